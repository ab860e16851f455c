"""The shared training infrastructure: configs, sampler, schedule, checkpoints, precision."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from ranks import free_port, rank_env

from lverse.config import ConfigError, dump_yaml, from_dict, load_config, parse_overrides
from lverse.files import load_weights, save_weights
from lverse.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from lverse.dist import DistInfo, cleanup
from lverse.train.loop import Task, TrainConfig, Trainer
from lverse.train.precision import FP16O2, build_precision
from lverse.train.sampler import ResumableSampler
from lverse.train.schedule import Cosine, PlateauHalving
from lverse.train.strategy import DDP, FSDP, SingleProcess, build_strategy


@dataclass
class _Inner:
    width: int = 4
    mult: tuple[int, ...] = (1, 2)
    name: str = "x"


@dataclass
class _Outer:
    model: _Inner = field(default_factory=_Inner)
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str | None = None


def test_config_yaml_overrides_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  width: 8\n  mult: [1, 2, 4]\ntrain:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n")
    cfg = load_config(_Outer, p, ["model.name=y", "train.max_steps=7"])
    assert cfg.model.width == 8 and cfg.model.mult == (1, 2, 4) and cfg.model.name == "y"
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.betas == (0.9, 0.95) and cfg.train.max_steps == 7
    # the resolved config round-trips through YAML
    p2 = tmp_path / "resolved.yaml"
    p2.write_text(dump_yaml(cfg))
    assert load_config(_Outer, p2) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_Outer, p, ["model.widht=3"])
    with pytest.raises(ConfigError, match="integer"):
        load_config(_Outer, p, ["model.width=abc"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        parse_overrides(["no_equals_sign"])


def test_sampler_shards_cover_and_resume() -> None:
    n, world = 10, 3
    shards = [list(ResumableSampler(n, r, world, seed=1)) for r in range(world)]
    assert all(len(s) == 4 for s in shards)  # 10 items over 3 ranks: padded to 12
    idx = [i for s in shards for i, _ in s]
    assert set(idx) == set(range(n))
    seeds = [sd for s in shards for _, sd in s]
    assert len(set(seeds)) == len(seeds)  # every position gets its own augmentation seed
    # resuming part-way through an epoch yields exactly the rest of that epoch
    s = ResumableSampler(n, 1, world, seed=1)
    s.set_epoch(0, start=2)
    assert list(s) == shards[1][2:]
    # epochs differ, and are reproducible
    a, b = ResumableSampler(n, seed=1), ResumableSampler(n, seed=1)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != list(ResumableSampler(n, seed=1))


def test_plateau_halving() -> None:
    s = PlateauHalving(1.0, window=2, patience=2)
    for loss in [5, 5, 4, 4]:  # improving
        assert not s.observe(loss)
    halved = [s.observe(x) for x in [4, 4, 4, 4]]  # two flat windows → halve once
    assert halved == [False, False, False, True] and s.lr == 0.5
    t = PlateauHalving(1.0, window=2, patience=2)
    t.load_state_dict(s.state_dict())
    assert t.lr == 0.5 and t.halvings == 1
    off = PlateauHalving(1.0, window=1, patience=0)
    assert not any(off.observe(1.0) for _ in range(10)) and off.lr == 1.0


def test_cooldown_decays_linearly_to_min_lr_and_stops_halving() -> None:
    s = PlateauHalving(1.0, window=1, patience=1, warmup_steps=2, total_steps=10, cooldown_steps=4, min_lr=0.2)
    lrs = [s.lr_at(step) for step in range(10)]
    # warm-up, flat, then 4 cool-down steps from 1.0 toward 0.2 (step 10 would be exactly 0.2)
    assert lrs[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert lrs[6:] == pytest.approx([1.0, 0.8, 0.6, 0.4])
    for loss in (3.0, 2.0):
        s.observe(loss, step=3)
    assert not s.observe(5.0, step=7) and s.lr == 1.0  # flat loss inside the cool-down: no halving
    assert s.observe(5.0, step=3) and s.lr == 0.5      # the same before it halves
    short = PlateauHalving(1.0, total_steps=4, cooldown_steps=10)  # a smoke run shorter than it
    assert [short.lr_at(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="cooldown_steps"):
        PlateauHalving(1.0, total_steps=0, cooldown_steps=6)


def test_checkpoint_roundtrip_keep_last_and_rng(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    model = nn.Linear(3, 2)
    torch.manual_seed(0)
    rs = rng_state()
    expected = torch.rand(4)
    for step in (10, 20, 30):
        mgr.save(step, model.state_dict(), {"kind": "linear"}, {"step": step, "rng": rs, "nested": {"a": [1, 2]}})
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert dirs == ["step_0000020", "step_0000030"]
    assert mgr.latest().name == "step_0000030"
    state, meta, train = CheckpointManager.load(mgr.latest())
    assert meta == {"kind": "linear"} and train["step"] == 30 and train["nested"] == {"a": [1, 2]}
    assert torch.equal(state["weight"], model.weight)
    set_rng_state(train["rng"])
    assert torch.equal(torch.rand(4), expected)
    # the weights file alone is loadable for inference
    w, cfg = load_weights(mgr.latest() / "model.safetensors")
    assert cfg["kind"] == "linear" and torch.equal(w["bias"], model.bias)


def test_save_weights_handles_shared_tensors(tmp_path: Path) -> None:
    t = torch.randn(4)
    save_weights(tmp_path / "w.safetensors", {"a": t, "b": t}, {"x": 1})
    w, cfg = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(w["a"], w["b"]) and cfg == {"x": 1}
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.norm.keep_fp32 = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.to(self.fc.weight.dtype))
        return self.norm(h.float())


def test_fp16_o2_master_weights_overflow_and_growth() -> None:
    torch.manual_seed(0)
    net = _Net()
    fp32_before = net.fc.weight.detach().clone()
    prec = build_precision("fp16-o2", torch.device("cpu"))
    assert isinstance(prec, FP16O2)
    prec.growth_interval = 2
    prec.prepare_model(net)
    assert net.fc.weight.dtype == torch.float16 and net.norm.weight.dtype == torch.float32
    opt = prec.build_optimizer([{"params": list(net.parameters())}], lr=1e-2)
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(m.dtype == torch.float32 for m in masters)
    assert torch.equal(masters[0], fp32_before)  # masters are the unrounded fp32 weights

    x = torch.randn(8, 4)
    scale0 = prec.scale
    prec.backward(net(x).pow(2).mean())
    stepped, _ = prec.step(opt, grad_clip=1.0)
    assert stepped and prec.scale == scale0
    # the fp16 model weight is the master rounded to fp16
    assert torch.equal(net.fc.weight, masters[0].half())
    # checkpoints hold the fp32 masters, not the fp16 copies
    sd = prec.model_state_dict(net)
    assert sd["fc.weight"].dtype == torch.float32 and torch.equal(sd["fc.weight"], masters[0])

    # an injected overflow: the step is skipped, weights untouched, scale halved
    before = [m.detach().clone() for m in masters]
    prec.backward(net(x).pow(2).mean())
    net.fc.weight.grad[0, 0] = float("inf")
    stepped, _ = prec.step(opt, grad_clip=1.0)
    assert not stepped and prec.skipped_steps == 1 and prec.scale == scale0 / 2
    assert all(torch.equal(a, b) for a, b in zip(before, masters))
    assert all(p.grad is None for p in net.parameters())
    # clean steps grow the scale back after growth_interval of them
    for _ in range(2):
        prec.backward(net(x).pow(2).mean())
        assert prec.step(opt, grad_clip=1.0)[0]
    assert prec.scale == scale0
    state = prec.state_dict()
    other = FP16O2(torch.device("cpu"))
    other.load_state_dict(state)
    assert other.scale == prec.scale and other.skipped_steps == 1


def test_fp16_o2_requires_prepare_and_rejects_unknown() -> None:
    with pytest.raises(RuntimeError, match="prepare_model"):
        FP16O2(torch.device("cpu")).build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], lr=1.0)
    with pytest.raises(ValueError, match="precision"):
        build_precision("fp8", torch.device("cpu"))


def test_lr_rule() -> None:
    t = TrainConfig(batch_size=8, grad_accum=2, base_lr=4.5e-6)
    assert t.resolved_lr(world_size=4) == pytest.approx(4.5e-6 * 64)
    t.lr = 1e-3
    assert t.resolved_lr(4) == 1e-3


@pytest.mark.parametrize("key,value", [("max_steps", 0), ("log_every", 0), ("keep_last", 0), ("ckpt_every", -1),
                                       ("warmup_steps", -5), ("batch_size", 0)])
def test_train_config_rejects_impossible_counts(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"train.{key}"):
        from_dict(TrainConfig, {key: value}, "train")
    TrainConfig(ckpt_every=0, image_every=0)  # 0 = off is allowed where it means something


def test_weight_average_ema_and_mean_follow_their_formulas() -> None:
    from lverse.train.average import WeightAverage

    w = nn.Parameter(torch.zeros(3))
    seen = []
    ema = WeightAverage([("w", w)], "ema", decay=0.75, start=2)
    mean = WeightAverage([("w", w)], "mean", start=2)
    for step in range(1, 6):
        with torch.no_grad():
            w.copy_(torch.tensor([step, 2.0 * step, -step]))
        seen.append(w.detach().clone())
        ema.update(step)
        mean.update(step)
    ref = seen[1]  # steps before `start` are not averaged
    for s in seen[2:]:
        ref = 0.75 * ref + 0.25 * s
    assert torch.allclose(ema.avg[0], ref) and ema.count == 4
    assert torch.allclose(mean.avg[0], torch.stack(seen[1:]).mean(0)) and mean.count == 4
    with mean.swapped():
        assert torch.allclose(w, torch.stack(seen[1:]).mean(0))
    assert torch.equal(w, seen[-1])  # the weights come back afterwards
    # a state dict restores it exactly; a different mode is refused
    other = WeightAverage([("w", w)], "mean", start=2)
    other.load_state_dict(mean.state_dict())
    assert torch.equal(other.avg[0], mean.avg[0]) and other.count == 4
    with pytest.raises(ValueError, match="ema"):
        other.load_state_dict(ema.state_dict())
    with pytest.raises(RuntimeError, match="step 9"):
        with WeightAverage([("w", w)], "ema", start=9).swapped():
            pass


@pytest.mark.parametrize("over,msg", [({"average": "swa"}, "train.average"), ({"average": "ema", "average_decay": 1.0}, "average_decay"),
                                      ({"average": "mean", "average_start": 10, "max_steps": 10}, "average_start")])
def test_train_config_rejects_bad_averages(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_dict(TrainConfig, over, "train")


def test_cosine_warms_up_then_decays_to_the_min_ratio_over_progress() -> None:
    s = Cosine(1.0, total_steps=100, warmup_steps=4, min_lr_ratio=0.1)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.25 * c for c in (1, 2, 3, 4)], rel=0.01)
    assert s.lr_at(50) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half way between lr and the floor
    assert s.lr_at(100) == pytest.approx(0.1) and s.lr_at(200) == pytest.approx(0.1)
    # progress, when given, drives the cosine instead of the step (the wall-time limit)
    assert s.lr_at(10, progress=1.0) == pytest.approx(0.1) and s.lr_at(10, progress=0.0) == 1.0
    assert not s.observe(3.0, 5) and s.state_dict() == {}


@pytest.mark.parametrize("over,msg", [({"schedule": "linear"}, "train.schedule"),
                                      ({"time_limit_minutes": 1.0}, "schedule=cosine"),
                                      ({"schedule": "cosine", "cooldown_steps": 10}, "cooldown_steps"),
                                      ({"schedule": "cosine", "min_lr_ratio": 2.0}, "min_lr_ratio"),
                                      ({"schedule": "cosine", "time_limit_minutes": -1.0}, "time_limit_minutes")])
def test_train_config_rejects_bad_schedules(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_dict(TrainConfig, over, "train")


def test_build_strategy_by_world() -> None:
    one = DistInfo()
    assert type(build_strategy("ddp", one, "fp16-o2")) is SingleProcess
    assert type(build_strategy("fsdp", one, "fp16-o2")) is SingleProcess  # a world of one shards nothing
    with pytest.raises(ValueError, match="strategy"):
        build_strategy("zero3", one, "fp32")
    with pytest.raises(ValueError, match="fsdp supports precision"):
        FSDP(DistInfo(world_size=2), "fp16")
    assert FSDP(DistInfo(world_size=2), "bf16").precision("bf16") == "fp32"  # FSDP casts, no autocast
    assert not FSDP.can_crash_save and not DDP.can_crash_save and SingleProcess.can_crash_save  # a world of one only


class _Pairs(torch.utils.data.Dataset):
    """x -> sum(x): the sampler hands ``(index, seed)``."""

    def __init__(self) -> None:
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 64

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, _ = key
        return self.x[i], self.x[i].sum(0, keepdim=True)


class _LinearTask(Task):
    def __init__(self, delay: float = 0.0) -> None:
        self.model = nn.Linear(4, 1)
        self.delay = delay

    def model_meta(self) -> dict:
        return {"kind": "linear"}

    def train_dataset(self) -> _Pairs:
        return _Pairs()

    def training_step(self, model, batch, step, autocast):  # type: ignore[override]
        time.sleep(self.delay)  # a slow rank (or machine)
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"loss": loss.item()}


def _time_limited(run_dir: Path, **over: object) -> TrainConfig:
    t = dict(run_dir=str(run_dir), device="cpu", batch_size=4, lr=0.05, max_steps=100_000, schedule="cosine",
             min_lr_ratio=0.0, time_limit_minutes=0.03, log_every=1, ckpt_every=0, num_workers=0,
             tensorboard=False, progress=False)
    t.update(over)
    return from_dict(TrainConfig, t, "train")


def test_time_limit_ends_the_run_with_the_schedule_finished(tmp_path: Path) -> None:
    cfg = _time_limited(tmp_path / "run")
    t0 = time.perf_counter()
    tr = Trainer(cfg, lambda: _LinearTask(delay=0.01))
    res = tr.fit()
    wall = time.perf_counter() - t0
    assert not res["stopped"] and 1 <= res["step"] < cfg.max_steps
    assert wall < 1.8 + 3.0  # the limit, plus start-up and the step in flight
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["step"] + 1))  # the last step is logged too
    assert rows[-1]["lr"] < 0.05 * cfg.lr  # the cosine ran on wall time: it ended near its floor
    latest = CheckpointManager(tmp_path / "run").latest()  # and checkpointed there
    assert latest is not None and latest.name == f"step_{res['step']:07d}"
    _, _, state = CheckpointManager.load(latest)
    assert state["elapsed"] >= 60 * cfg.time_limit_minutes
    # The clock is part of the run: resuming a run whose time is up takes no further step.
    again = Trainer(cfg, lambda: _LinearTask(), resume=str(tmp_path / "run")).fit()
    assert again["step"] == res["step"]


def _time_limit_worker(rank: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(rank_env(rank, port))
    torch.set_num_threads(1)
    cfg = _time_limited(Path(run_dir), time_limit_minutes=0.02)
    res = Trainer(cfg, lambda: _LinearTask(delay=0.002 if rank == 0 else 0.02)).fit()
    Path(out, f"steps{rank}").write_text(str(res["step"]))
    cleanup()
    os._exit(0)  # as in the stage-2 DDP test: no interpreter teardown racing a gloo thread


def test_time_limit_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    """Ranks with different clocks (here: one rank 10x slower per step) still agree when the
    time is up; a rank that stopped alone would leave the other waiting in an all-reduce."""
    mp.spawn(_time_limit_worker, args=(free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    steps = [int((tmp_path / f"steps{r}").read_text()) for r in range(2)]
    assert steps[0] == steps[1] >= 1


# --- the official plateau rule, epochs as a budget --------------------------------------------
def test_plateau_epoch_follows_a_hand_worked_sequence() -> None:
    """patience 2, cooldown 1, threshold 0.1 (relative), floor 0.2: each epoch's mean (the mean
    of its steps' losses; NaN steps ignored) against the best so far, worked by hand, and the
    same as torch's ReduceLROnPlateau given those means."""
    from lverse.train.schedule import PlateauEpoch

    s = PlateauEpoch(1.0, patience=2, cooldown=1, min_lr=0.2, threshold=0.1)
    means = [10, 9.5, 9.0, 8.9] + [8.9] * 15
    # e1 best 10; e2 9.5 and e3 9.0 are not below 10 x 0.9 (bad 1, 2: not more than 2); e4 8.9
    # is (best, bad 0); e5-e7 bad 1-3: halve to 0.5 and cool down; e8 cool-down (bad reset);
    # e9-e11 bad 1-3: 0.25; e12 cool-down; e13-e15: 0.2 (the floor, not 0.125); then no change
    expected = [1.0] * 6 + [0.5] * 4 + [0.25] * 4 + [0.2] * 5
    lrs, halved = [], []
    for m in means:
        for loss in (m - 0.5, float("nan"), m + 0.5):
            assert not s.observe(loss)
        halved.append(s.end_epoch())
        lrs.append(s.lr)
    assert lrs == pytest.approx(expected)
    assert [i + 1 for i, h in enumerate(halved) if h] == [7, 11, 15] and s.halvings == 3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1, min_lr=0.2, threshold=0.1)
    torch_lrs = []
    for m in means:
        ref.step(m)
        torch_lrs.append(opt.param_groups[0]["lr"])
    assert torch_lrs == pytest.approx(expected)
    t = PlateauEpoch(1.0)
    t.load_state_dict(s.state_dict())
    assert (t.lr, t.best, t.bad_epochs, t.cooldown_left, t.epochs) == (s.lr, s.best, s.bad_epochs, s.cooldown_left, 19)
    d = PlateauEpoch(1.0)  # the official defaults
    assert (d.epoch_patience, d.epoch_cooldown, d.min_lr, d.threshold, d.factor) == (10, 10, 1e-6, 1e-4, 0.5)


