"""Weight averaging: an exponential moving average, or a plain running mean, of the weights.

Not in the L-Verse paper. Why it is here: the last weights of a run are one noisy point of the
optimizer's path; an average over the last stretch of that path is usually a better model for
the same training cost (Polyak averaging; "SWA" when the mean is taken over a cool-down). It
costs one fp32 copy of the weights and one ``lerp`` per step.

* ``ema``: ``avg ← avg + (1 − decay)·(w − avg)`` after every optimizer step from ``start`` on.
* ``mean``: the uniform mean of the weights after each step from ``start`` on.

Averaged are the tensors the optimizer steps: the model's parameters, or under fp16-o2 their
fp32 master copies. Buffers (e.g. an EMA codebook, which is an average of its own) are not, so
the exported model takes its buffers from the last step. Steps the fp16 loss scaler skipped
(no weight changed) are not counted. Under DDP every replica holds the same weights and keeps
the same average; under FSDP each rank averages its own shards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

AVERAGES = ("none", "ema", "mean")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU (an FSDP shard is gathered: collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``target`` (sharded again under FSDP), fp32."""
    full = full.float().to(target.device)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, target.device_mesh, target.placements)
    return full


class WeightAverage:
    def __init__(self, named: list[tuple[str, torch.Tensor]], mode: str, decay: float = 0.999, start: int = 0) -> None:
        if mode not in AVERAGES[1:]:
            raise ValueError(f"weight average {mode!r} is not one of {AVERAGES[1:]}")
        self.names = [n for n, _ in named]
        self.targets = [t for _, t in named]
        self.mode, self.decay, self.start = mode, float(decay), int(start)
        self.avg: list[torch.Tensor] | None = None
        self.count = 0  # steps averaged so far

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1 = the first step)."""
        if step < self.start:
            return
        current = [t.detach().float() for t in self.targets]  # no copy for fp32 weights
        if self.avg is None:
            self.avg = [c.clone() for c in current]
            self.count = 1
            return
        self.count += 1
        w = 1.0 / self.count if self.mode == "mean" else 1.0 - self.decay
        for a, c in zip(self.avg, current):
            a.lerp_(c, w)

    @property
    def ready(self) -> bool:
        return self.avg is not None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the weights hold the average; afterwards they are what they were."""
        if self.avg is None:
            raise RuntimeError(f"no weights averaged yet (averaging starts at step {self.start})")
        with torch.no_grad():
            saved = [t.detach().clone() for t in self.targets]
            for t, a in zip(self.targets, self.avg):
                t.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(self.targets, saved):
                    t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """Whole fp32 tensors (collective under FSDP: every rank must call it)."""
        weights = {n: _full(a) for n, a in zip(self.names, self.avg)} if self.avg is not None else {}
        return {"mode": self.mode, "decay": self.decay, "start": self.start, "count": self.count, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"the checkpoint averages weights by {state['mode']!r}, the config by {self.mode!r}")
        self.count = int(state["count"])
        weights = state["weights"]
        if not weights:
            self.avg = None
            return
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {missing[:5]}")
        with torch.no_grad():
            self.avg = [_like(weights[n], t) for n, t in zip(self.names, self.targets)]
