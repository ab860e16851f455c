"""The one training loop every model uses.

A model supplies a :class:`~lverse.train.task.Task` (its model, loss, data and pictures); the
:class:`Trainer` does everything else, the same way for AugVAE, BiART and the Shapes CLIP:

* a single process, or one process per device under ``torchrun`` with DDP or FSDP
  (:mod:`lverse.train.strategy`; gloo on CPU, NCCL on GPU);
* precision (fp32 / bf16 / fp16 / fp16-o2, see :mod:`lverse.train.precision`);
* gradient accumulation with no all-reduce on the non-final micro-steps;
* AdamW with the papers' learning-rate rule (``base_lr × global batch``) and a schedule
  (:mod:`lverse.train.schedule`), a step budget in steps or epochs, an optional wall-time limit;
* a run directory (locked while it trains) with the resolved config, TensorBoard scalars,
  ``metrics.jsonl``, ``events.jsonl``, image grids;
* checkpoints every ``ckpt_every`` steps, on SIGINT/SIGTERM and on a crash, and an exact
  ``resume``: model, optimizer, schedule, precision state, RNG states and each rank's data
  position. A checkpoint's data position always matches its weights: a crash inside a step saves
  the state from before the step (single process; with several processes a rank alone cannot,
  and the last periodic checkpoint stands), or nothing while the optimizer was writing weights;
* guards (:mod:`lverse.train.guard`): a step with a non-finite loss or gradients is not applied,
  too many in a row stop the run, and no non-finite state is ever checkpointed; unusable data
  stops the run with its counts; a resume falls back past damaged checkpoints
  (:mod:`lverse.train.checkpoint`) and may change only some settings (:mod:`lverse.train.rundir`).

:meth:`Trainer.fit` reads top to bottom: lock the run, size the budget, restore a checkpoint,
set the model up, then train / log / draw / checkpoint step after step until the run is done.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lverse.config import ConfigError, dump_yaml, to_dict
from lverse.dist import DistInfo, all_reduce_mean, any_rank, barrier, init_distributed
from lverse.files import atomic_write_text, save_weights
from lverse.train.average import WeightAverage
from lverse.train.checkpoint import CheckpointManager, non_finite, rng_state, set_rng_state
from lverse.train.feed import Feed, RunState
from lverse.train.guard import DataHealth, Diverged, RunError, StopRequested, source_of
from lverse.train.logger import LogWindow, RunLogger
from lverse.train.precision import build_precision
from lverse.train.resume import Loaded, find_checkpoint, load_into, set_aside
from lverse.train.rundir import RunLock, append_event, read_recorded_config, resume_changes
from lverse.train.sampler import ResumableSampler
from lverse.train.schedule import build_schedule
from lverse.train.settings import TrainConfig
from lverse.train.strategy import build_strategy
from lverse.train.task import Task

__all__ = ["RunState", "Task", "TrainConfig", "Trainer"]


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        task_factory: Callable[[], Task],
        full_config: Any = None,
        resume: str | Path | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        """``resume``: a run directory or a step directory to continue from, ``"auto"`` (this
        run's checkpoints if it has any, else a fresh start), or None (a fresh start: refused
        where checkpoints exist already, since the two runs' checkpoints would mix)."""
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
        self.bar: Any = None
        self._stop_signal: int | None = None
        self._last_saved = 0         # the step of the newest checkpoint (a crash saves only newer steps)
        self._phase = "setup"        # setup | data | compute | optimizer | between: what a crash interrupted
        self._pre: tuple[RunState, dict[str, Any], dict[str, torch.Tensor], bool] | None = None  # before this step
        self._last_loss_finite = True
        self._skipped_total: dict[str, int] | None = None  # over all ranks, at the last log
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task = task_factory()
        torch.manual_seed(cfg.seed + 1 + self.info.rank)  # dropout and the like may differ per rank

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` (or the time limit), or until a signal stops the run.
        Returns ``{"step", "stopped", "run_dir", "skipped_items", "skipped_by", "nonfinite_steps"}``."""
        lock = RunLock(self.run_dir)
        if self.info.is_main:
            lock.acquire()  # before anything is written into the run directory
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict[str, Any]:
        dataset = self.task.train_dataset()
        built = dict(getattr(dataset, "skip_summary", dict)())  # records dropped while it was built
        self._resolve_budget(dataset)
        saved = find_checkpoint(self.resume, self.run_dir, say=self.info.is_main)
        changes = self._resume_changes(saved)    # refuses what a resume may not change
        if saved is not None:
            self._load_weights(saved)            # weights in before the model is cast or wrapped
        self._open_run_dir()
        model = self._setup()                    # device, precision, strategy, optimizer, schedule
        if saved is not None:
            self._restore(*saved, changes)       # optimizer, schedule, data position, RNG
        elif built and self.info.is_main:        # every rank built the same: count them once
            self.state.skipped_by.update(built)
            self.state.items += sum(built.values())
        health = DataHealth(source_of(dataset), self.cfg.bad_items_in_a_row, self.cfg.bad_share_warn,
                            self.cfg.bad_share_stop, self.info.is_main)
        self.feed = Feed(*self._build_loader(dataset), self.state, health, self.task, self.cfg.batch_size)
        batches = iter(self.feed)
        old_handlers = self._install_signal_handlers()
        self.bar = self._progress_bar()
        try:
            stopped = self._run(model, batches)
        except BaseException as e:
            self._crash_checkpoint(e)
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            for s, h in old_handlers:
                signal.signal(s, h)
            self.logger.close()
        st = self.state
        return {"step": st.step, "stopped": stopped, "run_dir": str(self.run_dir),
                "skipped_items": sum((self._skipped_total or st.skipped_by).values()),
                "skipped_by": dict(self._skipped_total or st.skipped_by), "nonfinite_steps": st.nonfinite_steps}

    def _run(self, model: nn.Module, batches: Iterator[Any]) -> bool:
        """The steps; True when a signal stopped the run (after writing a checkpoint)."""
        cfg, st = self.cfg, self.state
        self._last_saved = st.step
        self.window = LogWindow()
        clock = time.perf_counter() - st.elapsed
        progress = self._progress(clock)
        while progress < 1.0:
            try:
                grad_norm = self._train_step(model, batches, self.schedule.lr_at(st.step, progress))
            except StopRequested:  # a signal while the step waited for data: stop before it
                self._phase = "between"  # a further signal now only sets the flag
                self._rollback()
                self._checkpoint()
                self._say_stopped()
                return True
            progress = self._progress(clock)
            done = progress >= 1.0
            if st.step % cfg.log_every == 0 or done:
                self._log(grad_norm)
            if cfg.image_every and (st.step % cfg.image_every == 0 or done) and self.info.is_main:
                self._draw()
            stop = any_rank(self._stop_signal is not None, self.info.device)
            if (cfg.ckpt_every and st.step % cfg.ckpt_every == 0) or done or stop:
                self._checkpoint()
            if stop:
                self._say_stopped()
                return True
        if not self._last_loss_finite:  # never report success (or export) on a NaN streak
            raise Diverged(f"the run ended at step {st.step} after {st.bad_steps_in_a_row} step(s) in a row that were "
                           f"not applied, the last with a non-finite loss; {self._kept()}")
        return False

    def _say_stopped(self) -> None:
        if self.info.is_main:
            print(f"[lverse] stopped at step {self.state.step}; checkpoint in {self.ckpt.dir}. "
                  f"Resume with --resume {self.run_dir}", file=sys.stderr)

    # --- before the first step ----------------------------------------------------------------
    def _resolve_budget(self, dataset: Dataset) -> None:
        """``max_epochs`` → ``max_steps``; epoch-based settings need map-style data."""
        cfg, source = self.cfg, source_of(dataset)
        if isinstance(dataset, IterableDataset):
            for key, on in (("max_epochs", cfg.max_epochs > 0), ("schedule=plateau_epoch", cfg.schedule == "plateau_epoch")):
                if on:
                    raise ConfigError(f"train.{key} needs epochs of a dataset with a length; {source} is a stream: "
                                      "set train.max_epochs=0 and a train.max_steps budget, with train.schedule plateau or cosine")
            return
        if cfg.max_epochs:
            n, gb = len(dataset), cfg.global_batch(self.info.world_size)  # type: ignore[arg-type]
            cfg.max_steps = cfg.steps_for_epochs(n, self.info.world_size)
            if self.info.is_main:
                print(f"[lverse] train.max_epochs={cfg.max_epochs}: ceil({cfg.max_epochs} x {n:,} items / global batch "
                      f"{gb}) = {cfg.max_steps:,} steps (train.max_steps)", file=sys.stderr)
            if cfg.average != "none" and cfg.average_start >= cfg.max_steps:
                raise ConfigError(f"train.average_start={cfg.average_start} averages nothing in {cfg.max_steps} steps")

    def _open_run_dir(self) -> None:
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main, tensorboard=self.cfg.tensorboard)
        if self.info.is_main and self.full_config is not None:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.full_config))
        self.ckpt = CheckpointManager(self.run_dir, self.cfg.keep_last)

    def _load_weights(self, found: Loaded) -> None:
        """The checkpoint found (:mod:`lverse.train.resume`) into the model, if it fits it."""
        path, model_state, meta, train_state, _ = found
        load_into(self.task.model, path, meta, self.task.model_meta(), model_state)
        if train_state.get("world_size", self.info.world_size) != self.info.world_size and self.info.is_main:
            print(f"[lverse] resuming a {train_state['world_size']}-process run on {self.info.world_size}: "
                  "data order will differ", file=sys.stderr)

    def _resume_changes(self, saved: Any) -> dict[str, tuple[Any, Any]]:
        """On a resume: the settings that differ from the run's config.yaml (only resumable ones
        pass; the rest is a ConfigError naming them)."""
        if saved is None or self.full_config is None:
            return {}
        recorded = read_recorded_config(self.run_dir)
        if recorded is None:
            return {}
        return resume_changes(recorded, to_dict(self.full_config), str(self.run_dir / "config.yaml"))

    def _setup(self) -> nn.Module:
        """Device, precision, strategy, optimizer, schedule, weight average. Returns the module
        the training step calls (wrapped by DDP and/or torch.compile); ``task.model`` stays the
        plain module (the sharded root under FSDP)."""
        cfg, task, device = self.cfg, self.task, self.info.device
        task.model.to(device)
        task.prepare(device)
        self.strategy = build_strategy(cfg.strategy, self.info, cfg.precision)
        self.precision = build_precision(self.strategy.precision(cfg.precision), device, cfg.tf32)
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

    def _restore(self, path: Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                 train_state: dict[str, Any], damaged: list[Path], changes: dict[str, tuple[Any, Any]]) -> None:
        """The rest of a resume: optimizer, schedule, precision, weight average, position, RNG;
        then the settings the resume changed, and damaged or newer checkpoints moved aside."""
        try:
            self.strategy.load_optimizer_state(self.task.model, self.optimizer, train_state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"{path / 'state.pt'}: its optimizer state does not fit this model's parameter "
                              f"groups ({str(e).splitlines()[0]})") from None
        self.schedule.load_state_dict(train_state["schedule"])
        self.precision.load_state_dict(train_state["precision"])
        self.precision.load_master_from_model_state(model_state, self.task.model)
        self.state = st = RunState.from_checkpoint(train_state, self.info.rank, self.info.world_size)
        if self.average is not None:
            if "average" in train_state:
                self.average.load_state_dict(train_state["average"])
            elif st.step >= self.cfg.average_start and self.info.is_main:
                print(f"[lverse] the checkpoint holds no weight average: averaging starts at step {st.step + 1}",
                      file=sys.stderr)
        rngs = train_state["rng"]
        set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        lr, saved_lr = self.cfg.resolved_lr(self.info.world_size), train_state.get("lr")
        same_world = train_state.get("world_size", self.info.world_size) == self.info.world_size
        if saved_lr is not None and saved_lr != lr and same_world:  # --resume RUN train.lr=X: X from here on
            self.schedule.rebase(lr)
        barrier()  # every rank has read its checkpoint before rank 0 moves directories
        if self.info.is_main:
            print(f"[lverse] resumed from {path} at step {st.step}"
                  + "".join(f"; {k}: {a} -> {b}" for k, (a, b) in changes.items()), file=sys.stderr)
            aside = set_aside(self.ckpt, path, st.step, damaged)
            append_event(self.run_dir, {"event": "resume", "step": st.step, "from": str(path),
                                        "changed": {k: list(v) for k, v in changes.items()}, "set_aside": aside})

    def _build_loader(self, dataset: Dataset) -> tuple[Dataset, ResumableSampler | None, DataLoader]:
        cfg, info = self.cfg, self.info
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

    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        old = []

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._stop_signal = signum
            waiting = self._phase == "data" and not self.info.distributed
            if self.info.is_main:
                print(f"\n[lverse] signal {signum}: " + ("stopping before this step (it waits for data) ..." if waiting
                      else "checkpointing at the end of this step ..."), file=sys.stderr, flush=True)
            if waiting:
                # The loader may be slow, stuck or looping over bad records: leave it now. (With
                # several processes, the ranks stop together at the end of the step instead.)
                raise StopRequested

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
        self._snapshot()
        self.feed.epoch_ended = False
        self.optimizer.zero_grad(set_to_none=True)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        logs_acc: dict[str, float] = {}
        loss_sum = 0.0
        n_micro = 0
        while n_micro < cfg.grad_accum:
            self._phase = "data"
            batch = next(batches)
            self._phase = "compute"
            n = task.batch_size_of(batch)
            if n == 0:
                continue  # every item of it was unreadable (counted by the data guard)
            with self.strategy.sync_gradients(model, last=n_micro == cfg.grad_accum - 1):
                loss, logs = task.training_step(model, batch, st.step, self.precision.autocast)
                self.precision.backward(loss / cfg.grad_accum)
            loss_sum += float(loss.detach()) / cfg.grad_accum
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + float(v) / cfg.grad_accum
            self.window.samples += n
            n_micro += 1
        # One collective: the rank-averaged loss is NaN on every rank when it is on any (so every
        # rank skips the same steps), and whether any rank's epoch ended with this step.
        mean = all_reduce_mean({"loss": loss_sum, "epoch_end": float(self.feed.epoch_ended)}, self.info.device)
        self._last_loss_finite = math.isfinite(mean["loss"])
        self._phase = "optimizer"
        if self._last_loss_finite:
            stepped, grad_norm = self.precision.step(self.optimizer, cfg.grad_clip)
        else:  # not applied: weights, optimizer moments and the loss scale stay as they were
            self.precision.discard(self.optimizer)
            stepped, grad_norm = False, float("nan")
            st.nonfinite_steps += 1
        st.step += 1
        task.after_step(st.step)
        if self.average is not None and stepped:
            self.average.update(st.step)
        self._phase = "between"
        st.bad_steps_in_a_row = 0 if stepped else st.bad_steps_in_a_row + 1
        if self._last_loss_finite:
            self.window.add(logs_acc)
        if self.schedule.observe(mean["loss"], st.step) and self.info.is_main:
            print(f"[lverse] loss plateaued: learning rate halved to {self.schedule.lr:.3g} at step {st.step}",  # type: ignore[union-attr]
                  file=sys.stderr)
        if mean["epoch_end"] > 0 and self.schedule.end_epoch() and self.info.is_main:
            print(f"[lverse] epoch loss plateaued: learning rate halved to {self.schedule.lr:.3g} at step {st.step}",  # type: ignore[union-attr]
                  file=sys.stderr)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean['loss']:.4f}")
        if cfg.max_bad_steps and st.bad_steps_in_a_row >= cfg.max_bad_steps:
            raise Diverged(f"step {st.step}: {st.bad_steps_in_a_row} steps in a row were not applied (non-finite loss "
                           f"in {st.nonfinite_steps} steps so far, loss-scaler or non-finite-gradient skips in "
                           f"{self.precision.skipped_steps}; loss scale {self.precision.scale:g}): the run has diverged "
                           f"(train.max_bad_steps={cfg.max_bad_steps}). {self._kept()}")
        return grad_norm

    def _kept(self) -> str:
        """Where a stopped run can go on from."""
        latest = self.ckpt.latest()
        if latest is None:
            return "No checkpoint was written."
        return (f"The newest checkpoint, {latest}, is untouched: resume from it with a lower learning rate, "
                f"e.g. --resume {self.run_dir} train.lr=...")

    def _snapshot(self) -> None:
        """The state before this step, for a crash inside it (single process only: see the
        module doc). Buffers too: a forward may update them (the AugVAE's EMA codebook)."""
        if self.strategy.can_crash_save:
            buffers = {k: b.detach().clone() for k, b in self.task.model.named_buffers()}
            self._pre = (self.state.copy(), rng_state(), buffers, self._last_loss_finite)

    def _rollback(self) -> None:
        """Back to :meth:`_snapshot`'s state (the optimizer has not stepped: weights are as then)."""
        if self._pre is None:
            return
        st, rng, buffers, self._last_loss_finite = self._pre
        self.state.assign(st)  # in place: the feed holds this object
        with torch.no_grad():
            for k, b in self.task.model.named_buffers():
                b.copy_(buffers[k])
        set_rng_state(rng)

    def _log(self, grad_norm: float) -> None:
        """The window's scalars, averaged over ranks, to TensorBoard and ``metrics.jsonl``."""
        st, w = self.state, self.window
        scalars = all_reduce_mean(w.means(), self.info.device)
        dt = max(time.time() - w.start, 1e-9)
        scalars.update(self.task.periodic_logs())
        skipped: dict[str, int] = {}
        for by in self.strategy.all_gather_object(dict(st.skipped_by)):  # the ranks' reasons differ
            for k, v in by.items():
                skipped[k] = skipped.get(k, 0) + v
        self._skipped_total = skipped
        scalars.update(
            {
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "samples_per_s": w.samples * self.info.world_size / dt,
                "loss_scale": self.precision.scale,
                "skipped_steps": self.precision.skipped_steps,
                "nonfinite_steps": st.nonfinite_steps,
                "data/skipped_items": sum(skipped.values()),
                **{f"data/skipped/{k}": v for k, v in skipped.items()},
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

    def _checkpoint(self) -> None:
        """A checkpoint of this step, unless it is the newest already or its loss was not
        finite (those weights are what diverged: ``latest`` stays on the last good one)."""
        st = self.state
        if st.step <= self._last_saved:
            return
        if not self._last_loss_finite:
            if self.info.is_main:
                print(f"[lverse] step {st.step} not checkpointed: its loss was not finite", file=sys.stderr)
            return
        self._save()
        self._last_saved = st.step

    def _save(self, collective: bool = True) -> Path | None:
        """A checkpoint of the current step. ``collective=False``: this process alone (a crash)."""
        st = self.state
        model_state = self.export_state()
        extra_state: dict[str, Any] = {}
        if self.average is not None:
            extra_state["average"] = self.average.state_dict()
        bad = non_finite(model_state) + non_finite(extra_state.get("average", {}).get("weights", {}))
        if any_rank(bool(bad), self.info.device) if collective else bad:
            raise Diverged(f"step {st.step}: non-finite weights ({bad[:3] or 'on another rank'}) are never "
                           f"checkpointed. {self._kept()}")
        optim_state = self.strategy.optimizer_state_dict(self.task.model, self.optimizer)
        mine = {"rng": rng_state(), "run": dataclasses.asdict(st)}
        rows = self.strategy.all_gather_object(mine) if collective else [mine]
        path = None
        if self.info.is_main:
            state = {
                "step": st.step,
                "optimizer": optim_state,
                "schedule": self.schedule.state_dict(),
                "precision": self.precision.state_dict(),
                "rng": [r["rng"] for r in rows],
                "ranks": [r["run"] for r in rows],  # each rank's data position and counts
                "world_size": self.info.world_size,
                "lr": self.cfg.resolved_lr(self.info.world_size),  # a resume with another train.lr rebases on it
                # rank 0's, as before per-rank state: for readers of the older layout
                "epoch": st.epoch, "pos": st.pos, "skipped_items": st.skipped_items, "elapsed": st.elapsed,
                **extra_state,
            }
            path = self.ckpt.save(st.step, model_state, self.task.model_meta(), state, self.task.extra_files())
        if collective:
            barrier()
        return path

    def _crash_checkpoint(self, error: BaseException) -> None:
        """On an exception: save the newest consistent state if there is one (see the module
        doc), and never hide the original error."""
        say = (lambda msg: print(f"[lverse] {msg}", file=sys.stderr)) if self.info.is_main else (lambda msg: None)
        if isinstance(error, RunError):
            if self.info.is_main:
                append_event(self.run_dir, {"event": type(error).__name__, "step": self.state.step, "error": str(error)})
            if not error.checkpoint:
                return
        if self.state.step <= self._last_saved and self._phase not in ("data", "compute", "optimizer"):
            return  # between steps, and this step is checkpointed already
        if not self.strategy.can_crash_save:
            say(f"no crash checkpoint with strategy={self.strategy.name}: one process alone knows neither the other "
                "ranks' data positions nor (under FSDP) their shards; the newest periodic checkpoint stands")
            return
        if self._phase == "optimizer":
            say(f"crashed while the optimizer applied step {self.state.step + 1}: no crash checkpoint (the weights "
                "may be half-written); the newest periodic checkpoint stands")
            return
        try:
            if self._phase in ("data", "compute"):
                self._rollback()  # the step did not happen: save the state from before it
            if self.state.step <= self._last_saved or not self._last_loss_finite:
                return
            p = self._save(collective=False)
            if p is not None:
                say(f"crashed in step {self.state.step + 1}; the state after step {self.state.step} is in {p}")
        except Exception as e:  # never hide the original error
            say(f"could not write a crash checkpoint: {e}")
