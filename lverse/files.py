"""Files: safetensors weights with a JSON config beside them, run directories, image grids.

A weights file ``NAME.safetensors`` always has ``NAME.json`` next to it holding the model's
config (and whatever else a loader needs, e.g. the kind of model) and the file's checksum
(``"checksum": {"sha256", "bytes"}``), which :func:`load_weights` verifies: a truncated file or a
flipped bit is an error naming the file, never weights that load silently wrong. Hashing reads
the whole file once (about a second per GB); ``LVERSE_VERIFY_CHECKSUMS=0`` skips it (files
written before checksums were recorded are not checked). Loading never unpickles: safetensors
and JSON only. Every write goes to a temporary file in the same directory first and is then
renamed, so a crash mid-write never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

CHECKSUM_KEY = "checksum"  # in the JSON beside a weights file: {"sha256": hex, "bytes": size}
VERIFY_ENV = "LVERSE_VERIFY_CHECKSUMS"


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


def file_checksum(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": os.path.getsize(path)}


def verify_checksum(path: str | Path, expected: dict[str, Any] | None, verify: bool | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` when it does not match ``expected`` (a
    :func:`file_checksum` record). No record, or ``verify`` False (default: on unless
    ``$LVERSE_VERIFY_CHECKSUMS`` is ``0``), checks nothing."""
    if verify is None:
        verify = os.environ.get(VERIFY_ENV, "1") != "0"
    if not verify or not isinstance(expected, dict) or "sha256" not in expected:
        return
    size = os.path.getsize(path)
    if "bytes" in expected and size != expected["bytes"]:  # a truncated file, told without hashing it
        raise ValueError(f"{path}: damaged: {size} bytes, its checksum record says {expected['bytes']}")
    if file_checksum(path)["sha256"] != expected["sha256"]:
        raise ValueError(f"{path}: damaged: its sha256 differs from the one recorded when it was written "
                         f"(set {VERIFY_ENV}=0 to load it anyway)")


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
    """Write ``state`` to ``path`` (``.safetensors``) and ``config``, with the file's checksum, to
    the ``.json`` beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    flat = _contiguous_unshared(state)
    checksum: dict[str, Any] = {}

    def write(tmp: str) -> None:
        save_file(flat, tmp)
        checksum.update(file_checksum(tmp))  # of the bytes on disk, before the rename

    atomic_write(path, write)
    if config is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps({**config, CHECKSUM_KEY: checksum}, indent=2, default=str))
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu",
                 verify: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` file and its ``.json`` config (empty dict when absent), after
    checking the file against the checksum in the JSON (``verify``: see :func:`verify_checksum`).
    The returned config does not hold the checksum."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory; expected a .safetensors file")
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    cfg_path = path.with_suffix(".json")
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    verify_checksum(path, config.pop(CHECKSUM_KEY, None), verify)
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return state, config


def resolve_weights(path: str | Path) -> Path:
    """A weights file, or a run directory (its exported model, else its latest checkpoint)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        latest = p / "checkpoints" / "latest"
        if latest.is_file():
            return p / "checkpoints" / latest.read_text().strip() / "model.safetensors"
        raise FileNotFoundError(f"{p}: no model.safetensors and no checkpoints/latest in this run directory")
    if not p.is_file():
        raise FileNotFoundError(f"weights not found: {p}")
    return p


def to_uint8_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> Image.Image:
    """(N,3,H,W) in [-1,1] → one PIL grid image (white padding)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image (3,H,W) in [-1,1] as an 8-bit RGB file (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images (N,3,H,W) in [-1,1] as one PNG grid, ``nrow`` to a row, 2 px white padding."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_uint8_grid(images, nrow).save(path)
    return path
