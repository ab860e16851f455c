"""Learning-rate schedules: plateau halving (two rules), and a cosine (``train.schedule``).

Each answers ``lr_at(step, progress)`` before each optimizer step, ``observe(loss, step)``
after it and ``end_epoch()`` when the step finished an epoch, and keeps its state in the
checkpoint. ``rebase(lr)`` sets a new learning rate on a resume (``--resume RUN train.lr=X``).

``plateau`` (:class:`PlateauHalving`, the papers' "halve the learning rate when the loss
plateaus"): the training loss is averaged over windows of ``window`` steps (already averaged
over ranks by the caller, so every rank takes the same decision). When ``patience`` windows in
a row fail to improve on the best window by a relative ``threshold``, the learning rate is
multiplied by ``factor`` (0.5), down to ``min_lr``. An optional linear warm-up precedes it, and
an optional linear cool-down ends it: over the last ``cooldown_steps`` of ``total_steps`` the
rate falls linearly from its current value to ``min_lr``. (Short runs that stop while the loss
still falls gain most of a halving schedule's benefit from such a final decay; the paper
recipes leave it off.)

``plateau_epoch`` (:class:`PlateauEpoch`): the rule of the official L-Verse code, PyTorch's
``ReduceLROnPlateau(mode="min", factor=0.5, patience=10, cooldown=10, min_lr=1e-6,
threshold=1e-4)`` stepped once per epoch with that epoch's mean training loss (the mean of the
steps' rank-averaged losses). An epoch is bad when its mean does not beat the best so far by the
relative threshold; after a halving, ``cooldown`` epochs pass before bad epochs count again; the
rate halves when more than ``patience`` bad epochs have accumulated. Warm-up and the linear
cool-down are as for ``plateau``.

``cosine`` (:class:`Cosine`): a linear warm-up times a cosine from ``lr`` to
``lr × min_lr_ratio`` over the run's *progress* in [0, 1], which the trainer computes as the
larger of ``step / max_steps`` and ``elapsed / train.time_limit_minutes``: a run on a slow
machine then stops on time with its schedule finished, instead of being cut off at a high rate.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lverse.train.settings import TrainConfig

SCHEDULES = ("plateau", "plateau_epoch", "cosine")


class PlateauHalving:
    def __init__(
        self,
        base_lr: float,
        window: int = 500,
        patience: int = 3,
        factor: float = 0.5,
        threshold: float = 1e-3,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        enabled: bool = True,
        total_steps: int = 0,
        cooldown_steps: int = 0,
    ) -> None:
        if cooldown_steps < 0 or (cooldown_steps and total_steps <= 0):
            raise ValueError(f"cooldown_steps={cooldown_steps} needs total_steps > 0 (got {total_steps})")
        self.base_lr = base_lr
        self.window = max(1, window)
        self.patience = patience
        self.factor = factor
        self.threshold = threshold
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.enabled = enabled and patience > 0
        self.total_steps = total_steps
        # a short smoke run (max_steps below the config's cool-down) cools down over all of it
        self.cooldown_steps = min(cooldown_steps, total_steps)
        self.lr = base_lr
        self.best = math.inf
        self.bad_windows = 0
        self.halvings = 0
        self._sum = 0.0
        self._n = 0

    def lr_at(self, step: int, progress: float | None = None) -> float:
        """The rate for optimizer step ``step`` (0-based); ``progress`` is not used here: the
        cool-down counts steps (so ``train.time_limit_minutes`` is refused with this schedule)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.in_cooldown(step):
            return self.min_lr + (self.lr - self.min_lr) * max(self.total_steps - step, 0) / self.cooldown_steps
        return self.lr

    def in_cooldown(self, step: int) -> bool:
        return bool(self.cooldown_steps) and self.total_steps - step <= self.cooldown_steps

    def observe(self, loss: float, step: int | None = None) -> bool:
        """Record one step's loss; returns True when the learning rate was just halved.
        No halving once ``step`` is inside the cool-down (it decays the rate already)."""
        if not self.enabled or not math.isfinite(loss):
            return False
        if step is not None and self.in_cooldown(step):
            return False
        self._sum += loss
        self._n += 1
        if self._n < self.window:
            return False
        mean = self._sum / self._n
        self._sum, self._n = 0.0, 0
        if mean < self.best * (1 - self.threshold):
            self.best = mean
            self.bad_windows = 0
            return False
        self.bad_windows += 1
        if self.bad_windows >= self.patience and self.lr * self.factor >= self.min_lr:
            self.lr *= self.factor
            self.halvings += 1
            self.bad_windows = 0
            self.best = mean
            return True
        return False

    def end_epoch(self) -> bool:
        return False  # windows of steps, not epochs

    def rebase(self, lr: float) -> None:
        """A new learning rate from now on (halvings so far are forgotten)."""
        self.base_lr = self.lr = lr

    _STATE = ("lr", "best", "bad_windows", "halvings", "_sum", "_n")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k in self._STATE:
                setattr(self, k, v)


