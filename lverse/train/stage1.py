"""Stage 1: train AugVAE-ML on images, or finetune it into AugVAE-SL.

loss = MSE(x, x̂) + 0.1 · LPIPS(x, x̂) + Σ_levels β‖z − sg(q(z))‖²   (the quantizer adds the
commitment term; the codebook itself moves by EMA, not by gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, to_dict
from ..data import build_image_dataset
from ..models.augvae import AugVAE, AugVAEConfig, ml_to_sl
from ..perceptual import build_lpips
from .cli import run_stage
from .loop import Task, TrainConfig


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
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(name="augvae"))


def resolve_weights(path: str | Path) -> Path:
    """A weights file, or a run directory (its exported model, else its latest checkpoint)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "model.safetensors", p / "checkpoints" / "latest"):
            if cand.name == "latest" and cand.is_file():
                return p / "checkpoints" / cand.read_text().strip() / "model.safetensors"
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p}: no model.safetensors and no checkpoints/latest in this run directory")
    if not p.is_file():
        raise FileNotFoundError(f"weights not found: {p}")
    return p


def build_stage1_model(cfg: Stage1Config) -> AugVAE:
    if not cfg.init_from:
        if cfg.model.variant == "sl":
            raise ConfigError("model.variant=sl is finetuned from a trained AugVAE-ML: set init_from=PATH")
        return AugVAE(cfg.model)
    src = AugVAE.load(resolve_weights(cfg.init_from))
    if cfg.model.variant == "sl" and src.cfg.variant == "ml":
        return ml_to_sl(src)
    if src.cfg.variant != cfg.model.variant:
        raise ConfigError(f"init_from {cfg.init_from} is an AugVAE-{src.cfg.variant.upper()}, cannot start AugVAE-{cfg.model.variant.upper()} from it")
    return src


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
    """Stack images; items that failed to load (None) are dropped and counted."""
    good = [it for it in items if it is not None]
    images = torch.stack([it["image"] for it in good]) if good else torch.empty(0)
    return {"image": images, "skipped": len(items) - len(good)}


def freeze_tokenizer_side(model: AugVAE) -> None:
    """Freeze the encoders, the pre-quant conv and the codebook (no EMA update, no restarts)."""
    for module in (model.encoders, model.pre_quant, model.quantizer):
        for p in module.parameters():
            p.requires_grad_(False)
    model.quantizer.update = False


class Stage1Task(Task):
    def __init__(self, cfg: Stage1Config) -> None:
        self.cfg = cfg
        self.model = build_stage1_model(cfg)
        if cfg.trainable not in ("all", "decoder"):
            raise ConfigError(f"trainable must be 'all' or 'decoder', got {cfg.trainable!r}")
        if cfg.trainable == "decoder":
            if not cfg.init_from:
                raise ConfigError("trainable=decoder finetunes a trained AugVAE: set init_from=PATH")
            freeze_tokenizer_side(self.model)
        self.lpips: nn.Module | None = None
        self._vis: torch.Tensor | None = None

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "augvae", "config": to_dict(self.model.cfg)}

    def prepare(self, device: torch.device) -> None:
        self.device = device
        if self.cfg.loss.lpips_weight > 0:
            self.lpips = build_lpips(self.cfg.loss.vgg_weights or None, self.cfg.loss.lpips_random_backbone).to(device)

    def train_dataset(self) -> Any:
        return _image_dataset(self.cfg.data, train=True)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return collate_images(items)

    def training_step(self, model: nn.Module, batch: dict[str, Any], step: int, autocast: Callable) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"].to(self.device, non_blocking=True)
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


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "Train AugVAE-ML (stage 1a) or finetune AugVAE-SL (stage 1b).", Stage1Config, Stage1Task,
                     lambda cfg: describe(cfg.model))
