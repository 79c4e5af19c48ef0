import pytest
import torch

from fastcal.finetune.wise import interpolate_state_dicts, parse_alphas


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(7, generator=g, dtype=torch.float64),
        "ids": torch.arange(4),
    }


def test_alpha_endpoints_are_exactly_the_models(tiny_clip):
    zero_shot = tiny_clip.build_tiny_clip(seed=0).state_dict()
    fine_tuned = tiny_clip.build_tiny_clip(seed=1).state_dict()
    at_zero = interpolate_state_dicts(zero_shot, fine_tuned, 0.0)
    at_one = interpolate_state_dicts(zero_shot, fine_tuned, 1.0)
    for name in zero_shot:
        assert torch.equal(at_zero[name], zero_shot[name]), name
        assert torch.equal(at_one[name], fine_tuned[name]), name


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.83])
def test_interpolation_is_the_convex_combination(alpha):
    zs, ft = _state(0), _state(1)
    merged = interpolate_state_dicts(zs, ft, alpha)
    for name in ("w", "b"):
        expected = (1 - alpha) * zs[name].double() + alpha * ft[name].double()
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)
        assert merged[name].dtype == ft[name].dtype
    assert torch.equal(merged["ids"], zs["ids"])


def test_interpolation_rejects_mismatched_states():
    zs, ft = _state(0), _state(1)
    with pytest.raises(ValueError, match="keys"):
        interpolate_state_dicts(zs, {k: v for k, v in ft.items() if k != "w"}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_state_dicts(zs, {**ft, "w": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="integer"):
        interpolate_state_dicts(zs, {**ft, "ids": torch.arange(4) + 1}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state_dicts(zs, ft, 1.2)


def test_parse_alphas():
    assert parse_alphas("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_alphas("0.2:0.5:0.15") == [0.2, 0.35, 0.5]
    assert parse_alphas("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_alphas("0.5") == [0.5]
    assert parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("", "a:b:c", "0:1", "1:0:0.1", "0:1:0", "0:1.5:0.5", "x"):
        with pytest.raises(ValueError, match="alpha"):
            parse_alphas(bad)
