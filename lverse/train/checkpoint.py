"""Checkpoints of a run: inference weights and training state, kept apart.

Layout inside a run directory::

    checkpoints/
      step_0001000/
        model.safetensors   fp32 weights (the master weights under fp16-o2), loadable alone
        model.json          {"kind": ..., "config": ..., "checksum": ...}: enough to rebuild the model
        state.pt            optimizer, scheduler, precision, step, RNG states, data position
        state.json          the checksum of state.pt
      latest                text file naming the newest complete step directory

A step directory is written under a temporary name and renamed only once complete, and
``latest`` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact. Only the newest ``keep_last`` step directories are kept; the trainer never
writes non-finite weights, so the newest one is always usable.

:meth:`CheckpointManager.load` checks everything it can before a run trusts a checkpoint: both
checksums, that ``state.pt`` unpickles as plain data (never objects) and holds what a resume
needs, and that every weight is finite. A failure is a :class:`CheckpointDamaged` naming the
file; the trainer then falls back to the next older checkpoint (:meth:`CheckpointManager.candidates`)
and moves the damaged directory aside (``damaged_step_*``, never deleted).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lverse.files import atomic_write_text, file_checksum, load_weights, save_weights, verify_checksum

# what a trainer's resume cannot do without (later additions are optional: older checkpoints lack them)
REQUIRED_STATE = ("step", "optimizer", "schedule", "precision", "rng")


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be trusted: truncated, bit-flipped, unreadable or non-finite."""


def _np_state_to_plain(st: tuple) -> tuple:
    # numpy's state holds an ndarray; as a tensor it loads under torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = st
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_load(path: Path, require: tuple[str, ...]) -> dict[str, Any]:
    # Training state is tensors, numbers, strings and containers only: never unpickle objects.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, RuntimeError, UnpicklingError, ...: all mean "damaged"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointDamaged(f"{path}: unreadable training state ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{path}: expected a dict of training state, got {type(state).__name__}")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointDamaged(f"{path}: the training state lacks {missing}")
    return state


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def step_of(path: Path) -> int:
    """``step_0001000`` → 1000 (-1 for any other name)."""
    try:
        return int(path.name.rsplit("_", 1)[-1]) if path.name.startswith("step_") else -1
    except ValueError:
        return -1


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        model_meta: dict[str, Any],
        train_state: dict[str, Any],
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        final = self.step_dir(step)
        tmp = self.dir / f".tmp_step_{step:07d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_weights(tmp / "model.safetensors", model_state, model_meta)
        torch.save(train_state, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"checksum": file_checksum(tmp / "state.pt")}))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        cands = self.candidates()
        return cands[0] if cands else None

    def candidates(self) -> list[Path]:
        """Step directories to resume from, best first: the one ``latest`` names, then the
        others from the newest step down (the fallbacks when it turns out damaged)."""
        steps = sorted((p for p in self.dir.glob("step_*") if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)
        marker = self.dir / "latest"
        try:
            named = self.dir / marker.read_text().strip() if marker.is_file() else None
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named in steps:
            steps.remove(named)
            steps.insert(0, named)
        return steps

    def set_aside(self, path: Path, why: str) -> Path:
        """Rename a step directory to ``{why}_step_*``: out of resumes and pruning, kept for a look."""
        target = self.dir / f"{why}_{path.name}"
        n = 1
        while target.exists():
            target = self.dir / f"{why}{n}_{path.name}"
            n += 1
        path.rename(target)
        return target

    def mark_latest(self, path: Path) -> None:
        atomic_write_text(self.dir / "latest", path.name + "\n")

    @staticmethod
    def load(path: str | Path, verify: bool | None = None, require: tuple[str, ...] = ("step",)
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load (model_state, model_meta, train_state) from a step directory. A damaged one
        (see the module doc; ``require``: keys the training state must hold) is a
        :class:`CheckpointDamaged`; ``verify``: checksums, as in :func:`lverse.files.verify_checksum`."""
        path = Path(path)
        if not (path / "state.pt").is_file():
            if not (path / "model.safetensors").is_file():
                raise FileNotFoundError(f"{path}: not a checkpoint directory (no state.pt)")
            raise CheckpointDamaged(f"{path}: state.pt is missing")
        try:
            state, meta = load_weights(path / "model.safetensors", verify=verify)
            record = path / "state.json"
            if record.is_file():
                verify_checksum(path / "state.pt", json.loads(record.read_text()).get("checksum"), verify)
        except (ValueError, FileNotFoundError, OSError) as e:  # json.JSONDecodeError is a ValueError
            raise CheckpointDamaged(str(e)) from None
        bad = non_finite(state)
        if bad:
            raise CheckpointDamaged(f"{path / 'model.safetensors'}: non-finite weights in {len(bad)} tensor(s), e.g. {bad[:3]}")
        train_state = _safe_load(path / "state.pt", require)
        if not isinstance(train_state["step"], int):
            raise CheckpointDamaged(f"{path / 'state.pt'}: step is {train_state['step']!r}")
        return state, meta, train_state
