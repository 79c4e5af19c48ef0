"""ProDA: prompt distribution learning (Lu et al., "Prompt Distribution Learning", CVPR 2022).

``K`` learned contexts ``v_1..v_K`` (16 random tokens each; the first K/4 put the class name in front,
the next K/4 in the middle, the rest at the end: CoOp's three layouts). The class features of the
prompts are modelled as a Gaussian: for a step's subset S of ``P`` prompts, with
``t_ck = normalize(f_text(prompt_k, c))``::

    mu_c = (1/P) sum_k t_ck                    (not re-normalized),   z_bc = s <f_b, mu_c>
    d_ck = t_ck - mu_c,    Sigma^(j)_cc' = 1/(P + 1) sum_k d_ck,j d_c'k,j          (diagonal in dims j)
    sigma_bc = sum_j f_bj^2 (Sigma^(j)_yy + Sigma^(j)_cc - 2 Sigma^(j)_yc),  y = y_b   (sigma_by = 0)
    L_upper = CE(z + s^2 / 2 * sigma, y)       the Gaussian upper bound of the expected cross-entropy
    L_m = mean_{k != k'} |<u_k, u_k'>|,   u_k = normalize(f_text([SOS] v_k . [EOS]))   over all K
    L = L_upper + alpha * L_m

``sigma_bc`` is the variance of the logit difference ``(w_c - w_y) . f_b`` under that covariance; it is
computed here as ``(1/(P+1)) sum_k sum_j f_bj^2 (d_ck,j - d_yk,j)^2``, an exact rewrite of the
reference's ``(D, C, C)`` covariance that takes O(B C P D) instead of O(D C^2) memory. Inference scores
with the mean of all K prompts' normalized features, not re-normalized, ``z = s <f, mean_k t_ck>`` (the
reference's ``set_classifier``): a class whose prompts disagree gets a shorter classifier, hence a
softer logit.

Composition: the method's training logits are ``z`` (``MethodOutput.cosine_logits`` is False), so the
run's loss is taken on them, and the ``GaussianBound`` term adds ``lse(z + s^2/2 sigma) - lse(z) +
alpha L_m`` (``sigma_by = 0``, so with cross-entropy the sum is exactly ``L_upper + alpha L_m``); TCPT's
calibrated loss or label smoothing take CE's place on ``z``.

Prompt subsets: every ``K / P`` steps a permutation of the K prompts is drawn (from torch's CPU
generator, which the trainer seeds and checkpoints) and the steps take its consecutive P-blocks; the
cycle runs across epochs, as the reference's, and its position is the method's ``training_state``.

The authors' code is not public. The recipe and the computation follow the calibration study's copy
(ml-stat-Sustech/CLIP_Calibration ``trainers/classification/proda.py``), where it differs from the
paper's text: the covariance divisor P + 1; the subset of P = 4 prompts per step; the diversity term
over class-free prompts. Differences from that copy, none of which changes the computation: its prompt
text keeps underscores in class names while its name lengths do not (names are cleaned first here); its
fp16 context trains without loss scaling (float32 here); the subset permutation uses the CUDA
generator there.

Recipe: ml-stat-Sustech/CLIP_Calibration ``configs/trainers/ProDA/vit_b16_c16_ep100_batch4.yaml`` and
``train.py`` (``TRAINER.PRODA``: N_CTX 16, N_PROMPT 32, PROMPT_BS 4, ALPHA 0.1): ViT-B/16, SGD lr 0.001,
batch 4, 100 epochs, cosine after 1 constant warm-up epoch at 1e-5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_int, fail
from fastcal.methods.base import MethodOutput, MethodSpec, PromptMethod
from fastcal.methods.objectives import RegularizerSetup, StatelessRegularizer, StepBatch
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.models.text_encoder import TextEncoder

DIVERSITY_WEIGHT = 0.1
RECIPE = {
    "epochs": 100,
    "batch_size": 4,
    "lr": 0.001,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "n_ctx": 16,
    "n_prompts": 32,
    "prompt_batch": 4,
    "diversity_weight": DIVERSITY_WEIGHT,
}
# The embedded testbed (3-layer CLIP, 80 base-class images, 2-core CPU): a short schedule.
TESTBED_RECIPE = {"epochs": 20, "batch_size": 16, "lr": 0.02}
SOURCE = (
    "ml-stat-Sustech/CLIP_Calibration configs/trainers/ProDA/vit_b16_c16_ep100_batch4.yaml and "
    "train.py (TRAINER.PRODA); model and loss from trainers/classification/proda.py (the authors' code "
    "is not public)"
)
LAYOUTS = ("front", "middle", "end")


def prompt_positions(n_prompts: int) -> list[str]:
    """The class-name position of each prompt: the first K/4 "front", the next K/4 "middle", the rest
    "end" (one prompt: "end")."""
    quarter = n_prompts // 4 if n_prompts > 1 else 0
    return ["front"] * quarter + ["middle"] * quarter + ["end"] * (n_prompts - 2 * quarter)


def gaussian_variance(
    image_features: torch.Tensor, prompt_features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``sigma_bc`` (module docstring): ``f`` (B, D) normalized image features, ``prompt_features`` (C, P,
    D) the step's normalized prompt features, ``labels`` (B,) -> (B, C), zero at the labels."""
    deviations = prompt_features - prompt_features.mean(dim=1, keepdim=True)  # (C, P, D)
    squared = image_features.square()  # (B, D)
    own = torch.einsum("bd,cpd->bc", squared, deviations.square())  # sum_k,j f^2 d_ck^2
    at_label = own.gather(1, labels[:, None])  # (B, 1)
    cross = torch.einsum("bd,bpd,cpd->bc", squared, deviations[labels], deviations)
    return (own + at_label - 2.0 * cross) / (prompt_features.shape[1] + 1)


