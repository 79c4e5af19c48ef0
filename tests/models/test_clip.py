import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastcal.models import LoadedClip, WeightsNotFoundError, load_clip

REPO_ROOT = Path(__file__).resolve().parents[2]


def _outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=24)(["a dog", "a photo of a small cat.", "x"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _assert_same_outputs(a, b):
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


def test_random_init_gives_eval_model_tokenizer_and_transforms(tiny_name):
    loaded = load_clip(tiny_name)
    assert isinstance(loaded, LoadedClip)
    model, tokenizer, train_transform, eval_transform = loaded
    assert isinstance(model, open_clip.CLIP) and not model.training
    assert tokenizer(["a photo of a dog."]).shape == (1, 24)
    image = Image.fromarray((torch.rand(50, 70, 3) * 255).to(torch.uint8).numpy())
    assert eval_transform(image).shape == (3, 32, 32)
    assert train_transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize("layout", ["state_dict.pt", "open_clip_checkpoint.pt", "weights.safetensors"])
def test_local_checkpoint_reloads_identical_model(tiny_name, tmp_path, layout):
    torch.manual_seed(123)
    original = load_clip(tiny_name).model
    state = original.state_dict()
    path = tmp_path / layout
    if layout == "state_dict.pt":
        torch.save(state, path)
    elif layout == "open_clip_checkpoint.pt":  # what open_clip's trainer writes (DDP prefix included)
        torch.save(
            {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path
        )
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(456)
    reloaded = load_clip(tiny_name, path).model
    _assert_same_outputs(original, reloaded)
    torch.manual_seed(456)
    fresh = load_clip(tiny_name).model
    assert not torch.equal(_outputs(fresh)[1], _outputs(original)[1])


def test_local_dir_with_checkpoint_loads_it(tiny_source, tmp_path):
    source = tiny_source()
    original = load_clip(source).model
    folder = Path(source.removeprefix("local-dir:"))
    torch.save(original.state_dict(), folder / "open_clip_pytorch_model.bin")
    torch.manual_seed(7)
    _assert_same_outputs(original, load_clip(source).model)


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_name, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.randn(2, 3, 4, 4)}, path)
    with pytest.raises(ValueError, match=r"pretrained: expected an open_clip checkpoint of .*other\.pt"):
        load_clip(tiny_name, path)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_casts_weights_and_keeps_layer_norms_fp32(tiny_name, precision, dtype):
    model = load_clip(tiny_name, precision=precision).model
    assert model.transformer.resblocks[0].mlp.c_fc.weight.dtype == dtype
    assert model.ln_final.weight.dtype == torch.float32
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=24)(["a photo of a dog."])
    with torch.no_grad():
        features = model.encode_text(tokens)
    assert features.dtype == dtype and torch.isfinite(features.float()).all()


def test_unknown_model_name_says_where_names_are_listed():
    with pytest.raises(
        ValueError, match=r"name: expected .*open_clip\.list_models\(\).*ViT-B-32.*got 'ViT-B-33'"
    ):
        load_clip("ViT-B-33")


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(
        ValueError, match=r"pretrained: expected a pretrained tag of ViT-B-32 \(one of openai, "
    ):
        load_clip("ViT-B-32", "not-a-tag")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="precision: expected one of 'fp32', 'fp16', 'bf16', got 'fp64'"):
        load_clip("ViT-B-32", precision="fp64")
    with pytest.raises(ValueError, match="pretrained: expected None with 'local-dir:"):
        load_clip("local-dir:/nowhere", pretrained="openai")
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        load_clip("local-dir:/nowhere")


def test_missing_checkpoint_path_names_the_file(tmp_path):
    missing = tmp_path / "weights" / "clip.pt"
    with pytest.raises(WeightsNotFoundError, match=f"checkpoint file {missing} does not exist"):
        load_clip("ViT-B-32", missing)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_clip("ViT-B-32", str(missing))


def test_offline_tag_not_in_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B-32", "openai", cache_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors" in message
    assert str(tmp_path) in message and "HF_HUB_OFFLINE" in message
    assert "pretrained='/path/to/open_clip_model.safetensors'" in message


def _write_hf_cache(cache, repo_id, filename, tensors):
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(tensors, str(snapshot / filename))


def test_tag_is_read_from_the_local_hf_cache_with_the_tags_settings(tiny_name, tmp_path, monkeypatch):
    tag = {
        "hf_hub": "fastcal-test/tiny-clip/",
        "quick_gelu": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25,) * 3,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_name, {"testtag": tag})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = open_clip.create_model(tiny_name, force_quick_gelu=True)
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    _write_hf_cache(tmp_path, "fastcal-test/tiny-clip", "open_clip_model.safetensors", state)

    model, _, _, eval_transform = load_clip(tiny_name, "testtag", cache_dir=tmp_path)
    _assert_same_outputs(original.eval(), model)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    normalize = eval_transform.transforms[-1]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.25, 0.25, 0.25)


def test_hf_hub_name_is_read_from_the_local_cache(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match=r"fastcal-test/hub-clip/open_clip_config\.json"):
        load_clip("hf-hub:fastcal-test/hub-clip", cache_dir=tmp_path)
    source = tiny_source()
    original = load_clip(source).model
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    _write_hf_cache(tmp_path, "fastcal-test/hub-clip", "open_clip_model.safetensors", state)
    with pytest.raises(WeightsNotFoundError, match=r"fastcal-test/hub-clip/open_clip_config\.json"):
        load_clip("hf-hub:fastcal-test/hub-clip", cache_dir=tmp_path)
    (snapshot,) = tmp_path.glob("models--fastcal-test--hub-clip/snapshots/*")
    config = Path(source.removeprefix("local-dir:")) / "open_clip_config.json"
    (snapshot / "open_clip_config.json").write_text(config.read_text())
    model, tokenizer, _, _ = load_clip("hf-hub:fastcal-test/hub-clip", cache_dir=tmp_path)
    _assert_same_outputs(original, model)
    assert tokenizer(["a dog"]).shape == (1, 24)


_UNREACHABLE_SCRIPT = textwrap.dedent(
    """
    import time
    from fastcal.models import WeightsNotFoundError, load_clip
    start = time.monotonic()
    try:
        load_clip("ViT-B-32", "openai")
    except WeightsNotFoundError as e:
        print("ERROR:", e)
    print("SECONDS:", time.monotonic() - start)
    """
)


def test_unreachable_hub_is_probed_once_without_retries(tmp_path):
    """Online mode, endpoint that accepts connections and never answers: one probe, then the error."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted, request_lines = [], []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection = server.accept()[0]
            except TimeoutError:
                continue
            accepted.append(connection)
            connection.settimeout(1.0)
            try:
                request_lines.append(connection.recv(4096).split(b"\r\n")[0].decode())
            except TimeoutError:
                request_lines.append("")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS_"))
    }
    env.update(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HOME=str(tmp_path / "hf"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", _UNREACHABLE_SCRIPT],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()
    assert result.returncode == 0, result.stderr
    assert "ERROR: pretrained weights for ViT-B-32 'openai' not found" in result.stdout
    assert "the Hub could not be reached" in result.stdout
    # huggingface_hub itself fetches its agent registry once per process (3 s timeout, no retry);
    # the weights are probed exactly once.
    weight_requests = [line for line in request_lines if "vit_base_patch32_clip_224.openai" in line]
    assert len(weight_requests) == 1, request_lines
    assert len(request_lines) <= 2, request_lines
