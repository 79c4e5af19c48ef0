"""FPP: data-free, flatness-aware pretraining of the TPT context (github.com/YonseiML/fpp,
``fpp_classification.py`` ``init_prompts``).

Once per class set, before any test sample, with no data: the context is re-drawn from
N(0, ``init_std``^2) and trained for ``steps`` AdamW steps (lr cosine-annealed from ``lr`` to ``min_lr``,
torch's ``CosineAnnealingLR``) on::

    L = L_align + L_flat
    L_align = mean_{c, d} (t_cd - t0_cd)^2 * D
    L_flat  = -w * mean_{j, c} cos(t_c, t~_jc),       w = 1 + 15 / C (or a given weight)

where ``t = normalize(f_text(prompts(ctx)))`` are the class text features, ``t0`` those of the
hand-crafted prompt (the learner's phrase, "a photo of a"), and ``t~_j`` (no gradient) those of the
same prompts with Gaussian noise ``n_j`` added to every token embedding, one draw per ``j`` shared by all
classes: std ``ctx_noise`` on the context tokens and ``token_noise`` on the others (start, class name,
".", end). TPT or C-TPT then starts from, and resets to, the pretrained context.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcal._checks import check_int, check_number, check_tensor, fail
from fastcal.methods.prompt_learner import PromptLearner

FPP_INIT_STD = 0.141421
FPP_CTX_NOISE = 0.0707105
FPP_TOKEN_NOISE = 0.141421
# The flatness weight of the reference's distribution-shift runs (FPP_DS.sh: --FL_lambda 1.25).
FPP_SHIFT_WEIGHT = 1.25


@dataclass(frozen=True)
class FPPConfig:
    """FPP's pretraining (defaults: the reference's).

    Attributes:
        steps: AdamW steps (1,000).
        lr, min_lr: cosine annealing from ``lr`` to ``min_lr`` over ``steps``.
        weight_decay: AdamW weight decay (torch's default, as in the reference).
        n_noise: noise draws per step.
        init_std: std of the random initial context.
        ctx_noise: noise std on the context tokens.
        token_noise: noise std on the other tokens.
        flatness_weight: ``w``; ``None`` gives ``1 + 15 / C`` (their distribution-shift runs use 1.25).
        seed: seeds the initial context and the noise.
    """

    steps: int = 1000
    lr: float = 1e-2
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    n_noise: int = 4
    init_std: float = FPP_INIT_STD
    ctx_noise: float = FPP_CTX_NOISE
    token_noise: float = FPP_TOKEN_NOISE
    flatness_weight: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, minimum=0)
        check_int("n_noise", self.n_noise, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_number("lr", self.lr, minimum=0.0)
        check_number("min_lr", self.min_lr, minimum=0.0)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        check_number("init_std", self.init_std, minimum=0.0)
        check_number("ctx_noise", self.ctx_noise, minimum=0.0)
        check_number("token_noise", self.token_noise, minimum=0.0)
        if self.flatness_weight is not None:
            check_number("flatness_weight", self.flatness_weight)


def flatness_weight(num_classes: int, weight: float | None = None) -> float:
    """FPP's ``w``: ``weight`` when given, else ``1 + 15 / num_classes``."""
    check_int("num_classes", num_classes, minimum=1)
    return float(weight) if weight is not None else 1.0 + 15.0 / num_classes


def prompt_noise(
    learner: PromptLearner, n_noise: int, ctx_noise: float, token_noise: float, generator: torch.Generator
) -> torch.Tensor:
    """``n_noise`` draws of noise for the prompt embeddings, ``(n_noise, 1, T, W)`` (shared by the classes):
    std ``ctx_noise`` at the context positions, ``token_noise`` elsewhere."""
    if learner.class_token_position != "end":
        raise fail(
            "learner",
            "class_token_position 'end' (the context at positions 1..n_ctx)",
            learner.class_token_position,
        )
    length = learner.token_ids.shape[1]
    std = torch.full((length, 1), float(token_noise))
    std[1 : 1 + learner.n_ctx] = float(ctx_noise)
    noise = torch.randn(n_noise, 1, length, learner.ctx_dim, generator=generator) * std
    return noise.to(learner.token_prefix.device)


def fpp_losses(
    text_features: torch.Tensor,
    reference_features: torch.Tensor,
    noisy_features: torch.Tensor,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_align, L_flat)`` from the class text features ``t`` (C, D), the hand-crafted prompt's ``t0``
    (C, D) and the noisy prompts' ``t~`` (J, C, D) (module docstring; all normalized inside)."""
    check_tensor("text_features", text_features, ndim=2, floating=True, finite=False)
    check_tensor("reference_features", reference_features, ndim=2, floating=True, finite=False)
    check_tensor("noisy_features", noisy_features, ndim=3, floating=True, finite=False)
    if reference_features.shape != text_features.shape or noisy_features.shape[1:] != text_features.shape:
        raise fail(
            "features",
            f"t, t0 of shape (C, D) and t~ of shape (J, C, D), with (C, D) = {tuple(text_features.shape)}",
            f"t0 {tuple(reference_features.shape)}, t~ {tuple(noisy_features.shape)}",
        )
    t = F.normalize(text_features, dim=-1)
    t0 = F.normalize(reference_features, dim=-1)
    align = ((t - t0) ** 2).mean() * t.shape[-1]
    flat = -weight * F.cosine_similarity(t.unsqueeze(0), noisy_features, dim=-1).mean()
    return align, flat


def pretrain_context(
    learner: PromptLearner, config: FPPConfig | None = None, *, progress: bool = False
) -> torch.Tensor:
    """FPP's pretrained context ``(n_ctx, W)`` for the learner's class set (module docstring).

    The hand-crafted prompt is the learner's own context (its phrase embedding); the learner is left as
    it was. Deterministic for a given ``config.seed``.
    """
    from tqdm.auto import tqdm

    config = config or FPPConfig()
    if not isinstance(learner, PromptLearner) or learner.class_specific:
        raise fail("learner", "a PromptLearner with a unified context", type(learner).__name__)
    generator = torch.Generator().manual_seed(config.seed)
    weight = flatness_weight(learner.num_classes, config.flatness_weight)
    device = learner.token_prefix.device
    noisy_encoder = copy.copy(learner.text_encoder)  # its own plan memo for the (J * C)-row batch
    noisy_ids = learner.token_ids.repeat(config.n_noise, 1)
    with torch.no_grad():
        reference = F.normalize(learner(learner.ctx.detach()).float(), dim=-1)
    initial = torch.randn(learner.n_ctx, learner.ctx_dim, generator=generator) * config.init_std
    ctx = torch.nn.Parameter(initial.to(device))
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(config.steps, 1), eta_min=config.min_lr
    )
    for _ in tqdm(range(config.steps), desc="FPP pretraining", disable=not progress, leave=False):
        prompts = learner.prompt_embeddings(ctx)  # (C, T, W), once for the clean and the noisy prompts
        with torch.no_grad():
            noise = prompt_noise(learner, config.n_noise, config.ctx_noise, config.token_noise, generator)
            noisy = (prompts.detach().unsqueeze(0) + noise).flatten(0, 1)
            noisy_features = noisy_encoder.encode_embeddings(noisy, noisy_ids).float()
            noisy_features = noisy_features.view(config.n_noise, learner.num_classes, -1)
        text = learner.text_encoder.encode_embeddings(prompts, learner.token_ids).float()
        align, flat = fpp_losses(text, reference, noisy_features, weight)
        optimizer.zero_grad(set_to_none=True)
        (align + flat).backward()
        optimizer.step()
        schedule.step()
    return ctx.detach().clone()
