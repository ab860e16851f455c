"""Stage 1 through the shared trainer: learning, exact resume, signals, crashes, SL, bad data, DDP."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from ranks import free_port, rank_env

import lverse.shapes  # noqa: F401  (registers data.kind=shapes, also in spawned workers)
from lverse.cli.train import train_augvae as stage1_main
from lverse.config import ConfigError, from_dict
from lverse.dist import cleanup
from lverse.files import resolve_weights
from lverse.models.augvae import AugVAE, AugVAEConfig
from lverse.train.checkpoint import CheckpointManager
from lverse.train.logger import read_metrics
from lverse.train.loop import Trainer
from lverse.train.stage1 import Stage1Config, Stage1Task, describe

# Narrow (8 channels in 4 GroupNorm groups): a step costs a quarter of what 32 channels cost.
TINY_MODEL = dict(resolution=32, hidden_dim=8, norm_groups=4, ch_mult=[1, 1], num_res_blocks=1, z_channels=8,
                  codebook_size=32, codebook_dim=8)


def tiny_cfg(run_dir: Path, **train: Any) -> Stage1Config:
    data = {"kind": "shapes", "resolution": 32, "shapes_size": 64}
    t = dict(run_dir=str(run_dir), name="t", device="cpu", batch_size=4, lr=2e-3, max_steps=6, log_every=2,
             image_every=0, ckpt_every=100, num_workers=0, tensorboard=False, progress=False, plateau_patience=0)
    t.update(train)
    return from_dict(Stage1Config, {"model": {"variant": "ml", "num_levels": 3, **TINY_MODEL}, "data": data,
                                    "loss": {"lpips_weight": 0.0}, "train": t})


def fit(cfg: Stage1Config, resume: str | None = None, task_cls: type = Stage1Task) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg.train, lambda: task_cls(cfg), full_config=cfg, resume=resume)
    return trainer, trainer.fit()


def test_tiny_augvae_learns_shapes(tmp_path: Path) -> None:
    # 40 steps: the mean MSE of steps 31-40 is 0.13-0.16 of that of steps 1-10 (seeds 0-2)
    cfg = tiny_cfg(tmp_path / "run", max_steps=40, log_every=10, batch_size=8, image_every=40)
    cfg.data.shapes_size = 512
    _, res = fit(cfg)
    m = read_metrics(res["run_dir"])
    first, last = m[0]["mse"], m[-1]["mse"]
    assert last < 0.35 * first, (first, last)
    # the codebook is in use, by more than one code
    assert m[-1]["codebook/usage"] > 0 and m[-1]["codebook/perplexity"] > 1
    assert list((Path(res["run_dir"]) / "images").glob("reconstruction_*.png"))
    assert (Path(res["run_dir"]) / "config.yaml").is_file()


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.task.model.state_dict().items()}


def test_resume_reaches_same_weights_as_unbroken_run(tmp_path: Path) -> None:
    full, _ = fit(tiny_cfg(tmp_path / "a", max_steps=8))
    fit(tiny_cfg(tmp_path / "b", max_steps=4))  # "stopped" after 4 steps, mid-epoch (an epoch is 64 items = 16 steps)
    resumed, res = fit(tiny_cfg(tmp_path / "b", max_steps=8), resume=str(tmp_path / "b"))
    assert res["step"] == 8
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer state was restored too (Adam moments), not just the weights
    sa = full.optimizer.state_dict()["state"]
    sb = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_channels_last_trains_the_same_model_and_resumes(tmp_path: Path) -> None:
    """``channels_last: true``: the AugVAE's convolutions train in NHWC memory (other kernels,
    the same arithmetic up to rounding); the weights it saves are ordinary contiguous tensors,
    and a resumed run equals an unbroken one exactly."""
    plain, _ = fit(tiny_cfg(tmp_path / "a", max_steps=4))
    cfg = tiny_cfg(tmp_path / "b", max_steps=4)
    cfg.channels_last = True
    nhwc, res = fit(cfg)
    convs = [p for p in nhwc.task.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    # the same losses, and weights within half an Adam step (lr 2e-3) of each other: rounding
    # differences flip the sign of a few near-zero gradients, which Adam turns into whole steps
    la, lb = (read_metrics(tmp_path / d) for d in ("a", "b"))
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], rel=1e-4)
    a, b = _weights(plain), _weights(nhwc)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    saved = AugVAE.load(resolve_weights(res["run_dir"])).state_dict()
    assert all(torch.equal(saved[k], b[k].contiguous()) for k in saved)
    cfg8 = tiny_cfg(tmp_path / "b", max_steps=8)
    cfg8.channels_last = True
    resumed, _ = fit(cfg8, resume=str(tmp_path / "b"))
    cfg_full = tiny_cfg(tmp_path / "c", max_steps=8)
    cfg_full.channels_last = True
    full, _ = fit(cfg_full)
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in _weights(full).items())


class _SignalledTask(Stage1Task):
    def training_step(self, model, batch, step, autocast):  # type: ignore[override]
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would
        return super().training_step(model, batch, step, autocast)


class _CrashingTask(Stage1Task):
    def training_step(self, model, batch, step, autocast):  # type: ignore[override]
        if step == 3:
            raise RuntimeError("boom")
        return super().training_step(model, batch, step, autocast)


def test_sigterm_writes_checkpoint_and_stops(tmp_path: Path) -> None:
    _, res = fit(tiny_cfg(tmp_path / "s", max_steps=50), task_cls=_SignalledTask)
    assert res["stopped"] and res["step"] == 3
    latest = CheckpointManager(tmp_path / "s").latest()
    assert latest is not None and latest.name == "step_0000003"


def test_crash_writes_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        fit(tiny_cfg(tmp_path / "c", max_steps=50), task_cls=_CrashingTask)
    latest = CheckpointManager(tmp_path / "c").latest()
    assert latest is not None and latest.name == "step_0000003"
    _, _, state = CheckpointManager.load(latest)
    assert state["step"] == 3
    # and the crashed run resumes from it
    _, res = fit(tiny_cfg(tmp_path / "c", max_steps=5), resume=str(tmp_path / "c"))
    assert res["step"] == 5


def test_sl_finetune_from_ml_run_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ml_dir = tmp_path / "ml"
    cfg = tiny_cfg(ml_dir, max_steps=2)
    cfg.train.run_dir = str(ml_dir)
    fit(cfg)
    assert (ml_dir / "checkpoints" / "latest").is_file()
    yaml_path = tmp_path / "sl.yaml"
    import yaml

    from lverse.config import to_dict

    d = to_dict(tiny_cfg(tmp_path / "sl", max_steps=2))
    d["model"]["variant"] = "sl"
    d["init_from"] = str(ml_dir)
    yaml_path.write_text(yaml.safe_dump(d))
    assert stage1_main(["--config", str(yaml_path)]) == 0
    sl = AugVAE.load(tmp_path / "sl" / "model.safetensors")
    assert sl.cfg.variant == "sl" and len(sl.token_grids) == 1
    codes = sl.encode(torch.zeros(1, 3, 32, 32))
    assert codes.shape == (1, sl.tokens_per_image)
    # SL without init_from is a config error with a clear message, not a traceback
    d["init_from"] = ""
    yaml_path.write_text(yaml.safe_dump(d))
    assert stage1_main(["--config", str(yaml_path)]) == 2
    assert "init_from" in capsys.readouterr().err


def test_decoder_finetune_keeps_token_ids_and_trains_the_decoder(tmp_path: Path) -> None:
    ml_dir = tmp_path / "ml"
    fit(tiny_cfg(ml_dir, max_steps=3))
    before = AugVAE.load(resolve_weights(ml_dir))
    cfg = tiny_cfg(tmp_path / "dec", max_steps=4)
    cfg.init_from, cfg.trainable = str(ml_dir), "decoder"
    trainer, _ = fit(cfg)
    after = AugVAE.load(resolve_weights(tmp_path / "dec"))
    sb, sa = before.state_dict(), after.state_dict()
    frozen = [k for k in sb if k.startswith(("encoders.", "pre_quant.", "quantizer."))]
    trained = [k for k in sb if k.startswith(("decoders.", "post_quant."))]
    assert frozen and trained
    assert all(torch.equal(sb[k], sa[k]) for k in frozen)  # encoder, pre-quant and codebook (with EMA state)
    assert any(not torch.equal(sb[k], sa[k]) for k in trained)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(before.encode(x), after.encode(x))  # the same token ids: a BiART stays valid
    cfg.init_from = ""
    with pytest.raises(ConfigError, match="init_from"):
        Stage1Task(cfg)
    cfg.trainable = "encoder"
    with pytest.raises(ConfigError, match="trainable"):
        Stage1Task(cfg)
    # weight averaging leaves the EMA codebook at the last step: only a frozen codebook allows it
    cfg.trainable, cfg.init_from, cfg.train.average = "all", str(ml_dir), "ema"
    with pytest.raises(ConfigError, match="train.average"):
        Stage1Task(cfg)
    cfg.trainable = "decoder"
    Stage1Task(cfg)


def test_init_from_takes_the_codebook_training_settings_of_the_run(tmp_path: Path) -> None:
    # The architecture comes from the checkpoint; restarts and EMA are the new run's settings
    # (they used to be silently those of the run that wrote the checkpoint).
    ml_dir = tmp_path / "ml"
    fit(tiny_cfg(ml_dir, max_steps=2))
    cfg = tiny_cfg(tmp_path / "sl", max_steps=2)
    cfg.model.variant, cfg.init_from = "sl", str(ml_dir)
    cfg.model.dead_code_threshold, cfg.model.dead_code_restart, cfg.model.ema_decay = 0.5, "error", 0.9
    q = Stage1Task(cfg).model.quantizer
    assert (q.dead_code_threshold, q.restart_from, q.decay) == (0.5, "error", 0.9)
    _, res = fit(cfg)
    saved = AugVAE.load(resolve_weights(tmp_path / "sl"))
    assert (saved.cfg.dead_code_restart, saved.quantizer.restart_from) == ("error", "error")
    cfg.model.dead_code_restart = "nearest"
    with pytest.raises(ConfigError, match="dead_code_restart"):
        Stage1Task(cfg)


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    cfg = tiny_cfg(tmp_path / "f", max_steps=4, batch_size=4)
    cfg.data.kind, cfg.data.path = "folder", str(root)
    with pytest.warns(Warning):
        _, res = fit(cfg)
    assert res["step"] == 4 and res["skipped_items"] >= 1


def test_describe_paper_sizes() -> None:
    ml = describe(AugVAEConfig())
    sl = describe(AugVAEConfig(variant="sl"))
    assert ml["trainable_parameters"] == 221_224_195 and ml["tokens_per_image"] == 5440
    assert sl["trainable_parameters"] == 112_289_283 and sl["tokens_per_image"] == 1024
    assert sl["token_grids"] == [[32, 32]]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(rank_env(rank, port, world))
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(run_dir), max_steps=4)
    trainer = Trainer(cfg.train, lambda: Stage1Task(cfg), full_config=cfg)
    trainer.fit()
    torch.save({k: v.clone() for k, v in trainer.task.model.state_dict().items()}, f"{out}/rank{rank}.pt")
    cleanup()


def test_two_gloo_processes_keep_identical_weights_and_codebook(tmp_path: Path) -> None:
    # fork: the workers inherit the imported torch and lverse (spawned ones import them again,
    # which was most of this test's time)
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = AugVAE(AugVAEConfig(variant="ml", num_levels=3, **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_MODEL.items()}))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    emb = [k for k in a if "embedding" in k or "embed" in k]
    assert emb, "the quantizer's codebook should be in the state dict"
    assert not torch.equal(a[emb[0]], init.state_dict()[emb[0]])  # it did train