class ProDA(PromptMethod):
    """A distribution of ``n_prompts`` contexts over the frozen CLIP (module docstring).

    Args:
        model: an open_clip CLIP (frozen here).
        tokenizer: its tokenizer.
        classnames: the classes.
        n_ctx: context tokens of every prompt.
        n_prompts: K, the prompts (a multiple of ``prompt_batch``).
        prompt_batch: P, the prompts one training step models the distribution with.
        init_std: the contexts' N(0, init_std^2) initialization.
    """

    input_kind = "features"
    method_name = "proda"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 16,
        n_prompts: int = 32,
        prompt_batch: int = 4,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(model, tokenizer)
        check_int("n_prompts", n_prompts, minimum=1)
        check_int("prompt_batch", prompt_batch, minimum=1)
        if n_prompts % prompt_batch:
            raise fail("prompt_batch", f"a divisor of n_prompts={n_prompts}", prompt_batch)
        encoder = TextEncoder(model, bucket=True)
        # the three layouts (token ids, frozen embeddings); their own contexts are not used or trained
        self.layouts = nn.ModuleDict(
            {
                position: PromptLearner(
                    encoder, tokenizer, classnames, n_ctx=n_ctx, class_token_position=position
                ).requires_grad_(False)
                for position in LAYOUTS
            }
        )
        width = self.layouts["end"].ctx_dim
        device = self.layouts["end"].ctx.device
        self.ctx = nn.Parameter(torch.empty(n_prompts, n_ctx, width, device=device).normal_(0.0, init_std))
        self.positions = prompt_positions(n_prompts)
        # class-free prompts "[SOS] v_k . [EOS]" (the reference's "nc" prompts): ids of "X X .. X."
        ids = tokenizer([" ".join(["X"] * n_ctx) + "."]).to(device)
        ids = ids[:, : int(encoder.eot_positions(ids)[0]) + 1] if encoder.is_causal else ids
        with torch.no_grad():
            embedding = encoder.token_embedding(ids)
        # one row per prompt, one tensor for the run: the text encoder reads its lengths once
        self.register_buffer("free_ids", ids.expand(n_prompts, -1).clone(), persistent=False)
        self.register_buffer("free_prefix", embedding[:, :1].detach(), persistent=False)
        self.register_buffer("free_suffix", embedding[:, 1 + n_ctx :].detach(), persistent=False)
        object.__setattr__(self, "_encoder", encoder)
        self.prompt_batch = prompt_batch
        self._order: list[int] | None = None  # host-side, so choosing a step's prompts never reads the device
        self._step = 0
        self._classifier: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def classnames(self) -> list[str]:
        return self.layouts["end"].classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        for learner in self.layouts.values():
            learner.set_classnames(classnames)
        self._classifier = None

    @property
    def n_prompts(self) -> int:
        return self.ctx.shape[0]

    # ---- prompts -----------------------------------------------------------------------------------
    def prompt_features(self, prompts: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Normalized class features ``(C, P, D)`` of the prompts ``prompts`` (indices into the K, on the
        CPU), in the order end, middle, front (the reference's; the mean and covariance do not depend on
        it)."""
        indices = prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)
        groups = []
        for position in reversed(LAYOUTS):
            chosen = [k for k in indices if self.positions[k] == position]
            if chosen:
                index = torch.tensor(chosen, device=self.ctx.device)
                groups.append(self.layouts[position](self.ctx[index]))  # (S, C, D)
        features = F.normalize(torch.cat(groups), dim=-1)
        return features.transpose(0, 1)

    def class_free_features(self) -> torch.Tensor:
        """``(K, D)`` normalized features of ``[SOS] v_k . [EOS]`` for every prompt."""
        k = self.n_prompts
        width = self.ctx.shape[-1]
        prompts = torch.cat(
            [
                self.free_prefix.expand(k, -1, width),
                self.ctx.to(self.free_prefix.dtype),
                self.free_suffix.expand(k, -1, width),
            ],
            dim=1,
        )
        return F.normalize(self._encoder.encode_embeddings(prompts, self.free_ids), dim=-1)

    def next_prompts(self) -> list[int]:
        """The next training step's P prompt indices (module docstring: the permutation cycle)."""
        cycle = self.n_prompts // self.prompt_batch
        if cycle == 1:
            return list(range(self.n_prompts))
        if self._step == 0:
            self._order = torch.randperm(self.n_prompts).tolist()
        block = self._order[self._step * self.prompt_batch : (self._step + 1) * self.prompt_batch]
        self._step = (self._step + 1) % cycle
        return block

    def classifier(self) -> torch.Tensor:
        """``(C, D)``: the mean of all K prompts' normalized class features (not re-normalized); kept
        until the contexts or the classes change."""
        version, ids = self.ctx._version, self.layouts["end"].token_ids  # ids: new ones per class set
        cached = self._classifier
        if cached is None or cached[0] != version or cached[1] is not ids:
            with torch.no_grad():
                cached = (version, ids, self.prompt_features(range(self.n_prompts)).mean(dim=1))
            self._classifier = cached
        return cached[2]

    def class_features(self) -> torch.Tensor:
        """The classifier ``(C, D)`` evaluation scores with (``classifier``: not normalized)."""
        return self.classifier()

    # ---- forward -----------------------------------------------------------------------------------
    def output(self, image_features: torch.Tensor) -> MethodOutput:
        """``image_features`` (B, D) -> logits (B, C): in training with the step's P prompts (their mean,
        and their features in ``prompt_features``), in evaluation with the mean of all K."""
        self.check_inputs(image_features)
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        f = F.normalize(image_features.to(dtype), dim=-1)
        scale = self.clip_model.logit_scale.to(dtype).exp()
        prompt_features = None
        if self.training:
            prompt_features = self.prompt_features(self.next_prompts()).to(dtype)
            mean = prompt_features.mean(dim=1)
        else:
            mean = self.classifier().to(dtype)
        return MethodOutput(
            scale * f @ mean.T,
            f,
            F.normalize(mean, dim=-1),
            scale,
            cosine_logits=False,
            prompt_features=prompt_features,
        )

    def training_state(self) -> dict[str, Any]:
        order = None if self._order is None else torch.tensor(self._order)
        return {"order": order, "step": self._step}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        order = state.get("order")
        self._order = None if order is None else [int(k) for k in order.tolist()]
        self._step = int(state.get("step", 0))


class GaussianBound(StatelessRegularizer):
    """ProDA's loss beyond the run's loss on ``z`` (module docstring): ``lse(z + s^2/2 sigma) - lse(z)``
    (the Gaussian bound's excess over CE) ``+ alpha L_m``; ``alpha`` is the config's
    ``diversity_weight`` (0.1)."""

    name = "proda"

    def __init__(self, setup: RegularizerSetup) -> None:
        alpha = setup.config.get("diversity_weight")
        self.diversity_weight = DIVERSITY_WEIGHT if alpha is None else float(alpha)

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        out = batch.output
        if out.prompt_features is None:
            raise fail("method", "ProDA in training mode (the step's prompt features)", "no prompt features")
        sigma = gaussian_variance(out.image_features, out.prompt_features, batch.labels)
        bounded = out.logits + 0.5 * out.logit_scale.square() * sigma
        excess = (torch.logsumexp(bounded, dim=-1) - torch.logsumexp(out.logits, dim=-1)).mean()
        free = batch.method.class_free_features()
        magnitude = (free @ free.T).abs()
        k = magnitude.shape[0]
        # the mean over the off-diagonal entries, without a mask (a masked select would read the device)
        off_diagonal = (magnitude.sum() - magnitude.diagonal().sum()) / (k * (k - 1))
        return excess + self.diversity_weight * off_diagonal


SPEC = MethodSpec(
    name="proda",
    title="ProDA",
    build=ProDA,
    options=("n_ctx", "n_prompts", "prompt_batch", "init_std"),
    recipe=RECIPE,
    source=SOURCE,
    regularizers=(GaussianBound,),
    testbed_recipe=TESTBED_RECIPE,
)
