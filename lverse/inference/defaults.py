"""The one set of sampling defaults, per direction, and a bundle's own recommendations.

``sample.py`` with no flags, the Python API (:mod:`lverse.inference.generate`), the demo and the
Shapes benchmark's headline all read their settings from :func:`resolve`, so a published figure is
what a user gets. What the defaults are and why:

* **64 candidates** per prompt or image, reranked, the best kept (L-Verse section 3.6).
* **Temperature 1, no top-k**: the model's own distribution. The paper does not cut the image
  tokens' tail, and on Shapes a top-k of 256 did not help the reranked pick.
* **Top-p 0.9 for captions** (the reconstruction paper's default caption sampler); none for images.
* **Guidance 1** (off): classifier-free guidance is ours, and needs a BiART trained with caption
  dropout.
* **Reranker** ``clip+cycle``: CLIP and BiART's own reverse direction, z-scored and summed
  (:func:`lverse.inference.rerank.combine_scores`). On the shipped Shapes bundle it beats either
  alone in both directions. Without a CLIP it falls back to ``cycle``, which needs nothing more.

A bundle may carry ``sampling.json`` with per-direction overrides, e.g.
``{"text_to_image": {"temperature": 0.8, "guidance": 2.0}}``. The older flat form
``{"guidance": g, "image_temperature": t}`` is still read (both keys are text→image settings).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lverse.inference.rerank import parse_reranker, uses_clip, without_clip
from lverse.inference.sampling import SamplingParams

DIRECTIONS = ("text_to_image", "image_to_text")
SAMPLING_FILE = "sampling.json"
# The flat keys older bundles wrote, and where they go now.
LEGACY_KEYS = {"guidance": ("text_to_image", "guidance"), "image_temperature": ("text_to_image", "temperature")}


@dataclass(frozen=True)
class Sampling:
    """How one direction is sampled and reranked."""

    candidates: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    guidance: float = 1.0  # classifier-free guidance, text -> image only; 1 = off
    rerank: str = "clip+cycle"  # falls back to "cycle" when no CLIP is at hand

    def __post_init__(self) -> None:
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {self.candidates!r}")
        try:
            parse_reranker(self.rerank)  # any family combination (lverse.inference.rerank)
        except ValueError as e:
            raise ValueError(f"rerank: {e}") from None
        self.params()  # SamplingParams checks temperature, top_k, top_p, guidance

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, guidance=self.guidance)

    def with_clip(self, has_clip: bool) -> "Sampling":
        """The reranker actually usable: without a CLIP its CLIP parts go (``clip`` and
        ``clip+cycle`` become ``cycle``; ``reconstruct:clip`` plain ``reconstruct``)."""
        if has_clip or not uses_clip(self.rerank):
            return self
        return dataclasses.replace(self, rerank=without_clip(self.rerank))

    def override(self, **values: Any) -> "Sampling":
        """A copy with every value that is not None replaced (e.g. command-line flags)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


DEFAULTS: dict[str, Sampling] = {
    "text_to_image": Sampling(),
    "image_to_text": Sampling(top_p=0.9),
}
_FIELDS = {f.name: f.type for f in dataclasses.fields(Sampling)}


def normalize(data: dict[str, Any], where: str = "sampling") -> dict[str, dict[str, Any]]:
    """A bundle's recommendations in the per-direction form, checked; ``where`` names the file
    in every error."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in LEGACY_KEYS:
            direction, name = LEGACY_KEYS[key]
            out.setdefault(direction, {})[name] = value
        elif key in DIRECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be an object of settings, got {type(value).__name__}")
            unknown = sorted(set(value) - set(_FIELDS))
            if unknown:
                raise ValueError(f"{where}: {key}: unknown setting(s) {unknown}; known: {list(_FIELDS)}")
            out.setdefault(key, {}).update(value)
        else:
            raise ValueError(f"{where}: unknown key {key!r}; known: {list(DIRECTIONS)} (and the older "
                             f"{list(LEGACY_KEYS)})")
    for direction, values in out.items():
        for name, value in values.items():
            number = (int,) if name in ("candidates", "top_k") else (int, float)
            if name != "rerank" and (isinstance(value, bool) or not isinstance(value, number)):
                raise ValueError(f"{where}: {direction}.{name} must be a number, got {value!r}")
        try:
            dataclasses.replace(DEFAULTS[direction], **values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {direction}: {e}") from None
        if direction == "image_to_text" and values.get("guidance", 1.0) != 1.0:
            raise ValueError(f"{where}: image_to_text.guidance: guidance applies to text->image only")
    return out


def resolve(direction: str, recommended: dict[str, dict[str, Any]] | None = None, has_clip: bool = True,
            **overrides: Any) -> Sampling:
    """The settings for ``direction``: :data:`DEFAULTS`, then the bundle's ``recommended`` values
    (:func:`normalize`'s form), with a CLIP reranker replaced by ``cycle`` when there is no CLIP,
    then ``overrides`` that are not None (an explicit reranker is taken as asked)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    s = dataclasses.replace(DEFAULTS[direction], **(recommended or {}).get(direction, {}))
    return s.with_clip(has_clip).override(**overrides)


def read_sampling_file(root: Path) -> dict[str, dict[str, Any]]:
    """``root/sampling.json`` in the per-direction form (empty when the bundle has none)."""
    import json

    path = root / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    return normalize(data, str(path))
