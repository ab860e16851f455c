"""Which checkpoint a run resumes from, and whether it fits the model.

``resume`` is a run directory, a step directory, ``"auto"`` (this run's checkpoints if any,
else a fresh start: what ``torchrun --max-restarts`` and cluster requeues need), or None (a
fresh start, refused where checkpoints exist already: the two runs' checkpoints would mix and
``keep_last`` would prune the new run's).

From a run directory the candidates are tried newest first (:meth:`CheckpointManager.candidates`):
a damaged one (:class:`~lverse.train.checkpoint.CheckpointDamaged`) is reported and passed
over, and once the run has resumed it is moved aside (``damaged_step_*``), as are checkpoints
newer than the one resumed from (``abandoned_step_*``: a resume from an explicit older step), so
the next checkpoint written is always the newest. A named step directory is not passed over.

A checkpoint of another model (its ``model.json`` differs from the task's) is not damage: it
is a one-line error naming the file and the fields that differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lverse.config import ConfigError
from lverse.train.checkpoint import REQUIRED_STATE, CheckpointDamaged, CheckpointManager, step_of
from lverse.train.rundir import flatten

Loaded = tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, Any], list[Path]]


def find_checkpoint(resume: str | Path | None, run_dir: Path, say: bool = True) -> Loaded | None:
    """``(path, model_state, model_meta, train_state, damaged passed over)`` of the checkpoint
    to resume from, or None for a fresh start (see the module doc). ``say``: print fallbacks."""
    mine = CheckpointManager(run_dir).candidates()
    if resume is None or (str(resume) == "auto" and not mine):
        if resume is None and mine:
            raise ConfigError(f"{run_dir} holds checkpoints already (newest: {mine[0].name}): continue that run with "
                              f"--resume {run_dir} (or --resume auto), or train into another run directory "
                              "(train.name or train.run_dir)")
        return None
    p = run_dir if str(resume) == "auto" else Path(resume)
    explicit = p.name.startswith("step_") or (p / "state.pt").is_file()
    if explicit:
        candidates = [p]
    else:
        candidates = CheckpointManager(p if (p / "checkpoints").is_dir() else run_dir).candidates()
        if not candidates:
            raise FileNotFoundError(f"--resume {p}: no checkpoint found (looked for {p}/checkpoints/step_*)")
    damaged: list[Path] = []
    for path in candidates:
        try:
            return (path, *CheckpointManager.load(path, require=REQUIRED_STATE), damaged)
        except CheckpointDamaged as e:
            if explicit:
                raise
            damaged.append(path)
            if say:
                print(f"[lverse] {e}: falling back to an older checkpoint", file=sys.stderr)
    raise CheckpointDamaged(f"--resume {p}: every checkpoint is damaged ({', '.join(d.name for d in damaged)}); "
                            "see the lines above")


def load_into(model: nn.Module, path: Path, meta: dict[str, Any], model_meta: dict[str, Any],
              state: dict[str, torch.Tensor]) -> None:
    """The checkpoint's weights into ``model``, or a one-line :class:`ConfigError` naming the file
    and what differs (``model_meta``: the task's, compared as the checkpoint stored it)."""
    mine = json.loads(json.dumps(model_meta, default=str))
    if meta != mine:
        old, new = flatten(meta), flatten(mine)
        diff = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} here" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        raise ConfigError(f"{path / 'model.safetensors'} was written for another model ({'; '.join(diff[:8])})")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch's message is many lines
        raise ConfigError(f"{path / 'model.safetensors'} does not fit the model: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"{path / 'model.safetensors'} does not fit the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


def set_aside(ckpt: CheckpointManager, resumed: Path, step: int, damaged: list[Path]) -> list[str]:
    """Move the damaged checkpoints and those of steps after ``step`` (the one resumed from,
    ``resumed``) aside (see the module doc); ``latest`` then names ``resumed`` if it is one of
    this run's. Returns the new names."""
    moved = []
    for other in ckpt.candidates():
        if step_of(other) > step or other in damaged:
            target = ckpt.set_aside(other, "damaged" if other in damaged else "abandoned")
            print(f"[lverse] moved {other.name} aside to {target.name}", file=sys.stderr)
            moved.append(target.name)
    if resumed.parent == ckpt.dir:
        ckpt.mark_latest(resumed)
    return moved
