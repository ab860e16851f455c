"""Inference: a bundle (AugVAE-SL + BiART + tokenizer + CLIP) loaded as one pipeline, sampled in
both directions and reranked.

    from lverse.inference import LVersePipeline, image_to_text, text_to_image
"""
from lverse.inference.defaults import DEFAULTS, Sampling
from lverse.inference.generate import image_to_text, load_reranker, text_to_image
from lverse.inference.pipeline import LVersePipeline

__all__ = ["DEFAULTS", "LVersePipeline", "Sampling", "image_to_text", "load_reranker", "text_to_image"]
