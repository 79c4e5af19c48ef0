"""ObjectNet (Barbu et al., NeurIPS 2019) as an out-of-distribution test set for ImageNet models.

The release unpacks to ``objectnet-1.0/images/<folder>/*.png`` and ``objectnet-1.0/mappings/`` under the
datasets root. Of its 313 classes, 113 overlap ImageNet-1k; an ImageNet model is scored on the images of
those classes, each class's logit being the maximum logit of the ImageNet classes it maps to, and every
image loses a 2-pixel border first (it carries a red frame). This is the protocol of WiSE-FT
(mlfoundations/wise-ft ``src/datasets/objectnet.py``), which FLYP and CaRot evaluate with. The class
mapping is read from the release's own files:

- ``folder_to_objectnet_label.json``: image folder -> ObjectNet class name;
- ``objectnet_to_imagenet_1k.json``: ObjectNet class name -> ``"; "``-separated ImageNet class names
  (the 113 overlapping classes);
- ``imagenet_to_label_2012_v2``: line ``i`` holds the ImageNet class name of 2012 id ``i``;
- ``pytorch_to_imagenet_2012_id.json``: ImageNet-1k index (sorted WordNet ids) -> 2012 id.

Classes are the mapped folders in sorted order, named by their lower-cased ObjectNet names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastcal.data.items import list_images
from fastcal.data.templates import dataset_templates
from fastcal.finetune.evaluate import EvalSet

FOLDER = "objectnet-1.0"
BORDER = 2


def crop_border(image):
    """The image without its outer ``BORDER`` pixels (ObjectNet's red frame)."""
    width, height = image.size
    return image.crop((BORDER, BORDER, width - BORDER, height - BORDER))


def load_objectnet(root: str | os.PathLike, imagenet_classnames: list[str]) -> EvalSet | None:
    """The ObjectNet evaluation set under ``root`` (None when ``root/objectnet-1.0`` is absent).

    ``imagenet_classnames`` are the 1,000 names the classifier scores (in ImageNet-1k index order).
    """
    base = Path(root) / FOLDER
    if not base.is_dir():
        return None
    mappings, images = base / "mappings", base / "images"
    for required in (
        mappings / "folder_to_objectnet_label.json",
        mappings / "objectnet_to_imagenet_1k.json",
        mappings / "imagenet_to_label_2012_v2",
        mappings / "pytorch_to_imagenet_2012_id.json",
        images,
    ):
        if not required.exists():
            raise FileNotFoundError(f"objectnet: expected {required}, not found (the release's layout)")
    folder_to_label = json.loads((mappings / "folder_to_objectnet_label.json").read_text())
    label_to_imagenet = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
    lines = (mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    pytorch_to_2012 = json.loads((mappings / "pytorch_to_imagenet_2012_id.json").read_text())
    index_of_2012 = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    index_of_name = {line.strip(): index_of_2012[i] for i, line in enumerate(lines) if i in index_of_2012}
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}

    folders = sorted(label_to_folder[label] for label in label_to_imagenet)
    classnames, columns, items = [], [], []
    for label_index, folder in enumerate(folders):
        label = folder_to_label[folder]
        names = label_to_imagenet[label].split("; ")
        columns.append(tuple(sorted(index_of_name[name] for name in names)))
        classnames.append(label.lower())
        items.extend((path, label_index) for path in list_images(images / folder))
    return EvalSet(
        "objectnet",
        classnames,
        dataset_templates("imagenet"),  # the ImageNet head's templates, in its order (one cache entry)
        items,
        scored_classnames=list(imagenet_classnames),
        columns=tuple(columns),
        image_preprocess=crop_border,
    )
