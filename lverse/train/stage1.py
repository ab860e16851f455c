"""Stage 1: train AugVAE-ML on images, or finetune it into AugVAE-SL.

loss = MSE(x, x̂) + 0.1 · LPIPS(x, x̂) + Σ_levels β‖z − sg(q(z))‖²   (the quantizer adds the
commitment term; the codebook itself moves by EMA, not by gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lverse.config import ConfigError, to_dict
from lverse.data import build_image_dataset, collate_skip_none
from lverse.files import resolve_weights
from lverse.models.augvae import AugVAE, AugVAEConfig, ml_to_sl
from lverse.models.lpips import build_lpips
from lverse.models.quantizer import RESTART_FROM
from lverse.train.loop import Task, TrainConfig


@dataclass
class ImageDataConfig:
    kind: str = "shapes"          # shapes | folder | tar
    path: str = ""                # image folder (class folders or flat), or a tar-shard glob
    val_path: str = ""            # images for the reconstruction grids (defaults to `path`)
    resolution: int = 256
    shapes_size: int = 50000      # Shapes: items in the train split
    shapes_seed: int = 0


@dataclass
class Stage1LossConfig:
    lpips_weight: float = 0.1
    vgg_weights: str = ""                 # path to torchvision's vgg16-397923af.pth (else: cache)
    lpips_random_backbone: bool = False   # smoke runs/tests only: LPIPS on a random VGG


@dataclass
class Stage1Config:
    model: AugVAEConfig = field(default_factory=AugVAEConfig)
    init_from: str = ""           # SL: trained ML weights (file or run dir); ML: optional warm start
    # "all": train everything. "decoder": train only what turns codes into pixels (post-quant
    # conv, connectors, decoders); the encoders, pre-quant conv and codebook are frozen, so an
    # image's token ids stay exactly what they were and a BiART trained on them stays valid.
    trainable: str = "all"
    # the AugVAE, LPIPS and the images in channels-last (NHWC) memory: convolutions read pixels
    # with their channels together. 1-18% faster on a CPU (docs/benchmarks.md, bench/augvae.py);
    # off by default until the GPU benchmark has measured it (the same weights, other kernels)
    channels_last: bool = False
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(name="augvae"))


def build_stage1_model(cfg: Stage1Config) -> AugVAE:
    if not cfg.init_from:
        if cfg.model.variant == "sl":
            raise ConfigError("model.variant=sl is finetuned from a trained AugVAE-ML: set init_from=PATH")
        return AugVAE(cfg.model)
    src = AugVAE.load(resolve_weights(cfg.init_from))
    if cfg.model.variant == "sl" and src.cfg.variant == "ml":
        model = ml_to_sl(src)
    elif src.cfg.variant != cfg.model.variant:
        raise ConfigError(f"init_from {cfg.init_from} is an AugVAE-{src.cfg.variant.upper()}, cannot start AugVAE-{cfg.model.variant.upper()} from it")
    else:
        model = src
    # The architecture comes from the checkpoint, but how the codebook trains is this run's
    # choice: without this, model.dead_code_threshold etc. of the run's config were ignored.
    q = model.quantizer
    m = cfg.model
    model.cfg = replace(model.cfg, beta=m.beta, ema_decay=m.ema_decay, ema_eps=m.ema_eps,
                        dead_code_threshold=m.dead_code_threshold, dead_code_restart=m.dead_code_restart)
    q.beta, q.decay, q.eps = m.beta, m.ema_decay, m.ema_eps
    q.dead_code_threshold, q.restart_from = m.dead_code_threshold, m.dead_code_restart
    return model


def _image_dataset(cfg: ImageDataConfig, train: bool, path: str = "") -> Any:
    if cfg.kind == "shapes":
        return build_image_dataset(
            "shapes", split="train" if train else "test", size=cfg.shapes_size if train else 64,
            seed=cfg.shapes_seed, resolution=cfg.resolution,
        )
    root = path or cfg.path
    if not root:
        raise ConfigError(f"data.kind={cfg.kind} needs data.path")
    if cfg.kind == "tar" and train:
        # an endless stream: ranks never run out at different times (which would hang DDP)
        return build_image_dataset("tar", root=root, resolution=cfg.resolution, train=True, repeat=True)
    return build_image_dataset(cfg.kind, root=root, resolution=cfg.resolution, train=train)


def collate_images(items: list[Any]) -> dict[str, Any]:
    """Stack images; items that failed to load are dropped and counted (:func:`collate_skip_none`)."""
    batch = collate_skip_none(items)
    return {"image": batch.get("image", torch.empty(0)), "batch_size": batch["batch_size"],
            "skipped": batch["skipped"], "skipped_by": batch.get("skipped_by", {})}


def freeze_tokenizer_side(model: AugVAE) -> None:
    """Freeze the encoders, the pre-quant conv and the codebook (no EMA update, no restarts)."""
    for module in (model.encoders, model.pre_quant, model.quantizer):
        for p in module.parameters():
            p.requires_grad_(False)
    model.quantizer.update = False


class Stage1Task(Task):
    def __init__(self, cfg: Stage1Config) -> None:
        self.cfg = cfg
        # check the config before loading any checkpoint, so a typo fails at once
        if cfg.model.dead_code_restart not in RESTART_FROM:
            raise ConfigError(f"model.dead_code_restart must be one of {RESTART_FROM}, got {cfg.model.dead_code_restart!r}")
        if cfg.trainable not in ("all", "decoder"):
            raise ConfigError(f"trainable must be 'all' or 'decoder', got {cfg.trainable!r}")
        if cfg.trainable == "decoder" and not cfg.init_from:
            raise ConfigError("trainable=decoder finetunes a trained AugVAE: set init_from=PATH")
        if cfg.train.average != "none" and cfg.trainable == "all":
            # the codebook is an EMA of encoder outputs kept in buffers, which weight averaging
            # leaves at the last step: averaged encoders would quantize against a codebook
            # that was never fitted to them
            raise ConfigError("train.average applies to stage 1 only with trainable=decoder (the codebook is not averaged)")
        self.model = build_stage1_model(cfg)
        if cfg.trainable == "decoder":
            freeze_tokenizer_side(self.model)
        self.lpips: nn.Module | None = None
        self._vis: torch.Tensor | None = None

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "augvae", "config": to_dict(self.model.cfg)}

    def prepare(self, device: torch.device) -> None:
        self.device = device
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        if self.cfg.loss.lpips_weight > 0:
            self.lpips = build_lpips(self.cfg.loss.vgg_weights or None, self.cfg.loss.lpips_random_backbone).to(device)
        if self.cfg.channels_last:  # in place: the parameters keep their identity
            for m in (self.model, self.lpips):
                if m is not None:
                    m.to(memory_format=torch.channels_last)

    def train_dataset(self) -> Any:
        return _image_dataset(self.cfg.data, train=True)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return collate_images(items)

    def training_step(self, model: nn.Module, batch: dict[str, Any], step: int, autocast: Callable) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with autocast():
            out = model(x)
        recon = out.recon.float()
        mse = F.mse_loss(recon, x)
        loss = mse + out.commit_loss.float()
        out.commit_loss = out.commit_loss.detach()
        logs = {"mse": mse.item(), "commit": out.commit_loss.item()}
        if self.lpips is not None:
            with autocast():
                lp = self.lpips(recon, x).mean().float()
            loss = loss + self.cfg.loss.lpips_weight * lp
            logs["lpips"] = lp.item()
        logs["loss"] = loss.item()
        return loss, logs

    def periodic_logs(self) -> dict[str, float]:
        return {f"codebook/{k}": float(v) for k, v in self.model.codebook_stats().items()}

    @torch.no_grad()
    def visualize(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if self._vis is None:
            ds = _image_dataset(self.cfg.data, train=False, path=self.cfg.data.val_path)
            imgs = [ds[i] for i in range(min(8, len(ds)))]
            self._vis = collate_images(imgs)["image"]
        x = self._vis.to(self.device)
        recon = model(x).recon.float().clamp(-1, 1)
        return {"reconstruction": torch.cat([x, recon])}


def describe(cfg: AugVAEConfig) -> dict[str, Any]:
    """Parameter count and token layout, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AugVAE(cfg)
    return {
        "variant": cfg.variant,
        "resolution": cfg.resolution,
        "trainable_parameters": model.num_parameters(),
        "token_grids": [list(g) for g in model.token_grids],
        "tokens_per_image": model.tokens_per_image,
        "codebook": [cfg.codebook_size, cfg.codebook_dim],
    }
