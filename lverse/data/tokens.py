"""Pre-encoded token shards: what `lverse encode` writes and BiART training reads.

Stage 2 never runs the autoencoder in its training loop: the AugVAE-SL encodes the corpus once
(in fp32) and the codes are stored as memory-mapped integer arrays beside their captions::

    tokens_dir/
      meta.json                  tokens_per_image, codebook_size, crops, shard list, counts
      codes_00000.npy            (n, tokens_per_image), or (n, crops, tokens_per_image) with
                                 --crops > 1; uint16/int32, read with mmap
      captions_00000.jsonl       one row per image: {"id": ..., "captions": [every reference]}

The ``id`` traces a row back to its corpus (COCO's ``cocoid``, a CC3M image's URL, a file key);
evaluation scores generated captions against ``captions``. Directories written before ids were
kept hold a bare JSON list per row; they are still read (their ids are ``None``).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lverse.data.images import derive_seed
from lverse.files import atomic_write_text

META = "meta.json"


class TokenShardWriter:
    """Appends (codes, captions, id) rows and writes a shard every ``shard_size`` rows.

    ``codes`` are ``(B, tokens_per_image)``, or ``(B, crops, tokens_per_image)`` for several crops
    of each image. Ids seen twice are counted (:attr:`duplicates`)."""

    def __init__(self, out_dir: str | Path, tokens_per_image: int, codebook_size: int, shard_size: int = 50000,
                 prefix: str = "", crops: int = 1) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_image, self.codebook_size, self.crops = tokens_per_image, codebook_size, crops
        self.shard_size = shard_size
        self.prefix = prefix
        self.dtype = np.uint16 if codebook_size <= 65536 else np.int32
        self.shards: list[dict[str, Any]] = []
        self._codes: list[np.ndarray] = []
        self._rows: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()

    def add(self, codes: torch.Tensor, captions: Sequence[list[str]], ids: Sequence[str | None] | None = None) -> None:
        shape = (self.tokens_per_image,) if self.crops == 1 else (self.crops, self.tokens_per_image)
        if tuple(codes.shape[1:]) != shape:
            raise ValueError(f"expected codes of shape (B, {', '.join(map(str, shape))}), got {tuple(codes.shape)}")
        arr = codes.cpu().numpy().astype(self.dtype)
        for i in range(arr.shape[0]):
            row_id = None if ids is None else ids[i]
            if row_id is not None:
                self.seen[str(row_id)] += 1
            self._codes.append(arr[i])
            self._rows.append({"id": row_id, "captions": list(captions[i])})
            if len(self._codes) >= self.shard_size:
                self.flush()

    @property
    def duplicates(self) -> dict[str, int]:
        """Ids written more than once, with how many times."""
        return {k: n for k, n in self.seen.items() if n > 1}

    def flush(self) -> None:
        if not self._codes:
            return
        idx = len(self.shards)
        codes_name = f"codes_{self.prefix}{idx:05d}.npy"
        caps_name = f"captions_{self.prefix}{idx:05d}.jsonl"
        np.save(self.dir / codes_name, np.stack(self._codes))
        atomic_write_text(self.dir / caps_name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows))
        self.shards.append({"codes": codes_name, "captions": caps_name, "count": len(self._codes)})
        self._codes, self._rows = [], []

    def close(self, extra_meta: dict[str, Any] | None = None, write_meta: bool = True) -> dict[str, Any]:
        self.flush()
        meta = {
            "tokens_per_image": self.tokens_per_image,
            "codebook_size": self.codebook_size,
            "crops": self.crops,
            "num_items": sum(s["count"] for s in self.shards),
            "shards": self.shards,
            **(extra_meta or {}),
        }
        if write_meta:
            atomic_write_text(self.dir / META, json.dumps(meta, indent=2))
        return meta


def read_meta(tokens_dir: str | Path) -> dict[str, Any]:
    p = Path(tokens_dir) / META
    if not p.is_file():
        raise FileNotFoundError(f"{tokens_dir}: not a token directory (no {META}); create one with `lverse encode`")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not readable JSON ({e})") from None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``captions_*.jsonl``: ``{"id", "captions"}`` (a bare list in older files)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON row ({e})") from None
        rows.append({"id": None, "captions": row} if isinstance(row, list) else row)
    return rows


class TokenDataset(Dataset):
    """Image codes + captions from one or more token directories (memory-mapped).

    ``__getitem__`` accepts an index or ``(index, seed)``; the seed picks which of the item's
    captions is used this time (COCO has five per image: one is sampled per step) and, for a
    directory encoded with several crops, which crop: a new draw every epoch (the trainer's
    sampler gives each epoch and position its own seed), the same draw after a resume. Without
    a seed it is the first caption and the centre crop.
    """

    def __init__(self, dirs: str | Path | Iterable[str | Path]) -> None:
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        if not dirs:
            raise ValueError("no token directory given (data.tokens)")
        self.codes: list[np.ndarray] = []
        self.rows: list[list[dict[str, Any]]] = []
        self.tokens_per_image = -1
        self.codebook_size = -1
        for d in dirs:
            meta = read_meta(d)
            if self.tokens_per_image not in (-1, meta["tokens_per_image"]):
                raise ValueError(f"{d}: {meta['tokens_per_image']} tokens per image, other directories have {self.tokens_per_image}")
            if self.codebook_size not in (-1, meta["codebook_size"]):
                raise ValueError(f"{d}: codes of a {meta['codebook_size']}-code codebook, other directories use "
                                 f"{self.codebook_size}: they come from different AugVAEs")
            self.tokens_per_image = meta["tokens_per_image"]
            self.codebook_size = meta["codebook_size"]
            for s in meta["shards"]:
                arr = np.load(Path(d) / s["codes"], mmap_mode="r")
                rows = read_rows(Path(d) / s["captions"])
                if len(rows) != arr.shape[0]:
                    raise ValueError(f"{Path(d) / s['captions']}: {len(rows)} caption rows for {arr.shape[0]} code rows")
                self.codes.append(arr)
                self.rows.append(rows)
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self.codes])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"token index {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, index - int(self._offsets[shard])

    def references(self, index: int) -> tuple[str | None, list[str]]:
        """The item's id and every reference caption."""
        shard, row = self._locate(index)
        r = self.rows[shard][row]
        return r["id"], list(r["captions"])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key if isinstance(key, tuple) else (key, None))
        shard, row = self._locate(index)
        codes = self.codes[shard][row]
        caps = self.rows[shard][row]["captions"]
        if seed is None:
            pick, crop = 0, 0
        else:
            pick = int(torch.randint(len(caps), (1,), generator=torch.Generator().manual_seed(seed)))
            crop = derive_seed("lverse-crop", seed) % codes.shape[0] if codes.ndim == 2 else 0
        if codes.ndim == 2:  # (crops, tokens_per_image)
            codes = codes[crop]
        return {"codes": torch.from_numpy(codes.astype(np.int64)), "caption": caps[pick], "index": index}
