"""What a model plugs into the trainer: a :class:`Task` (its model, loss, data and pictures)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset


class Task:
    """What a stage plugs into the trainer. Subclasses set ``self.model`` in ``__init__``."""

    model: nn.Module

    def model_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        # Every trainable parameter decayed: stage 1 (AugVAE) trains so, as its recipes were
        # measured. Transformers decay weight matrices only (lverse.train.optim.weight_decay_groups).
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def train_dataset(self) -> Dataset:
        """The training data: map-style (indexed with the sampler's ``(index, seed)``) or a
        stream. Optional: ``source`` (a path or shard spec the trainer's errors name) and
        ``skip_summary()`` (records dropped while it was built, by reason: counted once)."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def prepare(self, device: torch.device) -> None:
        """Move non-trained helpers (e.g. the LPIPS network) to the device."""

    def training_step(self, model: nn.Module, batch: Any, step: int, autocast: Callable) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss to backpropagate and scalars to log. ``model`` may be DDP-wrapped."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1 = the first), e.g. to clamp a parameter of ``self.model``."""

    def periodic_logs(self) -> dict[str, float]:
        """Extra scalars at log time (e.g. codebook health), already reduced over ranks."""
        return {}

    @torch.no_grad()
    def visualize(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """Image grids to log, name → (N,3,H,W) in [-1, 1]."""
        return {}

    def extra_files(self) -> dict[str, str]:
        """Text files saved with every checkpoint (e.g. a tokenizer)."""
        return {}

    def batch_size_of(self, batch: Any) -> int:
        """Usable items in a collated batch (0: every item of it was unreadable)."""
        if isinstance(batch, dict) and isinstance(batch.get("batch_size"), int):
            return batch["batch_size"]  # collate_skip_none says so itself
        if isinstance(batch, dict):
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    return v.shape[0]
        if isinstance(batch, torch.Tensor):
            return batch.shape[0]
        return 1
