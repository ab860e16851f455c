"""CLIP files: an open_clip model rebuilt from the config dict stored beside its weights.

``clip.safetensors`` + ``clip.json`` (``{"kind": "clip", "model_name", "model_cfg",
"preprocess_cfg"}``). Nothing is ever downloaded. Shared by the inference pipeline and the
Shapes CLIP trainer, so there is one reader of the format.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from lverse.files import load_weights, save_weights

CLIP_FILE = "clip.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_open_clip(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """An untrained open_clip model from its config dict (``open_clip.CLIP(**cfg)``)."""
    import open_clip  # slow import (timm, ...): only when a CLIP is actually used

    cfg = copy.deepcopy(model_cfg)
    custom_text = bool(cfg.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def save_clip(
    path: str | Path,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    model_name: str = "custom",
    preprocess_cfg: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``clip.safetensors`` + ``clip.json`` (``path``: the weights file or a directory).

    ``extra``: more JSON-able entries for ``clip.json`` (e.g. training metrics)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CLIP_FILE
    meta: dict[str, Any] = {**(extra or {}), "kind": "clip", "model_name": model_name, "model_cfg": model_cfg}
    if preprocess_cfg:
        meta["preprocess_cfg"] = preprocess_cfg
    return save_weights(path, model.state_dict(), meta)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild an open_clip model saved by :func:`save_clip`; returns ``(model, meta)`` in eval mode."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CLIP_FILE
    state, meta = load_weights(path)
    if meta.get("kind") != "clip" or not isinstance(meta.get("model_cfg"), dict):
        raise ValueError(
            f"{path.with_suffix('.json')}: expected {{'kind': 'clip', 'model_name': ..., 'model_cfg': {{...}}}}, "
            f"got kind={meta.get('kind')!r}"
        )
    try:
        model = build_open_clip(meta["model_cfg"])
    except TypeError as e:
        raise ValueError(f"{path.with_suffix('.json')}: model_cfg does not build an open_clip model ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{path}: weights do not fit the CLIP config beside them ({first})") from None
    pp = {"mean": CLIP_MEAN, "std": CLIP_STD, **(meta.get("preprocess_cfg") or {})}
    visual = getattr(model, "visual", model)
    visual.preprocess_cfg = pp  # read by ClipReranker (open_clip's create_model sets the same attribute)
    return model.to(device).eval(), meta


