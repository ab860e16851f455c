"""The one training loop every model uses.

A model supplies a :class:`Task` (its model, loss, data and pictures); the :class:`Trainer`
does everything else, the same way for AugVAE, BiART and the Shapes CLIP:

* a single process, or one process per device under ``torchrun`` with DDP or FSDP
  (:mod:`lverse.train.strategy`; gloo on CPU, NCCL on GPU);
* precision (fp32 / bf16 / fp16 / fp16-o2, see :mod:`lverse.train.precision`);
* gradient accumulation with no all-reduce on the non-final micro-steps;
* AdamW with the papers' learning-rate rule (``base_lr × global batch``) and plateau halving,
  or a cosine (:mod:`lverse.train.schedule`), and an optional wall-time limit;
* a run directory with the resolved config, TensorBoard scalars, ``metrics.jsonl``, image grids;
* checkpoints every ``ckpt_every`` steps, on SIGINT/SIGTERM and on a crash, and an exact
  ``resume``: model, optimizer, schedule, precision state, RNG states and the data position.

:meth:`Trainer.fit` reads top to bottom: restore a checkpoint, set the model up, then
train / log / draw / checkpoint step after step until the run is done.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lverse.config import ConfigError, dump_yaml
from lverse.dist import DistInfo, all_reduce_mean, any_rank, barrier, init_distributed
from lverse.files import atomic_write_text, save_weights
from lverse.train.average import AVERAGES, WeightAverage
from lverse.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from lverse.train.logger import RunLogger
from lverse.train.precision import build_precision
from lverse.train.sampler import ResumableSampler
from lverse.train.schedule import SCHEDULES, build_schedule
from lverse.train.strategy import build_strategy


@dataclass
class TrainConfig:
    run_dir: str = ""                 # "" → runs/<name>
    name: str = "run"
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "fp32"           # fp32 | bf16 | fp16 | fp16-o2
    batch_size: int = 8               # per process (per GPU)
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 0.0                   # absolute learning rate; 0 → base_lr × global batch
    base_lr: float = 4.5e-6           # the papers' rule: lr = base_lr × global batch size
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    grad_clip: float = 0.0            # 0 = no clipping (the norm is still logged)
    schedule: str = "plateau"         # plateau (the papers') | cosine (lverse.train.schedule)
    warmup_steps: int = 0
    cooldown_steps: int = 0           # plateau: lr falls linearly to min_lr over the last N steps; 0 = off
    plateau_window: int = 500         # steps per loss window for plateau detection
    plateau_patience: int = 3         # windows without improvement before halving; 0 = never halve
    plateau_threshold: float = 1e-3
    min_lr: float = 0.0               # plateau: the floor of halving and the end of the cool-down
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

    def __post_init__(self) -> None:
        # Checked here, not at the first step that divides by them: a typo in an override
        # fails before any model or data is built.
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "image_every", "warmup_steps", "cooldown_steps", "num_workers", "average_start",
                     "time_limit_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.average not in AVERAGES:
            raise ConfigError(f"train.average must be one of {AVERAGES}, got {self.average!r}")
        if not 0.0 < self.average_decay < 1.0:
            raise ConfigError(f"train.average_decay must be in (0, 1), got {self.average_decay}")
        if self.average != "none" and self.average_start >= self.max_steps:
            raise ConfigError(f"train.average_start={self.average_start} averages nothing in {self.max_steps} steps")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule == "plateau" and self.time_limit_minutes > 0:
            # the plateau rule's cool-down counts steps: a run cut by the clock would end before it
            raise ConfigError("train.time_limit_minutes needs train.schedule=cosine")
        if self.schedule == "cosine" and self.cooldown_steps:
            raise ConfigError("train.cooldown_steps belongs to schedule=plateau (the cosine decays already)")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def resolved_lr(self, world_size: int) -> float:
        return self.lr if self.lr > 0 else self.base_lr * self.global_batch(world_size)


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
        if isinstance(batch, dict):
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    return v.shape[0]
        if isinstance(batch, torch.Tensor):
            return batch.shape[0]
        return 1


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint and restored by ``resume``."""

    step: int = 0             # optimizer steps done
    epoch: int = 0
    pos: int = 0              # samples of this epoch this rank has consumed
    skipped_items: int = 0    # unreadable items the data has skipped so far
    elapsed: float = 0.0      # seconds of training so far (train.time_limit_minutes)


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


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        task_factory: Callable[[], Task],
        full_config: Any = None,
        resume: str | Path | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            # On a small CPU box, one thread per process beside another job beats two fighting
            # for the same cores (every op waits at a barrier for a descheduled thread).
            torch.set_num_threads(cfg.threads)
        self.info = dist_info or init_distributed(cfg.device)
        self.run_dir = Path(cfg.run_dir or Path("runs") / cfg.name)
        self.full_config = full_config
        self.resume = resume
        self.state = RunState()
        self.average: WeightAverage | None = None
        self._stop_signal: int | None = None
        self._last_saved = 0  # the step of the newest checkpoint (a crash saves only newer steps)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task = task_factory()
        torch.manual_seed(cfg.seed + 1 + self.info.rank)  # dropout and the like may differ per rank

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` (or the time limit), or until a signal stops the run.
        Returns ``{"step", "stopped", "run_dir", "skipped_items"}``."""
        self._open_run_dir()
        saved = self._load_checkpoint()          # weights in before the model is cast or wrapped
        model = self._setup()                    # device, precision, strategy, optimizer, schedule
        if saved is not None:
            self._restore(*saved)                # optimizer, schedule, data position, RNG
        batches = self._batches(*self._build_loader())
        old_handlers = self._install_signal_handlers()
        self.bar = self._progress_bar()
        try:
            stopped = self._run(model, batches)
        except BaseException:
            self._crash_checkpoint()
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            for s, h in old_handlers:
                signal.signal(s, h)
            self.logger.close()
        return {"step": self.state.step, "stopped": stopped, "run_dir": str(self.run_dir),
                "skipped_items": self.state.skipped_items}

    def _run(self, model: nn.Module, batches: Iterator[Any]) -> bool:
        """The steps; True when a signal stopped the run (after writing a checkpoint)."""
        cfg, st = self.cfg, self.state
        self._last_saved = st.step
        self.window = LogWindow()
        clock = time.perf_counter() - st.elapsed
        progress = self._progress(clock)
        while progress < 1.0:
            grad_norm = self._train_step(model, batches, self.schedule.lr_at(st.step, progress))
            progress = self._progress(clock)
            done = progress >= 1.0
            if st.step % cfg.log_every == 0 or done:
                self._log(grad_norm)
            if cfg.image_every and (st.step % cfg.image_every == 0 or done) and self.info.is_main:
                self._draw()
            stop = any_rank(self._stop_signal is not None, self.info.device)
            if (cfg.ckpt_every and st.step % cfg.ckpt_every == 0) or done or stop:
                self._save()
                self._last_saved = st.step
            if stop:
                if self.info.is_main:
                    print(f"[lverse] stopped at step {st.step}; checkpoint in {self.ckpt.dir}. "
                          f"Resume with --resume {self.run_dir}", file=sys.stderr)
                return True
        return False

    # --- before the first step ----------------------------------------------------------------
    def _open_run_dir(self) -> None:
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main, tensorboard=self.cfg.tensorboard)
        if self.info.is_main and self.full_config is not None:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.full_config))
        self.ckpt = CheckpointManager(self.run_dir, self.cfg.keep_last)

    def _resolve_resume(self) -> Path | None:
        if self.resume is None:
            return None
        p = Path(self.resume)
        if (p / "state.pt").is_file():
            return p
        latest = CheckpointManager(p if (p / "checkpoints").is_dir() else self.run_dir).latest()
        if latest is None:
            raise FileNotFoundError(f"--resume {p}: no checkpoint found (looked for {p}/checkpoints/latest)")
        return latest

    def _load_checkpoint(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
        """With ``resume``: load the checkpoint's weights into the model; return what the rest
        of the restore needs (path, model state, training state)."""
        path = self._resolve_resume()
        if path is None:
            return None
        model_state, _, train_state = CheckpointManager.load(path)
        missing, unexpected = self.task.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        if train_state.get("world_size", self.info.world_size) != self.info.world_size and self.info.is_main:
            print(f"[lverse] resuming a {train_state['world_size']}-process run on {self.info.world_size}: "
                  "data order will differ", file=sys.stderr)
        return path, model_state, train_state

    def _setup(self) -> nn.Module:
        """Device, precision, strategy, optimizer, schedule, weight average. Returns the module
        the training step calls (wrapped by DDP and/or torch.compile); ``task.model`` stays the
        plain module (the sharded root under FSDP)."""
        cfg, task, device = self.cfg, self.task, self.info.device
        task.model.to(device)
        task.prepare(device)
        self.strategy = build_strategy(cfg.strategy, self.info, cfg.precision)
        self.precision = build_precision(self.strategy.precision(cfg.precision), device)
        self.precision.prepare_model(task.model)
        model = self.strategy.wrap(task.model)
        if cfg.compile:
            model = torch.compile(model)
        lr = cfg.resolved_lr(self.info.world_size)
        self.optimizer = self.precision.build_optimizer(task.param_groups(cfg.weight_decay), lr=lr,
                                                        betas=tuple(cfg.betas), eps=cfg.eps)
        self.schedule = build_schedule(cfg, lr)
        if cfg.average != "none":
            # after sharding and precision set-up: it averages the tensors the optimizer steps
            self.average = WeightAverage(self.precision.named_weights(task.model), cfg.average, cfg.average_decay,
                                         cfg.average_start)
        return model

    def _restore(self, path: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> None:
        """The rest of a resume: optimizer, schedule, precision, weight average, position, RNG."""
        self.strategy.load_optimizer_state(self.task.model, self.optimizer, train_state["optimizer"])
        self.schedule.load_state_dict(train_state["schedule"])
        self.precision.load_state_dict(train_state["precision"])
        self.precision.load_master_from_model_state(model_state, self.task.model)
        st = self.state
        st.step, st.epoch, st.pos = train_state["step"], train_state["epoch"], train_state["pos"]
        st.skipped_items = train_state.get("skipped_items", 0)
        st.elapsed = train_state.get("elapsed", 0.0)
        if self.average is not None:
            if "average" in train_state:
                self.average.load_state_dict(train_state["average"])
            elif st.step >= self.cfg.average_start and self.info.is_main:
                print(f"[lverse] the checkpoint holds no weight average: averaging starts at step {st.step + 1}",
                      file=sys.stderr)
        rngs = train_state["rng"]
        set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        if self.info.is_main:
            print(f"[lverse] resumed from {path} at step {st.step}", file=sys.stderr)

    def _build_loader(self) -> tuple[Dataset, ResumableSampler | None, DataLoader]:
        cfg, info = self.cfg, self.info
        dataset = self.task.train_dataset()
        sampler = None
        if not isinstance(dataset, IterableDataset):
            sampler = ResumableSampler(len(dataset), info.rank, info.world_size, cfg.seed)  # type: ignore[arg-type]
            if sampler.per_rank < cfg.batch_size:
                raise ValueError(f"dataset has {len(dataset)} items: too few for batch size {cfg.batch_size} × {info.world_size} processes")
        # else a stream (tar shards): it shards itself over ranks and workers, and an exact
        # resume skips the batches of the current epoch already consumed.
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=self.task.collate,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=info.device.type == "cuda",
            # a private generator: creating a loader iterator must not consume the global RNG,
            # or a resumed run would see different dropout than an unbroken one
            generator=torch.Generator(),
        )
        return dataset, sampler, loader

    def _batches(self, dataset: Dataset, sampler: ResumableSampler | None, loader: DataLoader) -> Iterator[Any]:
        """Batches forever, epoch after epoch, from the position in ``self.state``."""
        st = self.state
        while True:
            skip = 0
            if sampler is not None:
                sampler.set_epoch(st.epoch, st.pos)
            else:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(st.epoch)  # type: ignore[attr-defined]
                skip = st.pos // self.cfg.batch_size
            n = 0
            for b in loader:
                n += 1
                if n <= skip:
                    continue
                st.pos += self.cfg.batch_size
                yield b
            if n == 0:
                raise ValueError("the training data yielded no batch in a whole epoch (empty data set, or all items unreadable)")
            st.epoch, st.pos = st.epoch + 1, 0

    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        old = []

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._stop_signal = signum
            if self.info.is_main:
                print(f"\n[lverse] signal {signum}: checkpointing at the end of this step ...", file=sys.stderr, flush=True)

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old.append((s, signal.signal(s, handler)))
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return old

    def _progress_bar(self) -> Any:
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.state.step, desc=self.cfg.name, dynamic_ncols=True)

    # --- one step -------------------------------------------------------------------------------
    def _progress(self, clock: float) -> float:
        """How much of the run is done, in [0, 1]: the share of ``max_steps`` taken, or of
        ``time_limit_minutes`` used when that is more. The ranks average their clocks, so every
        rank sees the same number and stops after the same step."""
        cfg, st = self.cfg, self.state
        st.elapsed = time.perf_counter() - clock
        progress = st.step / cfg.max_steps
        if cfg.time_limit_minutes > 0:
            st.elapsed = all_reduce_mean({"elapsed": st.elapsed}, self.info.device)["elapsed"]
            progress = max(progress, st.elapsed / (60 * cfg.time_limit_minutes))
        return progress

    def _train_step(self, model: nn.Module, batches: Iterator[Any], lr: float) -> float:
        """One optimizer step over ``grad_accum`` micro-batches, and its bookkeeping. Returns the
        gradient norm."""
        cfg, st, task = self.cfg, self.state, self.task
        self.optimizer.zero_grad(set_to_none=True)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        logs_acc: dict[str, float] = {}
        n_micro = 0
        while n_micro < cfg.grad_accum:
            batch = next(batches)
            if isinstance(batch, dict) and "skipped" in batch:
                st.skipped_items += int(batch["skipped"])
            if task.batch_size_of(batch) == 0:
                continue  # every item of it was unreadable
            with self.strategy.sync_gradients(model, last=n_micro == cfg.grad_accum - 1):
                loss, logs = task.training_step(model, batch, st.step, self.precision.autocast)
                self.precision.backward(loss / cfg.grad_accum)
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + float(v) / cfg.grad_accum
            self.window.samples += task.batch_size_of(batch)
            n_micro += 1
        stepped, grad_norm = self.precision.step(self.optimizer, cfg.grad_clip)
        st.step += 1
        task.after_step(st.step)
        if self.average is not None and stepped:
            self.average.update(st.step)
        loss_val = logs_acc.get("loss", float("nan"))
        if not math.isfinite(loss_val) and stepped:
            raise FloatingPointError(f"loss is {loss_val} at step {st.step} with precision {cfg.precision}")
        self.window.add(logs_acc)
        # plateau decisions use the rank-averaged loss so every rank halves together
        mean_loss = all_reduce_mean({"l": loss_val}, self.info.device)["l"]
        if self.schedule.observe(mean_loss, st.step) and self.info.is_main:
            print(f"[lverse] loss plateaued: learning rate halved to {self.schedule.lr:.3g} at step {st.step}",  # type: ignore[union-attr]
                  file=sys.stderr)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss_val:.4f}")
        return grad_norm

    def _log(self, grad_norm: float) -> None:
        """The window's scalars, averaged over ranks, to TensorBoard and ``metrics.jsonl``."""
        st, w = self.state, self.window
        scalars = all_reduce_mean(w.means(), self.info.device)
        dt = max(time.time() - w.start, 1e-9)
        scalars.update(self.task.periodic_logs())
        scalars.update(
            {
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "samples_per_s": w.samples * self.info.world_size / dt,
                "loss_scale": self.precision.scale,
                "skipped_steps": self.precision.skipped_steps,
                "data/skipped_items": st.skipped_items,
                "epoch": st.epoch,
            }
        )
        self.logger.scalars(st.step, scalars)
        if self.bar is None and self.info.is_main:  # no bar (logs, CI): one line per log interval
            print(f"step {st.step}/{self.cfg.max_steps} loss {scalars.get('loss', float('nan')):.4g} "
                  f"lr {scalars['lr']:.3g} {st.elapsed:.0f}s", file=sys.stderr, flush=True)
        self.window = LogWindow()

    def _draw(self) -> None:
        model = self.task.model  # the plain module (DDP and torch.compile wrap this one)
        model.eval()
        for name, imgs in self.task.visualize(model, self.state.step).items():
            self.logger.images(self.state.step, name, imgs)
        model.train()

    # --- checkpoints and the final weights ------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 model weights (collective under FSDP: every rank must call it)."""
        return self.strategy.model_state_dict(self.task.model, self.precision)

    def final_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(weights to export, the last step's own weights or None)``: with ``train.average``
        the first is the average, else the last step's weights (and None). Collective under FSDP."""
        state = self.export_state()
        if self.average is None or not self.average.ready:
            return state, None
        with self.average.swapped():  # a copy: the state may hold the live tensors
            averaged = {k: v.clone() for k, v in self.export_state().items()}
        return averaged, state

    def export(self) -> Path | None:
        """Write the final weights (+ the task's extra files) into the run directory, for
        inference and for the next stage's ``init_from``. Collective under FSDP.

        With ``train.average`` the averaged weights are ``model.safetensors`` and the last step's
        own weights ``model_raw.safetensors``."""
        state, raw = self.final_weights()
        if not self.info.is_main:
            return None
        path = save_weights(self.run_dir / "model.safetensors", state, self.task.model_meta())
        if raw is not None:
            save_weights(self.run_dir / "model_raw.safetensors", raw, self.task.model_meta())
            print(f"[lverse] model.safetensors: the {self.average.mode} of the weights of the last "  # type: ignore[union-attr]
                  f"{self.average.count} steps; model_raw.safetensors: the last step's", file=sys.stderr)  # type: ignore[union-attr]
        for name, text in self.task.extra_files().items():
            atomic_write_text(self.run_dir / name, text)
        return path

    def _save(self, collective: bool = True) -> Path | None:
        """A checkpoint of the current step. ``collective=False``: this rank alone (a crash)."""
        if not collective and not self.strategy.can_crash_save:
            print(f"[lverse] no crash checkpoint with strategy={self.strategy.name} (gathering the shards "
                  "needs every rank)", file=sys.stderr)
            return None
        st = self.state
        model_state = self.export_state()
        optim_state = self.strategy.optimizer_state_dict(self.task.model, self.optimizer)
        extra_state: dict[str, Any] = {"epoch": st.epoch, "pos": st.pos, "skipped_items": st.skipped_items,
                                       "elapsed": st.elapsed}
        if self.average is not None:
            extra_state["average"] = self.average.state_dict()
        rngs = self.strategy.all_gather_object(rng_state()) if collective else [rng_state()]
        path = None
        if self.info.is_main:
            state = {
                "step": st.step,
                "optimizer": optim_state,
                "schedule": self.schedule.state_dict(),
                "precision": self.precision.state_dict(),
                "rng": rngs,
                "world_size": self.info.world_size,
                **extra_state,
            }
            path = self.ckpt.save(st.step, model_state, self.task.model_meta(), state, self.task.extra_files())
        if collective:
            barrier()
        return path

    def _crash_checkpoint(self) -> None:
        """Save what we have: the weights are those of the last completed optimizer step."""
        if self.state.step <= self._last_saved:
            return
        try:
            p = self._save(collective=False)
            if p is not None:
                print(f"[lverse] crashed at step {self.state.step}; checkpoint written to {p}", file=sys.stderr)
        except Exception as e:  # never hide the original error
            print(f"[lverse] could not write a crash checkpoint: {e}", file=sys.stderr)
