"""Convert the official L-Verse AugVAE checkpoints (PyTorch Lightning ``.ckpt``) to lverse.

The released files are Lightning checkpoint dicts whose ``hyper_parameters['args']`` is an
``argparse.Namespace``; they are read with ``torch.load(weights_only=True)`` allowing only that
class, never by unpickling arbitrary code. Weights are cast to fp32 and perceptual-loss keys
(``loss.*``) are dropped.

Key mapping (official → lverse):

* ``encoders.*``, ``decoders.*``, ``connectors.*``: same names (decoders in decoding order).
* ``pre_quants.{i}.weight`` / ``post_quants.{i}.weight``: one shared tensor in the official
  files too → ``pre_quant.weight`` / ``post_quant.weight`` (all copies checked to be equal).
* biases: ML ``pre_quants.{l}.bias`` → ``pre_quant.bias[l]`` and ``post_quants.{L-1-l}.bias`` →
  ``post_quant.bias[l]`` (the official decoder ``i`` reads level ``L-1-i`` through
  ``post_quants.i``); SL uses ``pre_quants.1.bias`` and ``post_quants.0.bias`` only, the other
  six per-level biases are unused by the official SL and dropped.
* ``quantizers.{i}.embedding.{weight,cluster_size,embed_avg}``: one shared codebook →
  ``quantizer.{embedding,cluster_size,embed_avg}``.

CLI: ``lverse convert OFFICIAL.ckpt OUT.safetensors [--variant ml|sl]``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lverse.models.augvae import AugVAE, AugVAEConfig


def _load_error_reason(e: Exception) -> str:
    """The informative part of a torch.load error (torch's own text suggests weights_only=False,
    which is exactly what must not be done with an untrusted file)."""
    msg = str(e)
    marker = "WeightsUnpickler error:"
    if marker in msg:
        msg = msg.split(marker, 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(msg.split())
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def load_official_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an official AugVAE Lightning checkpoint safely.

    Returns ``(state_dict, hyper_parameters)``: the model weights as fp32 (``loss.*`` dropped)
    and the hyper-parameters with ``args`` turned into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip/pickle), ...
        raise ValueError(
            f"{path}: not a PyTorch Lightning checkpoint of the official AugVAE layout "
            f"(safe torch.load failed: {_load_error_reason(e)}). Such files hold only tensors, "
            f"plain containers and an argparse.Namespace; do not load untrusted files with "
            f"weights_only=False."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(
            f"{path}: not a PyTorch Lightning checkpoint of the official AugVAE layout "
            f"(expected a dict with a 'state_dict' entry, got "
            f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__})"
        )
    hparams = dict(ckpt.get("hyper_parameters") or {})
    args = hparams.get("args")
    if isinstance(args, argparse.Namespace):
        hparams["args"] = vars(args).copy()
    elif not isinstance(args, dict):
        raise ValueError(
            f"{path}: hyper_parameters['args'] is missing (got {type(args).__name__}); "
            f"the official AugVAE checkpoints store their arguments there"
        )
    state: dict[str, Tensor] = {}
    for k, v in ckpt["state_dict"].items():
        if k.startswith("loss."):
            continue
        if not isinstance(v, Tensor):
            raise ValueError(f"{path}: state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        state[k] = v.float() if v.is_floating_point() else v
    return state, hparams


def _config_from_args(args: dict[str, Any], variant: str, num_levels: int, path: Path) -> AugVAEConfig:
    def need(name: str) -> Any:
        if name not in args:
            raise ValueError(f"{path}: hyper_parameters['args'] has no {name!r}")
        return args[name]

    if args.get("use_attn", False):
        raise ValueError(f"{path}: use_attn=True; lverse's AugVAE has no attention layers")
    if args.get("double_z", False):
        raise ValueError(f"{path}: double_z=True is not the AugVAE layout")
    return AugVAEConfig(
        variant=variant,
        resolution=int(need("resolution")),
        in_channels=int(args.get("in_channels", 3)),
        hidden_dim=int(need("hidden_dim")),
        ch_mult=tuple(int(m) for m in need("ch_mult")),
        num_res_blocks=int(need("num_res_blocks")),
        z_channels=int(need("z_channels")),
        num_levels=num_levels,
        codebook_size=int(need("num_tokens")),
        codebook_dim=int(need("codebook_dim")),
        beta=float(args.get("quant_beta", 0.25)),
        ema_decay=float(args.get("quant_ema_decay", 0.99)),
        ema_eps=float(args.get("quant_ema_eps", 1e-5)),
        dropout=float(args.get("dropout", 0.0)),
        norm_groups=32,  # the official code's GroupNorm(num_groups=32), not among its arguments
    )


def _shared(state: dict[str, Tensor], keys: list[str], used: set[str], path: Path) -> Tensor:
    """The one tensor stored under every key of ``keys`` (the official files repeat shared
    tensors); error if a copy differs."""
    for k in keys:
        if k not in state:
            raise ValueError(f"{path}: missing key {k!r}")
    first = state[keys[0]]
    for k in keys[1:]:
        if state[k].shape != first.shape or not torch.equal(state[k], first):
            raise ValueError(
                f"{path}: {k!r} differs from {keys[0]!r}, but lverse shares one tensor across "
                f"levels (AugVAE layout)"
            )
    used.update(keys)
    return first


def _check_attn_resolutions(attn: list[int], model: AugVAE, state: dict[str, Tensor], path: Path) -> None:
    """The official code names its quantized grids in ``attn_resolutions``; check them.

    An ML lists its levels' grids, finest first. An SL is finetuned from
    ``load_from_checkpoint(ML)`` and ``setup_finetune`` never touches the list, so a released
    SL file holds the **ML** list (``[64, 32, 16, 8]`` at 256 px) with ``finetune=True``; an SL
    written by other code may list only its kept grid (``[32]``). Both forms are accepted for
    an SL; the kept level itself follows from the weights (the SL keeps encoders ``0..k``, so it
    quantizes level ``k``). An empty list says nothing and is accepted."""
    if not attn:
        return
    cfg = model.cfg
    finest = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
    ml_grids = [finest >> lvl for lvl in range(cfg.num_levels)]
    if cfg.variant == "ml":
        if attn != ml_grids:
            raise ValueError(
                f"{path}: attn_resolutions {attn} do not match the quantized grids {ml_grids} "
                f"of an ML with {cfg.num_levels} levels at resolution {cfg.resolution}"
            )
        return
    encoders = {int(m.group(1)) for k in state if (m := re.match(r"encoders\.(\d+)\.", k))}
    kept = max(encoders, default=-1)
    if kept < 0 or [kept] != model.levels:
        raise ValueError(
            f"{path}: the SL weights hold encoders {sorted(encoders)}, but lverse's SL keeps "
            f"encoders 0..{model.levels[0]} and quantizes level {model.levels[0]}"
        )
    sl_grids = [h for h, _ in model.token_grids]
    if attn not in (ml_grids, sl_grids):
        raise ValueError(
            f"{path}: attn_resolutions {attn} fit neither the ML grid list {ml_grids} (what the "
            f"official finetuning leaves in a released SL) nor the SL's kept grid {sl_grids} at "
            f"resolution {cfg.resolution}"
        )


def convert_official(path: str | Path, variant: str | None = None) -> AugVAE:
    """Build an lverse :class:`AugVAE` holding the weights of an official checkpoint.

    ``variant`` ("ml" / "sl") is detected from the keys (SL has ``connectors.*``) when None.
    Every key of either side must map and every shape must agree, else ``ValueError`` names
    the key."""
    path = Path(path)
    state, hparams = load_official_checkpoint(path)
    args = hparams["args"]
    detected = "sl" if any(k.startswith("connectors.") for k in state) else "ml"
    if variant is None:
        variant = detected
    elif variant not in ("ml", "sl"):
        raise ValueError(f"variant must be 'ml', 'sl' or None, got {variant!r}")
    elif variant != detected:
        raise ValueError(f"{path}: asked for variant {variant!r} but the keys are those of {detected!r}")

    level_ids = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"pre_quants\.(\d+)\.weight", k)))
    num_levels = len(level_ids)
    if level_ids != list(range(num_levels)) or num_levels < 1:
        raise ValueError(f"{path}: expected pre_quants.0..N-1, found levels {level_ids}")
    cfg = _config_from_args(args, variant, num_levels, path)
    model = AugVAE(cfg)
    _check_attn_resolutions(list(args.get("attn_resolutions", [])), model, state, path)

    used: set[str] = set()
    L = num_levels
    new: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.startswith(("encoders.", "decoders.", "connectors.")):
            new[k] = v
            used.add(k)
    new["pre_quant.weight"] = _shared(state, [f"pre_quants.{i}.weight" for i in range(L)], used, path)
    new["post_quant.weight"] = _shared(state, [f"post_quants.{i}.weight" for i in range(L)], used, path)
    if variant == "ml":
        pre_bias_keys = [f"pre_quants.{lvl}.bias" for lvl in range(L)]
        post_bias_keys = [f"post_quants.{L - 1 - lvl}.bias" for lvl in range(L)]
    else:
        pre_bias_keys, post_bias_keys = ["pre_quants.1.bias"], ["post_quants.0.bias"]
        # the official SL keeps these biases but never reads them
        used.update(f"pre_quants.{i}.bias" for i in range(L) if i != 1)
        used.update(f"post_quants.{i}.bias" for i in range(1, L))
    for name, keys in (("pre_quant.bias", pre_bias_keys), ("post_quant.bias", post_bias_keys)):
        for k in keys:
            if k not in state:
                raise ValueError(f"{path}: missing key {k!r}")
        new[name] = torch.stack([state[k] for k in keys])
        used.update(keys)
    for src, dst in (("weight", "embedding"), ("cluster_size", "cluster_size"), ("embed_avg", "embed_avg")):
        new[f"quantizer.{dst}"] = _shared(
            state, [f"quantizers.{i}.embedding.{src}" for i in range(L)], used, path
        )

    unmapped = sorted(set(state) - used)
    if unmapped:
        raise ValueError(f"{path}: key {unmapped[0]!r} has no place in lverse's AugVAE "
                         f"({len(unmapped)} unmapped key(s): {unmapped[:5]})")
    target = model.state_dict()
    missing = sorted(set(target) - set(new))
    if missing:
        raise ValueError(f"{path}: no official key maps to lverse's {missing[0]!r} "
                         f"({len(missing)} missing: {missing[:5]})")
    extra = sorted(set(new) - set(target))
    if extra:
        raise ValueError(f"{path}: key {extra[0]!r} is not part of the {variant.upper()} model built "
                         f"from its hyper-parameters")
    for k, v in new.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{path}: shape mismatch for {k!r}: checkpoint {tuple(v.shape)}, "
                             f"model from its hyper-parameters {tuple(target[k].shape)}")
    model.load_state_dict(new, strict=True)
    model.eval()
    return model
