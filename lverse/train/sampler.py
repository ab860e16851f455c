"""A resumable, rank-sharded sampler that also hands each item its augmentation seed.

Exact resume needs two things a stock ``DistributedSampler`` does not give: starting an epoch
part-way through, and augmentation randomness that does not depend on which DataLoader worker
happened to load an item. So this sampler yields ``(index, seed)`` pairs: datasets derive their
random crop / caption choice from ``seed`` (a function of run seed, epoch and position), and the
trainer records how many samples of the epoch were consumed.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    def __init__(
        self,
        num_items: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_items <= 0:
            raise ValueError("dataset is empty")
        self.num_items = num_items
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed this epoch
        # every rank gets the same number of items (the permutation wraps round), so ranks stay in step
        self.per_rank = -(-num_items // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        total = self.per_rank * self.world_size
        if total > self.num_items:
            order = torch.cat([order, order[: total - self.num_items]])
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order().tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        for pos in range(self.start, len(order)):
            # the seed identifies (epoch, global position), so it is the same whoever loads it
            yield order[pos], (base + pos * self.world_size + self.rank) % (2**63 - 1)

    def __len__(self) -> int:
        return self.per_rank - self.start