def test_epoch_budget_formula_for_the_paper_corpora() -> None:
    t = TrainConfig(batch_size=8, max_epochs=30)  # the official code: 8 per GPU, 30 epochs
    assert t.steps_for_epochs(1_281_167, world_size=8) == 600_548   # ImageNet-1K
    assert t.steps_for_epochs(113_287, world_size=8) == 53_104      # COCO Karpathy train+restval
    assert t.steps_for_epochs(3_318_333, world_size=8) == 1_555_469  # CC3M
    assert TrainConfig(batch_size=4, grad_accum=2, max_epochs=3).steps_for_epochs(10, 1) == 4  # ceil(30 / 8)


class _Stream(torch.utils.data.IterableDataset):
    source = "shards-{000..009}.tar"

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(4, generator=g)
            yield x, x.sum(0, keepdim=True)


class _StreamTask(_LinearTask):
    def train_dataset(self) -> _Stream:  # type: ignore[override]
        return _Stream()


def test_max_epochs_sets_the_budget_and_plateau_epoch_steps_per_epoch(tmp_path: Path) -> None:
    over = dict(run_dir=str(tmp_path / "run"), device="cpu", batch_size=4, lr=0.05, max_epochs=2, max_steps=1000,
                schedule="plateau_epoch", log_every=1, ckpt_every=0, num_workers=0, tensorboard=False, progress=False)
    full = _Outer(train=from_dict(TrainConfig, over, "train"))
    tr = Trainer(full.train, lambda: _LinearTask(), full_config=full)
    res = tr.fit()
    assert res["step"] == 32 and tr.cfg.max_steps == 32  # ceil(2 x 64 items / 4)
    assert yaml_train(tmp_path / "run")["max_steps"] == 32  # the resolved budget is what the run records
    assert tr.schedule.epochs == 2 and tr.state.epoch == 2 and tr.state.pos == 0  # judged at each epoch's end
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows][14:18] == [0, 1, 1, 1]  # step 16 ends epoch 0
    for key, val in (("max_epochs", 1), ("schedule", "plateau_epoch")):
        cfg = from_dict(TrainConfig, {**over, "run_dir": str(tmp_path / key), "max_epochs": 0, "schedule": "plateau",
                                      key: val}, "train")
        with pytest.raises(ConfigError, match=r"shards-\{000..009\}.tar is a stream"):
            Trainer(cfg, lambda: _StreamTask()).fit()


