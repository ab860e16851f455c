"""Image datasets for stage 1 (AugVAE): image folders and tar shards, with robust decoding.

Conventions shared by every dataset in :mod:`lverse.data`:

* **Items** are dicts with at least ``"image"``: a float tensor 3×R×R in [-1, 1].
* **Bad records never crash a run.** A corrupt, empty or unreadable record makes
  ``__getitem__`` return a :class:`Skipped` (its reason and name; one :class:`BadImageWarning`
  per file names it); :func:`collate_skip_none` drops those (and ``None`` s), stacks the rest and
  reports ``batch["skipped"]`` and, by reason, ``batch["skipped_by"]``. The reason travels with
  the item, so the counts are exact with any number of DataLoader workers. A batch whose items
  were all bad has ``batch["batch_size"] == 0`` and only the count keys; the trainer skips it.
  Records dropped while a dataset is built (e.g. a COCO entry without captions) are in its
  :meth:`skip_summary`, which the trainer and ``lverse encode`` add to their counts. A tar shard
  cut short, even exactly between two members (no error from ``tarfile``), is a ``bad_shard``.
  Every dataset names its data in ``source`` (for the trainer's errors).
* **Reproducible augmentation.** Index a map-style dataset with ``(index, access_seed)``
  instead of ``index`` and the random crop is drawn from a ``torch.Generator`` seeded from
  ``(dataset seed, index, access_seed)``; the trainer's ``ResumableSampler`` yields such keys,
  so a resumed run sees exactly the crops it would have seen. A plain int
  index in train mode uses the global torch RNG (seeded per DataLoader worker by PyTorch).

Transforms follow the paper (and the official AugVAE code): train = random resized crop to
R with scale (0.75, 1) and square aspect; eval = resize the shorter side to R and centre
crop. One deliberate difference from ``torchvision.transforms.RandomResizedCrop``: when no
crop of the drawn scale fits (always the case for scale near 1 on non-square images, i.e.
most of ImageNet) torchvision falls back to the *centre* square, which would make the
augmentation a no-op; we fall back to the largest square at a *random* position.
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif")


class BadImageWarning(UserWarning):
    """An image (or record) was unreadable and has been skipped."""


class Skipped(NamedTuple):
    """What a dataset returns in place of a bad record: why (``reason``) and which (``name``)."""

    reason: str
    name: str


# --- seeds --------------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any mix of ints/strings (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """``i`` → ``(i, None)``; ``(i, access_seed)`` → ``(i, access_seed)``."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an int or (index, seed), got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), None


