"""Reranking by reconstruction, as the reconstruction paper does it ("DALL-E and Flamingo",
sections 3.1-3.3), with BiART in both roles.

* **Insight I** (captions): the best caption for an image is the one from which the image is
  reconstructed best. Each caption candidate is drawn back into ``samples`` images with BiART
  text→image, and scored by the mean similarity of those images to the input image.
* **Insight II** (images): the best image for a text is the one from which the text is
  reconstructed best. Each image candidate is captioned back (greedily by default, as the
  paper's beam search; or ``samples`` draws), cut at its first full stop like every caption,
  and scored by the mean similarity of those captions to the prompt.

Similarities (``reconstruct:<name>``):

==========  =============================================  ============================================
name        images (Insight I)                             captions (Insight II)
==========  =============================================  ============================================
``clip``    CLIP image cosine of the decoded images        CLIP text cosine
``latent``  minus the mean squared distance of the         cosine of the mean BiART token embeddings
            AugVAE codebook vectors, position by position  of the two captions (end token left out)
``tokens``  share of positions with the same image code    F1 of the two captions' token multisets
==========  =============================================  ============================================

``latent`` and ``tokens`` need no CLIP. A caller registers more under its own names, e.g. the
evaluation's SBERT or CIDEr (:mod:`lverse.eval.similarity`, a floor above this one):
``text_similarities={"sbert": Sbert().cosines}``, a function of two lists of strings that returns
one score per pair; ``image_similarities`` take two image batches in [-1, 1].

Cost: one generation per *distinct* candidate (Shapes' 64 caption draws hold few distinct
captions), batched; reconstructions are cached by candidate, so a candidate met again (in this
set or a later one) is not generated again. Randomness comes from ``seed`` per call, so a set's
scores are reproducible; a cached candidate keeps the reconstruction it got first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import ClipReranker
from lverse.inference.sampling import SamplingParams, generate_captions, generate_images

ImageSimilarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (M,3,R,R) x2 in [-1,1] -> (M,)
TextSimilarity = Callable[[Sequence[str], Sequence[str]], torch.Tensor]  # two lists of M -> (M,)
GREEDY = SamplingParams(temperature=0.0)


def code_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Share of positions where two code grids ``(M, L)`` hold the same code, ``(M,)``."""
    return (a == b).float().mean(-1)