def yaml_train(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["train"]


@pytest.mark.parametrize("over,msg", [({"max_epochs": -1}, "max_epochs"), ({"max_bad_steps": -1}, "max_bad_steps"),
                                      ({"bad_share_warn": 0.5, "bad_share_stop": 0.1}, "bad_share"),
                                      ({"schedule": "plateau_epoch", "time_limit_minutes": 1.0}, "schedule=cosine")])
def test_train_config_rejects_bad_guards_and_budgets(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_dict(TrainConfig, over, "train")


def test_checksums_catch_damage_and_can_be_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_weights(tmp_path / "w.safetensors", {"a": torch.arange(6.0)}, {"kind": "x"})
    assert "checksum" in json.loads(path.with_suffix(".json").read_text())
    assert load_weights(path)[1] == {"kind": "x"}  # the record is not part of the config handed back
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w.safetensors: damaged: its sha256 differs"):
        load_weights(path)
    assert not torch.equal(load_weights(path, verify=False)[0]["a"], torch.arange(6.0))
    monkeypatch.setenv("LVERSE_VERIFY_CHECKSUMS", "0")
    load_weights(path)
    path.write_bytes(bytes(data[:-8]))
    monkeypatch.delenv("LVERSE_VERIFY_CHECKSUMS")
    with pytest.raises(ValueError, match="damaged: .* bytes, its checksum record says"):
        load_weights(path)


def test_fp32_steps_with_non_finite_gradients_are_skipped_not_applied() -> None:
    prec = build_precision("fp32", torch.device("cpu"))
    w = nn.Parameter(torch.ones(3))
    opt = prec.build_optimizer([{"params": [w]}], lr=0.1)
    (w * torch.tensor([1.0, float("inf"), 1.0])).sum().backward()
    stepped, norm = prec.step(opt, grad_clip=1.0)
    assert not stepped and not math.isfinite(norm) and prec.skipped_steps == 1
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None


def test_a_checkpoint_at_an_epoch_end_resumes_into_the_next_epoch(tmp_path: Path) -> None:
    """64 items in batches of 4: step 16 ends epoch 0. Its checkpoint resumes at epoch 1, item 0
    (it used to resume at the end of epoch 0, find no batch there and stop with an error)."""
    over = dict(device="cpu", batch_size=4, lr=0.05, log_every=4, ckpt_every=0, num_workers=0, tensorboard=False,
                progress=False)
    full = Trainer(from_dict(TrainConfig, {**over, "run_dir": str(tmp_path / "a"), "max_steps": 20}, "train"),
                   lambda: _LinearTask())
    full.fit()
    Trainer(from_dict(TrainConfig, {**over, "run_dir": str(tmp_path / "b"), "max_steps": 16}, "train"), lambda: _LinearTask()).fit()
    _, _, state = CheckpointManager.load(CheckpointManager(tmp_path / "b").latest())
    assert (state["epoch"], state["pos"]) == (1, 0)
    resumed = Trainer(from_dict(TrainConfig, {**over, "run_dir": str(tmp_path / "b"), "max_steps": 20}, "train"),
                      lambda: _LinearTask(), resume=tmp_path / "b")
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(full.task.model.parameters(), resumed.task.model.parameters()))


def test_tf32_is_switched_for_cuda_devices_only() -> None:
    """``train.tf32`` (default true) sets torch's fp32 matmul/convolution precision for a CUDA
    device (the flags need no GPU to be set), and leaves them alone on a CPU; the legacy and the
    new flags agree afterwards (reading the legacy ones raised after setting only the new)."""
    from lverse.train.precision import set_tf32

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        assert not set_tf32(torch.device("cpu"), True)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        build_precision("fp32", torch.device("cuda"))
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
        build_precision("bf16", torch.device("cuda", 0), tf32=False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert from_dict(TrainConfig, {"tf32": False}).tf32 is False and TrainConfig().tf32 is True
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_fused_adamw_on_cuda_and_callers_may_pass_fused() -> None:
    """On a CUDA device the optimizer is fused AdamW unless the caller passes ``fused`` itself
    (bench/train_throughput.py did, and the two ``fused`` arguments raised a TypeError: the GPU
    benchmark would have failed at its first step). CPU tensors take fused AdamW too, so this
    runs without a GPU."""
    p = nn.Parameter(torch.ones(3))
    opt = build_precision("fp32", torch.device("cuda")).build_optimizer([{"params": [p]}], lr=1e-3)
    assert opt.defaults["fused"] is True
    opt = build_precision("bf16", torch.device("cuda")).build_optimizer([{"params": [p]}], lr=1e-3, fused=False)
    assert not opt.defaults["fused"]
    assert not build_precision("fp32", torch.device("cpu")).build_optimizer([{"params": [p]}], lr=1e-3).defaults["fused"]
