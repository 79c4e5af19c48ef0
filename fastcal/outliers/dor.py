"""DOR: dynamic outlier regularization of prompt tuning ("Understanding and Mitigating
Miscalibration in Prompt Tuning for Vision-Language Models", ICML 2025, arXiv 2410.02681; reference code
ml-stat-Sustech/Outlier-Calibration, not reachable here).

Prompt tuning moves the text features of words it never trains on, and that drift is what miscalibrates
the tuned model (overconfident new classes for CoOp). DOR anchors the text features of near-OOD outlier
words to where the frozen model put them::

    L = L_task + lambda * L_dor,     L_dor = 1 - (1/B) sum_b cos(t'_b, t_b)

where, for the epoch's ``B`` outliers ``o_b`` (``OutlierSampler`` draws them from the ``OutlierPool``),
``t'_b`` is the feature of ``o_b`` through the prompt being tuned (the learned context followed by the
outlier's tokens: ``PromptLearner.encode_terms``) and ``t_b`` its frozen zero-shot feature with the
dataset's template (the ``OutlierBank`` row). ``L_dor`` is ``fastcal.losses.outlier_drift_loss``.
``lambda`` = 8 for CoOp and 2 for the other methods (the paper's reported recipe, ``dor_weight``).

What the outliers go through is the method's to say (``PromptMethod.outlier_drift_pair``, from its
``term_features``):

- CoOp, KgCoOp, ProGrad: the learned context ``ctx`` (a class-specific context: the mean of the class
  contexts, since an outlier has no class);
- MaPLe, PromptSRC: the learned context and the deep text prompts, as their classes;
- CoCoOp: the batch's image-conditioned context ``ctx + mean_i meta_net(f_i)`` (CoCoOp trains with
  batch 1, where this is the image's own context); gradients reach the meta-net as well;
- TCP: the learned context with the class-aware tokens of the outlier's own frozen feature, ``TKE(t_b)``,
  injected like a class's;
- VPT: its text is frozen, so the term above is identically zero; fastcal's image-side variant (our
  construction, not the paper's code, which is not public for VPT) keeps each training image's
  similarity profile over the outliers where the frozen image encoder put it
  (``fastcal.methods.vpt.VPT.outlier_drift_pair``).

``lambda`` per base method (``dor_weight``): 8 for CoOp, 2 for the others (KgCoOp, MaPLe, TCP; VPT
takes the same 2), as the project's notes of the paper read; the paper's implementation details and
code could not be re-checked here.

``DORegularizer`` plugs into ``fastcal.runs.train`` as the ``"dor"`` regularizer (``build_dor`` is its
factory), so it combines with any loss, TCPT's calibrated loss included, and any method that supports it
(``PromptMethod.supports_outliers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcal._checks import check_choice, check_int, check_number, fail
from fastcal.outliers.sampling import DEFAULT_N_OUTLIERS, DEFAULT_TAU, OutlierSampler
from fastcal.outliers.selection import DEFAULT_POOL_SIZE, STRATEGIES, OutlierPool

DOR_WEIGHTS = {"coop": 8.0}
DEFAULT_DOR_WEIGHT = 2.0
OPTIONS = (
    "weight",
    "n_outliers",
    "pool_size",
    "tau",
    "uniform",
    "strategy",
    "vocabulary",
    "nltk_data",
    "oracle_classnames",
)


def dor_weight(method: str) -> float:
    """lambda per base method (module docstring): 8 for CoOp, 2 for the other methods."""
    return DOR_WEIGHTS.get(method, DEFAULT_DOR_WEIGHT)


def tuned_term_features(
    method: nn.Module,
    terms: Sequence[str],
    image_features: torch.Tensor | None = None,
    frozen_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, D)`` features of ``terms`` through ``method``'s tuned prompt (module docstring), with
    gradients to the tuned parameters."""
    if not getattr(method, "supports_outliers", False):
        raise fail("method", "a method with a tuned prompt DOR can regularize", type(method).__name__)
    return method.term_features(list(terms), image_features=image_features, frozen_features=frozen_features)


