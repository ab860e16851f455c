"""AugVAE (L-Verse stage 1): hierarchical VQ autoencoder with one codebook shared by all levels.

AugVAE-ML (``variant="ml"``) chains encoders: E(4,·) takes the image down to the finest latent
map (64² at 256 px), then each E(2,·) halves the *continuous* output of the previous one (32²,
16², 8²). Every level goes through a 1×1 pre-quant conv, the shared EMA quantizer and a 1×1
post-quant conv; the pre/post conv *weights* are shared across levels and each level keeps its
own bias ("cross-level feature augmentation": the codebook sees features of every scale).
Decoding runs coarse to fine: the coarsest level enters G(2,·); every finer level's post-quant
latent is concatenated (latent first) with the previous decoder's output and fed to the next
decoder; the last one, G(4,3), makes the image. Tokens: 64²+32²+16²+8² = 5440 per image.

AugVAE-SL (``variant="sl"``) is finetuned from ML (:func:`ml_to_sl`): the first two encoders and
the last two decoders, and only the second level (32² at 256 px) is quantized: 1024 tokens.
Each concatenation becomes a 1×1 "connector" conv z→2z.

Building blocks follow taming-transformers' Encoder/Decoder without attention: residual blocks
GroupNorm(``norm_groups``, eps 1e-6) → SiLU → conv3×3 → GroupNorm → SiLU → dropout → conv3×3 (+ 1×1 shortcut
when the width changes), downsample = pad right/bottom by one + conv3×3 stride 2, upsample =
nearest ×2 + conv3×3. Module names mirror the official checkpoints so the converter
(:mod:`lverse.convert.official_augvae`) is a near-identity mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lverse.config import from_dict, to_dict
from lverse.files import load_weights, save_weights
from lverse.models.quantizer import EMAVectorQuantizer


@dataclass
class AugVAEConfig:
    variant: str = "ml"  # "ml" (hierarchical, num_levels levels) or "sl" (single level)
    resolution: int = 256
    in_channels: int = 3
    hidden_dim: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)  # of the first encoder E(4,.) and the last decoder G(4,3)
    num_res_blocks: int = 2
    z_channels: int = 256
    num_levels: int = 4  # ML levels (SL keeps the first two encoders, quantizes level 2 only)
    codebook_size: int = 8192
    codebook_dim: int = 256
    beta: float = 0.25
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dropout: float = 0.0
    dead_code_threshold: float = 0.0
    # Ours (restarts are off in the paper): where a restarted code is placed, "random" or "error"
    # (see EMAVectorQuantizer's restart_from).
    dead_code_restart: str = "random"
    # Groups of every GroupNorm: 32 in the paper and the released checkpoints. A config option
    # so that test models can be narrower than 32 channels (hidden_dim must be a multiple).
    norm_groups: int = 32


# The chained encoders E(2,.) and decoders G(2,.) always use these multipliers of hidden_dim.
INNER_CH_MULT: tuple[int, ...] = (2, 4)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding (right/bottom only), as in the released weights
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class DownLevel(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample


class UpLevel(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample


class Encoder(nn.Module):
    """conv_in → per level: ``num_res_blocks`` blocks (+ downsample except the last) → mid →
    GroupNorm → SiLU → conv_out. Downsamples by ``2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self, in_channels: int, hidden_dim: int, ch_mult: Sequence[int], num_res_blocks: int,
        z_channels: int, dropout: float, groups: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden_dim, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_out = hidden_dim
        for i, mult in enumerate(ch_mult):
            block_in, block_out = hidden_dim * in_mult[i], hidden_dim * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, dropout, groups)
                      for j in range(num_res_blocks)]
            down = Downsample(block_out) if i != len(ch_mult) - 1 else None
            self.down.append(DownLevel(blocks, down))
        self.mid = MidBlock(block_out, dropout, groups)
        self.norm_out = _norm(block_out, groups)
        self.conv_out = nn.Conv2d(block_out, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in → mid → per level, coarsest first: ``num_res_blocks + 1`` blocks (+ upsample
    except the finest) → GroupNorm → SiLU → conv_out. ``up[i]`` is stored finest first (the
    official layout), so ``up[-1]`` runs first. Upsamples by ``2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self, in_channels: int, hidden_dim: int, ch_mult: Sequence[int], num_res_blocks: int,
        out_channels: int, dropout: float, groups: int,
    ) -> None:
        super().__init__()
        block_in = hidden_dim * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout, groups)
        levels: list[UpLevel] = []
        for i in reversed(range(len(ch_mult))):
            block_out = hidden_dim * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
            levels.insert(0, UpLevel(blocks, Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class SharedConv1x1(nn.Module):
    """A 1×1 conv whose weight is shared by several levels, each with its own bias.

    ``weight`` (out, in, 1, 1) is one Parameter and ``bias`` (levels, out) holds one row per
    level, so ``state_dict()`` has no duplicated tensor and the weight is counted once."""

    def __init__(self, in_channels: int, out_channels: int, num_levels: int) -> None:
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, 1)  # default conv init for weight and biases
        self.weight = nn.Parameter(ref.weight.detach().clone())
        bound = 1.0 / in_channels**0.5
        self.bias = nn.Parameter(torch.empty(num_levels, out_channels).uniform_(-bound, bound))

    def forward(self, x: Tensor, level: int) -> Tensor:
        return F.conv2d(x, self.weight, self.bias[level])


@dataclass
class AugVAEOutput:
    recon: Tensor  # (B, C, H, W) reconstruction, not clamped
    commit_loss: Tensor  # sum over quantized levels of beta * MSE(z, sg(z_q))
    indices: list[Tensor]  # (B, h_l, w_l) code ids per quantized level, finest first


class AugVAE(nn.Module):
    """AugVAE-ML / -SL. See the module docstring for the architecture.

    Attributes: ``cfg``; ``levels`` (which encoder outputs are quantized, finest first: ML all,
    SL ``[1]``); ``token_grids`` ((h, w) per quantized level, finest first); ``tokens_per_image``.
    Parameters: ``encoders``, ``decoders`` (in decoding order, coarse to fine), ``pre_quant``,
    ``post_quant`` (bias row ``i`` serves ``levels[i]``), ``connectors`` (SL only) and the one
    ``quantizer`` (codebook is a buffer updated by EMA, not a parameter).
    """

    def __init__(self, cfg: AugVAEConfig) -> None:
        super().__init__()
        if cfg.variant not in ("ml", "sl"):
            raise ValueError(f"AugVAEConfig.variant must be 'ml' or 'sl', got {cfg.variant!r}")
        if cfg.variant == "ml" and cfg.num_levels < 1:
            raise ValueError(f"AugVAEConfig.num_levels must be >= 1 for ML, got {cfg.num_levels}")
        if cfg.variant == "sl" and cfg.num_levels < 2:
            raise ValueError(f"AugVAEConfig.num_levels must be >= 2 for SL (it is finetuned from "
                             f"an ML with >= 2 levels), got {cfg.num_levels}")
        if cfg.norm_groups < 1 or cfg.hidden_dim % cfg.norm_groups != 0:
            # every width is a multiple of hidden_dim, so this is the one divisibility to check
            raise ValueError(f"AugVAEConfig: hidden_dim {cfg.hidden_dim} is not a multiple of "
                             f"norm_groups {cfg.norm_groups}")
        self.cfg = cfg
        n_enc = cfg.num_levels if cfg.variant == "ml" else 2
        factor = 2 ** (len(cfg.ch_mult) - 1)
        finest = cfg.resolution // factor
        if cfg.resolution % (factor * 2 ** (n_enc - 1)) != 0:
            raise ValueError(
                f"AugVAEConfig: resolution {cfg.resolution} is not divisible by "
                f"{factor * 2 ** (n_enc - 1)} (needed by ch_mult={tuple(cfg.ch_mult)} and "
                f"{n_enc} encoders)"
            )
        self.levels: list[int] = list(range(n_enc)) if cfg.variant == "ml" else [1]
        self.token_grids: list[tuple[int, int]] = [(finest >> i, finest >> i) for i in self.levels]
        self.tokens_per_image: int = sum(h * w for h, w in self.token_grids)

        z, hd, nrb, do, ng = cfg.z_channels, cfg.hidden_dim, cfg.num_res_blocks, cfg.dropout, cfg.norm_groups
        self.encoders = nn.ModuleList(
            [Encoder(cfg.in_channels, hd, cfg.ch_mult, nrb, z, do, ng)]
            + [Encoder(z, hd, INNER_CH_MULT, nrb, z, do, ng) for _ in range(n_enc - 1)]
        )
        n_q = len(self.levels)
        self.pre_quant = SharedConv1x1(z, cfg.codebook_dim, n_q)
        self.quantizer = EMAVectorQuantizer(
            cfg.codebook_size, cfg.codebook_dim, decay=cfg.ema_decay, eps=cfg.ema_eps,
            beta=cfg.beta, dead_code_threshold=cfg.dead_code_threshold,
            restart_from=cfg.dead_code_restart,
        )
        self.post_quant = SharedConv1x1(cfg.codebook_dim, z, n_q)
        decoders: list[Decoder] = []
        if cfg.variant == "ml":
            # G(2,.) for every level but the finest; the coarsest takes z, the others the
            # concatenation [latent, previous decoder output] (2z); G(4,3) makes the image.
            for i in range(n_enc - 1):
                decoders.append(Decoder(z if i == 0 else 2 * z, hd, INNER_CH_MULT, nrb, z, do, ng))
            last_in = z if n_enc == 1 else 2 * z
            self.connectors = None
        else:
            decoders.append(Decoder(2 * z, hd, INNER_CH_MULT, nrb, z, do, ng))
            last_in = 2 * z
            # connectors[i] widens decoder i's input z -> 2z in place of the concatenation
            self.connectors = nn.ModuleList([nn.Conv2d(z, 2 * z, 1) for _ in range(2)])
        decoders.append(Decoder(last_in, hd, cfg.ch_mult, nrb, cfg.in_channels, do, ng))
        self.decoders = nn.ModuleList(decoders)

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any] | AugVAEConfig, where: str = "AugVAE config") -> "AugVAE":
        """``where`` names the config's source (a file) in errors."""
        if isinstance(config, AugVAEConfig):
            return cls(config)
        return cls(from_dict(AugVAEConfig, _drop_retired_norm(dict(config), where), where))

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and its JSON ``{"kind": "augvae", "config": ...}``."""
        return save_weights(path, self.state_dict(), {"kind": "augvae", "config": to_dict(self.cfg)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "AugVAE":
        state, meta = load_weights(path, device=device)
        if meta.get("kind") != "augvae" or "config" not in meta:
            raise ValueError(
                f"{path}: its JSON config does not describe an AugVAE "
                f"(kind={meta.get('kind')!r}); expected {{'kind': 'augvae', 'config': {{...}}}}"
            )
        model = cls.from_config(meta["config"], str(path)).to(device)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit the AugVAE config beside them: {e}") from None
        return model

    # ---------------------------------------------------------------------------- introspection
    @property
    def quantizers(self) -> list[EMAVectorQuantizer]:
        """The quantizer of each quantized level: the very same module for all of them."""
        return [self.quantizer for _ in self.levels]

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Parameters, each shared tensor counted once (the codebook is a buffer: not counted)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def codebook_stats(self, reset: bool = True) -> dict[str, Any]:
        return self.quantizer.stats(reset=reset)

    # ---------------------------------------------------------------------------- computation
    def encode_latents(self, x: Tensor) -> list[Tensor]:
        """Pre-quant latents (B, codebook_dim, h, w) of the quantized levels, finest first."""
        out: list[Tensor] = []
        h = x
        for i, encoder in enumerate(self.encoders):
            h = encoder(h)
            if i in self.levels:
                out.append(self.pre_quant(h, self.levels.index(i)))
        return out

    def decode_quantized(self, quants: Sequence[Tensor]) -> Tensor:
        """Image from quantized latents (B, codebook_dim, h, w), one per level, finest first."""
        if len(quants) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} quantized maps, got {len(quants)}")
        dtype = self.post_quant.weight.dtype  # the quantizer is fp32; the model may be half
        if self.connectors is None:
            dec: Tensor | None = None
            for i, decoder in enumerate(self.decoders):
                lvl = len(quants) - 1 - i  # coarse to fine
                q = self.post_quant(quants[lvl].to(dtype), lvl)
                dec = decoder(q if dec is None else torch.cat([q, dec], dim=1))
            assert dec is not None
            return dec
        h = self.post_quant(quants[0].to(dtype), 0)
        for connector, decoder in zip(self.connectors, self.decoders):
            h = decoder(connector(h))
        return h

    def forward(self, x: Tensor) -> AugVAEOutput:
        results = self.quantizer.quantize_levels(self.encode_latents(x))
        commit = torch.stack([r[1] for r in results]).sum()
        recon = self.decode_quantized([r[0] for r in results])
        return AugVAEOutput(recon=recon, commit_loss=commit, indices=[r[2] for r in results])

    def _check_images(self, x: Tensor) -> None:
        r = self.cfg.resolution
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or tuple(x.shape[2:]) != (r, r):
            raise ValueError(
                f"AugVAE.encode: expected images (B, {self.cfg.in_channels}, {r}, {r}), "
                f"got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Token ids (B, tokens_per_image): each level's map in raster order, finest first.
        Never updates the codebook, whatever the mode."""
        self._check_images(x)
        results = self.quantizer.quantize_levels(self.encode_latents(x), update=False)
        return torch.cat([idx.flatten(1) for _, _, idx in results], dim=1)

    def decode(self, tokens: Tensor) -> Tensor:
        """Images (B, C, H, W) from token ids laid out as :meth:`encode` returns them."""
        if tokens.dim() != 2 or tokens.shape[1] != self.tokens_per_image:
            raise ValueError(
                f"AugVAE.decode: expected tokens (B, {self.tokens_per_image}), got {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.codebook_size):
            raise ValueError(
                f"AugVAE.decode: token ids must be in [0, {self.cfg.codebook_size}), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        tokens = tokens.to(self.quantizer.embedding.device)
        quants: list[Tensor] = []
        start = 0
        for h, w in self.token_grids:
            idx = tokens[:, start : start + h * w].reshape(-1, h, w).long()
            quants.append(self.quantizer.embed(idx).permute(0, 3, 1, 2))
            start += h * w
        return self.decode_quantized(quants)


def _drop_retired_norm(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``config`` without the retired ``norm`` key, which files written before ``norm_groups``
    hold: ``"group"`` is what the model still is (GroupNorm); ``"channel"`` cannot be built."""
    norm = config.pop("norm", "group")
    if norm != "group":
        raise ValueError(f"{where}: an AugVAE with norm={norm!r}, which lverse no longer builds (GroupNorm only)")
    return config


@torch.no_grad()
def ml_to_sl(ml: AugVAE) -> AugVAE:
    """AugVAE-SL initialised from a trained AugVAE-ML (the start of stage 1b).

    Keeps the first two encoders and the last two decoders bit-for-bit, the shared pre/post
    quant weights, the biases of the second level (the one SL quantizes: 32² at 256 px) and the
    codebook with its EMA statistics; adds two freshly initialised 1×1 connectors z→2z in place
    of the concatenations. Unlike the official finetuning code, the first level's map is not
    quantized any more (it was quantized and thrown away there).

    Note: the official SL applies the post-quant bias the ML used for its *coarsest* level (an
    indexing side effect); here the 32² level keeps its own post-quant bias.
    """
    # With 3+ levels the two kept decoders both take a concatenation (2z channels), which the
    # connectors replace; with 2 levels the first kept decoder is the coarsest and takes z only.
    if ml.cfg.variant != "ml" or ml.cfg.num_levels < 3:
        raise ValueError(
            f"ml_to_sl needs an AugVAE-ML with >= 3 levels, got variant={ml.cfg.variant!r} "
            f"num_levels={ml.cfg.num_levels}"
        )
    ref = next(ml.parameters())
    sl = AugVAE(replace(ml.cfg, variant="sl")).to(device=ref.device, dtype=ref.dtype)
    for i in range(2):
        sl.encoders[i].load_state_dict(ml.encoders[i].state_dict())
        sl.decoders[i].load_state_dict(ml.decoders[len(ml.decoders) - 2 + i].state_dict())
    sl.pre_quant.weight.copy_(ml.pre_quant.weight)
    sl.pre_quant.bias[0].copy_(ml.pre_quant.bias[1])
    sl.post_quant.weight.copy_(ml.post_quant.weight)
    sl.post_quant.bias[0].copy_(ml.post_quant.bias[1])
    sl.quantizer.load_state_dict(ml.quantizer.state_dict())
    sl.quantizer.update = ml.quantizer.update
    sl.train(ml.training)
    return sl