# --- decoding -----------------------------------------------------------------------------------
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB.

    * alpha (RGBA/LA/PA, or a palette/L/RGB image with a ``transparency`` entry) is
      composited on white — transparent backgrounds would otherwise turn black;
    * 16-bit modes (``I;16*``) are scaled by 1/257 (65535 → 255); ``I`` (32-bit int, how
      some readers return 16-bit data) likewise when its maximum exceeds 255, otherwise it is
      taken as 8-bit; ``F`` is taken as [0, 1] when its maximum is ≤ 1, else as [0, 255];
    * everything else (1, L, P, CMYK, YCbCr, ...) goes through PIL's own conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and peak > 255):
            arr = np.clip(arr, 0, 65535) / 257.0
        elif mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB image; raises on anything unreadable.

    Decoding is forced here (``load()``) so a truncated file fails now, inside the caller's
    ``try``, rather than later in a transform.
    """
    stream: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with stream:
        img = Image.open(stream)
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # malformed EXIF must not cost us an otherwise fine image
            pass
        return to_rgb(img)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image → float tensor 3×H×W in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class ImageTransform:
    """RGB PIL image → 3×R×R tensor in [-1, 1]; random resized crop (train) or centre crop.

    ``generator`` drives every random number of the train crop, so equal generator seeds give
    equal crops. ``resample``: ``"bicubic"`` (training, encoding, sampling) or ``"lanczos"`` (the
    L-Verse paper's reconstruction evaluation, Table 4).
    """

    def __init__(
        self,
        resolution: int,
        train: bool,
        scale: tuple[float, float] = (0.75, 1.0),
        ratio: tuple[float, float] = (1.0, 1.0),
        resample: str = "bicubic",
    ) -> None:
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.resolution, self.train, self.scale, self.ratio = resolution, train, scale, ratio
        self.resample = RESAMPLE[resample]

    def _uniform(self, lo: float, hi: float, g: torch.Generator | None) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def _randint(self, hi_inclusive: int, g: torch.Generator | None) -> int:
        return int(torch.randint(0, hi_inclusive + 1, (), generator=g))

    def crop_box(self, width: int, height: int, g: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """``(left, top, w, h)`` of the crop (torchvision's algorithm; see module docstring)."""
        if not self.train:
            side = min(width, height)
            return (width - side) // 2, (height - side) // 2, side, side
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * self._uniform(self.scale[0], self.scale[1], g)
            aspect = math.exp(self._uniform(log_lo, log_hi, g))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(width - w, g), self._randint(height - h, g), w, h
        # Fallback: the largest crop with the closest allowed aspect, at a random position.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        w, h = max(1, min(w, width)), max(1, min(h, height))
        return self._randint(width - w, g), self._randint(height - h, g), w, h

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        left, top, w, h = self.crop_box(img.width, img.height, generator)
        r = self.resolution
        # One resize of the crop box: PIL's filters are area-aware, so large downscales are
        # antialiased without an intermediate image.
        out = img.resize((r, r), self.resample, box=(left, top, left + w, top + h))
        return pil_to_tensor(out)


def read_image(path: str | os.PathLike[str], resolution: int, resample: str = "bicubic") -> torch.Tensor:
    """An image file as the AugVAE sees it at evaluation: ``(3, R, R)`` in [-1, 1].

    The one path from a file to pixels for encoding, sampling and evaluation: :func:`load_image`
    (any PIL mode, EXIF rotation) then the centre-crop :class:`ImageTransform`. A missing file
    is a ``FileNotFoundError``, an unreadable one a ``ValueError``; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = load_image(path)
        if img.width < 1 or img.height < 1:
            raise ValueError("empty image")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return ImageTransform(resolution, train=False, resample=resample)(img)


def crop_views(img: Image.Image, resolution: int, crops: int, *seed_parts: Any,
               scale: tuple[float, float] = (0.75, 1.0)) -> torch.Tensor:
    """``(crops, 3, R, R)``: the centre crop, then ``crops - 1`` random resized crops (the paper's
    training augmentation), each drawn from a generator seeded by ``seed_parts`` and its number,
    so an image encoded twice gets the same crops (``lverse encode --crops``)."""
    views = [ImageTransform(resolution, train=False)(img)]
    random_crop = ImageTransform(resolution, train=True, scale=scale)
    for k in range(1, crops):
        views.append(random_crop(img, torch.Generator().manual_seed(derive_seed("lverse-crops", *seed_parts, k))))
    return torch.stack(views)


def access_generator(dataset_seed: int, index: int, access_seed: int | None) -> torch.Generator | None:
    """Generator for one access, or ``None`` (global RNG) when no access seed was given."""
    if access_seed is None:
        return None
    return torch.Generator().manual_seed(derive_seed("lverse-aug", dataset_seed, index, access_seed))


# --- skip bookkeeping ------------------------------------------------------------------------
class SkipTracker:
    """Counts skipped records by reason and warns once per offending file/record."""

    source = ""  # the path (or shard spec) of the data, for error messages

    def _init_skips(self) -> None:
        self.skipped: Counter[str] = Counter()
        self._warned: set[str] = set()

    def _skip(self, reason: str, name: str, error: BaseException | str | None = None) -> Skipped:
        self.skipped[reason] += 1
        if name not in self._warned:
            self._warned.add(name)
            detail = f": {error}" if error else ""
            warnings.warn(f"skipping {name} ({reason}){detail}", BadImageWarning, stacklevel=3)
        return Skipped(reason, name)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip_summary(self) -> dict[str, int]:
        """Skipped records by reason, as seen by this process."""
        return dict(self.skipped)


# --- folders ------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, relative; hidden names skipped)."""
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found.extend(rel / f for f in filenames if not f.startswith(".") and _is_image(f))
    return sorted(found, key=lambda p: p.as_posix())


def check_dir(root: str | os.PathLike[str], what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} {root} is not a directory")
    return root


class ImageFolderDataset(Dataset, SkipTracker):
    """Images under ``root``: ImageNet-style ``root/class/.../x.jpg`` or a flat folder.

    Items: ``{"image", "index", "label", "path"}``; ``label`` is the index of the top-level
    folder in :attr:`classes` (sorted), or -1 for files directly under ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int = 256,
        train: bool = True,
        scale: tuple[float, float] = (0.75, 1.0),
        seed: int = 0,
    ) -> None:
        self.root = check_dir(root, "image folder")
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(
                f"no images found under {self.root} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.classes = sorted({p.parts[0] for p in self.files if len(p.parts) > 1})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.labels = [self.class_to_idx[p.parts[0]] if len(p.parts) > 1 else -1 for p in self.files]
        self.transform = ImageTransform(resolution, train, scale)
        self.seed = seed
        self._init_skips()
        self.source = str(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | Skipped:
        index, access_seed = split_key(key)
        path = self.root / self.files[index]
        try:
            img = load_image(path)
            tensor = self.transform(img, access_generator(self.seed, index, access_seed))
        except Exception as e:  # corrupt/empty/unsupported: skip, never fatal
            return self._skip("bad_image", str(path), e)
        return {"image": tensor, "index": index, "label": self.labels[index], "path": str(path)}


# --- batching -----------------------------------------------------------------------------------
def collate_skip_none(batch: Sequence[dict[str, Any] | Skipped | None]) -> dict[str, Any]:
    """Drop bad items (:class:`Skipped`, ``None``), stack the rest; adds ``batch_size``,
    ``skipped`` and, when something was skipped, ``skipped_by`` (reason -> count; a bare ``None``
    counts as ``"unreadable"``).

    Tensors of equal shape are stacked; bools/ints/floats become tensors; anything else
    (strings, dicts, lists, ``None``) stays a list.
    """
    items = [b for b in batch if b is not None and not isinstance(b, Skipped)]
    out: dict[str, Any] = {"batch_size": len(items), "skipped": len(batch) - len(items)}
    if out["skipped"]:
        out["skipped_by"] = dict(Counter(b.reason if isinstance(b, Skipped) else "unreadable"
                                         for b in batch if b is None or isinstance(b, Skipped)))
    if not items:
        return out
    for k in items[0]:
        vals = [it.get(k) for it in items]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            out[k] = torch.stack(vals)
        elif all(isinstance(v, bool) for v in vals):
            out[k] = torch.tensor(vals, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[k] = torch.tensor(vals, dtype=torch.long)
        elif all(isinstance(v, float) for v in vals):
            out[k] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[k] = vals
    return out


# --- tar shards ---------------------------------------------------------------------------------
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard list from a path, a directory (its ``*.tar``), a glob, a brace range
    (``data-{000..099}.tar``), ``::``-joined specs, or a list of any of those."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_shards(item)]
    spec = os.fspath(spec)
    if "::" in spec:
        return expand_shards(spec.split("::"))
    m = _BRACE.search(spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [s for i in range(lo, hi + 1) for s in expand_shards(spec[: m.start()] + f"{i:0{width}d}" + spec[m.end() :])]
    if "://" in spec or spec.startswith("pipe:"):
        raise ValueError(f"shard {spec!r}: only local tar files are supported (download shards first)")
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no tar shards match {spec!r}")
        return found
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no *.tar shards in directory {spec}")
        return found
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tar shard {spec} does not exist")
    return [spec]


def _split_member(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.jpg`` → ``("dir/abc", "seg.jpg")`` (webdataset's key convention)."""
    dirname, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` groups of consecutive members sharing a key.

    Raises ``tarfile.TarError``/``OSError`` on a damaged archive after yielding every complete
    sample before the damage, also on one cut off exactly between two members: ``tarfile``
    ends such a stream quietly, but a complete archive ends with a zero block, and this one does
    not. The samples after the cut are lost; the shard is reported, never silently short.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(path, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            split = _split_member(member.name)
            if split is None:
                continue
            k, ext = split
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = data
        # tarfile stops at a zero block (the end-of-archive marker: it read 512 bytes more than
        # the members) or quietly at the end of the data (read fewer): the latter is a cut file.
        if tf.offset > 0 and tf.fileobj.tell() - tf.offset < tarfile.BLOCKSIZE:
            if key is not None:
                yield key, parts  # complete: its last member ended before the cut
            raise tarfile.ReadError("truncated: the archive ends without its end-of-archive block")
    if key is not None:
        yield key, parts


def pick_image(parts: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    return None


def _consumer() -> tuple[int, int]:
    """(id, count) of this reader among all DDP ranks × DataLoader workers."""
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist_on else (0, 1)
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class TarShardDataset(IterableDataset, SkipTracker):
    """Samples from webdataset-style ``.tar`` shards (``key.jpg`` + optional ``key.txt``/``key.cls``).

    Work is split over DDP ranks × DataLoader workers: by shard when there are at least as
    many shards as readers, otherwise every reader streams all shards and keeps every n-th
    sample (so tiny corpora still work with many workers). With ``train=True`` the shard order
    is shuffled per epoch (:meth:`set_epoch`) and, if ``shuffle_buffer > 0``, samples go
    through a seeded shuffle buffer. Crops are seeded from ``(seed, epoch, key)``, so a run is
    reproducible. ``repeat=True`` streams forever (epochs advance internally): use it under
    DDP with a step budget, since ranks may otherwise see different sample counts.

    Items: ``{"image", "key", "label"}`` (label from ``.cls``, else -1); bad samples are
    ``None`` (see module docstring). A damaged shard is warned about and abandoned at the
    damage (``skipped["bad_shard"]``).
    """

    def __init__(
        self,
        urls_or_glob: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        resolution: int = 256,
        train: bool = True,
        scale: tuple[float, float] = (0.75, 1.0),
        seed: int = 0,
        shuffle_buffer: int = 0,
        repeat: bool = False,
        load_images: bool = True,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(urls_or_glob)
        if not self.shards:
            raise FileNotFoundError(f"no tar shards in {urls_or_glob!r}")
        self.transform = ImageTransform(resolution, train, scale)
        self.train, self.seed, self.shuffle_buffer = train, seed, shuffle_buffer
        self.repeat, self.load_images = repeat, load_images
        self.epoch = 0
        self._init_skips()
        self.source = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} (+{len(self.shards) - 1} shards)"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order/crops (call before creating the DataLoader iterator)."""
        self.epoch = epoch

    def _decode_image(self, key: str, parts: dict[str, bytes], epoch: int) -> torch.Tensor | None | Skipped:
        """Tensor, ``None`` when images are not loaded, or :class:`Skipped` when the image is bad."""
        if not self.load_images:
            return None
        data = pick_image(parts)
        if data is None:
            return self._skip("missing_image", key, f"no image member among {sorted(parts)}")
        try:
            g = torch.Generator().manual_seed(derive_seed("lverse-tar", self.seed, epoch, key))
            return self.transform(load_image(data), g)
        except Exception as e:
            return self._skip("bad_image", key, e)

    def make_item(self, key: str, parts: dict[str, bytes], epoch: int) -> dict[str, Any] | Skipped:
        """One sample → item dict, or :class:`Skipped`. Subclasses change the format."""
        image = self._decode_image(key, parts, epoch)
        if isinstance(image, Skipped):
            return image
        label = -1
        if "cls" in parts:
            try:
                label = int(parts["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                return self._skip("bad_label", key, "unreadable .cls")
        return {"image": image, "key": key, "label": label}

    def _samples(self, shards: list[str], keep: Callable[[int], bool]) -> Iterator[tuple[str, dict[str, bytes] | None]]:
        """``(key, parts)`` of the samples this reader keeps; ``(shard, None)`` where a damaged
        shard was abandoned (by its first reader only)."""
        n = 0
        for shard in shards:
            it = iter_tar_samples(shard)
            while True:
                try:
                    key, parts = next(it)
                except StopIteration:
                    break
                except (tarfile.TarError, OSError, EOFError) as e:
                    if keep(n):
                        self._skip("bad_shard", shard, e)
                        yield shard, None
                    break
                if keep(n):
                    yield f"{Path(shard).stem}/{key}", parts
                n += 1

    def _epoch_items(self, epoch: int) -> Iterator[dict[str, Any] | Skipped]:
        cid, count = _consumer()
        shards = list(self.shards)
        if self.train:
            # Same permutation in every reader (seeded by epoch only), so the split is a partition.
            random.Random(derive_seed("lverse-shards", self.seed, epoch)).shuffle(shards)
        if len(shards) >= count:
            samples = self._samples(shards[cid::count], lambda n: True)
        else:
            samples = self._samples(shards, lambda n: n % count == cid)
        if self.shuffle_buffer > 0 and self.train:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(derive_seed("lverse-buf", self.seed, epoch, cid)))
        for key, parts in samples:
            yield Skipped("bad_shard", key) if parts is None else self.make_item(key, parts, epoch)

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        epoch = self.epoch
        while True:
            yield from self._epoch_items(epoch)
            if not self.repeat:
                return
            epoch += 1


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def _encode(value: Any, ext: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP",
               "tif": "TIFF", "tiff": "TIFF", "gif": "GIF"}.get(ext.rsplit(".", 1)[-1])
        if fmt is None:
            raise ValueError(f"cannot encode an image as .{ext}")
        buf = io.BytesIO()
        img = value.convert("RGB") if fmt == "JPEG" and value.mode not in ("RGB", "L", "CMYK") else value
        img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    if isinstance(value, (list, tuple)):
        return "\n".join(map(str, value)).encode("utf-8")
    return str(value).encode("utf-8")


def write_tar_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    prefix: str = "shard",
    samples_per_shard: int = 100,
) -> list[Path]:
    """Write webdataset-style shards ``prefix-000000.tar``... and return their paths.

    Each sample is ``{"__key__": str, ext: value, ...}``; a value may be bytes (written as
    is), a PIL image (encoded by ``ext``), a str/int (UTF-8), or a list of str (one a line).
    Archives are byte-deterministic (fixed mtime/owner).
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tf: tarfile.TarFile | None = None
    count = 0

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        assert tf is not None
        tf.addfile(info, io.BytesIO(data))

    try:
        for sample in samples:
            if "__key__" not in sample:
                raise ValueError(f"sample without '__key__': keys {sorted(sample)}")
            if tf is None or count == samples_per_shard:
                if tf is not None:
                    tf.close()
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                tf, count = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT), 0
            key = str(sample["__key__"])
            for ext, value in sample.items():
                if ext != "__key__":
                    add(f"{key}.{ext}", _encode(value, ext))
            count += 1
    finally:
        if tf is not None:
            tf.close()
    return paths