def latent_similarity(codebook: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-mean_t ||e[a_t] - e[b_t]||^2`` over positions, ``(M,)``, with ``e`` the codebook rows
    ``(N, D)``: the decoder's view of two code grids, without decoding."""
    e = codebook.float()
    return -(e[a.long()] - e[b.long()]).pow(2).sum(-1).mean(-1)


def _bag(ids: torch.Tensor, counted: torch.Tensor, size: int) -> torch.Tensor:
    bag = torch.zeros(ids.shape[0], size, device=ids.device)
    return bag.scatter_add_(1, ids.clamp(0, size - 1), counted.float())


def token_f1(a: torch.Tensor, b: torch.Tensor, counted_a: torch.Tensor, counted_b: torch.Tensor, size: int) -> torch.Tensor:
    """F1 of the token multisets of rows ``a``, ``b`` ``(M, T)`` (only ``counted`` positions),
    ``(M,)``; two empty rows score 1."""
    ba, bb = _bag(a, counted_a, size), _bag(b, counted_b, size)
    overlap = torch.minimum(ba, bb).sum(-1)
    total = ba.sum(-1) + bb.sum(-1)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


class ReconstructReranker:
    """Scores caption candidates by image reconstruction (Insight I) and image candidates by
    caption reconstruction (Insight II); see the module docstring.

    ``samples``: reconstructions per candidate (their similarities are averaged); ``image_params``
    (default: temperature 1, the text→image default) and ``caption_params`` (default greedy) are
    how they are drawn; ``clip`` serves the ``clip`` similarity. Plain ``reconstruct`` is
    ``latent``."""

    def __init__(
        self,
        pipe: LVersePipeline,
        clip: ClipReranker | None = None,
        samples: int = 1,
        image_params: SamplingParams | None = None,
        caption_params: SamplingParams | None = None,
        max_text_tokens: int = 32,
        seed: int = 0,
        batch_size: int = 64,
        image_similarities: dict[str, ImageSimilarity] | None = None,
        text_similarities: dict[str, TextSimilarity] | None = None,
        cache_size: int = 8192,
    ) -> None:
        if samples < 1:
            raise ValueError(f"ReconstructReranker: samples must be >= 1, got {samples}")
        self.pipe, self.clip, self.samples, self.seed, self.batch_size = pipe, clip, samples, seed, batch_size
        self.image_params = image_params or SamplingParams()
        self.caption_params = caption_params or GREEDY
        self.max_text_tokens = min(max_text_tokens, pipe.text_len)
        self.image_similarities = dict(image_similarities or {})
        self.text_similarities = dict(text_similarities or {})
        self.cache_size = cache_size
        self._images: dict[bytes, dict[str, torch.Tensor]] = {}  # caption ids -> {"codes", "pixels"}
        self._captions: dict[bytes, dict[str, object]] = {}      # image codes -> {"texts", "ids"}
        self.generated = 0  # candidates generated (not found in the cache): the cost

    # --- which similarity -----------------------------------------------------------------
    def default_similarity(self) -> str:
        """Plain ``reconstruct``: ``latent``, which needs nothing beyond the bundle."""
        return "latent"

    def _check(self, option: str | None, extra: dict[str, object]) -> str:
        name = option or self.default_similarity()
        if name not in ("clip", "latent", "tokens", *extra):
            raise ValueError(f"reconstruct:{name}: unknown similarity; built in: clip, latent, tokens"
                             + (f"; registered: {', '.join(extra)}" if extra else ""))
        if name == "clip" and self.clip is None:
            raise ValueError("reconstruct:clip needs a CLIP (or use reconstruct:latent / reconstruct:tokens)")
        return name

    # --- reconstructions (batched over distinct candidates, cached) -------------------------
    def _remember(self, cache: dict, key: bytes, value: object) -> None:
        if len(cache) >= self.cache_size:
            cache.clear()  # simple bound: a reranker rarely meets a candidate again after many sets
        cache[key] = value

    @torch.no_grad()
    def images_from_captions(self, caption_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """``samples`` image code grids per caption row ``(N, text_len)`` (BiART ids)."""
        keys = [r.cpu().numpy().tobytes() for r in caption_ids]
        todo = list(dict.fromkeys(k for k in keys if k not in self._images))
        if todo:
            rows = torch.stack([caption_ids[keys.index(k)] for k in todo])
            codes = generate_images(self.pipe.biart, rows, self.samples, params=self.image_params, seed=self.seed,
                                    batch_size=self.batch_size)  # (U, samples, L)
            for k, c in zip(todo, codes):
                self._remember(self._images, k, {"codes": c})
            self.generated += len(todo)
        return [self._images[k] for k in keys]

    @torch.no_grad()
    def captions_from_images(self, codes: torch.Tensor) -> list[dict[str, object]]:
        """``samples`` captions per image row ``(N, image_len)``: ``{"texts", "ids"}`` (cut at the
        first full stop; ``ids`` their BiART ids ``(samples, text_len)``, re-encoded)."""
        keys = [r.cpu().numpy().tobytes() for r in codes]
        todo = list(dict.fromkeys(k for k in keys if k not in self._captions))
        if todo:
            rows = torch.stack([codes[keys.index(k)] for k in todo])
            ids = generate_captions(self.pipe.biart, rows, self.samples, self.max_text_tokens,
                                    eot_id=self.pipe.tokenizer.eot_id, params=self.caption_params, seed=self.seed,
                                    batch_size=self.batch_size)  # (U, samples, T)
            texts = self.pipe.captions_to_text(ids)
            for k, t in zip(todo, texts):
                self._remember(self._captions, k, {"texts": t, "ids": self.pipe.captions_to_ids(t)})
            self.generated += len(todo)
        return [self._captions[k] for k in keys]

    # --- Insight I: caption candidates ----------------------------------------------------
    @torch.no_grad()
    def score_captions(self, option: str | None, image_codes: torch.Tensor, caption_ids: torch.Tensor,
                       image: torch.Tensor | None = None) -> torch.Tensor:
        """Caption candidates ``(N, text_len)`` (BiART ids) for one image (codes ``(image_len,)``,
        pixels ``(3, R, R)``) or one per row (``(N, ...)``): the mean similarity of each caption's
        reconstructions to the image, ``(N,)``. Pixels are needed by ``clip`` and registered
        similarities (decoded from the codes when not given)."""
        name = self._check(option, self.image_similarities)
        n, k = caption_ids.shape[0], self.samples
        recs = self.images_from_captions(caption_ids)
        ref = _rows(image_codes.to(self.pipe.device), n).repeat_interleave(k, 0)
        rec = torch.cat([r["codes"] for r in recs]).to(self.pipe.device)  # (n * k, L)
        if name == "tokens":
            sim = code_agreement(rec, ref)
        elif name == "latent":
            sim = latent_similarity(self.pipe.augvae.quantizer.embedding, rec, ref)
        else:
            for r in recs:
                if "pixels" not in r:
                    r["pixels"] = self.pipe.decode_images(r["codes"])
            pix = torch.cat([r["pixels"] for r in recs])
            refpix = image if image is not None else self.pipe.decode_images(image_codes.view(-1, image_codes.shape[-1]))
            refpix = _rows(refpix.to(pix.device), n, 3).repeat_interleave(k, 0)
            if name == "clip":
                assert self.clip is not None
                sim = (self.clip.embed_images(pix) * self.clip.embed_images(refpix)).sum(-1)
            else:
                sim = torch.as_tensor(self.image_similarities[name](pix, refpix))
        return sim.float().view(n, k).mean(1).cpu()

    # --- Insight II: image candidates -----------------------------------------------------
    @torch.no_grad()
    def score_images(self, option: str | None, text_ids: torch.Tensor, codes: torch.Tensor,
                     prompt: str | Sequence[str] | None = None) -> torch.Tensor:
        """Image candidates ``(N, image_len)`` for one prompt (BiART ids ``(text_len,)``, text
        ``prompt``) or one per row: the mean similarity of each image's reconstructed captions to
        the prompt, ``(N,)``. Strings are needed by ``clip`` and registered similarities (decoded
        from the ids when not given)."""
        name = self._check(option, self.text_similarities)
        n, k = codes.shape[0], self.samples
        recs = self.captions_from_images(codes)
        ref = _rows(text_ids.to(self.pipe.device), n).repeat_interleave(k, 0)
        rec = torch.cat([r["ids"] for r in recs]).to(self.pipe.device)  # (n * k, text_len)
        if name in ("tokens", "latent"):
            v = self.pipe.vocab
            eot = v.text_start + self.pipe.tokenizer.eot_id
            ca, cb = v.is_text(rec) & (rec != eot), v.is_text(ref) & (ref != eot)
            if name == "tokens":
                sim = token_f1(rec, ref, ca, cb, v.size)
            else:
                emb = self.pipe.biart.tok_emb.weight.float()
                mean = lambda ids, c: (emb[ids.clamp(0, v.size - 1)] * c[..., None]).sum(1) / c.sum(1, keepdim=True).clamp(min=1)  # noqa: E731
                sim = F.cosine_similarity(mean(rec, ca), mean(ref, cb), dim=-1)
        else:
            texts = [t for r in recs for t in r["texts"]]  # type: ignore[union-attr]
            if prompt is None:
                prompt = self.pipe.captions_to_text(text_ids.view(-1, text_ids.shape[-1]))
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            if len(prompts) == 1:
                prompts = prompts * n
            refs = [p for p in prompts for _ in range(k)]
            if name == "clip":
                assert self.clip is not None
                sim = (self.clip.embed_texts(texts) * self.clip.embed_texts(refs)).sum(-1)
            else:
                sim = torch.as_tensor(self.text_similarities[name](texts, refs))
        return sim.float().view(n, k).mean(1).cpu()


def _rows(x: torch.Tensor, n: int, dims: int = 1) -> torch.Tensor:
    """``n`` rows of references: ``x`` is one reference (``dims`` dimensions), a batch of one,
    or one per row."""
    if x.dim() == dims:
        x = x[None]
    if x.dim() != dims + 1 or x.shape[0] not in (1, n):
        raise ValueError(f"expected one reference or {n}, got a tensor of shape {tuple(x.shape)}")
    return x.expand(n, *x.shape[1:])


__all__ = ["ReconstructReranker", "code_agreement", "latent_similarity", "token_f1"]
