"""The inference bundle: AugVAE-SL + BiART + text tokenizer (+ optionally a CLIP), one directory.

A checkpoint directory holds::

    augvae.safetensors + augvae.json   AugVAE-SL (AugVAE.save)
    biart.safetensors  + biart.json    BiART (BiART.save)
    tokenizer.json                     TextTokenizer.save(dir / "tokenizer.json")
    clip.safetensors   + clip.json     optional: an open_clip model for reranking,
                                       {"kind": "clip", "model_name": ..., "model_cfg": {...}}

``model_cfg`` is open_clip's own model config dict (``embed_dim``, ``vision_cfg``,
``text_cfg``, ...), so a small CLIP trained by us is rebuilt with open_clip's model classes and
these weights, with nothing downloaded.

:meth:`LVersePipeline.load` checks that the three parts fit together (BiART's image vocabulary
is the AugVAE codebook, its text vocabulary is the tokenizer's, its image length is the AugVAE's
tokens per image); a mismatch is a ``ValueError`` naming the file and both values. The AugVAE
always runs in fp32 (the paper: the quantizer underflows in fp16); ``precision`` applies to
BiART only, whose LayerNorms stay fp32 (:meth:`BiART.to_o2`).

A bundle may also hold ``sampling.json``: how its maker recommends sampling it, per direction
(:mod:`lverse.inference.defaults`); :meth:`LVersePipeline.defaults` applies it.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import lverse
from lverse.config import from_dict
from lverse.data.images import read_image
from lverse.dist import resolve_device
from lverse.inference.clip import CLIP_FILE, load_clip, save_clip
from lverse.inference.defaults import SAMPLING_FILE, Sampling, normalize, read_sampling_file, resolve
from lverse.inference.sampling import decode_captions
from lverse.models.augvae import AugVAE
from lverse.models.biart import BiART, BiARTConfig
from lverse.tokenizer import TextTokenizer
from lverse.vocab import VocabLayout

AUGVAE_FILE = "augvae.safetensors"
BIART_FILE = "biart.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_ENV = "LVERSE_CHECKPOINT"

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# CLIP's (OpenAI) normalisation, open_clip's default when a config names none.


def default_checkpoint_dir() -> Path:
    """``$LVERSE_CHECKPOINT`` if set, else the Shapes checkpoint shipped in the repository."""
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        return Path(env)
    return Path(lverse.__file__).resolve().parent.parent / "checkpoints" / "shapes"


def resolve_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


class LVersePipeline:
    """AugVAE + BiART + tokenizer on one device, with the glue between them.

    Attributes: ``augvae`` (fp32, eval), ``biart`` (eval, in the requested precision),
    ``tokenizer``, ``path`` (the directory it was loaded from, if any) and, once
    :meth:`clip` has been called, the CLIP model.
    """

    def __init__(
        self,
        augvae: AugVAE,
        biart: BiART,
        tokenizer: TextTokenizer,
        path: str | Path | None = None,
        clip: torch.nn.Module | None = None,
        clip_meta: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        where = str(self.path / SAMPLING_FILE) if self.path is not None else "sampling"
        # the bundle's recommendations (sampling.json), per direction: see lverse.inference.defaults
        self.sampling = normalize(dict(sampling or {}), where)
        check_compatible(augvae, biart, tokenizer, self.path)
        self.augvae = augvae.eval()
        self.biart = biart.eval()
        self.tokenizer = tokenizer
        self._clip = clip
        self._clip_meta = clip_meta

    # --- files ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = "auto",
        precision: str = "fp32",
    ) -> "LVersePipeline":
        """Load a checkpoint directory (default: :func:`default_checkpoint_dir`).

        The CLIP, if the directory holds one, is loaded on first use (:meth:`clip`).
        """
        root = Path(path) if path is not None else default_checkpoint_dir()
        if not root.is_dir():
            hint = "" if path is not None else f" (the default; pass --checkpoint DIR or set ${CHECKPOINT_ENV})"
            raise FileNotFoundError(f"checkpoint directory not found: {root}{hint}")
        for name in (AUGVAE_FILE, BIART_FILE, TOKENIZER_FILE):
            if not (root / name).is_file():
                raise FileNotFoundError(f"checkpoint {root} lacks {name}")
        dev = resolve_device(device)
        dtype = resolve_precision(precision)
        tokenizer = TextTokenizer.load(root / TOKENIZER_FILE)
        # Check the configs before loading any weights: a mismatch is reported without
        # reading (possibly large) weight files, and with the names of the files at fault.
        check_compatible_configs(_read_config(root / AUGVAE_FILE, "augvae"), _read_config(root / BIART_FILE, "biart"),
                                 tokenizer.vocab_size, root)
        augvae = AugVAE.load(root / AUGVAE_FILE, device=dev).float()
        biart = BiART.load(root / BIART_FILE, device=dev)
        biart = biart.float() if dtype == torch.float32 else biart.to_o2(dtype)
        return cls(augvae, biart, tokenizer, path=root, sampling=read_sampling_file(root))

    def save(self, path: str | Path) -> Path:
        """Write the bundle (and the CLIP, if one is loaded) into directory ``path``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.augvae.save(root / AUGVAE_FILE)
        self.biart.save(root / BIART_FILE)
        self.tokenizer.save(root / TOKENIZER_FILE)
        if self.sampling:
            (root / SAMPLING_FILE).write_text(json.dumps(normalize(self.sampling), indent=2) + "\n")
        elif (root / SAMPLING_FILE).is_file():
            (root / SAMPLING_FILE).unlink()  # a stale recommendation would outlive the model it was for
        if self.has_clip:
            model, meta = self.clip()
            own = ("kind", "model_name", "model_cfg", "preprocess_cfg")
            save_clip(root / CLIP_FILE, model, meta["model_cfg"], meta.get("model_name", "custom"),
                      meta.get("preprocess_cfg"), extra={k: v for k, v in meta.items() if k not in own})
        return root

    # --- properties -----------------------------------------------------------------------
    def defaults(self, direction: str, has_clip: bool | None = None, **overrides: Any) -> Sampling:
        """How to sample ``direction`` ("text_to_image" / "image_to_text") with this bundle: the
        library's defaults, the bundle's ``sampling.json``, then ``overrides`` that are not None
        (:func:`lverse.inference.defaults.resolve`). ``has_clip``: whether a CLIP reranker can
        be used (default: whether the bundle holds a CLIP)."""
        return resolve(direction, self.sampling, self.has_clip if has_clip is None else has_clip, **overrides)

    @property
    def device(self) -> torch.device:
        return self.biart.device

    @property
    def vocab(self) -> VocabLayout:
        return self.biart.vocab

    @property
    def text_len(self) -> int:
        return self.biart.cfg.text_len

    @property
    def image_len(self) -> int:
        return self.biart.cfg.image_len

    @property
    def resolution(self) -> int:
        return self.augvae.cfg.resolution

    @property
    def has_clip(self) -> bool:
        return self._clip is not None or (self.path is not None and (self.path / CLIP_FILE).is_file())

    def clip(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The bundled open_clip model and its metadata (loaded on first call, fp32)."""
        if self._clip is None:
            if self.path is None or not (self.path / CLIP_FILE).is_file():
                where = self.path / CLIP_FILE if self.path is not None else "this pipeline"
                raise FileNotFoundError(f"no CLIP in the checkpoint ({where} not found)")
            self._clip, self._clip_meta = load_clip(self.path / CLIP_FILE, device=self.device)
        return self._clip, dict(self._clip_meta or {})

    def set_clip(self, model: torch.nn.Module, model_cfg: dict[str, Any], model_name: str = "custom") -> None:
        """Attach an open_clip model (saved with the bundle by :meth:`save`)."""
        self._clip = model.to(self.device).eval()
        self._clip_meta = {"kind": "clip", "model_name": model_name, "model_cfg": model_cfg}

    # --- text -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], warn: bool = True) -> tuple[torch.Tensor, list[int]]:
        """BiART text ids ``(B, text_len)`` on the device, and each prompt's token count.

        Layout as in training: BPE ids, ``<end_of_text>``, PAD. A prompt whose ids plus end
        token exceed ``text_len`` is cut to ``text_len`` tokens (no end token, as the training
        data cuts long captions) with a warning. An empty prompt is a ``ValueError``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        rows: list[list[int]] = []
        counts: list[int] = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i + 1} is empty")
            ids = self.tokenizer.encode(p)
            if not ids:
                raise ValueError(f"prompt {i + 1} ({p!r}) has no tokens after clean-up")
            counts.append(len(ids))
            row = (ids + [self.tokenizer.eot_id])[: self.text_len]
            if warn and len(ids) + 1 > self.text_len:
                warnings.warn(
                    f"prompt {i + 1} has {len(ids)} tokens; the model reads {self.text_len} "
                    f"(including the end token): truncated",
                    stacklevel=2,
                )
            rows.append(row + [TextTokenizer.PAD] * (self.text_len - len(row)))
        ids_t = torch.tensor(rows, dtype=torch.long)
        return self.vocab.text_to_global(ids_t, text_pad=TextTokenizer.PAD).to(self.device), counts

    def captions_to_text(self, ids: torch.Tensor, truncate: bool = True) -> list:
        """Strings for generated caption ids ``(..., L)`` (cut at the first full stop by default)."""
        return decode_captions(self.tokenizer, self.vocab, ids, truncate=truncate)

    def captions_to_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """Re-encode caption strings as BiART text ids ``(N, text_len)`` (``text eot PAD..``).

        Used to score a *truncated* caption: what is printed is what is scored, in the
        canonical BPE segmentation the model was trained on. Empty captions become
        ``eot PAD ...``.
        """
        rows = []
        for t in texts:
            ids = (self.tokenizer.encode(t) + [self.tokenizer.eot_id])[: self.text_len]
            rows.append(ids + [TextTokenizer.PAD] * (self.text_len - len(ids)))
        ids_t = torch.tensor(rows, dtype=torch.long).view(len(rows), self.text_len)
        return self.vocab.text_to_global(ids_t, text_pad=TextTokenizer.PAD).to(self.device)

    # --- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Image codes ``(B, image_len)`` from images ``(B, 3, R, R)`` in [-1, 1] (AugVAE in fp32)."""
        out = [self.augvae.encode(images[i : i + batch_size].to(self.device, torch.float32))
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out, 0)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images ``(B, 3, R, R)`` in [-1, 1] (clamped) from codes ``(B, image_len)``."""
        out = [self.augvae.decode(codes[i : i + batch_size].to(self.device)).float().clamp(-1, 1)
               for i in range(0, codes.shape[0], batch_size)]
        return torch.cat(out, 0)

    def load_image(self, path: str | Path) -> torch.Tensor:
        """An image file as the AugVAE sees it: ``(3, R, R)`` in [-1, 1] (:func:`read_image`)."""
        return read_image(path, self.resolution)


# ------------------------------------------------------------------------------------------
# Consistency checks
# ------------------------------------------------------------------------------------------


def _read_config(path: Path, kind: str) -> dict[str, Any]:
    """The ``config`` dict from the JSON beside a weights file, checked to be of ``kind``."""
    cfg_path = path.with_suffix(".json")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (the config beside {path.name})")
    try:
        meta = json.loads(cfg_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind or not isinstance(meta.get("config"), dict):
        got = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{cfg_path}: expected kind={kind!r} with a config, got kind={got!r}")
    return meta["config"]


def check_compatible_configs(
    augvae_cfg: dict[str, Any], biart_cfg: dict[str, Any], tokenizer_vocab: int, root: Path | None
) -> None:
    """Raise ``ValueError`` when BiART's vocabulary/lengths do not match AugVAE and tokenizer."""
    where = (lambda name: str(root / name)) if root is not None else (lambda name: name)
    b = from_dict(BiARTConfig, dict(biart_cfg), where("biart.json"))
    with torch.device("meta"):  # tokens_per_image without allocating or initialising weights
        augvae = AugVAE.from_config(augvae_cfg, where=where("augvae.json"))
    _check_pairs(
        [
            ("num_image_codes", b.num_image_codes, "codebook_size", augvae.cfg.codebook_size, AUGVAE_FILE),
            ("num_text_tokens", b.num_text_tokens, "vocab_size", tokenizer_vocab, TOKENIZER_FILE),
            ("image_len", b.image_len, "tokens_per_image", augvae.tokens_per_image, AUGVAE_FILE),
        ],
        root,
    )


def check_compatible(augvae: AugVAE, biart: BiART, tokenizer: TextTokenizer, root: Path | None = None) -> None:
    c = biart.cfg
    _check_pairs(
        [
            ("num_image_codes", c.num_image_codes, "codebook_size", augvae.cfg.codebook_size, AUGVAE_FILE),
            ("num_text_tokens", c.num_text_tokens, "vocab_size", tokenizer.vocab_size, TOKENIZER_FILE),
            ("image_len", c.image_len, "tokens_per_image", augvae.tokens_per_image, AUGVAE_FILE),
        ],
        root,
    )


def _check_pairs(pairs: list[tuple[str, Any, str, Any, str]], root: Path | None) -> None:
    where = (lambda name: str(root / name)) if root is not None else (lambda name: name)
    for b_name, b_val, o_name, o_val, o_file in pairs:
        if b_val != o_val:
            raise ValueError(
                f"{where('biart.json')}: {b_name}={b_val} does not match {where(o_file)} "
                f"{o_name}={o_val}"
            )
