"""Pre-encoded token shards: what `lverse encode` writes and BiART training reads.

Stage 2 never runs the autoencoder in its training loop: the AugVAE-SL encodes the corpus once
(in fp32) and the codes are stored as memory-mapped integer arrays beside their captions::

    tokens_dir/
      meta.json                  tokens_per_image, codebook_size, shard list, skipped counts
      codes_00000.npy            (n, tokens_per_image) uint16/int32, read with mmap
      captions_00000.jsonl       one JSON list of captions per row of the codes array
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lverse.files import atomic_write_text

META = "meta.json"


class TokenShardWriter:
    """Appends (codes, captions) rows and writes a shard every ``shard_size`` rows."""

    def __init__(self, out_dir: str | Path, tokens_per_image: int, codebook_size: int, shard_size: int = 50000, prefix: str = "") -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_image = tokens_per_image
        self.codebook_size = codebook_size
        self.shard_size = shard_size
        self.prefix = prefix
        self.dtype = np.uint16 if codebook_size <= 65536 else np.int32
        self.shards: list[dict[str, Any]] = []
        self._codes: list[np.ndarray] = []
        self._caps: list[list[str]] = []
        self._n = 0

    def add(self, codes: torch.Tensor, captions: Sequence[list[str]]) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected codes of shape (B, {self.tokens_per_image}), got {tuple(codes.shape)}")
        arr = codes.cpu().numpy().astype(self.dtype)
        for i in range(arr.shape[0]):
            self._codes.append(arr[i])
            self._caps.append(list(captions[i]))
            self._n += 1
            if self._n >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self._codes:
            return
        idx = len(self.shards)
        codes_name = f"codes_{self.prefix}{idx:05d}.npy"
        caps_name = f"captions_{self.prefix}{idx:05d}.jsonl"
        np.save(self.dir / codes_name, np.stack(self._codes))
        atomic_write_text(self.dir / caps_name, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in self._caps))
        self.shards.append({"codes": codes_name, "captions": caps_name, "count": len(self._codes)})
        self._codes, self._caps, self._n = [], [], 0

    def close(self, extra_meta: dict[str, Any] | None = None, write_meta: bool = True) -> dict[str, Any]:
        self.flush()
        meta = {
            "tokens_per_image": self.tokens_per_image,
            "codebook_size": self.codebook_size,
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
    return json.loads(p.read_text())


class TokenDataset(Dataset):
    """Image codes + captions from one or more token directories (memory-mapped).

    ``__getitem__`` accepts an index or ``(index, seed)``; the seed picks which of the item's
    captions is used this time (COCO has five per image: one is sampled per step).
    """

    def __init__(self, dirs: str | Path | Iterable[str | Path]) -> None:
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        if not dirs:
            raise ValueError("no token directory given (data.tokens)")
        self.codes: list[np.ndarray] = []
        self.captions: list[list[list[str]]] = []
        self.tokens_per_image = -1
        self.codebook_size = -1
        for d in dirs:
            meta = read_meta(d)
            if self.tokens_per_image not in (-1, meta["tokens_per_image"]):
                raise ValueError(f"{d}: {meta['tokens_per_image']} tokens per image, other directories have {self.tokens_per_image}")
            self.tokens_per_image = meta["tokens_per_image"]
            self.codebook_size = max(self.codebook_size, meta["codebook_size"])
            for s in meta["shards"]:
                arr = np.load(Path(d) / s["codes"], mmap_mode="r")
                caps = [json.loads(line) for line in (Path(d) / s["captions"]).read_text(encoding="utf-8").splitlines()]
                if len(caps) != arr.shape[0]:
                    raise ValueError(f"{Path(d) / s['captions']}: {len(caps)} caption rows for {arr.shape[0]} code rows")
                self.codes.append(arr)
                self.captions.append(caps)
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self.codes])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key if isinstance(key, tuple) else (key, None))
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        row = index - int(self._offsets[shard])
        codes = torch.from_numpy(self.codes[shard][row].astype(np.int64))
        caps = self.captions[shard][row]
        pick = 0 if seed is None else int(torch.randint(len(caps), (1,), generator=torch.Generator().manual_seed(seed)))
        return {"codes": codes, "caption": caps[pick], "index": index}
