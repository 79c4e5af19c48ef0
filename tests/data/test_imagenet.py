"""ImageNet and its variants from tiny fake trees in CoOp's and TPT's layouts."""

import re

import open_clip
import pytest

from fastcal.data import load_dataset
from fastcal.data.imagenet import imagenet_classnames, imagenet_subset_indices, imagenet_wnids

# Golden (index, wnid, CLIP class name) triples of the standard ImageNet-1k class order.
GOLDEN = [
    (0, "n01440764", "tench"),
    (1, "n01443537", "goldfish"),
    (207, "n02099601", "Golden Retriever"),
    (281, "n02123045", "tabby cat"),
    (999, "n15075141", "toilet paper"),
]
WNIDS = ["n01440764", "n02099601", "n15075141"]


def fill(folder, names, make_image, per_class=2, ext=".JPEG"):
    seed = 0
    for name in names:
        for j in range(per_class):
            make_image(folder / name / f"img_{j}{ext}", seed=seed)
            seed += 1


def test_wnids_and_classnames_follow_the_standard_order():
    wnids, names = imagenet_wnids(), imagenet_classnames()
    assert len(wnids) == len(names) == 1000
    assert wnids == sorted(wnids)
    assert names == list(open_clip.IMAGENET_CLASSNAMES)
    for index, wnid, name in GOLDEN:
        assert (wnids[index], names[index]) == (wnid, name)
    assert imagenet_subset_indices([g[1] for g in GOLDEN]) == [g[0] for g in GOLDEN]
    with pytest.raises(ValueError, match="n99999999"):
        imagenet_subset_indices(["n99999999"])


def test_imagenet_coop_layout(tmp_path, make_image):
    fill(tmp_path / "imagenet" / "images" / "train", WNIDS, make_image, per_class=3)
    fill(tmp_path / "imagenet" / "images" / "val", WNIDS, make_image, per_class=2)
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 tench\n")
    (tmp_path / "imagenet" / "images" / "val" / WNIDS[0] / "notes.txt").write_text("not an image")
    data = load_dataset("imagenet", tmp_path)
    assert data.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert data.templates[0] == "a photo of a {}."
    assert [label for _, label in data.train] == [0] * 3 + [207] * 3 + [999] * 3
    assert [label for _, label in data.test] == [0] * 2 + [207] * 2 + [999] * 2
    assert data.val == []
    assert all(f"/val/{imagenet_wnids()[label]}/" in path for path, label in data.test)


def test_imagenet_tpt_layout_without_train(tmp_path, make_image):
    fill(tmp_path / "ImageNet" / "val", WNIDS[1:], make_image)
    data = load_dataset("imagenet", tmp_path)
    assert data.train == []
    assert [label for _, label in data.test] == [207, 207, 999, 999]


def test_imagenet_missing_lists_every_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("imagenet", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "imagenet" / "images" / "val") in message
    assert str(tmp_path / "ImageNet" / "val") in message


def test_imagenet_unknown_folder_is_refused(tmp_path, make_image):
    fill(tmp_path / "ImageNet" / "val", [*WNIDS, "not_a_wnid"], make_image)
    with pytest.raises(ValueError, match="not_a_wnid"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize(
    ("name", "coop_dir", "tpt_dir"),
    [
        ("imagenet_a", "imagenet-adversarial/imagenet-a", "imagenet-a"),
        ("imagenet_r", "imagenet-rendition/imagenet-r", "imagenet-r"),
    ],
)
@pytest.mark.parametrize("layout", ["coop", "tpt"])
def test_imagenet_a_and_r_subsets(tmp_path, make_image, name, coop_dir, tpt_dir, layout):
    folder = tmp_path / (coop_dir if layout == "coop" else tpt_dir)
    subset = ["n02123045", "n01443537", "n15075141"]
    fill(folder, subset, make_image, ext=".jpg")
    (folder / "README.txt").write_text("readme")
    data = load_dataset(name, tmp_path)
    # Classes are the folders in sorted (= ImageNet index) order, labelled 0..n-1.
    assert data.classnames == ["goldfish", "tabby cat", "toilet paper"]
    assert [label for _, label in data.test] == [0, 0, 1, 1, 2, 2]
    assert data.train == [] and data.val == []
    wnid_of = {0: "n01443537", 1: "n02123045", 2: "n15075141"}
    assert all(f"/{wnid_of[label]}/" in path for path, label in data.test)


def test_imagenet_v2_class_is_the_folder_number_not_its_sorted_position(tmp_path, make_image):
    folders = ["0", "1", "2", "10", "100", "999"]
    root = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    fill(root, folders, make_image, per_class=1, ext=".jpeg")
    data = load_dataset("imagenet_v2", tmp_path)
    labels = {path.split("/")[-2]: label for path, label in data.test}
    assert labels == {f: int(f) for f in folders}
    # ImageFolder's sorted listing would give "10" position 2 and "2" position 4.
    assert sorted(folders) == ["0", "1", "10", "100", "2", "999"]
    assert labels["10"] == 10 and labels["2"] == 2
    assert data.classnames[10] == open_clip.IMAGENET_CLASSNAMES[10]
    assert len(data.classnames) == 1000


def test_imagenet_v2_tpt_layout_and_bad_folders(tmp_path, make_image):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    fill(root, ["5", "1000"], make_image, per_class=1)
    with pytest.raises(ValueError, match=re.escape("['1000']")):
        load_dataset("imagenet_v2", tmp_path)
    (root / "1000" / "img_0.JPEG").unlink()
    (root / "1000").rmdir()
    data = load_dataset("imagenet_v2", tmp_path)
    assert [label for _, label in data.test] == [5]


@pytest.mark.parametrize("layout", ["imagenet-sketch/images", "ImageNet-Sketch"])
def test_imagenet_sketch_layouts(tmp_path, make_image, layout):
    fill(tmp_path / layout, WNIDS, make_image, per_class=1, ext=".png")
    data = load_dataset("imagenet_sketch", tmp_path)
    assert [label for _, label in data.test] == [0, 207, 999]
    assert len(data.classnames) == 1000 and data.classnames[207] == "Golden Retriever"
    image, label = data.dataset("test")[1]
    assert image.shape == (3, 3, 5) and label == 207


def test_variant_missing_names_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("imagenet_a", tmp_path)
    assert str(tmp_path / "imagenet-adversarial" / "imagenet-a") in str(err.value)
    assert str(tmp_path / "imagenet-a") in str(err.value)


def test_imagenet_family_templates_are_the_clip_ensemble(tmp_path, make_image):
    fill(tmp_path / "imagenet-r", WNIDS[:1], make_image, per_class=1)
    templates = load_dataset("imagenet_r", tmp_path).templates
    openai = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert templates[0] == "a photo of a {}."
    assert sorted(templates) == sorted(openai)
