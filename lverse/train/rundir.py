"""A run directory's own rules: one trainer at a time, what a resume may change, its event log.

* :class:`RunLock`: the process that trains in a run directory (rank 0) holds an exclusive
  ``flock`` on ``RUN/.lock``; a second trainer is refused with the holder's pid and host. The
  operating system releases the lock when the holder dies, even by SIGKILL, so a requeued or
  restarted job never finds a stale lock.
* :func:`resume_changes`: a resumed run's resolved config against the ``config.yaml`` the run
  recorded. Only the settings in :data:`~lverse.train.settings.RESUMABLE` (learning rate, step
  budget, logging, checkpoint cadence, loader threads, guards) may differ; any other difference
  is refused by name, since the checkpoint's model, optimizer and data position would not fit it.
* :func:`append_event`: ``RUN/events.jsonl``, one JSON object per event worth keeping beside
  the metrics (a resume and what it changed, a fallback past a damaged checkpoint).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from lverse.config import ConfigError
from lverse.train.guard import RunError
from lverse.train.settings import RESUMABLE

IGNORED = ("train.run_dir", "train.name")  # they name the run; the directory resumed is what counts


class RunLocked(RunError):
    """Another process trains in this run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._file: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (lverse trains on Linux)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # "a+": the holder's note survives our failed try
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            f.close()
            raise RunLocked(f"{self.path.parent} is being trained in by {holder}: two trainers would overwrite "
                            "each other's checkpoints; wait for it to end or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (lists stay values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_changes(recorded: dict[str, Any], current: dict[str, Any], where: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, current)}`` for every setting that differs; a :class:`ConfigError`
    naming each one that may not change on a resume (``where``: the recorded file)."""
    old, new = flatten(recorded), flatten(current)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if k not in IGNORED and old.get(k) != new.get(k)}
    allowed = {f"train.{k}" for k in RESUMABLE}
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        what = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume: {len(refused)} setting(s) differ from {where} and cannot change on a resume "
                          f"(the checkpoint was trained with them): {what}. A resume may change "
                          f"{', '.join(sorted(allowed))}; start a new run (another train.name) for anything else")
    return changed


def read_recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` as plain data, or None when there is none (or it is unreadable)."""
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}, default=str) + "\n")
