"""A run directory that survives interruption: the manifest, the item store, shards, reports.

Every protocol of ``lverse evaluate`` writes into one output directory::

    manifest.json          what the run is: protocol, bundle (file hashes), data, sampling, seed...
    <stage>.jsonl          one line per item as it is made (``<stage>.rank<R>.jsonl`` under torchrun)
    <stage>/000042.png     generated images, written (atomically) before their line
    report.json, report.md the scores, every metric's implementation and version

**Resuming.** The manifest's ``settings`` are everything that changes what is drawn (bundle,
data, sampling settings, seed, batch size, precision, device type: a sampler's random stream
depends on the last three). A run started in a directory whose manifest has other settings is
refused, naming each difference. Items are drawn in fixed chunks (chunk ``k`` = items
``k*C .. k*C+C-1``, seeded from ``(seed, stage, k)``); a chunk whose items all have their line
(and file) is skipped, so a resumed run regenerates nothing that exists. ``--n`` is not a
setting: a larger ``--n`` extends a run (item ``i`` is the same item whatever ``n``).

**torchrun.** Rank ``r`` of ``W`` draws the chunks ``k`` with ``k % W == r`` and writes its own
files; after a barrier rank 0 reads every rank's lines and scores.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

import lverse
from lverse.data.images import derive_seed
from lverse.dist import barrier
from lverse.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"


class EvalError(Exception):
    """A problem the user can fix (missing weights, a refused resume, bad flags): one line."""


# ------------------------------------------------------------------------------------------
# Versions and identities
# ------------------------------------------------------------------------------------------


def package_version(name: str) -> str:
    """``"name X.Y.Z"``, or ``"name (not installed)"``."""
    try:
        return f"{name} {metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return f"{name} (not installed)"


def java_version() -> str | None:
    """The first line of ``java -version`` (``None`` when there is no ``java`` on the PATH)."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else "java (unknown version)"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def bundle_identity(root: Path | None, names: Iterable[str]) -> dict[str, Any]:
    """``{"path", "sha256": {file: hash}}`` of the bundle files that exist (what was evaluated)."""
    if root is None:
        return {"path": None, "sha256": {}}
    return {"path": str(root), "sha256": {n: file_sha256(root / n) for n in sorted(names) if (root / n).is_file()}}