class DORegularizer:
    """``lambda * (1 - mean_b cos(t'_b, t_b))`` over the epoch's sampled outliers (module docstring).

    Args:
        pool: the outlier candidates with their frozen features (``fastcal.outliers.selection``).
        weight: lambda.
        n_outliers: outliers per epoch (the paper: 50-100; default 100).
        tau, uniform: the sampling weights ``exp(s / tau)`` or uniform (``OutlierSampler``).
        seed: the run's seed; the draw of epoch ``e`` depends only on ``(seed, e)``.
        device: where the frozen targets live (the tuned model's device).
        method: the method being tuned, when known (the trainer's factory passes it): the epoch's draw
            then also prepares the outliers' prompts (tokens, layout, the text encoder's plan, which
            reads their lengths on the host), so that the epoch's steps only run them.
    """

    name = "dor"

    def __init__(
        self,
        pool: OutlierPool,
        *,
        weight: float,
        n_outliers: int = DEFAULT_N_OUTLIERS,
        tau: float = DEFAULT_TAU,
        uniform: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        method: nn.Module | None = None,
    ) -> None:
        if not isinstance(pool, OutlierPool):
            raise TypeError(f"pool: expected an OutlierPool, got {type(pool).__name__}")
        self.pool = pool
        self.weight = check_number("weight", weight, minimum=0.0)
        self.sampler = OutlierSampler(pool.similarity, n_outliers, tau=tau, uniform=uniform, seed=seed)
        self.device = torch.device(device)
        self.method = method
        self.epoch: int | None = None
        self.terms: list[str] = []
        self.targets = torch.empty(0)

    def on_epoch_start(self, epoch: int) -> None:
        """Draw this epoch's outliers (the same for the same seed and epoch)."""
        indices = self.sampler.sample(epoch)
        self.epoch = epoch
        self.terms = [self.pool.terms[i] for i in indices.tolist()]
        self.targets = self.pool.features[indices].to(self.device, torch.float32)
        if self.method is not None:
            self.method.prepare_outliers(self.terms, self.targets)

    def drift(self, method: nn.Module, batch: Any = None) -> torch.Tensor:
        """The unweighted ``L_dor`` of the current outliers (epoch 0's when none were drawn yet): one minus
        the mean cosine of the rows of ``method.outlier_drift_pair``. ``batch``: the step's
        ``StepBatch`` (its images condition CoCoOp's context and drive VPT's variant); ``None``: no
        images."""
        from fastcal.losses import outlier_drift_loss

        if self.epoch is None:
            self.on_epoch_start(0)
        if not getattr(method, "supports_outliers", False):
            raise fail("method", "a method with a tuned prompt DOR can regularize", type(method).__name__)
        tuned, anchor = method.outlier_drift_pair(self.terms, self.targets, batch)
        if tuned.dtype in (torch.float16, torch.bfloat16):
            tuned = tuned.float()
        return outlier_drift_loss(tuned, anchor)

    def __call__(self, batch: Any) -> torch.Tensor:
        """``weight * L_dor`` for a training step (a ``fastcal.methods.objectives.StepBatch``)."""
        return self.weight * self.drift(batch.method, batch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        epoch = state.get("epoch")
        if epoch is not None:
            self.on_epoch_start(int(epoch))


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise fail("regularizer_options['dor']", "options among " + ", ".join(OPTIONS), unknown)
    values = dict(options)
    if "strategy" in values:
        check_choice("regularizer_options['dor']['strategy']", values["strategy"], STRATEGIES)
    for name in ("n_outliers", "pool_size"):
        if name in values:
            check_int(f"regularizer_options['dor'][{name!r}]", values[name], minimum=1)
    if "tau" in values:
        check_number("regularizer_options['dor']['tau']", values["tau"], minimum=0.0, strict_minimum=True)
    return values


def build_dor(setup: Any) -> DORegularizer:
    """The ``"dor"`` regularizer of ``fastcal.runs.train`` from its ``RegularizerSetup``.

    Options (``regularizer_options: {dor: {...}}``): ``weight`` (lambda; default ``dor_weight(method)``),
    ``n_outliers`` (100), ``pool_size`` (K, 5000), ``tau`` (0.1), ``uniform`` (False), ``strategy``
    (``"near"``, ``"far"``, ``"random"``, ``"oracle"``), ``vocabulary`` (``"wordnet"`` or a word-list
    file), ``nltk_data`` (where WordNet is, or goes), ``oracle_classnames`` (the new classes, for the
    oracle; default: the run's "new" evaluation group, ``setup.extras["eval_classnames"]["new"]``).
    The pool is built with the training classes and the dataset's hand-crafted template
    (``templates[0]``); bank and vocabulary are cached under the run's cache folder.
    """
    from fastcal._io import default_cache_dir
    from fastcal.outliers.selection import build_outlier_pool
    from fastcal.outliers.vocabulary import load_vocabulary

    options = _check_options(setup.options)
    if not setup.method.supports_outliers:
        raise fail("method", "a method whose tuned prompt DOR can regularize", setup.method_name)
    strategy = options.get("strategy", "near")
    cache_root = Path(setup.cache_dir) if setup.cache_dir is not None else default_cache_dir()
    vocabulary = None
    if strategy != "oracle":
        vocabulary = load_vocabulary(
            options.get("vocabulary", "wordnet"),
            nltk_data=options.get("nltk_data"),
            cache_dir=cache_root / "wordnet",
        )
    oracle = options.get("oracle_classnames", setup.extras.get("eval_classnames", {}).get("new"))
    pool = build_outlier_pool(
        setup.model,
        setup.tokenizer,
        setup.classnames,
        setup.templates[0],
        vocabulary=vocabulary,
        strategy=strategy,
        k=options.get("pool_size", DEFAULT_POOL_SIZE),
        seed=setup.seed,
        oracle_classnames=oracle,
        cache_dir=cache_root,
        progress=setup.progress,
        model_key=setup.model_key,
    )
    return DORegularizer(
        pool,
        weight=options.get("weight", dor_weight(setup.method_name)),
        n_outliers=options.get("n_outliers", DEFAULT_N_OUTLIERS),
        tau=options.get("tau", DEFAULT_TAU),
        uniform=bool(options.get("uniform", False)),
        seed=setup.seed,
        device=setup.device,
        method=setup.method,
    )
