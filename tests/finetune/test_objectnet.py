import json

from PIL import Image

from fastcal.finetune.objectnet import crop_border, load_objectnet


def _write_release(root):
    base = root / "objectnet-1.0"
    (base / "mappings").mkdir(parents=True)
    folders = {"air_freshener": "Air freshener", "banana": "Banana", "chair": "Chair", "toaster": "Toaster"}
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    # three of the four ObjectNet classes overlap "ImageNet" (here a 5-class stand-in)
    overlap = {"Banana": "banana", "Chair": "folding chair; rocking chair", "Toaster": "toaster"}
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(overlap))
    # 2012 ids: line i names the class of 2012 id i; the "pytorch" index order differs
    names_2012 = ["toaster", "banana", "folding chair", "rocking chair", "tench"]
    (base / "mappings" / "imagenet_to_label_2012_v2").write_text("\n".join(names_2012) + "\n")
    pytorch_to_2012 = {"0": 4, "1": 1, "2": 2, "3": 3, "4": 0}  # index 4 is "toaster"
    (base / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(pytorch_to_2012))
    for folder, count in (("air_freshener", 2), ("banana", 3), ("chair", 1), ("toaster", 2)):
        (base / "images" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10, 8), (i, 0, 0)).save(base / "images" / folder / f"{i}.png")


def test_objectnet_classes_columns_and_items(tmp_path):
    assert load_objectnet(tmp_path, ["x"]) is None
    _write_release(tmp_path)
    imagenet = ["tench", "banana", "folding chair", "rocking chair", "toaster"]
    eval_set = load_objectnet(tmp_path, imagenet)
    assert eval_set.name == "objectnet"
    assert eval_set.classnames == ["banana", "chair", "toaster"]
    assert eval_set.columns == ((1,), (2, 3), (4,))
    assert eval_set.classifier_classnames == imagenet
    labels = [label for _, label in eval_set.items]
    assert labels == [0, 0, 0, 1, 2, 2]
    assert all("air_freshener" not in str(path) for path, _ in eval_set.items)
    assert eval_set.image_preprocess is crop_border
    assert crop_border(Image.new("RGB", (10, 8))).size == (6, 4)