def environment() -> dict[str, str]:
    return {"lverse": lverse.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: chunks ``k`` with ``k % world == rank``."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def suffix(self) -> str:
        return "" if self.world == 1 else f".rank{self.rank}"


def chunks(n: int, size: int) -> list[range]:
    """Items ``0..n-1`` in fixed chunks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [range(k, min(n, k + size)) for k in range(0, n, size)]


def chunk_seed(seed: int, stage: str, chunk: int) -> int:
    """The seed of chunk ``chunk`` of ``stage``: independent streams per stage and chunk."""
    return derive_seed("lverse-eval", seed, stage, chunk) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]


class RunDir:
    """An output directory with a manifest and per-stage item stores (see the module docstring)."""

    def __init__(self, root: str | Path, shard: Shard = Shard()) -> None:
        self.root = Path(root)
        self.shard = shard

    def open(self, protocol: str, settings: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start or resume: write the manifest, or check the one there. Returns the manifest."""
        path = self.root / MANIFEST
        want = json.loads(json.dumps({"protocol": protocol, "settings": settings}, default=str))
        if path.is_file():
            try:
                have = json.loads(path.read_text("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EvalError(f"{path}: unreadable manifest ({e}); use another --out") from None
            diff = _differences({"protocol": have.get("protocol"), "settings": have.get("settings")}, want)
            if diff:
                raise EvalError(f"refusing to resume {self.root} with other settings ({'; '.join(diff)}): "
                                f"use another --out, or the settings it was started with")
            return have
        barrier()  # every rank has read "no manifest" before rank 0 writes one
        if self.shard.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({**want, "info": {**environment(), **(info or {})}}, indent=2) + "\n")
        barrier()
        return json.loads(path.read_text("utf-8"))

    # --- item stores ----------------------------------------------------------------------
    def records(self, stage: str) -> dict[int, dict[str, Any]]:
        """Every line of ``stage`` (all ranks' files) by item index; a torn last line is ignored;
        an image record whose file is gone does not count."""
        out: dict[int, dict[str, Any]] = {}
        for f in sorted(self.root.glob(f"{stage}.jsonl")) + sorted(self.root.glob(f"{stage}.rank*.jsonl")):
            for line in f.read_text("utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short: its item is drawn again
                if isinstance(rec, dict) and isinstance(rec.get("index"), int):
                    if "file" in rec and not (self.root / rec["file"]).is_file():
                        continue
                    out[rec["index"]] = rec
        return out

    def append(self, stage: str, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        path = self.root / f"{stage}{self.shard.suffix()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def image_path(self, stage: str, index: int) -> str:
        """The relative path of item ``index``'s image in ``stage``."""
        return f"{stage}/{index:06d}.png"

    def save_image(self, rel: str, image: torch.Tensor) -> None:
        """An image ``(3, H, W)`` in [-1, 1] as an 8-bit PNG, atomically."""
        from PIL import Image

        x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        pil = Image.fromarray(x.permute(1, 2, 0).numpy())
        atomic_write(self.root / rel, lambda tmp: pil.save(tmp, format="PNG"))

    def load_image(self, rel: str) -> torch.Tensor:
        """A stored image back as ``(3, H, W)`` uint8."""
        import numpy as np
        from PIL import Image

        with Image.open(self.root / rel) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)

    def write_json(self, name: str, data: Any) -> Path:
        return atomic_write_text(self.root / name, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.root / name, text)


def run_stage(
    run: RunDir,
    stage: str,
    n: int,
    chunk_size: int,
    draw: Callable[[range, int], list[dict[str, Any]]],
    seed: int,
    bars: Callable[[str, int], Callable[[int], object]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Draw the items of ``stage`` that are missing, chunk by chunk, on this rank's chunks.

    ``draw(items, chunk_seed)`` returns one record per item of the chunk (each with ``index``;
    an image record names its ``file``, already saved). Records of items that already exist are
    not written again. Returns this stage's records after a barrier (all ranks').
    """
    have = run.records(stage)
    mine = [(k, items) for k, items in enumerate(chunks(n, chunk_size)) if run.shard.mine(k)]
    todo = [(k, items) for k, items in mine if any(i not in have for i in items)]
    if todo and len(todo) < len(mine):
        log(f"[evaluate] {stage}: resuming, {sum(len(it) for _, it in mine) - sum(len(it) for _, it in todo)} "
            f"items already drawn")
    update = bars(stage, sum(len(items) for _, items in todo)) if bars is not None and todo else None
    for k, items in todo:
        missing = {i for i in items if i not in have}
        recs = draw(items, chunk_seed(seed, stage, k))
        new = [r for r in recs if r["index"] in missing]
        run.append(stage, new)
        have.update({r["index"]: r for r in new})
        if update is not None:
            update(len(items))
    barrier()
    return run.records(stage)


def iter_batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bars:
    """Progress bars on stderr (rank 0 only, none with ``enabled=False``); ``bars(desc, total)``
    returns an ``update(n)`` callable, and the bar closes when it reaches its total."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __call__(self, desc: str, total: int) -> Callable[[int], object]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="it", disable=not self.enabled, file=sys.stderr,
                   dynamic_ncols=True, leave=False)

        def update(k: int) -> None:
            bar.update(k)
            if bar.n >= total:
                bar.close()

        return update


__all__ = ["Bars", "EvalError", "RunDir", "Shard", "bundle_identity", "chunk_seed", "chunks", "file_sha256",
           "java_version", "package_version", "run_stage"]
