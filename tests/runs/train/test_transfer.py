"""fastcal.runs.train.transfer: the class groups a saved prompt is evaluated on."""

import pytest

from fastcal.data.testbed import digits_splits
from fastcal.runs.train.transfer import target_groups


def test_target_groups_base_new_and_all():
    splits = digits_splits()
    base, new = target_groups(splits, "base_new")
    assert base.classnames == ["zero", "one", "two", "three", "four"]
    assert new.classnames == ["five", "six", "seven", "eight", "nine"]
    assert len(base.items) + len(new.items) == len(splits.test)
    assert {label for _, label in new.items} == set(range(5))  # remapped to 0..4
    (only_new,) = target_groups(splits, "new")
    assert only_new.classnames == new.classnames and len(only_new.items) == len(new.items)
    (everything,) = target_groups(splits, "all")
    assert everything.classnames == list(splits.classnames) and len(everything.items) == len(splits.test)


@pytest.mark.parametrize("groups", ["auto", "bsae", ""])
def test_target_groups_refuses_unknown_groups(groups):
    with pytest.raises(ValueError, match="groups: expected one of"):
        target_groups(digits_splits(), groups)
