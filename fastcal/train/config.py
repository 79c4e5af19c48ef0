"""The run configuration: one flat dataclass, filled from defaults, a method's recipe, YAML and overrides.

Precedence, lowest first: the field defaults below, the method's published recipe (``MethodSpec.recipe``,
for the fields left ``None`` here: schedule, batch, learning rate, context length, ...), a YAML file
(``--config FILE``), then ``key=value`` overrides (``--lr=0.01``). Every value is checked against the
field's type; unknown keys are an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcal._checks import check_choice, check_device, check_int, check_number, fail
from fastcal.data.registry import DATASETS
from fastcal.metrics.functional import MAX_BINS

LOSSES = ("ce", "calibrated", "label_smoothing")
PROTOCOLS = ("base2new", "all")
FROZEN_TEMPLATES = ("hard", "ensemble")
DEFAULT_LABEL_SMOOTHING = 0.1
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "openai"
TESTBED_MODEL = "fastcal-testbed"
PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_INIT = "none"
# Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = ("output", "resume", "progress", "num_workers", "cache_dir", "device", "root")


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the method's recipe value".

    Data and protocol: ``dataset`` (a ``fastcal.data.DATASETS`` name; ``None`` = the embedded testbed),
    ``root``, ``shots`` per class, ``protocol`` (``"base2new"``: train on the base half of the classes,
    test on base and new; ``"all"``: train and test on every class), ``seed`` (few-shot draw,
    initialization, batch order).

    Model: ``model`` / ``pretrained`` (an open_clip architecture, default ViT-B-16, and a pretrained tag
    or checkpoint file, default ``"openai"``, ``"none"`` for a random initialization; on the testbed
    both stay unset: it brings its own CLIP, recorded as ``fastcal-testbed``), ``precision``
    (``fp32``, ``fp16``, ``bf16``), ``device`` (``"auto"``: CUDA when available), ``amp`` (fp16
    autocast with a gradient scaler, on CUDA only).

    Method: ``method`` and its options (``n_ctx``, ``ctx_init`` (``""``: random initialization),
    ``class_specific``, ``class_token_position``, ``init_std``; MaPLe's ``prompt_depth``; VPT's
    ``n_ctx_vision``, ``vision_depth`` and ``text_template``).

    Objective: ``loss`` (``"ce"``, ``"calibrated"``: seed 000's ``CalibratedPromptLoss`` with
    ``margin_alpha``, ``margin_beta``, ``moment_weight``; ``"label_smoothing"``), ``label_smoothing``
    (default 0.1 for that loss, 0 otherwise), ``regularizers`` (added to the method's own, e.g.
    ``["dor"]``) with ``regularizer_options`` (``{name: {option: value}}``), ``kgcoop_weight``,
    ``frozen_templates`` (the zero-shot class features that the calibrated loss and KgCoOp hold the
    tuned features to: ``"hard"`` = the dataset's hand-crafted prompt, ``"ensemble"`` = all templates).

    Optimization (SGD, cosine schedule after a constant warm-up, as Dassl runs CoOp): ``epochs``,
    ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``warmup_epochs``, ``warmup_lr``.

    Features: ``augment`` (train on augmented views; else on the eval transform), ``augment_epochs``
    (how many distinct augmented epochs are cached for frozen-image methods; epoch ``e`` reads views
    ``e % augment_epochs``; ``None`` = a fresh set of views every epoch, as the reference code).

    Output: ``output`` (run folder), ``n_bins`` (ECE bins), ``eval_batch_size``, ``resume``,
    ``progress``, ``cache_dir`` (feature and weight caches; default ``$FASTCAL_CACHE``).
    """

    method: str = "coop"
    loss: str = "ce"
    dataset: str | None = None
    root: str | None = None
    shots: int = 16
    protocol: str = "base2new"
    seed: int = 1
    output: str | None = None

    model: str | None = None
    pretrained: str | None = None
    precision: str = "fp32"
    device: str = "auto"
    amp: bool = True

    n_ctx: int | None = None
    ctx_init: str | None = None
    class_specific: bool = False
    class_token_position: str = "end"
    init_std: float = 0.02
    prompt_depth: int | None = None
    n_ctx_vision: int | None = None
    vision_depth: int | None = None
    text_template: str | None = None

    margin_alpha: float = 0.1
    margin_beta: float = 0.01
    moment_weight: float = 5.0
    label_smoothing: float | None = None
    regularizers: list[str] = field(default_factory=list)
    regularizer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    kgcoop_weight: float | None = None
    frozen_templates: str = "hard"

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None

    augment: bool = True
    augment_epochs: int | None = None
    n_bins: int = 15
    eval_batch_size: int = 256
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    cache_dir: str | None = None

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_sources(
        cls, *, yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """Defaults < YAML file < overrides (values already typed, or strings parsed as YAML scalars)."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path))
        values.update(overrides or {})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        hints = typing.get_type_hints(cls)
        known = set(cls.field_names())
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise fail("config key", "one of " + ", ".join(sorted(known)), repr(key))
            kwargs[name] = coerce(name, value, hints[name])
        return cls(**kwargs).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ---- checks and recipe -------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        from fastcal.methods.base import METHOD_MODULES

        check_choice("method", self.method, METHOD_MODULES)
        check_choice("loss", self.loss, LOSSES)
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_choice("frozen_templates", self.frozen_templates, FROZEN_TEMPLATES)
        check_choice("precision", self.precision, PRECISIONS)
        check_device("device", self.device)
        self._check_model()
        check_int("shots", self.shots, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("n_bins", self.n_bins, minimum=1, maximum=MAX_BINS)
        check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        for name in ("n_ctx", "prompt_depth", "n_ctx_vision", "vision_depth", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=1)
        for name in ("warmup_epochs",):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=0)
        if self.augment_epochs is not None:
            check_int("augment_epochs", self.augment_epochs, minimum=1)
        for name in ("lr", "warmup_lr"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), minimum=0.0, strict_minimum=True)
        for name in ("momentum", "weight_decay", "kgcoop_weight", "margin_alpha", "margin_beta"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), minimum=0.0)
        check_number("moment_weight", self.moment_weight, minimum=0.0)
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
        """This config with the method's recipe filling every ``None`` it has a value for (on the
        embedded testbed, the method's testbed schedule first)."""
        from fastcal.methods.base import get_method

        spec = get_method(self.method)
        values = self.to_dict()
        recipe = dict(spec.recipe)
        if self.dataset is None:
            recipe.update(spec.testbed_recipe)
        for key, value in recipe.items():
            if values.get(key) is None:
                values[key] = value
        if self.dataset is None:
            values["model"] = TESTBED_MODEL
        else:
            values["model"] = values["model"] or DEFAULT_MODEL
            if values["pretrained"] is None and not values["model"].startswith(("local-dir:", "hf-hub:")):
                values["pretrained"] = DEFAULT_PRETRAINED
        if values["label_smoothing"] is None:
            values["label_smoothing"] = DEFAULT_LABEL_SMOOTHING if self.loss == "label_smoothing" else 0.0
        for key in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr"):
            if values[key] is None:
                raise fail(key, f"a value (the {self.method} recipe has none)", None)
        return TrainConfig.from_dict(values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of config keys (a missing file or a non-mapping is an error naming the path)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: expected a YAML file, got {path}, which does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise fail("config", f"a YAML mapping in {path}", f"invalid YAML{line} ({problem})") from None
    if not isinstance(loaded, dict):
        raise fail("config", f"a YAML mapping of keys to values in {path}", type(loaded).__name__)
    return loaded


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (``3`` -> int, ``1e-3`` -> float, ``none`` -> None, lists)."""
    import yaml

    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    # YAML 1.1 reads "1e-3" (no dot) as a string.
    try:
        float(text)
    except ValueError:
        return False
    return True


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint`` (strings parsed as YAML scalars), or a ValueError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in args:
            return None
        return coerce(name, value, inner[0])
    if isinstance(value, str) and hint is not str:
        value = parse_scalar(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail(name, "true or false", repr(value))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail(name, "an integer", repr(value))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(name, "a number", repr(value))
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail(name, "a string", repr(value))
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise fail(name, "a list", repr(value))
        return [coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(name, "a mapping", repr(value))
        return {str(k): coerce(f"{name}[{k!r}]", v, args[1]) for k, v in value.items()}
    if hint is Any:
        return value
    raise TypeError(f"{name}: unsupported config type {hint!r}")
