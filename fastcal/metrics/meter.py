"""Streaming calibration metrics: ``CalibrationMeter``.

The top-label metrics on uniform bins are functions of per-bin sums, so the meter keeps only
``3 * n_bins + 2`` float64 numbers: per bin the count, the sum of confidences and the sum of hits, plus
the running sums of the Brier and NLL terms. ``update`` adds a batch's sums (no host synchronization
when ``validate=False``), ``merge`` adds another meter's, ``sync`` all-reduces them across
``torch.distributed`` ranks. ``compute`` gives exactly the dict of ``calibration_report`` on the
concatenated data, up to float64 rounding, however the data was split. Rows can also come as
(confidence, correct) pairs (``update_top_label``), for callers that kept no probability rows.

Equal-mass bins (``ace``) and ``smooth_ece`` need the samples themselves: ``keep_samples=True`` also
stores each row's top-label confidence and hit (O(N) memory, 9 bytes a row) and ``compute`` then adds
the keys ``ace`` and ``smooth_ece``.
"""

from __future__ import annotations

import torch

from fastcal._checks import check_int, check_tensor, fail
from fastcal.metrics.functional import (
    MAX_BINS,
    NLL_EPS,
    _SmoothECE,
    bin_sums,
    binned_error,
    check_probabilities,
    quantile_bin_sorted,
    report_from_sums,
    row_statistics,
    uniform_bin_index,
)

_f64 = torch.float64


