"""Checkpoints of a run: inference weights and training state, kept apart.

Layout inside a run directory::

    checkpoints/
      step_0001000/
        model.safetensors   fp32 weights (the master weights under fp16-o2), loadable alone
        model.json          {"kind": ..., "config": ...}: enough to rebuild the model
        state.pt            optimizer, scheduler, precision, step, RNG states, data position
      latest                text file naming the newest complete step directory

A step directory is written under a temporary name and renamed only once complete, and
``latest`` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact. Only the newest ``keep_last`` step directories are kept.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lverse.files import atomic_write_text, load_weights, save_weights


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


def _safe_load(path: Path) -> dict[str, Any]:
    # Training state is tensors, numbers, strings and containers only: never unpickle objects.
    return torch.load(path, map_location="cpu", weights_only=True)


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
        marker = self.dir / "latest"
        if marker.is_file():
            p = self.dir / marker.read_text().strip()
            if (p / "state.pt").is_file():
                return p
        steps = sorted(p for p in self.dir.glob("step_*") if (p / "state.pt").is_file())
        return steps[-1] if steps else None

    @staticmethod
    def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load (model_state, model_meta, train_state) from a step directory."""
        path = Path(path)
        if not (path / "state.pt").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no state.pt)")
        state, meta = load_weights(path / "model.safetensors")
        return state, meta, _safe_load(path / "state.pt")
