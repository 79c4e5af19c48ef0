"""The training stream: a seeded order of global batches, seeded augmentations and caption draws.

Everything random about the data is a function of ``(seed, epoch, index)``, not of the process, the
number of workers or where training stopped:

- order: epoch ``e`` visits ``torch.randperm(N)`` drawn from a generator seeded with
  ``sha256("fastcal-finetune-order:{seed}:{e}")``, cut into global batches of ``B`` (the last partial
  batch dropped); global step ``t`` is batch ``t mod (N // B)`` of epoch ``t // (N // B)``, and rank ``r``
  of ``W`` takes rows ``[r B / W, (r + 1) B / W)`` of it;
- view: image ``i`` in epoch ``e`` is transformed with torch's, Python's and NumPy's generators seeded by
  ``sha256("fastcal-finetune-view:{seed}:{e}:{i}")`` (in a forked state, so the caller's generators are
  untouched), and its caption template is the next 8 bytes of that digest modulo the template count.

So two ranks with half the batch each see exactly the rows one process with the whole batch sees, and a
resumed run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from fastcal._checks import check_int, fail
from fastcal._seeds import derived_seed
from fastcal.data.items import Item, load_image, seeded_generators


def view_seed_and_draw(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """The augmentation seed and the caption draw of image ``index`` in ``epoch``."""
    label = f"fastcal-finetune-view:{seed}:{epoch}:{index}"
    return derived_seed(label), derived_seed(label, 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of ``n`` images in ``epoch`` (a seeded permutation)."""
    generator = torch.Generator().manual_seed(derived_seed(f"fastcal-finetune-order:{seed}:{epoch}"))
    return torch.randperm(n, generator=generator)


class TrainingViews(Dataset):
    """``dataset[(epoch, index)] -> (image, label, caption token ids)`` with seeded views.

    Args:
        items: ``(image, label)`` pairs (paths or PIL images).
        transform: the training transform (PIL -> tensor); run with the view's seeded generators.
        seed: the run's seed.
        captions: ``captions(label, draw) -> token ids`` (``fastcal.finetune.flyp.CaptionSampler``), or
            None when the method needs no captions (an empty tensor is returned instead).
    """

    def __init__(
        self,
        items: Sequence[Item],
        transform: Callable[[Any], torch.Tensor],
        *,
        seed: int,
        captions: Callable[[int, int], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise fail("items", "a non-empty list of (image, label) pairs", repr(items)[:80])
        self.items = list(items)
        self.transform = transform
        self.seed = check_int("seed", seed, minimum=0)
        self.captions = captions

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
        epoch, index = key
        image, label = self.items[index]
        view_seed, draw = view_seed_and_draw(self.seed, epoch, index)
        with seeded_generators(view_seed):
            pixels = self.transform(load_image(image))
        tokens = self.captions(label, draw) if self.captions is not None else torch.empty(0, dtype=torch.long)
        return pixels, label, tokens


class GlobalBatchSampler(Sampler):
    """This rank's share of the global batches of steps ``[start_step, total_steps)`` (module docstring).

    Yields lists of ``(epoch, index)`` keys for ``TrainingViews``; use as a DataLoader's
    ``batch_sampler``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_int("n", n, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("world_size", world_size, minimum=1)
        if batch_size % world_size:
            raise fail("batch_size", f"a multiple of the world size {world_size}", batch_size)
        if batch_size > n:
            raise fail("batch_size", f"at most the {n} training images", batch_size)
        check_int("total_steps", total_steps, minimum=1)
        check_int("start_step", start_step, minimum=0)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def batch(self, step: int, order: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """The ``(epoch, index)`` keys of this rank's rows of global step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if order is None:
            order = epoch_order(self.n, self.seed, epoch)
        local = self.batch_size // self.world_size
        begin = position * self.batch_size + self.rank * local
        return [(epoch, int(i)) for i in order[begin : begin + local]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, order = -1, None
        for step in range(self.start_step, self.total_steps):
            epoch = step // self.steps_per_epoch
            if epoch != cached_epoch:
                cached_epoch, order = epoch, epoch_order(self.n, self.seed, epoch)
            yield self.batch(step, order)
