"""The one training loop both stages use.

A stage supplies a :class:`Task` (its model, loss, data and pictures); the :class:`Trainer`
does everything else, the same way for AugVAE and BiART:

* one process per device under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU), or a single process;
* precision (fp32 / bf16 / fp16 / fp16-o2, see :mod:`lverse.train.precision`);
* gradient accumulation with no all-reduce on the non-final micro-steps;
* AdamW with the papers' learning-rate rule (``base_lr × global batch``) and plateau halving;
* a run directory with the resolved config, TensorBoard scalars, ``metrics.jsonl``, image grids;
* checkpoints every ``ckpt_every`` steps, on SIGINT/SIGTERM and on a crash, and an exact
  ``resume``: model, optimizer, schedule, precision state, RNG states and the data position.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
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
from lverse.train.schedule import PlateauHalving


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
    warmup_steps: int = 0
    cooldown_steps: int = 0           # lr falls linearly to min_lr over the last N steps; 0 = off
    plateau_window: int = 500         # steps per loss window for plateau detection
    plateau_patience: int = 3         # windows without improvement before halving; 0 = never halve
    plateau_threshold: float = 1e-3
    min_lr: float = 0.0
    log_every: int = 50
    image_every: int = 500
    ckpt_every: int = 1000
    keep_last: int = 3
    num_workers: int = 2
    compile: bool = False
    strategy: str = "ddp"             # ddp | fsdp (shard weights, grads and optimizer state over ranks)
    tensorboard: bool = True
    progress: bool = True
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
        for name in ("ckpt_every", "image_every", "warmup_steps", "cooldown_steps", "num_workers", "average_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.average not in AVERAGES:
            raise ConfigError(f"train.average must be one of {AVERAGES}, got {self.average!r}")
        if not 0.0 < self.average_decay < 1.0:
            raise ConfigError(f"train.average_decay must be in (0, 1), got {self.average_decay}")
        if self.average != "none" and self.average_start >= self.max_steps:
            raise ConfigError(f"train.average_start={self.average_start} averages nothing in {self.max_steps} steps")

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


class StopRequested(Exception):
    pass


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
        self.fsdp = False
        self.average: WeightAverage | None = None
        self._stop_signal: int | None = None
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task = task_factory()
        torch.manual_seed(cfg.seed + 1 + self.info.rank)  # dropout and the like may differ per rank

    # ------------------------------------------------------------------------------------------
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

    def export_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 model weights (collective under FSDP: every rank must call it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.task.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: (v.float() if v.is_floating_point() else v) for k, v in full.items()}
        return self.precision.model_state_dict(self.task.model)

    def export(self) -> Path | None:
        """Write the final weights (+ the task's extra files) into the run directory, for
        inference and for the next stage's ``init_from``. Collective under FSDP.

        With ``train.average`` the averaged weights are ``model.safetensors`` and the last step's
        own weights ``model_raw.safetensors``."""
        state = self.export_state()
        raw = None
        if self.average is not None and self.average.ready:
            raw = state
            with self.average.swapped():  # a copy: the state may hold the live tensors
                state = {k: v.clone() for k, v in self.export_state().items()}
        if not self.info.is_main:
            return None
        path = save_weights(self.run_dir / "model.safetensors", state, self.task.model_meta())
        if raw is not None:
            save_weights(self.run_dir / "model_raw.safetensors", raw, self.task.model_meta())
            print(f"[lverse] model.safetensors: the {self.average.mode} of the weights of the last "
                  f"{self.average.count} steps; model_raw.safetensors: the last step's", file=sys.stderr)
        for name, text in self.task.extra_files().items():
            atomic_write_text(self.run_dir / name, text)
        return path

    def _optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.task.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _save(self, ckpt: CheckpointManager, step: int, extra_state: dict[str, Any], collective: bool = True) -> Path | None:
        if self.fsdp and not collective:
            print("[lverse] no crash checkpoint under FSDP (gathering the shards needs every rank)", file=sys.stderr)
            return None
        model_state = self.export_state()
        optim_state = self._optimizer_state()
        if self.average is not None:
            extra_state = {**extra_state, "average": self.average.state_dict()}
        rngs = [rng_state()]
        if collective and self.info.distributed:
            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        path = None
        if self.info.is_main:
            state = {
                "step": step,
                "optimizer": optim_state,
                "schedule": self.schedule.state_dict(),
                "precision": self.precision.state_dict(),
                "rng": rngs,
                "world_size": self.info.world_size,
                **extra_state,
            }
            path = ckpt.save(
                step,
                model_state,
                self.task.model_meta(),
                state,
                self.task.extra_files(),
            )
        if collective:
            barrier()
        return path

    def _shard(self, model: nn.Module) -> None:
        """FSDP2: shard each transformer block (if the model has ``blocks``) and the root.

        The sharded parameters stay fp32 and are the optimizer's master weights; with
        ``precision=bf16`` they are gathered in bf16 for compute and gradients reduced in fp32
        (FSDP's own mixed precision). fp16 modes need a loss scaler FSDP does not share with
        lverse's: use DDP for fp16/fp16-o2 (BiART at paper size fits one GPU under O2).
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.strategy=fsdp supports precision fp32 or bf16, not {self.cfg.precision} (use strategy=ddp)")
        if self.cfg.precision == "bf16":
            self.precision = build_precision("fp32", self.info.device)  # FSDP casts; no autocast needed
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for block in getattr(model, "blocks", []):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, info, task = self.cfg, self.info, self.task
        device = info.device
        logger = RunLogger(self.run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
        if info.is_main and self.full_config is not None:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.full_config))
        ckpt = CheckpointManager(self.run_dir, cfg.keep_last)

        resume_from = self._resolve_resume()
        train_state: dict[str, Any] | None = None
        if resume_from is not None:
            model_state, _, train_state = CheckpointManager.load(resume_from)
            missing, unexpected = task.model.load_state_dict(model_state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"{resume_from}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
            if train_state.get("world_size", info.world_size) != info.world_size and info.is_main:
                print(f"[lverse] resuming a {train_state['world_size']}-process run on {info.world_size}: data order will differ", file=sys.stderr)

        task.model.to(device)
        task.prepare(device)
        self.precision = build_precision(cfg.precision, device)
        self.precision.prepare_model(task.model)
        model: nn.Module = task.model
        if cfg.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"train.strategy={cfg.strategy!r} is not one of ('ddp', 'fsdp')")
        self.fsdp = cfg.strategy == "fsdp" and info.distributed
        if self.fsdp:
            self._shard(task.model)
        elif info.distributed:
            # Start every replica from rank 0's state, buffers included (DDP would only sync the
            # parameters, and with broadcast_buffers=False not the buffers, e.g. the codebook).
            with torch.no_grad():
                for t in list(task.model.parameters()) + list(task.model.buffers()):
                    dist.broadcast(t.data, src=0)
            # broadcast_buffers=False: the quantizer keeps its EMA codebook in sync by all-reducing
            # its statistics; a broadcast from rank 0 would hide a missing all-reduce.
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        if cfg.compile:
            model = torch.compile(model)

        lr = cfg.resolved_lr(info.world_size)
        self.optimizer = self.precision.build_optimizer(task.param_groups(cfg.weight_decay), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.schedule = PlateauHalving(
            lr, cfg.plateau_window, cfg.plateau_patience, 0.5, cfg.plateau_threshold, cfg.min_lr, cfg.warmup_steps,
            total_steps=cfg.max_steps, cooldown_steps=cfg.cooldown_steps,
        )

        if cfg.average != "none":
            # after sharding and precision set-up: it averages the tensors the optimizer steps
            self.average = WeightAverage(self.precision.named_weights(task.model), cfg.average, cfg.average_decay,
                                         cfg.average_start)
        step, epoch, pos = 0, 0, 0
        skipped_items = 0
        if train_state is not None:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(task.model, self.optimizer, train_state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(train_state["optimizer"])
            self.schedule.load_state_dict(train_state["schedule"])
            self.precision.load_state_dict(train_state["precision"])
            if hasattr(self.precision, "load_master_from_model_state"):
                self.precision.load_master_from_model_state(model_state, task.model)  # type: ignore[attr-defined]
            step, epoch, pos = train_state["step"], train_state["epoch"], train_state["pos"]
            if self.average is not None:
                if "average" in train_state:
                    self.average.load_state_dict(train_state["average"])
                elif step >= cfg.average_start and info.is_main:
                    print(f"[lverse] the checkpoint holds no weight average: averaging starts at step {step + 1}",
                          file=sys.stderr)
            skipped_items = train_state.get("skipped_items", 0)
            rngs = train_state["rng"]
            set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
            if info.is_main:
                print(f"[lverse] resumed from {resume_from} at step {step}", file=sys.stderr)

        dataset = task.train_dataset()
        if isinstance(dataset, IterableDataset):
            # Streams (tar shards) shard themselves over ranks and workers; exact resume is by
            # skipping the batches of the current epoch already consumed.
            sampler = None
            loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=task.collate, num_workers=cfg.num_workers,
                                drop_last=True, pin_memory=device.type == "cuda", generator=torch.Generator())
        else:
            sampler = ResumableSampler(len(dataset), info.rank, info.world_size, cfg.seed)  # type: ignore[arg-type]
            if sampler.per_rank < cfg.batch_size:
                raise ValueError(f"dataset has {len(dataset)} items: too few for batch size {cfg.batch_size} × {info.world_size} processes")
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                sampler=sampler,
                collate_fn=task.collate,
                num_workers=cfg.num_workers,
                drop_last=True,
                pin_memory=device.type == "cuda",
                # a private generator: creating a loader iterator must not consume the global RNG,
                # or a resumed run would see different dropout than an unbroken one
                generator=torch.Generator(),
            )

        def batches() -> Iterator[Any]:
            nonlocal epoch, pos
            while True:
                skip = 0
                if sampler is not None:
                    sampler.set_epoch(epoch, pos)
                else:
                    if hasattr(dataset, "set_epoch"):
                        dataset.set_epoch(epoch)  # type: ignore[attr-defined]
                    skip = pos // cfg.batch_size
                n = 0
                for b in loader:
                    n += 1
                    if n <= skip:
                        continue
                    pos += cfg.batch_size
                    yield b
                if n == 0:
                    raise ValueError("the training data yielded no batch in a whole epoch (empty data set, or all items unreadable)")
                epoch, pos = epoch + 1, 0

        old_handlers = self._install_signal_handlers()
        bar = None
        if cfg.progress and info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.name, dynamic_ncols=True)
        data_iter = batches()
        last_saved = step
        # per-key sums and counts: some scalars appear only on some steps (e.g. per-direction NLLs)
        window: dict[str, float] = {}
        window_n: dict[str, int] = {}
        t_last, samples_since = time.time(), 0
        result: dict[str, Any] = {}
        try:
            while step < cfg.max_steps:
                self.optimizer.zero_grad(set_to_none=True)
                for g in self.optimizer.param_groups:
                    g["lr"] = self.schedule.lr_at(step)
                logs_acc: dict[str, float] = {}
                n_micro = 0
                while n_micro < cfg.grad_accum:
                    batch = next(data_iter)
                    if isinstance(batch, dict) and "skipped" in batch:
                        skipped_items += int(batch["skipped"])
                    if task.batch_size_of(batch) == 0:
                        continue
                    last = n_micro == cfg.grad_accum - 1
                    if self.fsdp:  # FSDP: reduce-scatter the gradients on the last micro-step only
                        task.model.set_requires_gradient_sync(last)  # type: ignore[operator]
                        sync = contextlib.nullcontext()
                    else:
                        sync = contextlib.nullcontext() if (last or not info.distributed) else model.no_sync()  # type: ignore[operator]
                    with sync:
                        loss, logs = task.training_step(model, batch, step, self.precision.autocast)
                        self.precision.backward(loss / cfg.grad_accum)
                    for k, v in logs.items():
                        logs_acc[k] = logs_acc.get(k, 0.0) + float(v) / cfg.grad_accum
                    samples_since += task.batch_size_of(batch)
                    n_micro += 1
                stepped, gnorm = self.precision.step(self.optimizer, cfg.grad_clip)
                step += 1
                if self.average is not None and stepped:
                    self.average.update(step)
                loss_val = logs_acc.get("loss", float("nan"))
                if not math.isfinite(loss_val) and stepped:
                    raise FloatingPointError(f"loss is {loss_val} at step {step} with precision {cfg.precision}")
                for k, v in logs_acc.items():
                    window[k] = window.get(k, 0.0) + v
                    window_n[k] = window_n.get(k, 0) + 1
                # plateau decisions use the rank-averaged loss so every rank halves together
                mean_loss = all_reduce_mean({"l": loss_val}, device)["l"] if info.distributed else loss_val
                if self.schedule.observe(mean_loss, step) and info.is_main:
                    print(f"[lverse] loss plateaued: learning rate halved to {self.schedule.lr:.3g} at step {step}", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.4f}")

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    scalars = all_reduce_mean({k: v / window_n[k] for k, v in window.items()}, device)
                    dt = max(time.time() - t_last, 1e-9)
                    scalars.update(task.periodic_logs())
                    scalars.update(
                        {
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "grad_norm": gnorm,
                            "samples_per_s": samples_since * info.world_size / dt,
                            "loss_scale": self.precision.scale,
                            "skipped_steps": self.precision.skipped_steps,
                            "data/skipped_items": skipped_items,
                            "epoch": epoch,
                        }
                    )
                    logger.scalars(step, scalars)
                    window, window_n, t_last, samples_since = {}, {}, time.time(), 0
                if cfg.image_every and (step % cfg.image_every == 0 or step == cfg.max_steps) and info.is_main:
                    _unwrap(model).eval()
                    for name, imgs in task.visualize(_unwrap(model), step).items():
                        logger.images(step, name, imgs)
                    _unwrap(model).train()

                stop = any_rank(self._stop_signal is not None, device)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or stop:
                    self._save(ckpt, step, {"epoch": epoch, "pos": pos, "skipped_items": skipped_items})
                    last_saved = step
                if stop:
                    raise StopRequested()
            result = {"step": step, "stopped": False}
        except StopRequested:
            if info.is_main:
                print(f"[lverse] stopped at step {step}; checkpoint in {ckpt.dir}. Resume with --resume {self.run_dir}", file=sys.stderr)
            result = {"step": step, "stopped": True}
        except BaseException:
            # Save what we have: the weights are those of the last completed optimizer step.
            if step > last_saved:
                try:
                    p = self._save(ckpt, step, {"epoch": epoch, "pos": pos, "skipped_items": skipped_items}, collective=False)
                    if p is not None:
                        print(f"[lverse] crashed at step {step}; checkpoint written to {p}", file=sys.stderr)
                except Exception as e:  # never hide the original error
                    print(f"[lverse] could not write a crash checkpoint: {e}", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
            for s, h in old_handlers:
                signal.signal(s, h)
            logger.close()
        result["run_dir"] = str(self.run_dir)
        result["skipped_items"] = skipped_items
        return result
