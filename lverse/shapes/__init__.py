"""The Shapes world: procedural scenes that a CPU-sized L-Verse can learn and a judge can read.

It proves, in minutes on a laptop CPU, that every stage of lverse really works: scenes and
their captions (:mod:`~lverse.shapes.scenes`), a caption parser and an image reader that judge
generated results (:mod:`~lverse.shapes.parse`, :mod:`~lverse.shapes.judge`), the benchmark
(:mod:`~lverse.shapes.benchmark`), a tiny CLIP for reranking (:mod:`~lverse.shapes.clip_train`)
and the demo (:mod:`~lverse.shapes.demo`). The core library never imports this package;
importing it registers the ``"shapes"`` dataset kind for configs and ``lverse encode``.
"""
from lverse.data import register_caption_dataset, register_image_dataset
from lverse.shapes.scenes import ShapesCaptionDataset, ShapesDataset

register_image_dataset("shapes", ShapesDataset)
register_caption_dataset("shapes", ShapesCaptionDataset)

__all__ = ["ShapesDataset", "ShapesCaptionDataset"]