class PlateauEpoch(PlateauHalving):
    """``plateau_epoch``: see the module doc. ``observe`` only sums the epoch's losses;
    :meth:`end_epoch` decides."""

    def __init__(self, base_lr: float, patience: int = 10, cooldown: int = 10, min_lr: float = 1e-6,
                 threshold: float = 1e-4, factor: float = 0.5, warmup_steps: int = 0, total_steps: int = 0,
                 cooldown_steps: int = 0) -> None:
        super().__init__(base_lr, window=1, patience=1, factor=factor, threshold=threshold, min_lr=min_lr,
                         warmup_steps=warmup_steps, total_steps=total_steps, cooldown_steps=cooldown_steps)
        self.epoch_patience, self.epoch_cooldown = patience, cooldown
        self.bad_epochs = 0
        self.cooldown_left = 0  # epochs of the cool-down after a halving still to go
        self.epochs = 0

    def observe(self, loss: float, step: int | None = None) -> bool:
        if math.isfinite(loss):
            self._sum += loss
            self._n += 1
        return False

    def end_epoch(self) -> bool:
        """Judge the epoch that just ended by its mean loss; True when the rate was just halved."""
        if self._n == 0:
            return False
        mean = self._sum / self._n
        self._sum, self._n = 0.0, 0
        self.epochs += 1
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = mean, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:  # the epochs right after a halving are not held against it
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs <= self.epoch_patience:
            return False
        self.bad_epochs, self.cooldown_left = 0, self.epoch_cooldown
        new = max(self.lr * self.factor, self.min_lr)
        if self.lr - new <= 1e-8:  # at the floor already (ReduceLROnPlateau's eps)
            return False
        self.lr = new
        self.halvings += 1
        return True

    _STATE = PlateauHalving._STATE + ("bad_epochs", "cooldown_left", "epochs")


class Cosine:
    """Linear warm-up over ``warmup_steps``, times a cosine from ``base_lr`` to
    ``base_lr × min_lr_ratio`` over ``progress`` in [0, 1] (see the module doc)."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def lr_at(self, step: int, progress: float | None = None) -> float:
        if progress is None:
            progress = step / self.total_steps
        lo = self.base_lr * self.min_lr_ratio
        cos = lo + 0.5 * (self.base_lr - lo) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return cos * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else cos

    def observe(self, loss: float, step: int | None = None) -> bool:
        return False  # the rate depends on progress alone

    def end_epoch(self) -> bool:
        return False

    def rebase(self, lr: float) -> None:
        self.base_lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing learnt from the run: progress (steps, elapsed time) is the trainer's

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_schedule(cfg: TrainConfig, lr: float) -> PlateauHalving | Cosine:
    """``cfg.schedule`` starting from the resolved learning rate ``lr``."""
    if cfg.schedule == "cosine":
        return Cosine(lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    if cfg.schedule == "plateau_epoch":
        return PlateauEpoch(lr, cfg.epoch_patience, cfg.epoch_cooldown, cfg.epoch_min_lr, cfg.epoch_threshold,
                            warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, cooldown_steps=cfg.cooldown_steps)
    return PlateauHalving(lr, cfg.plateau_window, cfg.plateau_patience, 0.5, cfg.plateau_threshold, cfg.min_lr,
                          cfg.warmup_steps, total_steps=cfg.max_steps, cooldown_steps=cfg.cooldown_steps)
