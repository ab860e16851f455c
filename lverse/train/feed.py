"""Where a run stands (:class:`RunState`) and the batches it trains on (:class:`Feed`).

The feed hands out batches forever, epoch after epoch, from the position in the run state, and
counts every item it draws with the data guard (:class:`~lverse.train.guard.DataHealth`), so a
bad dataset stops the run with its counts instead of looping. With map-style data the sampler
(:class:`~lverse.train.sampler.ResumableSampler`) starts an epoch part-way through; a stream
(tar shards) skips the batches of the current epoch already consumed.

An epoch of map-style data ends with its last batch: the position moves to the next epoch
*before* that batch is handed out, so a checkpoint written after that step resumes at the start
of the next epoch (not at an empty remainder of this one), and the step knows it ended an epoch
(:attr:`Feed.epoch_ended`, for schedules that act once per epoch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset

from lverse.train.guard import DataError, DataHealth, count_items, source_of
from lverse.train.sampler import ResumableSampler


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (per rank) and restored by ``resume``."""

    step: int = 0             # optimizer steps taken (applied or skipped)
    epoch: int = 0
    pos: int = 0              # samples of this epoch this rank has consumed
    elapsed: float = 0.0      # seconds of training so far (train.time_limit_minutes)
    items: int = 0            # items this rank drew, usable or not
    skipped_by: dict[str, int] = field(default_factory=dict)  # this rank's bad items, by reason
    bad_in_a_row: int = 0     # unusable items drawn in a row
    nonfinite_steps: int = 0  # steps not applied because the loss was not finite
    bad_steps_in_a_row: int = 0

    @property
    def skipped_items(self) -> int:
        return sum(self.skipped_by.values())

    def copy(self) -> RunState:
        return dataclasses.replace(self, skipped_by=dict(self.skipped_by))

    def assign(self, other: RunState) -> None:
        """Become a copy of ``other``, in place (the feed holds this object)."""
        for f in dataclasses.fields(RunState):
            setattr(self, f.name, getattr(other.copy(), f.name))

    @classmethod
    def from_checkpoint(cls, train_state: dict[str, Any], rank: int, world_size: int) -> RunState:
        """This rank's position and counts (a checkpoint from before per-rank state: rank 0's)."""
        ranks = train_state.get("ranks")
        if ranks:
            mine = ranks[rank] if len(ranks) == world_size else ranks[0]
        else:
            skipped = int(train_state.get("skipped_items", 0))
            mine = {"epoch": train_state["epoch"], "pos": train_state["pos"], "elapsed": train_state.get("elapsed", 0.0),
                    "skipped_by": {"unreadable": skipped} if skipped else {}}
        known = {f.name for f in dataclasses.fields(cls)}
        st = cls(**{k: v for k, v in mine.items() if k in known})
        st.skipped_by, st.step = dict(st.skipped_by), int(train_state["step"])
        return st


class Feed:
    def __init__(self, dataset: Dataset, sampler: ResumableSampler | None, loader: DataLoader, state: RunState,
                 health: DataHealth, task: Any, batch_size: int) -> None:
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.state, self.health, self.task, self.batch_size = state, health, task, batch_size
        self.epoch_ended = False  # set when a batch handed out ended its epoch; the trainer clears it

    def __iter__(self) -> Iterator[Any]:
        st, bs = self.state, self.batch_size
        while True:
            whole, usable = st.pos == 0, 0
            if self.sampler is not None:
                self.sampler.set_epoch(st.epoch, st.pos)
                left = len(self.loader)  # batches of this epoch still to come (drop_last)
                it = iter(self.loader)
                for i in range(left):
                    b = next(it)
                    usable += self._count(b)
                    st.pos += bs
                    if i == left - 1:
                        self._end_epoch(usable, whole)
                    yield b
                del it
                if left == 0:  # resumed just before the epoch's leftover (fewer items than a batch)
                    if whole:
                        raise DataError(f"{source_of(self.dataset)}: an epoch has no full batch")
                    self._end_epoch(usable, False)
            else:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(st.epoch)  # type: ignore[attr-defined]
                skip, n = st.pos // bs, 0
                for b in self.loader:
                    n += 1
                    if n <= skip:
                        continue
                    usable += self._count(b)
                    st.pos += bs
                    yield b
                if n == 0:
                    raise DataError(f"{source_of(self.dataset)}: the training data yielded no batch in a whole epoch "
                                    "(empty data set?)")
                self._end_epoch(usable, whole)

    def _count(self, batch: Any) -> int:
        usable = self.task.batch_size_of(batch)
        skipped, by = count_items(batch, usable)
        self.health.after_batch(self.state, usable, skipped, by)
        return usable

    def _end_epoch(self, usable: int, whole: bool) -> None:
        self.health.after_epoch(self.state, usable, whole)
        self.state.epoch, self.state.pos = self.state.epoch + 1, 0
        self.epoch_ended = True
