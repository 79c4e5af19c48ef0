"""The test-time tuning step, built to be captured once in a CUDA graph and replayed per test sample.

For ``S`` test samples at once (``samples_per_step``), each with its own context ``ctx_s`` (a
``(S, n_ctx, W)`` parameter: vectorized parameters), one replay does what TPT's reference
(github.com/azshue/TPT, ``tpt_classification.py``: ``test_time_tuning`` then the final ``model(image)``)
does one sample at a time:

1. reset: ``ctx_s <- ctx_0`` and the AdamW state (moments, step count) to zero, in place;
2. ``steps`` times (TPT: 1): class text features ``t_s = normalize(f_text(prompts(ctx_s)))``, logits of
   the ``V`` views ``z_svc = exp(logit_scale) <f_sv, t_sc>`` with the views' normalized image features
   ``f_sv`` (computed once, outside, without gradients); at the first step the ``k = int(V * selection)``
   views of lowest entropy (``topk``, fixed ``k``) are selected and kept; loss
   ``L = sum_s [H(mean_{v in sel} softmax(z_sv)) - lambda * ATFD(t_s) + mu * P(t_s)]``
   (``fastcal.losses``: the marginal entropy through log-sum-exp, C-TPT's dispersion when ``lambda > 0``,
   O-TPT's orthogonality penalty when ``mu > 0``), backward, one AdamW step;
3. predict: logits of view 0 with the tuned contexts (fresh text features, no gradient).

The loss is a sum over samples whose terms each depend on one context only, so every context gets its
own sample's gradient; AdamW is elementwise, so the stacked moments are ``S`` independent optimizers:
the result equals ``S`` runs of one sample up to float rounding.

Everything the step touches lives in static buffers allocated once: the image features it reads, the
context, its gradient (zeroed in place, never set to ``None``), the optimizer state (AdamW with
``capturable=True`` on CUDA), the selection and the logits it writes. Selection is ``topk`` with a fixed
``k`` (no boolean masks), and nothing reads a value back to the host, so on CUDA the whole step is
captured once (after three warm-up runs on a side stream) and replayed; on the CPU, or with
``use_graph=False``, the same body runs eagerly on the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcal._checks import check_int, check_number, check_tensor, fail
from fastcal.losses.functional import (
    marginal_entropy,
    orthogonality_penalty,
    text_dispersion,
    value_checks,
)
from fastcal.methods.prompt_learner import PromptLearner
from fastcal.tpt.ensemble import PromptEnsemble

_WARMUP_RUNS = 3


@dataclass(frozen=True)
class TuningConfig:
    """TPT's test-time optimization (defaults: the reference's).

    Attributes:
        n_views: views per test sample, view 0 (the centre crop) included.
        selection: fraction of views kept by confidence selection (``k = int(n_views * selection)``).
        steps: optimization steps per sample (TPT's ``tta_steps``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (torch's default, which the reference leaves in place).
        betas, eps: AdamW's.
        dispersion_weight: C-TPT's lambda (0: plain TPT).
        orthogonality_weight: O-TPT's lambda (0: none).
    """

    n_views: int = 64
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dispersion_weight: float = 0.0
    orthogonality_weight: float = 0.0

    def __post_init__(self) -> None:
        check_int("n_views", self.n_views, minimum=1)
        check_number("selection", self.selection, minimum=0.0, maximum=1.0, strict_minimum=True)
        check_int("steps", self.steps, minimum=0)
        check_number("lr", self.lr, minimum=0.0)
        check_number("weight_decay", self.weight_decay, minimum=0.0)
        check_number("eps", self.eps, minimum=0.0, strict_minimum=True)
        check_number("dispersion_weight", self.dispersion_weight, minimum=0.0)
        check_number("orthogonality_weight", self.orthogonality_weight, minimum=0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise fail("betas", "two numbers in [0, 1)", repr(self.betas))
        if self.n_selected < 1:
            raise fail("selection", f"at least one of {self.n_views} views kept", self.selection)

    @property
    def n_selected(self) -> int:
        """Views kept by confidence selection: ``int(n_views * selection)`` (6 of 64)."""
        return int(self.n_views * self.selection)


class TestTimeStep:
    """TPT / C-TPT for ``samples_per_step`` test samples per call, on static buffers (module docstring).

    Args:
        learner: the prompt learner (its class set and frozen token embeddings; its own ``ctx`` is not
            used), or a ``PromptEnsemble`` (one context per template, concatenated).
        init_ctx: the context every sample starts from and is reset to, ``(n_ctx, W)`` (TPT: the
            embedding of "a photo of a"; FPP: the pretrained context).
        logit_scale: CLIP's learned log-scale (``model.logit_scale``); its exponential scales the logits.
        feature_dim: the joint embedding width ``D`` of the image features.
        samples_per_step: ``S``, the samples tuned together.
        config: the optimization (``TuningConfig``).
        use_graph: capture the step in a CUDA graph (default: when the learner is on CUDA).
        encoder: maps the contexts ``(S, n_ctx, W)`` to class text features ``(S, C, D)``; default the
            learner itself (``fastcal.methods.prefix.PackedPrompts`` computes the same with the shared prefix
            encoded once).
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        learner: PromptLearner,
        init_ctx: torch.Tensor,
        logit_scale: torch.Tensor | float,
        feature_dim: int,
        *,
        samples_per_step: int = 1,
        config: TuningConfig | None = None,
        use_graph: bool | None = None,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(learner, (PromptLearner, PromptEnsemble)):
            raise TypeError(
                f"learner: expected a PromptLearner or PromptEnsemble, got {type(learner).__name__}"
            )
        if learner.class_specific:
            raise fail("learner", "a unified (shared) context", "a class-specific learner")
        self.config = config or TuningConfig()
        self.samples_per_step = check_int("samples_per_step", samples_per_step, minimum=1)
        check_int("feature_dim", feature_dim, minimum=1)
        check_tensor("init_ctx", init_ctx, ndim=2, floating=True)
        if tuple(init_ctx.shape) != (learner.n_ctx, learner.ctx_dim):
            raise fail("init_ctx", f"shape ({learner.n_ctx}, {learner.ctx_dim})", tuple(init_ctx.shape))
        self.learner = learner
        self.encoder = encoder if encoder is not None else learner
        device = learner.ctx.device
        self.device = device
        if use_graph is None:
            use_graph = device.type == "cuda"
        if use_graph and device.type != "cuda":
            raise fail("use_graph", "False (or None) unless the learner is on CUDA", f"True on {device}")
        self.use_graph = bool(use_graph)

        s, v, c = self.samples_per_step, self.config.n_views, learner.num_classes
        scale = torch.as_tensor(logit_scale, dtype=torch.float32).detach().exp()
        self.scale = scale.to(device)
        self.init_ctx = init_ctx.detach().to(device, torch.float32).clone()
        self.image_features = torch.zeros(s, v, feature_dim, device=device)
        self.selected = torch.zeros(s, self.config.n_selected, dtype=torch.long, device=device)
        self.logits = torch.zeros(s, c, device=device)
        self.loss = torch.zeros(s, device=device)
        self.ctx = nn.Parameter(self.init_ctx.expand(s, -1, -1).clone())
        self.ctx.grad = torch.zeros_like(self.ctx)
        self.optimizer = torch.optim.AdamW(
            [self.ctx],
            lr=self.config.lr,
            betas=self.config.betas,
            eps=self.config.eps,
            weight_decay=self.config.weight_decay,
            capturable=device.type == "cuda",
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.use_graph:
            self._capture()
        else:
            self.run()  # creates the optimizer state and the text encoder's plan

    # ---- the body -----------------------------------------------------------------------------------
    def _text_features(self) -> torch.Tensor:
        return F.normalize(self.encoder(self.ctx).float(), dim=-1)  # (S, C, D)

    def _view_logits(self, text: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.bmm(views, text.transpose(1, 2))

    def reset(self) -> None:
        """Contexts back to ``init_ctx``, gradient and AdamW state to zero; every buffer stays in place."""
        with torch.no_grad():
            self.ctx.copy_(self.init_ctx.expand_as(self.ctx))
            self.ctx.grad.zero_()
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()

    def _loss(self, select: bool) -> torch.Tensor:
        text = self._text_features()
        logits = self._view_logits(text, self.image_features)  # (S, V, C)
        if select:
            with torch.no_grad():
                log_p = logits.log_softmax(dim=-1)
                entropy = -(log_p.exp() * log_p).sum(dim=-1)
                self.selected.copy_(entropy.topk(self.config.n_selected, dim=1, largest=False).indices)
        chosen = logits.gather(1, self.selected[:, :, None].expand(-1, -1, logits.shape[-1]))
        loss = marginal_entropy(chosen, reduction="none")  # (S,)
        if self.config.dispersion_weight > 0:
            loss = loss - self.config.dispersion_weight * text_dispersion(text, reduction="none")
        if self.config.orthogonality_weight > 0:
            loss = loss + self.config.orthogonality_weight * orthogonality_penalty(text, reduction="none")
        return loss

    def run(self) -> None:
        """Reset, tune and predict on the static buffers (what a graph replay does)."""
        self.reset()
        # the losses read no tensor values here: no host sync, eager or captured alike
        with value_checks(False):
            for step in range(self.config.steps):
                loss = self._loss(select=step == 0)
                loss.sum().backward()
                self.optimizer.step()
                with torch.no_grad():
                    self.loss.copy_(loss.detach())
                    self.ctx.grad.zero_()
        with torch.no_grad():
            text = self._text_features()
            self.logits.copy_(self._view_logits(text, self.image_features[:, :1]).squeeze(1))

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                self.run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run()

    # ---- per call -----------------------------------------------------------------------------------
    def __call__(self, image_features: torch.Tensor) -> torch.Tensor:
        """Tune on the views' normalized image features ``(S', V, D)``, ``S' <= samples_per_step``;
        return the view-0 logits with each sample's tuned context, ``(S', C)`` (a new tensor)."""
        s = image_features.shape[0] if image_features.ndim == 3 else -1
        if s < 1 or s > self.samples_per_step or image_features.shape[1:] != self.image_features.shape[1:]:
            width = self.image_features.shape[-1]
            expected = f"(S, {self.config.n_views}, {width}) with 1 <= S <= {self.samples_per_step}"
            raise fail("image_features", expected, tuple(image_features.shape))
        with torch.no_grad():
            self.image_features[:s].copy_(image_features)
            if s < self.samples_per_step:
                self.image_features[s:].zero_()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()
        return self.logits[:s].clone()
