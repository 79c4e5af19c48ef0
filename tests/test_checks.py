"""fastcal._checks: the finite check decides from one sum and is exact when the sum overflows."""

import pytest
import torch

from fastcal._checks import check_tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_entry_is_found_and_counted(dtype, bad):
    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[5, 7] = bad
    with pytest.raises(ValueError, match=r"x: expected finite values .*1 non-finite entries"):
        check_tensor("x", x)


def test_opposite_infinities_are_found():
    x = torch.tensor([float("inf"), float("-inf"), 1.0])
    with pytest.raises(ValueError, match="2 non-finite entries"):
        check_tensor("x", x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_entries_whose_sum_overflows_pass(dtype):
    largest = torch.finfo(dtype).max
    x = torch.full((5, 3), largest, dtype=dtype)
    assert not torch.isfinite(x.sum())
    assert check_tensor("x", x) is x


def test_finite_check_can_be_turned_off():
    x = torch.tensor([float("nan"), 1.0])
    assert check_tensor("x", x, finite=False) is x
