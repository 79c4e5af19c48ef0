"""Reliability diagrams (Niculescu-Mizil & Caruana, ICML 2005; the layout of Guo et al., ICML 2017).

Top panel: per uniform bin, a bar up to the bin's accuracy and, stacked on it, a hatched bar spanning
the gap to the bin's mean confidence (the diagonal evaluated where the bin's samples lie; the gap
bars' widths weighted by bin mass sum to the ECE); the diagonal; the ECE in the legend. Bottom panel: the
histogram of top-label confidences on the same bins, with the mean confidence and the accuracy marked.
``risk_coverage_plot``: selective and generalized risk against coverage (``fastcal.metrics.selective``).
Drawn with matplotlib's Agg canvas (no pyplot, no display); saved as PNG when given a path.
"""

from __future__ import annotations

import os

import torch

from fastcal._io import atomic_path
from fastcal.metrics.functional import reliability_bins


def reliability_diagram(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    path: str | os.PathLike | None = None,
    title: str | None = None,
):
    """Reliability diagram of top-label confidence on ``n_bins`` uniform bins; returns the matplotlib
    ``Figure`` (and writes it as PNG to ``path``, atomically, when given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = reliability_bins(probs, labels, n_bins=n_bins)
    edges = bins.edges.cpu().numpy()
    count = bins.count.cpu().numpy()
    conf = bins.confidence.cpu().numpy()
    acc = bins.accuracy.cpu().numpy()
    total = count.sum()
    ece_value = float((count / total * abs(acc - conf)).sum())
    mean_conf = float((count * conf).sum() / total)
    mean_acc = float((count * acc).sum() / total)

    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    filled = count > 0

    fig = Figure(figsize=(5.0, 6.2))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        2, 1, height_ratios=(3, 1), left=0.15, right=0.97, top=0.95, bottom=0.08, hspace=0.12
    )
    ax = fig.add_subplot(grid[0])
    hist_ax = fig.add_subplot(grid[1], sharex=ax)

    ax.bar(
        centers[filled],
        acc[filled],
        width=width,
        color="#3b75af",
        edgecolor="black",
        linewidth=0.6,
        label="Accuracy",
    )
    ax.bar(
        centers[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width,
        color="#d62728",
        alpha=0.3,
        edgecolor="#d62728",
        hatch="//",
        linewidth=0.6,
        label="Gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.plot([], [], linestyle="none", label=f"ECE = {100 * ece_value:.2f}% ({n_bins} bins)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title if title is not None else f"Reliability diagram (N = {int(total)})")

    hist_ax.bar(centers, count, width=width, color="#7f7f7f", edgecolor="black", linewidth=0.6)
    hist_ax.axvline(mean_conf, color="#d62728", linestyle="--", label=f"Mean confidence {mean_conf:.3f}")
    hist_ax.axvline(mean_acc, color="#3b75af", linestyle="-", label=f"Accuracy {mean_acc:.3f}")
    hist_ax.set_xlabel("Confidence")
    hist_ax.set_ylabel("Count")
    hist_ax.legend(loc="upper left", fontsize="x-small")

    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    return fig


def risk_coverage_plot(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
):
    """The risk-coverage curves of top-label confidence (``fastcal.metrics.selective``, ties grouped):
    selective risk and generalized risk against coverage, with AURC and AUGRC in the legend and the
    overall error rate marked; returns the ``Figure`` (PNG to ``path``, atomically, when given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastcal.metrics.selective import augrc, aurc, risk_coverage_curve

    curve = risk_coverage_curve(probs, labels)
    coverage = curve.coverage.cpu().numpy()
    selective = curve.selective_risk.cpu().numpy()
    generalized = curve.generalized_risk.cpu().numpy()
    aurc_value, augrc_value = float(aurc(probs, labels)), float(augrc(probs, labels))

    fig = Figure(figsize=(5.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.subplots_adjust(left=0.15, right=0.97, top=0.93, bottom=0.12)
    ax.plot(coverage, selective, color="#3b75af", label=f"Selective risk (AURC = {aurc_value:.4f})")
    ax.plot(coverage, generalized, color="#d62728", label=f"Generalized risk (AUGRC = {augrc_value:.4f})")
    ax.axhline(
        selective[-1], color="gray", linestyle="--", linewidth=0.8, label="Error rate at full coverage"
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1e-3, float(selective.max())) * 1.05)
    ax.set_xlabel("Coverage")
    ax.set_ylabel("Risk")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title if title is not None else f"Risk-coverage (N = {len(labels)})")
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    return fig
