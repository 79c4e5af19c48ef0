"""Few-shot sampling, base-to-new classes and the transfer target lists."""

import math
import random
from collections import Counter, defaultdict

import pytest
import torch

from fastcal.data import DatasetSplits
from fastcal.data.protocols import (
    CROSS_DATASET_TARGETS,
    DOMAIN_GENERALIZATION_TARGETS,
    ClassSubset,
    base_new_split,
    few_shot,
    few_shot_splits,
)


def make_items(counts, offset=0):
    """Items with string "images", classes interleaved (so first-appearance order matters)."""
    pool = [(f"img{offset + i}_{label}", label) for label, n in enumerate(counts) for i in range(n)]
    random.Random(7).shuffle(pool)
    return pool


def dassl_reference(items, k, seed):
    """Dassl's generate_fewshot_dataset(repeat=False) run after set_random_seed(seed)."""
    random.seed(seed)
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    out = []
    for group in tracker.values():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


def test_few_shot_draws_k_per_class_like_coop():
    items = make_items([9, 13, 5, 21, 8, 11, 6])
    state = random.getstate()
    for k in (1, 4, 5):
        for seed in (1, 2, 3):
            drawn = few_shot(items, k, seed)
            assert Counter(label for _, label in drawn) == dict.fromkeys(range(7), k)
            assert len(set(drawn)) == len(drawn) and set(drawn) <= set(items)
            assert drawn == few_shot(items, k, seed)
            assert drawn == dassl_reference(items, k, seed)
    random.setstate(state)
    assert few_shot(items, 4, 1) != few_shot(items, 4, 2)


def test_few_shot_small_classes_keep_all_or_repeat():
    items = make_items([2, 7, 3])
    kept = Counter(label for _, label in few_shot(items, 4, 0))
    assert kept == {0: 2, 1: 4, 2: 3}
    repeated = few_shot(items, 4, 0, repeat=True)
    assert Counter(label for _, label in repeated) == {0: 4, 1: 4, 2: 4}
    assert set(repeated) <= set(items)


def test_few_shot_checks_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        few_shot([], 1, 0)
    with pytest.raises(ValueError, match="k"):
        few_shot(make_items([3]), 0, 0)
    with pytest.raises(TypeError, match="seed"):
        few_shot(make_items([3]), 1, 0.5)


def test_few_shot_splits_follows_coop_train_then_val():
    train, val, test = make_items([20, 17, 30]), make_items([8, 9, 7], 100), make_items([4, 4, 4], 200)
    splits = DatasetSplits("toy", ["a", "b", "c"], ["{}"], train, val, test)
    for k, k_val in [(2, 2), (16, 4)]:
        fs = few_shot_splits(splits, k, 1)
        assert Counter(label for _, label in fs.train) == dict.fromkeys(range(3), k)
        assert Counter(label for _, label in fs.val) == dict.fromkeys(range(3), k_val)
        assert fs.test == test and fs.classnames == splits.classnames
        rng = random.Random(1)  # one stream: train first, then val
        by_label = defaultdict(list)
        for item in train:
            by_label[item[1]].append(item)
        expected_train = [x for g in by_label.values() for x in rng.sample(g, k)]
        by_label = defaultdict(list)
        for item in val:
            by_label[item[1]].append(item)
        expected_val = [x for g in by_label.values() for x in rng.sample(g, k_val)]
        assert (fs.train, fs.val) == (expected_train, expected_val)


@pytest.mark.parametrize("num_classes", [2, 7, 10, 101])
def test_base_new_halves(num_classes):
    split = base_new_split(num_classes)
    m = math.ceil(num_classes / 2)
    assert split.base.classes == tuple(range(m))
    assert split.new.classes == tuple(range(m, num_classes))
    assert len(split.base) + len(split.new) == num_classes
    assert split.base.splits is None and split.base.classnames is None


def test_base_new_label_maps_round_trip():
    base, new = base_new_split([f"class{i}" for i in range(9)])
    assert base.classnames == [f"class{i}" for i in range(5)]
    assert new.classnames == ["class5", "class6", "class7", "class8"]
    original = torch.tensor([5, 8, 6, 6, 7])
    sub = new.to_subset(original)
    assert sub.tolist() == [0, 3, 1, 1, 2]
    assert torch.equal(new.to_original(sub), original)
    assert new.to_original([0, 3]) == [5, 8] and new.to_subset(7) == 2
    assert base.to_original(base.to_subset(list(range(5)))) == list(range(5))
    with pytest.raises(ValueError, match="outside this subset"):
        base.to_subset(torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="labels"):
        new.to_subset(2)
    with pytest.raises(ValueError, match="labels"):
        new.to_original(4)


def test_base_new_split_of_a_dataset():
    train, test = make_items([3, 4, 5, 6, 7]), make_items([2, 2, 2, 2, 2], 50)
    splits = DatasetSplits("toy", list("abcde"), ["a {}."], train, [], test)
    base, new = base_new_split(splits)
    assert base.splits.classnames == ["a", "b", "c"] and new.splits.classnames == ["d", "e"]
    assert base.splits.name == "toy/base" and new.splits.templates == ["a {}."]
    for subset in (base, new):
        for part, full in (("train", train), ("test", test)):
            kept = [item for item in full if item[1] in subset.classes]
            sub_items = subset.splits.items(part)
            assert [image for image, _ in sub_items] == [image for image, _ in kept]
            assert subset.to_original([label for _, label in sub_items]) == [label for _, label in kept]
            assert all(0 <= label < len(subset) for _, label in sub_items)
    assert len(base.splits.train) + len(new.splits.train) == len(train)


def test_class_subset_select_and_checks():
    subset = ClassSubset((1, 3), 4)
    assert subset.select([("a", 0), ("b", 3), ("c", 1)]) == [("b", 1), ("c", 0)]
    with pytest.raises(TypeError, match="source"):
        base_new_split("abc")
    with pytest.raises(ValueError, match="number of classes"):
        base_new_split(1)


def test_transfer_targets():
    assert len(CROSS_DATASET_TARGETS) == 10 and "imagenet" not in CROSS_DATASET_TARGETS
    assert DOMAIN_GENERALIZATION_TARGETS == ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
