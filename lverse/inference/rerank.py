"""Rerankers: pick the best of many sampled candidates.

Three families, each with its own name, combined with ``+`` (docs/design.md, section 5.3):

* **clip** (L-Verse section 3.6, after DALL-E): score = cosine similarity of CLIP's image and
  text embeddings. :class:`ClipReranker` wraps any open_clip model; the weights come from a
  local file only (never downloaded).
* **likelihood** (called ``cycle`` before the reconstruction family existed; ``cycle`` stays an
  alias, so sampling.json files, scripts and reports keep working and keep their key): the
  reconstruction paper's idea ("DALL-E and Flamingo", sections 3.1-3.3) without generating.
  BiART holds both directions, so a candidate is scored by the likelihood its *reverse*
  direction gives the source: an image candidate by ``log p(text | image tokens)`` (i2t, the
  caption as GEN), a caption candidate by ``log p(image tokens | caption)`` (t2i). Scores are
  length-normalised: the mean log-probability over the counted target tokens (caption ids incl.
  ``<end_of_text>``, or image codes; PAD and separators do not count, as in training). One
  teacher-forced forward pass per candidate, chunked by ``batch_size``.
  :class:`LikelihoodReranker` (``CycleReranker``, its old name).
* **reconstruct** (the paper's Insights I and II as it does them, by generating): a caption
  candidate is drawn back into images and scored by their similarity to the input image; an
  image candidate is captioned back and scored by the caption's similarity to the prompt.
  ``reconstruct:<similarity>`` picks the similarity (``clip``, ``latent``, ``tokens`` or one a
  caller registers); plain ``reconstruct`` is ``latent``, which needs no CLIP.
  :mod:`lverse.inference.reconstruct`.
* ``a+b``: the score sets are put on one scale by z-scoring each within the candidate set
  (mean 0, std 1; a constant score set contributes 0) and summed, so neither dominates by its
  units (cosine in [-1, 1] vs. log-probabilities in nats). :func:`combine_scores`.
  ``clip+cycle`` (= ``clip+likelihood``) is the default (:mod:`lverse.inference.defaults`).

A reranker's score sets are keyed by the names as the mode spells them (``clip+cycle`` gives
``clip`` and ``cycle``; ``clip+likelihood`` gives ``clip`` and ``likelihood``, equal values).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lverse.inference.clip import CLIP_MEAN, CLIP_STD, load_clip
from lverse.models.biart import GEN, BiART, Direction

# The classic choices, in the order reports list them (``lverse benchmark`` and ``lverse evaluate
# shapes`` score these by default); :func:`parse_reranker` accepts every combination of families.
RERANKERS = ("clip", "cycle", "clip+cycle", "none")
FAMILIES = ("clip", "likelihood", "reconstruct")
ALIASES = {"cycle": "likelihood"}  # old name -> family
# The similarities built into the reconstruct family (lverse.inference.reconstruct); callers may
# register more (e.g. SBERT or CIDEr from lverse.eval) under other names.
RECONSTRUCT_SIMILARITIES = ("clip", "latent", "tokens")
# Names users may give beside the combinations (shown in --help).
EXAMPLES = ("likelihood", "clip+likelihood", "reconstruct", "reconstruct:clip", "reconstruct:latent",
            "reconstruct:tokens", "clip+reconstruct", "likelihood+reconstruct:latent")


def parse_reranker(mode: str) -> list[tuple[str, str, str | None]]:
    """``mode`` -> ``[(key, family, option)]``, one per ``+``-joined part (``none``: ``[]``).

    ``key`` is the part as spelled (the score set's name), ``family`` one of :data:`FAMILIES`
    (``cycle`` is ``likelihood``), ``option`` the similarity after ``reconstruct:`` (``None``: the
    default). A bad mode is a ``ValueError`` naming the part."""
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"reranker must be a non-empty string, got {mode!r}")
    if mode == "none":
        return []
    out: list[tuple[str, str, str | None]] = []
    for part in mode.split("+"):
        name, _, option = part.partition(":")
        family = ALIASES.get(name, name)
        if family not in FAMILIES:
            raise ValueError(f"unknown reranker {part!r} in {mode!r}; families: {', '.join(FAMILIES)} "
                             f"(cycle = likelihood), joined with '+', or none; e.g. {', '.join(EXAMPLES[:4])}")
        if option and family != "reconstruct":
            raise ValueError(f"reranker {part!r} in {mode!r}: only reconstruct takes a similarity (reconstruct:NAME)")
        if part in [k for k, _, _ in out]:
            raise ValueError(f"reranker {mode!r} names {part!r} twice")
        out.append((part, family, option or None))
    return out


class RerankerError(ValueError, argparse.ArgumentTypeError):
    """A bad reranker name: a ValueError, which argparse prints as it is given (``type=``)."""


def check_reranker(mode: str) -> str:
    """``mode`` if :func:`parse_reranker` accepts it, else :class:`RerankerError` (a
    ``ValueError``; as argparse's ``type=`` its message is printed)."""
    try:
        parse_reranker(mode)
    except ValueError as e:
        raise RerankerError(str(e)) from None
    return mode


def uses_clip(mode: str) -> bool:
    """Whether ``mode`` has a CLIP part (``clip``, or ``reconstruct:clip``)."""
    return any(f == "clip" or o == "clip" for _, f, o in parse_reranker(mode))


# ------------------------------------------------------------------------------------------
# Cycle (BiART's reverse direction)
# ------------------------------------------------------------------------------------------


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, max_elems: int = 1 << 26) -> torch.Tensor:
    """``log softmax(logits)[targets]`` per position, ``(N, T)`` in fp32.

    Processed in slices of positions so the fp32 copy of the logits stays under ``max_elems``
    values (at the paper's vocabulary, 1024 image positions of one row are 59M values).
    """
    N, T, V = logits.shape
    step = max(1, max_elems // max(1, N * V))
    out = torch.empty((N, T), dtype=torch.float32, device=logits.device)
    for t0 in range(0, T, step):
        sl = logits[:, t0 : t0 + step].float()
        tgt = targets[:, t0 : t0 + step].clamp(0, V - 1)
        out[:, t0 : t0 + step] = sl.gather(-1, tgt[..., None]).squeeze(-1) - torch.logsumexp(sl, dim=-1)
    return out


@torch.no_grad()
def conditional_logprob(
    model: BiART,
    cond: torch.Tensor,
    target: torch.Tensor,
    direction: Direction,
    batch_size: int = 64,
    max_logits: int = 1 << 28,
) -> torch.Tensor:
    """Mean log p(target | cond) per row, ``(N,)`` fp32, teacher-forced.

    ``t2i``: ``cond`` are BiART text ids ``(N, text_len)``, ``target`` image codes ``(N,
    image_len)``; ``i2t``: ``cond`` image codes, ``target`` BiART text ids (caption, eot, PAD).
    Counted: image codes (t2i) or caption ids (i2t), never PAD. A row without counted tokens
    scores 0.

    The prompt (REF part and the opening separator) is prefilled into a KV cache computing the
    head only at its last position; the target then runs through the cache in chunks of
    positions sized so that a chunk's logits hold at most ``max_logits`` values (64 paper-size
    caption candidates x 1024 image positions x 57,603 ids would be 3.8G values at once). The
    output head thus runs on target positions only, and memory stays bounded.
    """
    if cond.shape[0] != target.shape[0]:
        raise ValueError(f"conditional_logprob: {cond.shape[0]} conditions but {target.shape[0]} targets")
    vocab = model.vocab
    device = model.device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, cond.shape[0], batch_size):
            c = cond[i : i + batch_size].to(device)
            prompt, seg = model.build_prompt(c, direction)
            if direction == "t2i":
                codes = target[i : i + batch_size].to(device).long()
                if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab.num_image_codes):
                    raise ValueError(f"image codes must lie in [0, {vocab.num_image_codes})")
                tgt = vocab.image_to_global(codes)
                counted = vocab.is_image(tgt)
            else:
                tgt = target[i : i + batch_size].to(device).long()
                counted = vocab.is_text(tgt)
            n, P = prompt.shape
            T = tgt.shape[1]
            cache = model.new_cache(n, max_len=P + T - 1)
            # Position P-1 (the opening separator) predicts target[0]; the prefill computes the
            # head there only. Then the target is fed in chunks through the cache, each chunk
            # predicting the next tokens, so at most n * chunk * V logits exist at a time.
            lp = torch.empty((n, T), dtype=torch.float32, device=device)
            # (contiguous: a strided slice would take another matmul kernel, whose last bits differ)
            h = model.hidden(prompt, seg, cache=cache)[:, -1:].contiguous()
            lp[:, :1] = _target_logprobs(model.head(h), tgt[:, :1])
            chunk = max(1, max_logits // max(1, n * vocab.size))
            for t0 in range(0, T - 1, chunk):
                x = tgt[:, t0 : min(t0 + chunk, T - 1)]
                logits = model(x, torch.full_like(x, GEN), cache=cache, start_pos=P + t0)
                lp[:, t0 + 1 : t0 + 1 + x.shape[1]] = _target_logprobs(logits, tgt[:, t0 + 1 : t0 + 1 + x.shape[1]])
            cnt = counted.sum(1)
            out.append((lp * counted).sum(1) / cnt.clamp(min=1))
    finally:
        model.train(was_training)
    return torch.cat(out, 0) if out else torch.empty(0, device=device)


class LikelihoodReranker:
    """Scores candidates by BiART's reverse direction (see the module docstring)."""

    def __init__(self, model: BiART, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size

    def score_images(self, text_ids_global: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Image candidates ``(N, image_len)`` for one text ``(text_len,)`` (or one per row,
        ``(N, text_len)``): mean log p(text | image), ``(N,)``."""
        text = _expand(text_ids_global, image_codes.shape[0])
        return conditional_logprob(self.model, image_codes, text, "i2t", self.batch_size)

    def score_captions(self, image_codes: torch.Tensor, caption_ids_global: torch.Tensor) -> torch.Tensor:
        """Caption candidates ``(N, text_len)`` (BiART ids) for one image ``(image_len,)`` (or one
        per row): mean log p(image | caption), ``(N,)``."""
        codes = _expand(image_codes, caption_ids_global.shape[0])
        return conditional_logprob(self.model, caption_ids_global, codes, "t2i", self.batch_size)


CycleReranker = LikelihoodReranker  # the family's old name


def _expand(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.dim() == 1:
        return x[None].expand(n, -1)
    if x.shape[0] != n:
        raise ValueError(f"expected one row or {n} rows, got {x.shape[0]}")
    return x


# ------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------


class ClipReranker:
    """CLIP score: cosine similarity of open_clip image and text embeddings.

    ``model_or_path``: an open_clip model, or a ``clip.safetensors`` file / a checkpoint
    directory holding one (see :mod:`lverse.inference.pipeline`). Images are given in [-1, 1]; they are
    resized to the model's input size (bicubic, antialiased) and normalised with the model's
    mean/std (``visual.preprocess_cfg``, else CLIP's). Text goes through ``tokenizer``, by
    default open_clip's CLIP BPE tokenizer at the model's context length.
    """

    def __init__(
        self,
        model_or_path: torch.nn.Module | str | Path,
        device: str | torch.device = "cpu",
        tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> None:
        if isinstance(model_or_path, (str, Path)):
            model, _ = load_clip(model_or_path, device=device)
        else:
            model = model_or_path
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        visual = getattr(self.model, "visual", self.model)
        size = getattr(visual, "image_size", 224)
        self.image_size: tuple[int, int] = tuple(size) if isinstance(size, (tuple, list)) else (size, size)  # type: ignore[assignment]
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = torch.tensor(pp.get("mean", CLIP_MEAN), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", CLIP_STD), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(self.model)

    @classmethod
    def from_open_clip(
        cls, model_name: str, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> "ClipReranker":
        """A named open_clip architecture with weights from a *local* file (never downloaded)."""
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP weights not found: {path} (give a local file with --clip-weights, "
                "or use --rerank cycle, which needs no CLIP)"
            )
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        try:
            # A file path as `pretrained` makes open_clip load it; a tag would download, so
            # only existing files reach this call.
            model = open_clip.create_model(model_name, pretrained=str(path), device=torch.device(device))
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot load CLIP weights {path} into {model_name}: {first}") from None
        return cls(model, device, tokenizer=open_clip.get_tokenizer(model_name), batch_size=batch_size)

    # --- embeddings -----------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device, torch.float32).clamp(-1, 1) + 1) / 2
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``(N, D)`` for images ``(N, 3, H, W)`` in [-1, 1]."""
        out = [
            F.normalize(self.model.encode_image(self.preprocess(images[i : i + self.batch_size])).float(), dim=-1)
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(out, 0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(N, D)``."""
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1))
        return torch.cat(out, 0)

    # --- scores ---------------------------------------------------------------------------
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each (image, text) pair, ``(N,)``."""
        if images.shape[0] != len(texts):
            raise ValueError(f"ClipReranker.score: {images.shape[0]} images but {len(texts)} texts")
        return (self.embed_images(images) * self.embed_texts(texts)).sum(-1)

    def score_images(self, images: torch.Tensor, text: str) -> torch.Tensor:
        """Image candidates ``(N, 3, H, W)`` against one text: ``(N,)``."""
        return self.embed_images(images) @ self.embed_texts([text])[0]

    def score_texts(self, image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Caption candidates against one image ``(3, H, W)``: ``(N,)``."""
        return self.embed_texts(texts) @ self.embed_images(image[None])[0]


def _default_tokenizer(model: torch.nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    from open_clip.tokenizer import SimpleTokenizer

    ctx = int(getattr(model, "context_length", 77))
    vocab = getattr(model, "vocab_size", None)
    tok = SimpleTokenizer(context_length=ctx)
    if vocab is not None and vocab < len(tok.encoder):
        raise ValueError(
            f"the CLIP's text vocabulary has {vocab} tokens but open_clip's CLIP tokenizer needs "
            f"{len(tok.encoder)}; pass a matching tokenizer to ClipReranker"
        )
    return tok


# ------------------------------------------------------------------------------------------
# Combining
# ------------------------------------------------------------------------------------------


def zscore(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the candidate set; a constant set (or one candidate) gives 0."""
    x = x.float()
    std = x.std(unbiased=False) if x.numel() > 1 else x.new_zeros(())
    if float(std) == 0.0 or not torch.isfinite(std):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def combine_scores(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of z-scored score sets (``clip+cycle``): each set weighs the same whatever its units."""
    if not scores:
        raise ValueError("combine_scores: no scores")
    return torch.stack([zscore(s) for s in scores]).sum(0)


def without_clip(mode: str) -> str:
    """``mode`` usable without a CLIP: its ``clip`` parts dropped, ``reconstruct:clip`` as plain
    ``reconstruct``; ``cycle`` when nothing is left (what the defaults fall back to)."""
    parts = []
    for key, family, option in parse_reranker(mode):
        if family == "clip":
            continue
        parts.append("reconstruct" if option == "clip" else key)
    if mode == "none":
        return mode
    return "+".join(dict.fromkeys(parts)) or "cycle"


__all__ = [
    "RERANKERS",
    "FAMILIES",
    "ALIASES",
    "parse_reranker",
    "check_reranker",
    "uses_clip",
    "without_clip",
    "conditional_logprob",
    "LikelihoodReranker",
    "CycleReranker",
    "ClipReranker",
    "zscore",
    "combine_scores",
]
