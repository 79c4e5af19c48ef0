"""KgCoOp: knowledge-guided context optimization (Yao et al., CVPR 2023; github.com/htyao89/KgCoOp).

CoOp's model (``fastcal.methods.coop.CoOp``) trained with an extra term that keeps the learned class
features near the hand-crafted prompt's zero-shot features ``t0_c`` (the dataset's template, CoOp's
``CUSTOM_TEMPLATES``)::

    L = CE + w * (1 - mean_c cos(t_c, t0_c))    (= CE + w/2 * ``fastcal.losses.kgcoop_loss``)

The term is the ``"kgcoop"`` regularizer (``fastcal.methods.objectives.KnowledgeGuidance``, weight
``kgcoop_weight``), which every training step of a ``KgCoOp`` adds (``fastcal.methods.training_step``,
``fastcal train``), so it combines with any loss; the model is CoOp's.

Base-to-new recipe: htyao89/KgCoOp ``KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml`` with
``KgCoOp/scripts/base2new_train.sh``: ViT-B/16, 16 shots, context "a photo of a" (4 tokens), unified,
class token at the end, SGD lr 0.002, batch 128, 100 epochs, cosine after 1 constant warm-up epoch at
1e-5, w = 8.0 (the weight their scripts pass; the code's default is 1.0).
"""

from __future__ import annotations

from fastcal.methods.base import MethodSpec
from fastcal.methods.coop import PROMPT_OPTIONS, CoOp

KGCOOP_WEIGHT = 8.0

RECIPE = {
    "epochs": 100,
    "batch_size": 128,
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 4,
    "ctx_init": "a photo of a",
    "kgcoop_weight": KGCOOP_WEIGHT,
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): a short schedule.
TESTBED_RECIPE = {"epochs": 50, "batch_size": 16, "lr": 0.01}
SOURCE = (
    "htyao89/KgCoOp KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml and "
    "KgCoOp/scripts/base2new_train.sh (W=8.0)"
)


class KgCoOp(CoOp):
    """CoOp's model under KgCoOp's name, recipe and knowledge-guidance regularizer (module docstring)."""

    method_name = "kgcoop"


SPEC = MethodSpec(
    name="kgcoop",
    title="KgCoOp",
    build=KgCoOp,
    options=PROMPT_OPTIONS,
    recipe=RECIPE,
    source=SOURCE,
    testbed_recipe=TESTBED_RECIPE,
    regularizers=("kgcoop",),
)
