"""A shuffling sampler whose order is a function of (seed, epoch) only, so resumed runs see the same order."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Yields a permutation of range(size) drawn from seed + epoch. Call `set_epoch` before every epoch
    (the Accelerate-prepared loader forwards its own `set_epoch` here), otherwise every epoch repeats the
    same order, which is the official code's sampler bug."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
