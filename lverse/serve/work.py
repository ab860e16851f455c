"""What ``lverse serve`` does with the model: requests checked, then run as queued jobs.

Everything here goes through the inference API the command lines use (:func:`text_to_image`,
:func:`image_to_text`, :func:`load_reranker`, :meth:`LVersePipeline.defaults`,
:func:`~lverse.data.images.read_image`), so a request with the same settings and seed gives what
``lverse sample`` gives, and bad input gets the same messages.

While images are drawn the job shows, min-dalle style, the first :data:`PREVIEWS` candidates
taking shape: every few rows of the token grid the partial grid goes through the AugVAE decoder,
the rows not drawn yet shown grey (:class:`ImageWatch`, fed by the sampler's ``partial`` hook).
"""
from __future__ import annotations

import dataclasses
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lverse.data.images import read_image
from lverse.files import to_uint8_grid
from lverse.inference.defaults import DIRECTIONS, Sampling
from lverse.inference.generate import DEFAULT_TEXT_TOKENS, Reranker, image_to_text, load_reranker, text_to_image
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import EXAMPLES, RERANKERS, uses_clip
from lverse.serve.jobs import Job

PREVIEWS = 4  # candidates shown while they are drawn
PREVIEW_STEPS = 8  # previews per image (at most), whatever the token grid
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``lverse serve`` flags of the same names)."""

    max_candidates: int = 128
    max_keep: int = 8
    max_upload_mb: float = 8.0
    max_waiting: int = 16
    max_prompt_chars: int = 1000

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


# The settings a request may give, by direction, and their types.
FIELDS: dict[str, dict[str, type]] = {
    "text_to_image": {"candidates": int, "keep": int, "temperature": float, "top_k": int, "top_p": float,
                      "guidance": float, "rerank": str, "seed": int},
    "image_to_text": {"candidates": int, "temperature": float, "top_k": int, "top_p": float, "rerank": str,
                      "seed": int},
}
ROUND_TRIP_FIELDS: dict[str, type] = {"candidates": int, "rerank": str, "seed": int}


@dataclass(frozen=True)
class Request:
    """A checked request for one direction: the resolved settings, seed and (images) keep."""

    sampling: Sampling
    reranker: Reranker
    seed: int = 0
    keep: int = 1

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.sampling), "seed": self.seed, "keep": self.keep}


def png(images: torch.Tensor, nrow: int = 8, pad: int = 0) -> bytes:
    """Images ``(N, 3, H, W)`` in [-1, 1] as one PNG (side by side, ``nrow`` to a row)."""
    buf = io.BytesIO()
    to_uint8_grid(images, nrow=nrow, pad=pad).save(buf, format="PNG")
    return buf.getvalue()


def _convert(name: str, value: Any, kind: type) -> Any:
    """A JSON value or a form field (a string) as ``kind``; a one-line error naming the field."""
    if value is None or (isinstance(value, str) and value.strip() == "" and kind is not str):
        return None
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value.strip()
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return kind(value)


def check_fields(values: Mapping[str, Any], fields: Mapping[str, type], also: tuple[str, ...] = ()) -> dict[str, Any]:
    """``values`` converted to their types; an unknown field is an error (a typo would otherwise
    be ignored). ``also``: fields the caller reads itself (``prompt``, ``image``)."""
    unknown = sorted(set(values) - set(fields) - set(also))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted([*also, *fields])}")
    return {k: _convert(k, values[k], t) for k, t in fields.items() if k in values}


class Model:
    """One bundle behind the web page: checks requests against :class:`Limits` and runs them."""

    def __init__(self, pipe: LVersePipeline, limits: Limits = Limits(), batch_size: int = 64) -> None:
        self.pipe, self.limits, self.batch_size = pipe, limits, batch_size
        self.max_text_tokens = min(DEFAULT_TEXT_TOKENS, pipe.text_len)
        grids = pipe.augvae.token_grids
        # One token grid (AugVAE-SL): previews every few rows, rows not drawn yet grey. Several
        # levels (AugVAE-ML) have no rows to follow: previews at even steps, nothing masked.
        self.grid = grids[0] if len(grids) == 1 else None
        if self.grid is not None:
            h, w = self.grid
            self.preview_every = w * max(1, -(-h // PREVIEW_STEPS))
        else:
            self.preview_every = max(1, pipe.image_len // PREVIEW_STEPS)
        # Previews fill the grid's undrawn part with a grey image's codes: the drawn rows then
        # fade into grey at their lower edge instead of into whatever code 0 looks like.
        with torch.no_grad():
            self.filler = pipe.encode_images(torch.zeros(1, 3, pipe.resolution, pipe.resolution))[0]
        if pipe.has_clip:
            pipe.clip()  # loaded now, not inside the first request

    # --- what the page reads first ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        p = self.pipe
        return {
            "checkpoint": str(p.path) if p.path is not None else None,
            "device": str(p.device),
            "resolution": p.resolution,
            "text_len": p.text_len,
            "image_len": p.image_len,
            "max_text_tokens": self.max_text_tokens,
            "has_clip": p.has_clip,
            "defaults": {d: dataclasses.asdict(p.defaults(d)) for d in DIRECTIONS},
            # suggestions for the page (any '+' combination of families is accepted)
            "rerankers": [r for r in dict.fromkeys((*RERANKERS, *EXAMPLES)) if p.has_clip or not uses_clip(r)],
            "limits": {**dataclasses.asdict(self.limits), "max_upload_bytes": self.limits.max_upload_bytes},
        }

    # --- checking requests -----------------------------------------------------------------
    def request(self, direction: str, values: Mapping[str, Any]) -> Request:
        """Settings for ``direction`` from checked ``values`` (already converted): the bundle's
        defaults with these on top (:meth:`LVersePipeline.defaults`, whose checks and messages
        are the library's), within this server's limits."""
        values = dict(values)
        seed = values.pop("seed", None) or 0
        keep = values.pop("keep", None)
        keep = 1 if keep is None else keep
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if keep > self.limits.max_keep:
            raise ValueError(f"keep must be at most {self.limits.max_keep} on this server, got {keep}")
        n = values.get("candidates")
        if n is not None and n > self.limits.max_candidates:
            raise ValueError(f"candidates must be at most {self.limits.max_candidates} on this server, got {n}")
        sampling = self.pipe.defaults(direction, **values)
        reranker = load_reranker(self.pipe, sampling.rerank, batch_size=self.batch_size)
        return Request(sampling, reranker, seed, keep)

    def prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {prompt!r}")
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ValueError(f"prompt has {len(prompt)} characters; this server takes at most "
                             f"{self.limits.max_prompt_chars}")
        self.pipe.encode_prompts([prompt], warn=False)  # e.g. "has no tokens after clean-up"
        return prompt

    def image(self, name: str, data: bytes) -> torch.Tensor:
        """An uploaded file as the model sees it ``(3, R, R)``, read by the one image loader
        (:func:`read_image`, as ``lverse sample --image``): its messages, naming the upload."""
        name = re.sub(r"[^\w.+-]", "_", Path(name or "upload").name) or "upload"
        if len(data) > self.limits.max_upload_bytes:
            raise ValueError(f"{name} is {len(data) / MB:.1f} MB; this server takes images of at most "
                             f"{self.limits.max_upload_mb:g} MB")
        with tempfile.TemporaryDirectory(prefix="lverse-upload-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                return read_image(path, self.pipe.resolution)
            except (OSError, ValueError) as e:
                raise ValueError(str(e).replace(str(path), name)) from None

    # --- the work (in the queue's worker thread) -------------------------------------------
    def text_to_image(self, job: Job, prompt: str, req: Request, stage: str = "drawing images") -> dict[str, Any]:
        return self._draw_images(job, prompt, req, stage)[0]

    def _draw_images(self, job: Job, prompt: str, req: Request, stage: str) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The result, and the kept images as tensors (a round trip reads the best one back)."""
        n_draw = 1 if req.sampling.rerank == "none" else req.sampling.candidates
        job.begin(stage, req.keep * n_draw * self.pipe.image_len)
        watch = ImageWatch(self, job, n_draw, stage)
        entry = text_to_image(self.pipe, [prompt], req.sampling, req.keep, req.seed, req.reranker,
                              self.batch_size, watch)[0]
        if len(watch.codes) != req.keep:
            raise RuntimeError(f"expected {req.keep} rounds of candidates, saw {len(watch.codes)}")
        rounds = job.data.setdefault("codes", [])
        base = len(rounds)
        rounds.extend(watch.codes)
        images, candidates = [], []
        for r, im in enumerate(entry["images"]):
            name = f"image-{base + r}.png"
            job.files[name] = png(im["image"][None])
            best = im["candidate"]
            images.append({"url": self.url(job, name), "seed": im["seed"], "candidate": best, "score": im["score"],
                           "scores": {k: float(v[best]) for k, v in im["scores"].items()}})
            order = torch.argsort(im["scores"]["score"], descending=True, stable=True).tolist()
            candidates.append([{"candidate": j, "url": self.url(job, f"candidate-{base + r}-{j}.png"),
                                **{k: float(v[j]) for k, v in im["scores"].items()}} for j in order])
        warning = None
        if entry["truncated"]:
            warning = (f"the prompt has {entry['tokens']} tokens; the model reads {self.pipe.text_len} including "
                       f"the end token: truncated")
        result = {"prompt": prompt, "tokens": entry["tokens"], "truncated": entry["truncated"], "warning": warning,
                  "images": images, "candidates": candidates, "settings": req.describe()}
        return result, [im["image"] for im in entry["images"]]

    def image_to_text(self, job: Job, image: torch.Tensor, req: Request, stage: str = "drawing captions",
                      input_name: str = "input.png") -> dict[str, Any]:
        n_draw = 1 if req.sampling.rerank == "none" else req.sampling.candidates
        job.begin(stage, n_draw * self.max_text_tokens)
        job.files.setdefault(input_name, png(image[None]))

        def progress(rows: int) -> None:
            job.tick(rows)
            if job.tokens >= job.total:
                job.stage = "reranking"

        res = image_to_text(self.pipe, image[None], req.sampling, req.seed, req.reranker, self.max_text_tokens,
                            self.batch_size, progress)[0]
        return {"input": self.url(job, input_name), **res, "settings": req.describe()}

    def round_trip_text(self, job: Job, prompt: str, t2i: Request, i2t: Request) -> dict[str, Any]:
        """Text -> the best image -> its best caption (the caption should say the prompt again)."""
        there, kept = self._draw_images(job, prompt, t2i, "1/2 drawing images")
        back = self.image_to_text(job, kept[0], i2t, "2/2 drawing captions", input_name="image-0.png")
        return {"prompt": prompt, "image": there["images"][0], "caption": back["caption"],
                "caption_score": back["score"], "text_to_image": there, "image_to_text": back}

    def round_trip_image(self, job: Job, image: torch.Tensor, i2t: Request, t2i: Request) -> dict[str, Any]:
        """An image -> its best caption -> the best image for that caption (should look alike)."""
        there = self.image_to_text(job, image, i2t, "1/2 drawing captions")
        back = self.text_to_image(job, there["caption"], t2i, "2/2 drawing images") if there["caption"] else None
        if back is None:
            raise ValueError("the best caption is empty: nothing to draw an image from")
        return {"input": there["input"], "caption": there["caption"], "caption_score": there["score"],
                "image": back["images"][0], "image_to_text": there, "text_to_image": back}

    # --- files made on request -------------------------------------------------------------
    def candidate_png(self, job: Job, name: str) -> bytes | None:
        """``candidate-R-J.png``: candidate J of round R, decoded when first asked for."""
        m = re.fullmatch(r"candidate-(\d+)-(\d+)\.png", name)
        rounds = job.data.get("codes", [])
        if m is None or int(m[1]) >= len(rounds) or int(m[2]) >= rounds[int(m[1])].shape[0]:
            return None
        codes = rounds[int(m[1])][int(m[2])]
        with torch.no_grad():
            return png(self.pipe.decode_images(codes[None]))

    @staticmethod
    def url(job: Job, name: str) -> str:
        return f"/api/jobs/{job.id}/files/{name}"


class ImageWatch:
    """The progress object :func:`text_to_image`'s decoding reports to, after every token:
    counts tokens and stops a cancelled job (:meth:`Job.tick`), previews the first candidates
    every few token rows, and keeps each round's finished codes (its candidates, in order, for
    the page's "all candidates")."""

    def __init__(self, model: Model, job: Job, n_draw: int, stage: str) -> None:
        self.model, self.job, self.n_draw, self.stage = model, job, n_draw, stage
        self.codes: list[torch.Tensor] = []  # one (n_draw, image_len) per finished round
        self._chunks: list[torch.Tensor] = []

    def __call__(self, rows: int) -> None:
        if self.job.stage != self.stage:
            self.job.stage = self.stage  # back from reranking the previous round
        self.job.tick(rows)

    def partial(self, ids: torch.Tensor) -> None:
        pipe, t = self.model.pipe, ids.shape[1]
        if t % self.model.preview_every == 0 or t == pipe.image_len:
            self.job.set_preview(png(self.preview(ids[:PREVIEWS]), nrow=PREVIEWS, pad=2))
        if t == pipe.image_len:  # a chunk of candidates is complete (chunks come in order)
            self._chunks.append(pipe.vocab.global_to_image(ids).cpu().clone())
            if sum(c.shape[0] for c in self._chunks) == self.n_draw:
                self.codes.append(torch.cat(self._chunks))
                self._chunks = []
                self.job.stage = "reranking"

    @torch.no_grad()
    def preview(self, ids: torch.Tensor) -> torch.Tensor:
        """Candidates ``ids (k, t)`` drawn so far, decoded with the rest of the grid taken from
        a grey image's codes; rows not drawn yet are shown grey."""
        pipe, t = self.model.pipe, ids.shape[1]
        codes = self.model.filler.to(ids.device).repeat(ids.shape[0], 1)
        codes[:, :t] = pipe.vocab.global_to_image(ids)
        pixels = pipe.decode_images(codes).cpu()
        if self.model.grid is not None and t < pipe.image_len:
            h, w = self.model.grid
            pixels[:, :, (t // w) * pipe.resolution // h :, :] = 0.0  # grey
        return pixels
