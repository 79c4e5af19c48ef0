"""The settings of a prompt-tuning run (``fastcal train``): one flat ``Settings`` dataclass.

Precedence, lowest first (``fastcal.runs.options``): the field defaults below, the method's published
recipe (``MethodSpec.recipe``, for the fields left ``None`` here: schedule, batch, learning rate,
context length, ...; on the embedded testbed its short testbed schedule first) and the loss's defaults,
a YAML file (``--config FILE``), then the command line (``--lr 0.01``). Every value is checked against
the field's type; unknown keys are an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastcal import registry
from fastcal._checks import check_choice, check_device, check_int, check_number, fail
from fastcal.data.registry import DATASETS
from fastcal.data.templates import check_template
from fastcal.metrics.functional import MAX_BINS
from fastcal.runs.options import Settings, setting

PROTOCOLS = ("base2new", "all")
FROZEN_TEMPLATES = ("hard", "ensemble")
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "openai"
TESTBED_MODEL = "fastcal-testbed"
PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adam")
RANDOM_INIT = "none"
# Settings that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = ("output", "resume", "overwrite", "progress", "num_workers", "cache_dir", "device", "root")
SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr")
DEFAULT_OPTIMIZER = "sgd"


@dataclass
class TrainConfig(Settings):
    """Everything a training run depends on; ``None`` means "the method's recipe value". Optimization is
    SGD (Adam where the recipe says so: TCP) with a cosine schedule after a constant warm-up, as Dassl
    runs CoOp (``fastcal.runs.train.loop``)."""

    method: str = setting("coop", help="prompt method: " + ", ".join(registry.names("prompt_method")))
    loss: str = setting(
        "ce",
        help="ce, calibrated (TCPT's loss), label_smoothing, or a calibration baseline: mbls, "
        "confidence_penalty, focal, mdca, zs_norm, penalty",
    )
    dataset: str | None = setting(None, help="a fastcal dataset name (unset: the embedded testbed)")
    root: str | None = setting(None, help="the folder holding the dataset")
    shots: int = setting(16, help="training images per class")
    protocol: str = setting(
        "base2new", help="base2new (train on the base half of the classes, test base and new) or all"
    )
    seed: int = setting(1, help="few-shot draw, initialization and batch order")
    output: str | None = setting(None, help="the run folder")

    model: str | None = setting(
        None, help="open_clip architecture (unset: ViT-B-16 with a dataset, the testbed's own CLIP without)"
    )
    pretrained: str | None = setting(
        None, help="pretrained tag or checkpoint file (unset: openai; 'none': random initialization)"
    )
    precision: str = setting("fp32", help="model weights: fp32, fp16 or bf16")
    device: str = setting("auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    amp: bool = setting(True, help="fp16 autocast with a gradient scaler (CUDA only)")

    n_ctx: int | None = setting(None, help="context tokens (recipe)")
    ctx_init: str | None = setting(None, help="phrase the context starts from ('': random; recipe)")
    class_specific: bool = setting(False, help="one context per class (CoOp's CSC)")
    class_token_position: str = setting("end", help="class name position: end, middle or front")
    init_std: float = setting(0.02, help="std of a random context initialization")
    prompt_depth: int | None = setting(None, help="MaPLe, PromptSRC: text layers with prompts (recipe)")
    n_ctx_vision: int | None = setting(None, help="VPT, PromptSRC: visual prompt tokens (recipe)")
    vision_depth: int | None = setting(None, help="VPT, PromptSRC: layers with visual prompts (recipe)")
    text_template: str | None = setting(
        None,
        help="the fixed hand-crafted prompt of VPT (its classifier), ProGrad (its teacher; unset: the "
        "dataset's) and TCP (its class knowledge) (recipe)",
    )
    name_template: str | None = setting(
        None, help="TCP: the text after the context, {} the class name (recipe, per dataset)"
    )
    prograd_lambda: float | None = setting(
        None, help="ProGrad: share of the gradient's conflict with the zero-shot teacher removed (recipe)"
    )
    text_loss_weight: float | None = setting(None, help="PromptSRC: weight of the text L1 agreement (recipe)")
    image_loss_weight: float | None = setting(
        None, help="PromptSRC: weight of the image L1 agreement (recipe)"
    )
    gpa_mean: float | None = setting(None, help="PromptSRC: mean epoch of the prompt aggregation (recipe)")
    gpa_std: float | None = setting(None, help="PromptSRC: std (epochs) of the prompt aggregation (recipe)")
    inject_layer: int | None = setting(
        None, help="TCP: text layer before which the class-aware tokens enter (recipe)"
    )
    n_prompts: int | None = setting(None, help="ProDA: prompts in the distribution (recipe)")
    prompt_batch: int | None = setting(None, help="ProDA: prompts per training step (recipe)")
    diversity_weight: float | None = setting(None, help="ProDA: weight of the prompt diversity term (recipe)")

    margin_alpha: float = setting(0.1, help="calibrated loss: weight of the mean logit margin")
    margin_beta: float = setting(0.01, help="calibrated loss: weight of the margin variance")
    moment_weight: float = setting(5.0, help="calibrated loss: weight of the text moment matching")
    label_smoothing: float | None = setting(
        None, help="label smoothing epsilon (unset: 0.1 for the label_smoothing loss, else 0)"
    )
    mbls_margin: float = setting(10.0, help="mbls loss: the logit-gap margin")
    mbls_alpha: float = setting(0.1, help="mbls loss: weight of the margin penalty")
    confidence_penalty_weight: float = setting(0.1, help="confidence_penalty loss: weight of the entropy")
    focal_gamma: float = setting(3.0, help="focal loss: gamma")
    focal_adaptive: bool = setting(False, help="focal loss: FLSD-53's per-sample gamma (5 / 3 / gamma)")
    mdca_weight: float = setting(1.0, help="mdca loss: weight of MDCA added to CE")
    zeroshot_penalty_weight: float = setting(10.0, help="penalty loss: weight of the zero-shot range penalty")
    regularizers: list[str] = setting(
        default_factory=list,
        help="extra regularizers, comma-separated: " + ", ".join(registry.names("regularizer")),
        flags=("--regularizer",),
    )
    regularizer_options: dict[str, dict[str, Any]] = setting(
        default_factory=dict, help="YAML mapping of regularizer options, e.g. '{dor: {weight: 8}}'"
    )
    kgcoop_weight: float | None = setting(None, help="KgCoOp's weight w (recipe: 8)")
    frozen_templates: str = setting(
        "hard",
        help="zero-shot anchor of the calibrated loss and KgCoOp: hard (the dataset's prompt) or ensemble",
    )

    epochs: int | None = setting(None, help="training epochs (recipe)")
    batch_size: int | None = setting(None, help="batch size (recipe)")
    optimizer: str | None = setting(None, help="sgd or adam (recipe; unset there: sgd)")
    lr: float | None = setting(None, help="learning rate (recipe)")
    momentum: float | None = setting(None, help="SGD momentum (recipe)")
    weight_decay: float | None = setting(None, help="weight decay, added to the gradient (recipe)")
    adam_eps: float | None = setting(None, help="Adam's epsilon (recipe; unset: 1e-8)")
    warmup_epochs: int | None = setting(None, help="epochs at the constant warm-up rate (recipe)")
    warmup_lr: float | None = setting(None, help="warm-up learning rate (recipe)")

    augment: bool = setting(True, help="train on augmented views (else on the eval transform)")
    augment_epochs: int | None = setting(
        None, help="distinct augmented epochs cached for frozen-image methods (unset: fresh views each epoch)"
    )
    n_bins: int = setting(15, help="ECE bins")
    eval_batch_size: int = setting(256, help="evaluation batch size")
    num_workers: int = setting(0, help="data-loading processes", flags=("--workers",))
    resume: bool = setting(False, help="continue the run in --output from its last checkpoint")
    overwrite: bool = setting(False, help="replace the run --output holds (its files are removed)")
    progress: bool = setting(True, help="progress bars", negative="--quiet")
    cache_dir: str | None = setting(None, help="feature and weight caches (unset: $FASTCAL_CACHE)")

    # ---- checks and recipe -------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        check_choice("method", self.method, registry.names("prompt_method"))
        check_choice("loss", self.loss, registry.names("loss"))
        for name in self.regularizers:
            check_choice("regularizers", name, registry.names("regularizer"))
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_choice("frozen_templates", self.frozen_templates, FROZEN_TEMPLATES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.optimizer is not None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_device("device", self.device)
        self._check_model()
        check_int("shots", self.shots, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("n_bins", self.n_bins, minimum=1, maximum=MAX_BINS)
        check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        for name in (
            "n_ctx",
            "prompt_depth",
            "n_ctx_vision",
            "vision_depth",
            "n_prompts",
            "prompt_batch",
            "epochs",
            "batch_size",
        ):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=1)
        for name in ("warmup_epochs", "inject_layer"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=0)
        if self.augment_epochs is not None:
            check_int("augment_epochs", self.augment_epochs, minimum=1)
        for name in ("lr", "warmup_lr", "adam_eps", "gpa_std"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), minimum=0.0, strict_minimum=True)
        for name in (
            "momentum",
            "weight_decay",
            "kgcoop_weight",
            "margin_alpha",
            "margin_beta",
            "text_loss_weight",
            "image_loss_weight",
            "diversity_weight",
        ):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), minimum=0.0)
        for name in (
            "moment_weight",
            "mbls_margin",
            "mbls_alpha",
            "confidence_penalty_weight",
            "focal_gamma",
            "mdca_weight",
            "zeroshot_penalty_weight",
        ):
            check_number(name, getattr(self, name), minimum=0.0)
        for name in ("text_template", "name_template"):
            if getattr(self, name) is not None:
                check_template(name, getattr(self, name))
        if self.prograd_lambda is not None:
            check_number("prograd_lambda", self.prograd_lambda, minimum=0.0, maximum=1.0)
        check_number("init_std", self.init_std, minimum=0.0, strict_minimum=True)
        if self.label_smoothing is not None:
            check_number("label_smoothing", self.label_smoothing, minimum=0.0, maximum=1.0)
        if self.dataset is not None:
            check_choice("dataset", self.dataset, DATASETS)
            if self.root is None:
                raise fail("root", "the dataset folder with --dataset", "none")
        for name in self.regularizer_options:
            if name not in self.regularizers:
                raise fail(
                    "regularizer_options", f"options only for listed regularizers {self.regularizers}", name
                )
        return self

    def _check_model(self) -> None:
        if self.dataset is None:
            if self.model not in (None, TESTBED_MODEL):
                raise fail(
                    "model", f"none with the embedded testbed (it brings {TESTBED_MODEL})", repr(self.model)
                )
            if self.pretrained is not None:
                raise fail(
                    "pretrained",
                    "none with the embedded testbed (it brings its weights)",
                    repr(self.pretrained),
                )
            return
        if self.model is not None and not self.model.startswith(("local-dir:", "hf-hub:")):
            import open_clip

            if open_clip.get_model_config(self.model.replace("/", "-")) is None:
                raise fail("model", "an open_clip architecture (open_clip.list_models())", repr(self.model))

    def resolved(self) -> TrainConfig:
        """This config with the method's recipe filling every ``None`` it has a value for (its values for
        the dataset first, or on the embedded testbed its testbed schedule), and the loss's defaults."""
        from fastcal.methods.base import get_method
        from fastcal.methods.objectives import loss_options

        spec = get_method(self.method)
        values = self.to_dict()
        recipe = dict(spec.recipe)
        if self.dataset is None:
            recipe.update(spec.testbed_recipe)
        else:
            recipe.update(spec.dataset_recipes.get(self.dataset, {}))
        for key, value in recipe.items():
            if values.get(key) is None:
                values[key] = value
        values["optimizer"] = values["optimizer"] or DEFAULT_OPTIMIZER
        if self.dataset is None:
            values["model"] = TESTBED_MODEL
        else:
            values["model"] = values["model"] or DEFAULT_MODEL
            if values["pretrained"] is None and not values["model"].startswith(("local-dir:", "hf-hub:")):
                values["pretrained"] = DEFAULT_PRETRAINED
        values.update(loss_options(self.loss, values))
        for key in SCHEDULE_KEYS:
            if values[key] is None:
                raise fail(key, f"a value (the {self.method} recipe has none)", None)
        return TrainConfig.from_dict(values)
