"""reliability_diagram: bars equal the bin statistics, ECE in the legend, PNG on disk."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fastcal.metrics import ece, reliability_bins, reliability_diagram


def sample(n=2003, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits * 0.6, dim=1), 1, generator=g).squeeze(1)
    return torch.softmax(logits, dim=1), labels


def test_bars_legend_and_histogram_match_the_bins():
    probs, labels = sample()
    fig = reliability_diagram(probs, labels, n_bins=12, title="testbed")
    assert isinstance(fig.canvas, FigureCanvasAgg)
    diagram, histogram = fig.axes
    bins = reliability_bins(probs, labels, n_bins=12)
    filled = (bins.count > 0).numpy()

    accuracy_bars, gap_bars = diagram.containers
    heights = np.array([bar.get_height() for bar in accuracy_bars])
    np.testing.assert_allclose(heights, bins.accuracy.numpy()[filled], atol=1e-12)
    gap_tops = np.array([bar.get_y() + bar.get_height() for bar in gap_bars])
    np.testing.assert_allclose(gap_tops, bins.confidence.numpy()[filled], atol=1e-12)
    centers = np.array([bar.get_x() + bar.get_width() / 2 for bar in accuracy_bars])
    np.testing.assert_allclose(centers, ((np.arange(12) + 0.5) / 12)[filled], atol=1e-12)

    legend = [text.get_text() for text in diagram.get_legend().get_texts()]
    assert f"ECE = {100 * float(ece(probs, labels, n_bins=12)):.2f}% (12 bins)" in legend
    assert diagram.get_title() == "testbed"
    diagonal = [line for line in diagram.get_lines() if line.get_label() == "Perfect calibration"]
    assert diagonal and list(diagonal[0].get_xdata()) == [0, 1] and list(diagonal[0].get_ydata()) == [0, 1]

    (counts,) = histogram.containers
    np.testing.assert_array_equal([bar.get_height() for bar in counts], bins.count.numpy())
    assert sum(bar.get_height() for bar in counts) == 2003


def test_writes_png(tmp_path):
    probs, labels = sample(n=301, seed=1)
    path = tmp_path / "plots" / "reliability.png"
    fig = reliability_diagram(probs, labels, path=path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (600, 744)  # 5 x 6.2 inches at 120 dpi
    assert fig.axes[0].get_title() == "Reliability diagram (N = 301)"
    assert not list(tmp_path.glob("plots/.*.tmp"))  # the atomic write left no temporary file


def test_no_file_without_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reliability_diagram(*sample(n=50, seed=2))
    assert list(tmp_path.iterdir()) == []


def test_validates_inputs():
    probs, labels = sample(n=40, seed=3)
    with pytest.raises(ValueError, match="pass probabilities, not logits: softmax first"):
        reliability_diagram(torch.log(probs), labels)
    with pytest.raises(ValueError, match="n_bins: expected an integer >= 1"):
        reliability_diagram(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="labels: expected 40 labels"):
        reliability_diagram(probs, labels[:-1])


def test_risk_coverage_plot(tmp_path):
    from fastcal.metrics import augrc, aurc, risk_coverage_curve, risk_coverage_plot

    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(300, 4, generator=g, dtype=torch.float64) * 2, 1)
    labels = torch.randint(0, 4, (300,), generator=g)
    path = tmp_path / "rc.png"
    fig = risk_coverage_plot(probs, labels, path=path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    curve = risk_coverage_curve(probs, labels)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curve.selective_risk.numpy())
    np.testing.assert_allclose(ax.lines[1].get_xdata(), curve.coverage.numpy())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"AURC = {float(aurc(probs, labels)):.4f}" in legend[0]
    assert f"AUGRC = {float(augrc(probs, labels)):.4f}" in legend[1]
