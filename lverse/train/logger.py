"""Per-run logging: TensorBoard scalars and images, a metrics.jsonl file, PNG grids.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step, so scripts and
tests can read a run's curves without TensorBoard.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lverse.files import save_grid


class LogWindow:
    """The scalars of the steps since the last log: per-key sums and counts, because some
    scalars appear only on some steps (e.g. per-direction NLLs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.start = time.time()

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.dir / "tb"))
                except ImportError:  # tensorboard is a dependency, but never make logging fatal
                    self.writer = None
            self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def images(self, step: int, name: str, images: torch.Tensor, nrow: int = 8) -> Path | None:
        if not self.enabled:
            return None
        path = save_grid(images, self.dir / "images" / f"{name}_{step:07d}.png", nrow)
        if self.writer is not None:
            grid = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1)
            self.writer.add_image(name, grid, step)
        return path

    def close(self) -> None:
        if self.enabled:
            if self.writer is not None:
                self.writer.close()
            self._jsonl.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
