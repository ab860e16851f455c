"""Files: safetensors weights with a JSON config beside them, written atomically.

A weights file ``NAME.safetensors`` always has ``NAME.json`` next to it holding the model's
config (and whatever else a loader needs, e.g. the kind of model). Loading never unpickles:
safetensors and JSON only. Every write goes to a temporary file in the same directory first
and is then renamed, so a crash mid-write never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the usual permissions (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _w)


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _contiguous_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone any that do so the file is flat.
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            v = v.clone()
        seen.add(ptr)
        out[k] = v.contiguous().cpu()
    return out


def save_weights(
    path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``) and ``config`` to the ``.json`` beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    flat = _contiguous_unshared(state)
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    if config is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(config, indent=2, default=str))
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` file and its ``.json`` config (empty dict when absent)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory; expected a .safetensors file")
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    cfg_path = path.with_suffix(".json")
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    return state, config
