"""``train.*``: the settings of the one training loop (:class:`TrainConfig`), checked on creation.

Every key is documented where it is declared; the groups are the run (names, device, seed),
optimisation (batch, learning rate and its schedule, :mod:`lverse.train.schedule`), the step
budget (``max_steps``, or ``max_epochs`` for map-style data), bookkeeping (logs, images,
checkpoints), weight averaging (:mod:`lverse.train.average`) and the guards that stop a run
which cannot go on (:mod:`lverse.train.guard`).
"""
from __future__ import annotations

from dataclasses import dataclass

from lverse.config import ConfigError
from lverse.train.average import AVERAGES
from lverse.train.schedule import SCHEDULES

# settings a ``--resume`` may change (lverse.train.rundir): they change neither the model, the
# data nor the optimizer's state, only how long, how fast and how visibly the run goes on
RESUMABLE = ("lr", "base_lr", "tf32", "max_steps", "max_epochs", "log_every", "image_every", "ckpt_every", "keep_last",
             "progress", "tensorboard", "num_workers", "threads", "max_bad_steps", "bad_items_in_a_row",
             "bad_share_warn", "bad_share_stop")


@dataclass
class TrainConfig:
    run_dir: str = ""                 # "" → runs/<name>
    name: str = "run"
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "fp32"           # fp32 | bf16 | fp16 | fp16-o2
    # on a CUDA GPU, fp32 matmuls and convolutions (all of fp32, and what autocast leaves in
    # fp32) run in TF32: several times faster on tensor cores; false = full IEEE fp32
    tf32: bool = True
    batch_size: int = 8               # per process (per GPU)
    grad_accum: int = 1
    max_steps: int = 1000
    # > 0: the run's step budget is ceil(max_epochs × len(dataset) / global batch), replacing
    # max_steps (map-style data only: a stream has no length); the resolved max_steps is what
    # config.yaml records
    max_epochs: int = 0
    lr: float = 0.0                   # absolute learning rate; 0 → base_lr × global batch
    base_lr: float = 4.5e-6           # the papers' rule: lr = base_lr × global batch size
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    grad_clip: float = 0.0            # 0 = no clipping (the norm is still logged)
    # plateau (halve on a flat loss window, ours) | plateau_epoch (the official L-Verse code:
    # ReduceLROnPlateau on each epoch's mean loss) | cosine; see lverse.train.schedule
    schedule: str = "plateau"
    warmup_steps: int = 0
    cooldown_steps: int = 0           # plateau*: lr falls linearly to min_lr over the last N steps; 0 = off
    plateau_window: int = 500         # steps per loss window for plateau detection
    plateau_patience: int = 3         # windows without improvement before halving; 0 = never halve
    plateau_threshold: float = 1e-3
    min_lr: float = 0.0               # plateau: the floor of halving and the end of the cool-down
    epoch_patience: int = 10          # plateau_epoch: epochs without improvement tolerated before halving
    epoch_cooldown: int = 10          # plateau_epoch: epochs after a halving before bad epochs count again
    epoch_min_lr: float = 1e-6        # plateau_epoch: the floor of halving (and of its cool-down)
    epoch_threshold: float = 1e-4     # plateau_epoch: relative improvement that counts
    min_lr_ratio: float = 0.0         # cosine: the final rate, as a fraction of lr
    # > 0: end the run after this many minutes if max_steps is not reached first; the cosine runs
    # on whichever comes first, so the run ends with its schedule finished (cosine only)
    time_limit_minutes: float = 0.0
    log_every: int = 50
    image_every: int = 500
    ckpt_every: int = 1000
    keep_last: int = 3
    num_workers: int = 2
    compile: bool = False
    strategy: str = "ddp"             # ddp | fsdp (shard weights, grads and optimizer state over ranks)
    tensorboard: bool = True
    progress: bool = True             # a progress bar; without one, a line per log_every steps
    threads: int = 0                  # torch intra-op threads per process; 0 = PyTorch's default
    # Weight averaging (ours, not in the papers; lverse.train.average): none | ema | mean. The
    # exported model.safetensors holds the average, model_raw.safetensors the last step's weights.
    average: str = "none"
    average_decay: float = 0.999      # ema only
    average_start: int = 0            # the first step averaged, e.g. where the cool-down starts
    # Guards (lverse.train.guard). Steps in a row not applied (non-finite loss or gradients, or
    # skipped by the fp16 loss scaler; a healthy fp16 start skips up to ~16) before the run
    # stops; 0 = never
    max_bad_steps: int = 25
    bad_items_in_a_row: int = 1000    # unusable items drawn in a row before the run stops; 0 = never
    bad_share_warn: float = 0.01      # warn once when more than this share of the items drawn were bad
    bad_share_stop: float = 0.2       # stop when more than this share were bad (1 = never)

    def __post_init__(self) -> None:
        # Checked here, not at the first step that divides by them: a typo in an override
        # fails before any model or data is built.
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "image_every", "warmup_steps", "cooldown_steps", "num_workers", "average_start",
                     "time_limit_minutes", "max_epochs", "epoch_patience", "epoch_cooldown", "epoch_min_lr",
                     "max_bad_steps", "bad_items_in_a_row"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.bad_share_warn <= self.bad_share_stop <= 1.0:
            raise ConfigError(f"train.bad_share_warn={self.bad_share_warn} and train.bad_share_stop={self.bad_share_stop} "
                              "must satisfy 0 <= warn <= stop <= 1")
        if self.average not in AVERAGES:
            raise ConfigError(f"train.average must be one of {AVERAGES}, got {self.average!r}")
        if not 0.0 < self.average_decay < 1.0:
            raise ConfigError(f"train.average_decay must be in (0, 1), got {self.average_decay}")
        if self.average != "none" and self.average_start >= self.max_steps and not self.max_epochs:
            raise ConfigError(f"train.average_start={self.average_start} averages nothing in {self.max_steps} steps")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule != "cosine" and self.time_limit_minutes > 0:
            # the plateau rules' cool-down counts steps: a run cut by the clock would end before it
            raise ConfigError("train.time_limit_minutes needs train.schedule=cosine")
        if self.schedule == "cosine" and self.cooldown_steps:
            raise ConfigError("train.cooldown_steps belongs to schedule=plateau (the cosine decays already)")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def resolved_lr(self, world_size: int) -> float:
        return self.lr if self.lr > 0 else self.base_lr * self.global_batch(world_size)

    def steps_for_epochs(self, num_items: int, world_size: int) -> int:
        """``ceil(max_epochs × num_items / global batch)``: the step budget of ``max_epochs``."""
        return max(1, -(-self.max_epochs * num_items // self.global_batch(world_size)))
