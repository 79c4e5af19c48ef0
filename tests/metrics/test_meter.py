"""CalibrationMeter: equal to the functional metrics however the data is split, merged or synced."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcal.metrics import CalibrationMeter, ace, calibration_report, smooth_ece

f64 = torch.float64


def random_probs(n, c, seed, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=f64) * 2.5
    labels = torch.multinomial(torch.softmax(logits * 1.3, dim=1), 1, generator=g).squeeze(1)
    return torch.softmax(logits, dim=1).to(dtype), labels


def assert_reports_equal(got, expected, tol=1e-9):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tol, rel=tol), key


@settings(max_examples=20, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 996), max_size=8),
    n_bins=st.integers(1, 25),
    seed=st.integers(0, 1000),
)
def test_meter_equals_functional_under_any_split(cuts, n_bins, seed):
    probs, labels = random_probs(997, 6, seed)
    bounds = [0, *sorted(set(cuts)), 997]
    meter = CalibrationMeter(n_bins)
    for lo, hi in itertools.pairwise(bounds):
        meter.update(probs[lo:hi], labels[lo:hi])
    assert_reports_equal(meter.compute(), calibration_report(probs, labels, n_bins=n_bins), tol=1e-6)
    assert meter.count == 997


@settings(max_examples=10, deadline=None)
@given(parts=st.integers(2, 6), seed=st.integers(0, 1000))
def test_merge_equals_one_meter(parts, seed):
    probs, labels = random_probs(611, 4, seed)
    one = CalibrationMeter(10, keep_samples=True)
    one.update(probs, labels)
    pieces = [CalibrationMeter(10, keep_samples=True) for _ in range(parts)]
    for i, (p, y) in enumerate(zip(probs.tensor_split(parts), labels.tensor_split(parts), strict=True)):
        pieces[i].update(p, y)
    merged = pieces[0]
    for other in pieces[1:]:
        merged.merge(other)
    merged.merge(CalibrationMeter(10, keep_samples=True))  # an empty meter adds nothing
    assert_reports_equal(merged.compute(), one.compute(), tol=1e-9)


def test_keep_samples_adds_quantile_and_smooth_metrics():
    probs, labels = random_probs(1503, 5, 3)
    meter = CalibrationMeter(12, keep_samples=True)
    for p, y in zip(probs.split(400), labels.split(400), strict=True):
        meter.update(p, y)
    report = meter.compute()
    assert report["ace"] == pytest.approx(float(ace(probs, labels, n_bins=12)), abs=1e-12)
    assert report["smooth_ece"] == pytest.approx(float(smooth_ece(probs, labels)), abs=1e-12)
    plain = CalibrationMeter(12)
    plain.update(probs, labels)
    assert set(report) - set(plain.compute()) == {"ace", "smooth_ece"}


def test_state_is_o_of_bins_and_float32_inputs():
    small, large = CalibrationMeter(15), CalibrationMeter(15)
    probs, labels = random_probs(5000, 3, 0, dtype=torch.float32)
    small.update(probs[:10], labels[:10])
    for _ in range(3):
        large.update(probs, labels)

    def held(meter):
        return sum(v.numel() * v.element_size() for v in vars(meter).values() if isinstance(v, torch.Tensor))

    assert held(small) == held(large) == (15 * 3 + 2) * 8
    expected = calibration_report(torch.cat([probs] * 3), torch.cat([labels] * 3))
    assert_reports_equal(large.compute(), expected, tol=1e-6)


def test_validate_false_skips_value_checks_but_not_shapes():
    meter = CalibrationMeter(validate=False)
    probs, labels = random_probs(20, 3, 1)
    meter.update(probs * 2, labels)  # not checked: the caller promised valid probabilities
    with pytest.raises(ValueError, match="labels: expected 20 labels"):
        meter.update(probs, labels[:5])
    with pytest.raises(ValueError, match="probs: expected a 2-D tensor"):
        meter.update(probs[0], labels[:1])


def test_meter_validation():
    probs, labels = random_probs(20, 3, 1)
    meter = CalibrationMeter()
    with pytest.raises(ValueError, match="pass probabilities, not logits: softmax first"):
        meter.update(torch.log(probs), labels)
    nan = probs.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="probs: expected finite"):
        meter.update(nan, labels)
    with pytest.raises(ValueError, match=r"labels: expected labels in \[0, 3\)"):
        meter.update(probs, labels + 3)
    with pytest.raises(ValueError, match="probs: expected a non-empty tensor"):
        meter.update(probs[:0], labels[:0])
    with pytest.raises(ValueError, match="n_bins: expected an integer >= 1, got 0"):
        CalibrationMeter(0)
    with pytest.raises(ValueError, match="CalibrationMeter: expected at least one row"):
        meter.compute()
    with pytest.raises(ValueError, match="other: expected a meter with n_bins=15"):
        meter.merge(CalibrationMeter(10))
    with pytest.raises(TypeError, match="other: expected a CalibrationMeter"):
        meter.merge({"ece": 0.1})
    meter.update(probs, labels)
    meter.reset()
    assert meter.count == 0


def test_sync_without_process_group_is_a_no_op():
    probs, labels = random_probs(50, 3, 2)
    meter = CalibrationMeter()
    meter.update(probs, labels)
    assert meter.sync() is meter
    assert_reports_equal(meter.compute(), calibration_report(probs, labels))


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from fastcal.metrics import CalibrationMeter

    rank, world, store_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    data = torch.load(sys.argv[4])
    probs, labels = data["probs"].tensor_split(world)[rank], data["labels"].tensor_split(world)[rank]
    meter = CalibrationMeter(10, keep_samples=True)
    for p, y in zip(probs.split(37), labels.split(37)):
        meter.update(p, y)
    local = meter.compute()
    meter.sync()
    meter.sync()  # idempotent: a second sync must not double count
    print(json.dumps({"local": local, "global": meter.compute()}))
    dist.destroy_process_group()
    """
)


def test_sync_all_reduces_across_two_processes(tmp_path):
    probs, labels = random_probs(401, 5, 4)
    torch.save({"probs": probs, "labels": labels}, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(tmp_path / "store"), str(tmp_path / "data.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    expected = calibration_report(probs, labels, n_bins=10)
    expected["ace"] = float(ace(probs, labels, n_bins=10))
    expected["smooth_ece"] = float(smooth_ece(probs, labels))
    for result in results:
        assert_reports_equal(result["global"], expected, tol=1e-9)
    assert results[0]["local"]["count"] + results[1]["local"]["count"] == 401
    assert results[0]["local"]["ece"] != pytest.approx(expected["ece"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_meter_on_cuda_equals_cpu():
    probs, labels = random_probs(3001, 7, 5, dtype=torch.float32)
    meter = CalibrationMeter(15, validate=False)
    for p, y in zip(probs.split(500), labels.split(500), strict=True):
        meter.update(p.cuda(), y.cuda())
    assert_reports_equal(meter.compute(), calibration_report(probs, labels), tol=1e-6)
