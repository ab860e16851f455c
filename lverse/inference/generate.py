"""Both directions end to end: draw candidates, rerank them, keep the best (L-Verse section 3.6).

This is the Python API behind ``sample.py`` (which only adds argument parsing and files)::

    from lverse.inference import LVersePipeline, image_to_text, text_to_image
    pipe = LVersePipeline.load()                       # the shipped Shapes bundle
    out = text_to_image(pipe, ["a small red circle above a large blue square"])
    out[0]["images"][0]["image"]                       # (3, R, R) in [-1, 1]
    image_to_text(pipe, pipe.load_image("x.png")[None])[0]["caption"]

Settings come from :meth:`LVersePipeline.defaults` (:mod:`lverse.inference.defaults`: the same
defaults ``sample.py``, the demo and the Shapes benchmark use) unless a :class:`Sampling` is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lverse.inference.clip import load_clip
from lverse.inference.defaults import Sampling
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.reconstruct import ReconstructReranker
from lverse.inference.rerank import ClipReranker, LikelihoodReranker, combine_scores, parse_reranker, uses_clip
from lverse.inference.sampling import generate_captions, generate_images, truncate_caption

DECODE_BATCH = 16  # images through the AugVAE decoder at once (full-resolution activations are large)
DEFAULT_TEXT_TOKENS = 32  # caption tokens drawn per candidate (L-Verse section 3.6)
Progress = Callable[[int], object]


class Reranker:
    """Scores one candidate set with ``mode``: ``none``, or families joined by ``+`` (``clip``,
    ``likelihood`` alias ``cycle``, ``reconstruct[:similarity]``; :mod:`lverse.inference.rerank`).

    Returns named score tensors: each part's own, keyed as the mode spells it (``clip``,
    ``cycle``, ``reconstruct:latent``, ...), and ``score``, the one the best candidate is chosen
    by (the parts' z-scored sum when there are several; zeros for ``none``, which keeps the first
    candidate). ``reconstruct`` (optional) sets how the reconstruct family draws and compares
    (:class:`~lverse.inference.reconstruct.ReconstructReranker`); by default one reconstruction
    per candidate, with this reranker's CLIP if any."""

    def __init__(self, mode: str, pipe: LVersePipeline, clip: ClipReranker | None = None, batch_size: int = 64,
                 reconstruct: ReconstructReranker | None = None) -> None:
        self.parts = parse_reranker(mode)
        if uses_clip(mode) and clip is None and (reconstruct is None or reconstruct.clip is None):
            raise ValueError(f"reranker {mode!r} needs a CLIP")
        self.mode, self.pipe, self.clip = mode, pipe, clip
        self.cycle = self.likelihood = LikelihoodReranker(pipe.biart, batch_size)
        if reconstruct is None and any(f == "reconstruct" for _, f, _ in self.parts):
            reconstruct = ReconstructReranker(pipe, clip, batch_size=batch_size)
        self.reconstruct = reconstruct

    @property
    def needs_pixels(self) -> bool:
        """Whether image candidates must be decoded to be scored (the CLIP family's)."""
        return any(f == "clip" for _, f, _ in self.parts)

    def images(self, prompt: str, text_ids: torch.Tensor, codes: torch.Tensor,
               pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        for key, family, option in self.parts:
            if family == "clip":
                assert self.clip is not None and pixels is not None
                parts[key] = self.clip.score_images(pixels, prompt).cpu()
            elif family == "likelihood":
                parts[key] = self.cycle.score_images(text_ids, codes).cpu()
            else:
                assert self.reconstruct is not None
                parts[key] = self.reconstruct.score_images(option, text_ids, codes, prompt)
        return self.finish(parts, codes.shape[0])

    def captions(self, image: torch.Tensor, codes: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        ids = self.pipe.captions_to_ids(captions) if any(f != "clip" for _, f, _ in self.parts) else None
        for key, family, option in self.parts:
            if family == "clip":
                assert self.clip is not None
                parts[key] = self.clip.score_texts(image, captions).cpu()
            elif family == "likelihood":
                parts[key] = self.cycle.score_captions(codes, ids).cpu()
            else:
                assert self.reconstruct is not None
                parts[key] = self.reconstruct.score_captions(option, codes, ids, image)
        return self.finish(parts, len(captions))

    @staticmethod
    def finish(parts: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Adds ``score``, the one candidates are chosen by, to one candidate set's family scores."""
        if not parts:
            parts["score"] = torch.zeros(n)
        elif len(parts) == 1:
            parts["score"] = next(iter(parts.values()))
        else:
            parts["score"] = combine_scores(list(parts.values()))
        return parts


def load_reranker(pipe: LVersePipeline, mode: str, clip_model: str | None = None,
                  clip_weights: str | Path | None = None, batch_size: int = 64) -> Reranker:
    """The :class:`Reranker` for ``mode``; its CLIP from ``clip_weights`` (an open_clip weights file
    for architecture ``clip_model``, or a ``clip.safetensors``), else the bundle's own. Errors name
    ``sample.py``'s flags, the way a user meets them."""
    clip = None
    if uses_clip(mode):
        dev = pipe.device
        if clip_model is not None:
            if clip_weights is None:
                raise ValueError("--clip-model needs --clip-weights FILE (CLIP weights are never downloaded); "
                                 "or use --rerank cycle")
            clip = ClipReranker.from_open_clip(clip_model, clip_weights, dev, batch_size)
        elif clip_weights is not None:
            w = Path(clip_weights)
            if not w.is_file():
                raise FileNotFoundError(f"CLIP weights not found: {w} (or use --rerank cycle, which needs no CLIP)")
            if not w.with_suffix(".json").is_file():
                raise ValueError(f"--clip-weights {w}: give --clip-model NAME for an open_clip weights file "
                                 f"(or a clip.safetensors with its clip.json beside it)")
            clip = ClipReranker(load_clip(w, device=dev)[0], dev, batch_size=batch_size)
        elif pipe.has_clip:
            clip = ClipReranker(pipe.clip()[0], dev, batch_size=batch_size)
        else:
            raise ValueError(f"--rerank {mode} needs a CLIP: the checkpoint {pipe.path} has no clip.safetensors and "
                             "no --clip-model/--clip-weights were given; use --rerank cycle")
    return Reranker(mode, pipe, clip, batch_size)


@torch.no_grad()
def text_to_image(
    pipe: LVersePipeline,
    prompts: Sequence[str],
    settings: Sampling | None = None,
    keep: int = 1,
    seed: int = 0,
    reranker: Reranker | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """For each prompt, ``keep`` images, each the best of its own draw of ``settings.candidates``
    (seeds ``seed .. seed + keep - 1``, as the paper repeats the draw k times).

    Returns one dict per prompt: ``prompt``, ``tokens``, ``truncated`` and ``images``, a list of
    ``{"image": (3, R, R) in [-1, 1], "seed", "candidate", "score", "scores"}`` (``scores``: every
    candidate's score of each reranker family)."""
    settings = settings or pipe.defaults("text_to_image")
    reranker = reranker or load_reranker(pipe, settings.rerank, batch_size=batch_size)
    text_ids, counts = pipe.encode_prompts(list(prompts), warn=False)
    n_draw = 1 if reranker.mode == "none" else settings.candidates
    results = []
    for p, prompt in enumerate(prompts):
        entry: dict[str, Any] = {"prompt": prompt, "tokens": counts[p], "truncated": counts[p] + 1 > pipe.text_len,
                                 "images": []}
        for r in range(keep):
            codes = generate_images(pipe.biart, text_ids[p : p + 1], n_draw, params=settings.params(), seed=seed + r,
                                    batch_size=batch_size, progress=progress)[0]
            pixels = pipe.decode_images(codes, DECODE_BATCH) if reranker.needs_pixels else None
            scores = reranker.images(prompt, text_ids[p], codes, pixels)
            best = int(scores["score"].argmax())
            image = pixels[best] if pixels is not None else pipe.decode_images(codes[best : best + 1])[0]
            entry["images"].append({"image": image.cpu(), "seed": seed + r, "candidate": best,
                                    "score": float(scores["score"][best]), "scores": scores})
        results.append(entry)
    return results


@torch.no_grad()
def image_to_text(
    pipe: LVersePipeline,
    images: torch.Tensor,
    settings: Sampling | None = None,
    seed: int = 0,
    reranker: Reranker | None = None,
    max_text_tokens: int | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    on_caption: Callable[[int, str], object] | None = None,
) -> list[dict[str, Any]]:
    """For each image ``(N, 3, R, R)`` in [-1, 1], ``settings.candidates`` captions of up to
    ``max_text_tokens`` (default 32, the paper's) tokens, each cut at its first full stop (the
    paper's truncation), reranked.

    Returns one dict per image: ``caption`` (the best), ``score`` and ``candidates`` (best first:
    ``{"caption", "raw", "score", <family>: ...}``). ``on_caption(i, caption)`` is called as each
    image is done."""
    settings = settings or pipe.defaults("image_to_text")
    reranker = reranker or load_reranker(pipe, settings.rerank, batch_size=batch_size)
    max_text_tokens = min(DEFAULT_TEXT_TOKENS, pipe.text_len) if max_text_tokens is None else max_text_tokens
    if not 1 <= max_text_tokens <= pipe.text_len:
        raise ValueError(f"max_text_tokens {max_text_tokens} must be in 1..{pipe.text_len} (the model's text length)")
    codes = pipe.encode_images(images, DECODE_BATCH)
    n_draw = 1 if reranker.mode == "none" else settings.candidates
    results = []
    for i in range(images.shape[0]):
        ids = generate_captions(pipe.biart, codes[i : i + 1], n_draw, max_text_tokens, eot_id=pipe.tokenizer.eot_id,
                                params=settings.params(), seed=seed, batch_size=batch_size, progress=progress)[0]
        raw = pipe.captions_to_text(ids, truncate=False)
        caps = [truncate_caption(t) for t in raw]
        scores = reranker.captions(images[i], codes[i], caps)
        order = torch.argsort(scores["score"], descending=True, stable=True).tolist()
        results.append({
            "caption": caps[order[0]],
            "score": float(scores["score"][order[0]]),
            "candidates": [{"caption": caps[j], "raw": raw[j], **{k: float(t[j]) for k, t in scores.items()}}
                           for j in order],
        })
        if on_caption is not None:
            on_caption(i, caps[order[0]])
    return results
