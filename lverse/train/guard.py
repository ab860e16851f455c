"""What stops a run that cannot go on, and the errors it stops with.

Two things end a run early with a clear error (exit code 1 from the CLI), both configurable in
:class:`~lverse.train.settings.TrainConfig`:

* **Divergence** (:class:`Diverged`). A step whose loss (on any rank) or gradients are not
  finite is not applied: the weights, optimizer and average stay as they were, and the step is
  counted (``nonfinite_steps``; the fp16 loss scaler's skips are ``skipped_steps``). After
  ``train.max_bad_steps`` such steps in a row the run stops, naming the step. No checkpoint is
  written for a step whose loss was not finite, nor for non-finite weights, so ``latest`` stays
  on the last good checkpoint and a requeued ``--resume`` cannot overwrite good checkpoints
  with bad ones.
* **Unusable data** (:class:`DataError`). Datasets return a
  :class:`~lverse.data.images.Skipped` for a bad record and the collate counts them. The run
  stops when ``train.bad_items_in_a_row`` items in a row gave nothing usable, or a whole epoch
  did, or the share of bad items passes ``train.bad_share_stop`` (judged once 200 items were
  drawn, or at the end of an epoch); past ``train.bad_share_warn`` it warns once. The error
  names the data and the counts by reason.

:class:`StopRequested` is how a stop signal leaves a step that is waiting for data: it derives
from ``BaseException`` so that a dataset's ``except Exception`` cannot swallow it.
"""
from __future__ import annotations

import sys
from typing import Any

BAD_SHARE_MIN_ITEMS = 200  # items drawn before the bad share is judged (or an epoch's end)


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to do. ``checkpoint``: whether
    the state before the failing step may still be saved (consistent, but is it useful?)."""

    checkpoint = True


class Diverged(RunError):
    checkpoint = False  # the state is what diverged: keep latest on the last good checkpoint


class DataError(RunError):
    pass


class StopRequested(BaseException):
    """A stop signal arrived while the step waited for data: stop before this step."""


def count_items(batch: Any, usable: int) -> tuple[int, dict[str, int]]:
    """``(skipped, skipped by reason)`` of a collated batch (see ``collate_skip_none``)."""
    if not isinstance(batch, dict) or not batch.get("skipped"):
        return 0, {}
    skipped = int(batch["skipped"])
    by = dict(batch.get("skipped_by") or {"unreadable": skipped})
    return skipped, {str(k): int(v) for k, v in by.items()}


def source_of(dataset: Any) -> str:
    """What the error messages call the data: its ``source`` (a path, a shard spec) if it has one."""
    return str(getattr(dataset, "source", "") or type(dataset).__name__)


def counts_text(by: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) or "none"


class DataHealth:
    """Counts the items a rank draws and stops or warns as the module doc says. The counts live
    in the trainer's :class:`~lverse.train.loop.RunState` (``st``), so they are checkpointed."""

    def __init__(self, source: str, in_a_row: int, warn: float, stop: float, is_main: bool) -> None:
        self.source, self.in_a_row, self.warn, self.stop = source, in_a_row, warn, stop
        self.is_main = is_main
        self.warned = False

    def after_batch(self, st: Any, usable: int, skipped: int, by: dict[str, int]) -> None:
        st.items += usable + skipped
        for k, v in by.items():
            st.skipped_by[k] = st.skipped_by.get(k, 0) + v
        st.bad_in_a_row = st.bad_in_a_row + skipped if usable == 0 else 0
        if self.in_a_row and st.bad_in_a_row >= self.in_a_row:
            raise DataError(f"{self.source}: no usable item in the last {st.bad_in_a_row} drawn "
                            f"(train.bad_items_in_a_row={self.in_a_row}); skipped so far by reason: "
                            f"{counts_text(st.skipped_by)}. Check the data path and the files")
        if st.items >= BAD_SHARE_MIN_ITEMS:
            self.judge_share(st)

    def after_epoch(self, st: Any, usable_in_epoch: int, whole_epoch: bool) -> None:
        if whole_epoch and usable_in_epoch == 0:
            raise DataError(f"{self.source}: a whole epoch gave no usable item; skipped by reason: "
                            f"{counts_text(st.skipped_by)}. Check the data path and the files")
        self.judge_share(st)

    def judge_share(self, st: Any) -> None:
        bad = sum(st.skipped_by.values())
        share = bad / max(st.items, 1)
        if self.stop < 1.0 and share > self.stop:
            raise DataError(f"{self.source}: {bad} of {st.items} items drawn were bad ({share:.1%} > "
                            f"train.bad_share_stop={self.stop:g}); by reason: {counts_text(st.skipped_by)}")
        if share > self.warn and not self.warned:
            self.warned = True
            if self.is_main:
                print(f"[lverse] warning: {self.source}: {bad} of {st.items} items drawn were bad ({share:.1%} > "
                      f"train.bad_share_warn={self.warn:g}); by reason: {counts_text(st.skipped_by)}",
                      file=sys.stderr, flush=True)
