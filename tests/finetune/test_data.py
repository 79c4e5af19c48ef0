import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fastcal.finetune.data import GlobalBatchSampler, TrainingViews, epoch_order, view_seed_and_draw


def test_ranks_partition_the_global_batches_of_one_process():
    single = list(GlobalBatchSampler(23, 6, seed=3, total_steps=9))
    ranks = [list(GlobalBatchSampler(23, 6, seed=3, total_steps=9, rank=r, world_size=3)) for r in range(3)]
    assert len(single) == 9 and all(len(b) == 6 for b in single)
    for step, batch in enumerate(single):
        assert batch == ranks[0][step] + ranks[1][step] + ranks[2][step]
    # 3 full batches per epoch (the last 5 images dropped); each epoch visits distinct images
    for epoch in range(3):
        keys = [k for batch in single[3 * epoch : 3 * epoch + 3] for k in batch]
        assert {e for e, _ in keys} == {epoch}
        assert len({i for _, i in keys}) == 18
        assert [i for _, i in keys] == epoch_order(23, 3, epoch)[:18].tolist()
    assert single[0] != single[3]


def test_resumed_sampler_continues_the_stream():
    full = list(GlobalBatchSampler(20, 4, seed=0, total_steps=12))
    tail = GlobalBatchSampler(20, 4, seed=0, total_steps=12, start_step=7)
    assert len(tail) == 5
    assert list(tail) == full[7:]


def test_sampler_checks_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        GlobalBatchSampler(20, 5, seed=0, total_steps=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        GlobalBatchSampler(3, 4, seed=0, total_steps=2)


def _items(n):
    rng = np.random.default_rng(0)
    return [(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)), i % 2) for i in range(n)]


def test_views_are_a_function_of_seed_epoch_and_index():
    transform = T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.ToTensor()])
    drawn = []

    def captions(label, draw):
        drawn.append(draw)
        return torch.tensor([label, draw % 5])

    views = TrainingViews(_items(4), transform, seed=1, captions=captions)
    torch.manual_seed(123)
    random.seed(5)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a_image, a_label, a_tokens = views[(0, 2)]
    b_image, _, b_tokens = views[(0, 2)]
    assert torch.equal(a_image, b_image) and torch.equal(a_tokens, b_tokens)
    assert a_label == 0 and a_image.shape == (3, 8, 8)
    assert not torch.equal(views[(1, 2)][0], a_image)
    assert not torch.equal(TrainingViews(_items(4), transform, seed=2)[(0, 2)][0], a_image)
    assert drawn[0] == view_seed_and_draw(1, 0, 2)[1]
    # the caller's generators are untouched
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1]
    assert np.array_equal(np.random.get_state()[1], state[2])
    # no captions: an empty token row
    assert TrainingViews(_items(2), transform, seed=0)[(0, 1)][2].numel() == 0
    with pytest.raises(ValueError, match="items"):
        TrainingViews([], transform, seed=0)