class CalibrationMeter:
    """Accumulate calibration statistics over batches, processes and ranks.

    Args:
        n_bins: number of uniform bins for ece, mce and l2 (and of equal-mass bins for ace).
        keep_samples: also keep per-row confidence and hit (O(N)) so ``compute`` can add ``ace`` and
            ``smooth_ece``.
        validate: check every batch (finite probabilities summing to 1, labels in range); this reads
            values back from the device. ``False`` keeps only the shape checks, for hot loops.
    """

    def __init__(self, n_bins: int = 15, *, keep_samples: bool = False, validate: bool = True):
        self.n_bins = check_int("n_bins", n_bins, minimum=1, maximum=MAX_BINS)
        self.keep_samples = bool(keep_samples)
        self.validate = bool(validate)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._bins: torch.Tensor | None = None  # (n_bins, 3): count, confidence sum, hit sum
        self._totals: torch.Tensor | None = None  # (2,): Brier sum, NLL sum
        self._without_totals = False  # pairs were added without their Brier and NLL terms
        self._confidence: list[torch.Tensor] = []
        self._hit: list[torch.Tensor] = []
        self._synced: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = (
            None
        )

    def _allocate(self, device) -> None:
        if self._bins is None:
            self._bins = torch.zeros(self.n_bins, 3, dtype=_f64, device=device)
            self._totals = torch.zeros(2, dtype=_f64, device=device)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``probs`` (B, C) probabilities, ``labels`` (B,) integers in [0, C)."""
        if self.validate:
            check_probabilities(probs, labels)
        else:
            check_tensor("probs", probs, ndim=2, floating=True, finite=False)
            check_tensor("labels", labels, ndim=1, integer=True, nonempty=False, finite=False)
            if labels.shape[0] != probs.shape[0]:
                raise fail("labels", f"{probs.shape[0]} labels (one per row)", labels.shape[0])
        self._allocate(probs.device)
        stats = row_statistics(probs.to(self._bins.device), labels.to(self._bins.device), eps=NLL_EPS)
        index = uniform_bin_index(stats.confidence, self.n_bins)
        self._bins += bin_sums(index, stats.confidence[:, None], stats.hit[:, None], self.n_bins)[0]
        self._totals += torch.stack([stats.brier.sum(), stats.nll.sum()])
        if self.keep_samples:
            self._confidence.append(stats.confidence)
            self._hit.append(stats.hit.bool())
        self._synced = None

    @torch.no_grad()
    def update_top_label(
        self,
        confidence: torch.Tensor,
        correct: torch.Tensor,
        *,
        brier: torch.Tensor | None = None,
        nll: torch.Tensor | None = None,
    ) -> None:
        """Add a batch given as (confidence, correct) pairs: each row's top-label probability (B,) and
        whether its prediction was right (B,), with no probability rows to build. The top-label metrics
        need nothing else; Brier and NLL need the whole row, so pass each row's ``brier`` and ``nll``
        terms (``sum_c (p_c - [c = y])^2`` and ``-log p_y``) when you have them; a meter given pairs
        without them leaves ``brier`` and ``nll`` out of ``compute()``."""
        check_tensor("confidence", confidence, ndim=1, floating=True, finite=self.validate)
        check_tensor("correct", correct, ndim=1, finite=False)
        if correct.shape[0] != confidence.shape[0]:
            raise fail("correct", f"{confidence.shape[0]} values (one per confidence)", correct.shape[0])
        if self.validate and bool(((confidence < 0) | (confidence > 1)).any()):
            raise fail("confidence", "probabilities in [0, 1]", "values outside [0, 1]")
        self._allocate(confidence.device)
        confidence = confidence.to(self._bins.device, _f64)
        hit = correct.to(self._bins.device, _f64)
        index = uniform_bin_index(confidence, self.n_bins)
        self._bins += bin_sums(index, confidence[:, None], hit[:, None], self.n_bins)[0]
        if brier is None or nll is None:
            self._without_totals = True
        else:
            self._totals += torch.stack([brier.to(self._bins).sum(), nll.to(self._bins).sum()])
        if self.keep_samples:
            self._confidence.append(confidence)
            self._hit.append(hit.bool())
        self._synced = None

    def merge(self, other: CalibrationMeter) -> CalibrationMeter:
        """Add the statistics of ``other`` (same ``n_bins``) to this meter; return this meter."""
        if not isinstance(other, CalibrationMeter):
            raise TypeError(f"other: expected a CalibrationMeter, got {type(other).__name__}")
        if other.n_bins != self.n_bins:
            raise fail("other", f"a meter with n_bins={self.n_bins}", f"n_bins={other.n_bins}")
        if other.keep_samples != self.keep_samples:
            raise fail("other", f"a meter with keep_samples={self.keep_samples}", other.keep_samples)
        if other._bins is None:
            return self
        self._allocate(other._bins.device)
        self._bins += other._bins.to(self._bins.device)
        self._totals += other._totals.to(self._bins.device)
        self._without_totals |= other._without_totals
        self._confidence += [c.to(self._bins.device) for c in other._confidence]
        self._hit += [h.to(self._bins.device) for h in other._hit]
        self._synced = None
        return self

    def sync(self) -> CalibrationMeter:
        """Sum the statistics of every rank (``torch.distributed.all_reduce``) when a process group is
        initialized; a no-op otherwise. ``compute`` then reports the global values on every rank until
        the next ``update``/``merge``/``reset``; calling ``sync`` twice does not double count."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self._bins.device if self._bins is not None else torch.device("cpu")
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        packed = torch.zeros(self.n_bins * 3 + 2, dtype=_f64, device=device)
        if self._bins is not None:
            packed[: self.n_bins * 3] = self._bins.reshape(-1).to(device)
            packed[self.n_bins * 3 :] = self._totals.to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        confidence = hit = None
        if self.keep_samples:
            local = (
                (torch.cat(self._confidence).cpu(), torch.cat(self._hit).cpu()) if self._confidence else None
            )
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            parts = [g for g in gathered if g is not None]
            if parts:
                confidence = torch.cat([c for c, _ in parts])
                hit = torch.cat([h for _, h in parts])
        self._synced = (
            packed[: self.n_bins * 3].view(self.n_bins, 3),
            packed[self.n_bins * 3 :],
            confidence,
            hit,
        )
        return self

    @property
    def count(self) -> int:
        """Number of rows accumulated (after ``sync``: on all ranks)."""
        bins = self._state()[0]
        return 0 if bins is None else int(bins[:, 0].sum())

    def _state(self):
        if self._synced is not None:
            return self._synced
        if self._bins is None:
            return None, None, None, None
        confidence = torch.cat(self._confidence) if self._confidence else None
        hit = torch.cat(self._hit) if self._hit else None
        return self._bins, self._totals, confidence, hit

    def compute(self) -> dict[str, float]:
        """The ``calibration_report`` dict of everything accumulated (plus ``ace`` and ``smooth_ece``
        with ``keep_samples=True``)."""
        bins, totals, confidence, hit = self._state()
        if bins is None or float(bins[:, 0].sum()) == 0:
            raise fail("CalibrationMeter", "at least one row before compute()", "0 rows")
        report = report_from_sums(bins, totals[0], totals[1], self.n_bins)
        if self._without_totals:
            del report["brier"], report["nll"]
        if self.keep_samples:
            hit = hit.to(_f64)
            sorted_conf, sorted_hit, positions_bin = quantile_bin_sorted(
                confidence[:, None], hit[:, None], self.n_bins
            )
            sums = bin_sums(positions_bin, sorted_conf, sorted_hit, self.n_bins)
            report["ace"] = float(binned_error(sums, "l1")[0])
            report["smooth_ece"] = _SmoothECE(confidence, hit).fixed_point()[0]
        return report
