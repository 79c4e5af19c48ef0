import hashlib
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

import fastcal.models.cache as cache_module
from fastcal.models import TextEncoder, load_clip, model_fingerprint, transform_fingerprint
from fastcal.models.cache import class_text_features, image_features


class TinyImages(Dataset):
    """Follows fastcal's dataset protocol: ``(image, label)``, ``classnames``, ``labels``,
    ``fingerprint()`` (a digest of the pixels)."""

    def __init__(self, n=11, transform=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.rand(n, 3, 40, 40, generator=g)
        self.classnames = ["zero", "one", "two"]
        self.labels = [i % 3 for i in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.pixels[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def fingerprint(self):
        return hashlib.sha256(self.pixels.numpy().tobytes()).hexdigest()


EVAL = transforms.CenterCrop(32)
TRAIN = transforms.Compose(
    [transforms.RandomResizedCrop(32, antialias=True), transforms.RandomHorizontalFlip()]
)


class CountingEncoder:
    """``model.encode_image`` that counts the images it encodes."""

    def __init__(self, model):
        self.model = model
        self.images = 0

    def __call__(self, images):
        self.images += images.shape[0]
        return self.model.encode_image(images)


@pytest.fixture
def tiny(tiny_source):
    torch.manual_seed(0)
    return load_clip(tiny_source())


def _features(encoder, dataset, cache_dir, epoch=None, transform=EVAL, **kwargs):
    return image_features(
        encoder,
        dataset,
        model_key=model_fingerprint(encoder.model),
        transform_key=transform_fingerprint(transform),
        epoch=epoch,
        cache_dir=cache_dir,
        batch_size=4,
        progress=False,
        **kwargs,
    )


def test_round_trip_encodes_once_and_returns_the_encoders_features(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    dataset = TinyImages(transform=EVAL)
    features, labels = _features(encoder, dataset, tmp_path)
    assert encoder.images == len(dataset)
    with torch.no_grad():
        expected = tiny.model.encode_image(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-6)
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == dataset.labels
    again, again_labels = _features(encoder, dataset, tmp_path)
    assert encoder.images == len(dataset)  # served from the file
    assert torch.equal(again, features) and torch.equal(again_labels, labels)


def _mapped_files(tensor):
    """Files whose mapping in this process contains the tensor's data (Linux /proc/self/maps)."""
    address = tensor.data_ptr()
    files = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        begin, end = (int(x, 16) for x in fields[0].split("-"))
        if begin <= address < end and len(fields) == 6:
            files.append(Path(fields[5].strip()))
    return files


def test_loaded_features_are_memory_mapped_from_the_cache_file(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    features, labels = _features(encoder, TinyImages(transform=EVAL), tmp_path)
    (cache_file,) = (tmp_path / "image_features").glob("*.safetensors")
    assert _mapped_files(features) == [cache_file.resolve()]
    assert _mapped_files(labels) == [cache_file.resolve()]


def _flip_bytes(path, count=8):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[-1 - 4 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_file_is_recomputed(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    dataset = TinyImages(transform=EVAL)
    features, _ = _features(encoder, dataset, tmp_path)
    expected = features.clone()
    (cache_file,) = (tmp_path / "image_features").glob("*.safetensors")
    _flip_bytes(cache_file)
    with pytest.warns(UserWarning, match="stale or corrupt"):
        recomputed, _ = _features(encoder, dataset, tmp_path)
    assert encoder.images == 2 * len(dataset)
    torch.testing.assert_close(recomputed, expected, atol=0, rtol=0)


def test_changed_weights_or_transform_or_data_are_recomputed(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    dataset = TinyImages(transform=EVAL)
    before, _ = _features(encoder, dataset, tmp_path)
    with torch.no_grad():
        tiny.model.visual.proj.mul_(1.5)
    after, _ = _features(encoder, dataset, tmp_path)
    assert encoder.images == 2 * len(dataset)
    torch.testing.assert_close(after, 1.5 * before, atol=1e-5, rtol=1e-5)

    crop28 = transforms.Compose([transforms.CenterCrop(28), transforms.Resize(32, antialias=True)])
    _features(encoder, TinyImages(transform=crop28), tmp_path, transform=crop28)
    _features(encoder, TinyImages(transform=EVAL, seed=1), tmp_path)
    assert encoder.images == 4 * len(dataset)
    assert len(list((tmp_path / "image_features").glob("*.safetensors"))) == 4


def test_augmented_epochs_are_reproducible_and_differ(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    dataset = TinyImages(transform=TRAIN)
    epoch0, _ = _features(encoder, dataset, tmp_path / "a", epoch=0, transform=TRAIN)
    epoch1, _ = _features(encoder, dataset, tmp_path / "a", epoch=1, transform=TRAIN)
    assert not torch.allclose(epoch0, epoch1, atol=1e-3)
    # Recomputed from scratch (fresh cache), other batch size, caller's RNG in another state: same views.
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    repeat = image_features(
        encoder,
        dataset,
        model_key=model_fingerprint(tiny.model),
        transform_key=transform_fingerprint(TRAIN),
        epoch=0,
        cache_dir=tmp_path / "b",
        batch_size=3,
        progress=False,
    )[0]
    assert encoder.images == 3 * len(dataset)
    torch.testing.assert_close(repeat, epoch0, atol=1e-6, rtol=1e-6)
    # The caller's generators are left exactly as they were.
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert np.array_equal(np.random.get_state()[1], state[2])


def test_image_features_validates_its_arguments(tiny, tmp_path):
    encoder = CountingEncoder(tiny.model)
    with pytest.raises(ValueError, match=r"dataset: expected a dataset with a fingerprint\(\) method"):
        image_features(encoder, [(torch.zeros(3, 32, 32), 0)], model_key="m", transform_key="t")
    with pytest.raises(ValueError, match="model_key: expected a non-empty string"):
        image_features(encoder, TinyImages(), model_key="", transform_key="t", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="epoch: expected an integer >= 0"):
        image_features(encoder, TinyImages(), model_key="m", transform_key="t", epoch=-1, cache_dir=tmp_path)


CLASSNAMES = ["zero", "one", "two", "great white shark", "seven"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of a {}."]


def test_class_text_features_are_clips_prompt_ensemble(tiny, tmp_path):
    model, tokenizer = tiny.model, tiny.tokenizer
    features = class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    with torch.no_grad():
        per_template = [
            F.normalize(model.encode_text(tokenizer([t.format(c) for c in CLASSNAMES])), dim=-1)
            for t in TEMPLATES
        ]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    assert features.shape == (len(CLASSNAMES), 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    hard = class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES[0], cache_dir=tmp_path)
    torch.testing.assert_close(hard, per_template[0], atol=1e-5, rtol=0)


def test_class_text_features_are_cached_per_model_and_templates(tiny, tmp_path, monkeypatch):
    calls = []

    class CountingTextEncoder(TextEncoder):
        def encode(self, token_ids):
            calls.append(token_ids.shape[0])
            return super().encode(token_ids)

    monkeypatch.setattr(cache_module, "TextEncoder", CountingTextEncoder)
    model, tokenizer = tiny.model, tiny.tokenizer
    first = class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path, batch_size=2)
    assert sum(calls) == len(CLASSNAMES) * len(TEMPLATES) and max(calls) == 2
    second = class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert sum(calls) == len(CLASSNAMES) * len(TEMPLATES) and torch.equal(first, second)
    class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES[:2], cache_dir=tmp_path)
    with torch.no_grad():
        model.transformer.resblocks[1].mlp.c_proj.weight.add_(0.1 * torch.randn(64, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new key is a new file, not a stale one
        changed = class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert sum(calls) == len(CLASSNAMES) * (len(TEMPLATES) + 2 + len(TEMPLATES))
    assert not torch.allclose(changed, first, atol=1e-4)
    # a caller's model_key is the key: the fingerprint finds the file, another key is another file
    calls.clear()
    keyed = class_text_features(
        model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path, model_key=model_fingerprint(model)
    )
    assert calls == [] and torch.equal(keyed, changed)
    class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path, model_key="other")
    assert sum(calls) == len(CLASSNAMES) * len(TEMPLATES)
    with pytest.raises(ValueError, match="model_key: expected a non-empty string"):
        class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path, model_key="")


def test_class_text_features_default_cache_dir_and_validation(tiny, cache_dir):
    model, tokenizer = tiny.model, tiny.tokenizer
    class_text_features(model, tokenizer, CLASSNAMES, TEMPLATES[0])
    assert len(list((cache_dir / "features" / "class_text_features").glob("*.safetensors"))) == 1
    with pytest.raises(ValueError, match="templates: expected a template string"):
        class_text_features(model, tokenizer, CLASSNAMES, ["no placeholder"])
    with pytest.raises(ValueError, match="classnames: expected a non-empty list of strings"):
        class_text_features(model, tokenizer, [], TEMPLATES)
