"""The Shapes judge: read a scene out of a caption and out of an image, and compare scenes.

This is what lets anyone check on a CPU that L-Verse's stages really learn the Shapes data
(:mod:`lverse.shapes.scenes`): a generated image is read back into a :class:`Scene` and compared
with the prompt's scene (text→image), a generated caption is parsed and compared with the
image's scene (image→text). No learned component is involved, so a score from the judge means
the same thing for every model.

>>> scene = parse_caption("A small red circle to the left of a large blue square.")
>>> read = read_image(render(scene))          # any PIL image / (3,H,W) tensor / ndarray
>>> match(read, scene)
True
>>> judge_pairs(images, captions)             # {"exact": .., "colour": .., "n": ..}

Caption parser
--------------
:func:`parse_caption` is a small recursive-descent parser for exactly the grammar of the
dataset module's docstring. Its words come from the dataset's own tables (``SHAPES``,
``COLOURS``, ``SIZES``, ``REL_WORDS``, ``POS_WORDS``), so the two cannot drift apart; only the
glue words ``a``, ``there is`` and ``and`` are the grammar's own. Anything outside the grammar
raises :class:`ParseError` naming the offending word — the parser never guesses.

Image reader
------------
1. Every pixel's *ink* (background minus pixel) is compared with each palette colour's ink
   direction. A flat object antialiased or blurred against the white background is
   ``α·colour + (1-α)·white``, i.e. its ink is ``α`` times the colour's ink: the direction
   names the colour whatever the coverage, the length gives the coverage ``α``. A pixel is
   object when ``α ≥ 0.5`` (the half-coverage contour, which blur leaves in place) and it lies
   near a palette line; otherwise background.
2. Connected components (specks below a minimum area dropped), coloured by majority vote.
3. Per object a *soft* mask (the coverage ``α`` of its colour, normalised between the local
   background and interior levels) gives area, centroid and the complex moments
   ``c_pq = Σ α (z - z̄)^p``. Those are the features because a Gaussian blur leaves them
   alone: blur spreads ink but keeps its total (area), its mean (centroid) and, being an
   isotropic Gaussian, adds nothing to ``Σ α z³`` or ``Σ α z⁴``. ``|c₃|`` is large only for
   the triangle (the other shapes are centrally symmetric); ``Re c₄`` is negative for the
   square, positive for the diamond (a square turned 45° flips its sign) and zero for the
   circle. Normalised by powers of the area they are scale-free; the prototype values are
   measured on the dataset's own renderer at import, so they follow it.
4. Size from the extent implied by area and shape (nearest of ``SIZES`` on a log scale);
   placement from bounding-box centres with the dataset's layout rule.

Scores
------
:func:`match` (exact scene equality up to the direction a chain is read in),
:func:`attribute_scores` (per-attribute correctness under the best object assignment),
:func:`judge_scenes` / :func:`judge_pairs` (aggregates over a set).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from lverse.shapes.parse import ParseError, _as_scene, _attrs, match, parse_caption, try_parse_caption
from lverse.shapes.scenes import (
    BACKGROUND,
    COLOURS,
    INVERSE,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    render,
)

__all__ = [
    "ObjectReading",
    "ReadResult",
    "read_image",
    "read_image_detailed",
    "read_images",
    "attribute_scores",
    "judge_scenes",
    "judge_pairs",
    "ATTRIBUTES",
]

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]
SceneLike = Union[Scene, dict, str]

# =============================================================================================
# Image reader
# =============================================================================================
_WHITE = np.asarray(BACKGROUND, np.float64) / 255.0
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_INK = _WHITE - np.asarray([COLOURS[c] for c in _COLOUR_NAMES], np.float64) / 255.0  # (K,3)
_INK_LEN = np.linalg.norm(_INK, axis=1)  # (K,)
_INK_DIR = _INK / _INK_LEN[:, None]  # unit ink direction of each palette colour

# A pixel is an object pixel when at least half covered (α ≥ 0.5: the half-coverage contour
# stays put under blur) and within this RGB distance (0..1 units) of a palette colour's
# line through white. Palette lines are ≥ 0.43 apart at full colour; noise σ=0.05 plus a
# ±20/255 colour shift moves a pixel about 0.2 at worst; grey and black lie ≥ 0.45 off.
_OBJECT_ALPHA = 0.5
_MAX_LINE_DIST = 0.3
# Specks: the smallest real object (small triangle/diamond) covers 0.5·0.18² ≈ 0.016 of the
# canvas, a quarter of that is noise.
_MIN_AREA_FRAC = 0.004
# The soft mask reaches this many pixels beyond the object's α ≥ 0.5 pixels (blurred edges).
_SOFT_REACH = 2
# One-object positions: "center" has its centre within 0.05 of the middle on both axes, the
# others at least 0.2 off it (x ≤ 0.3 for left): decide at the midpoint.
_CENTER_RADIUS = 0.125


@dataclass
class ObjectReading:
    """One object found in an image, with the evidence behind it."""

    shape: str
    colour: str
    size: str
    x: float  # bounding-box centre, normalised (like ShapeObject.x)
    y: float
    area: float  # soft area as a fraction of the canvas
    extent: float  # bounding-box side implied by area and shape, fraction of the canvas side
    shape_margin: float  # 2nd-best minus best prototype distance (prototypes lie ~1 apart)
    colour_purity: float  # share of the object's pixels whose own nearest colour agrees
    features: dict[str, float] = field(default_factory=dict)  # |c3|, Re c4 (normalised)

    def to_object(self) -> ShapeObject:
        return ShapeObject(self.shape, self.colour, self.size, self.x, self.y)


@dataclass
class ReadResult:
    """What :func:`read_image_detailed` found. ``scene`` is None when no object was found."""

    scene: Scene | None
    objects: list[ObjectReading]
    specks: int  # components dropped as smaller than the minimum area
    off_palette: float  # fraction of the canvas that is ink of no palette colour
    placement_margin: float  # how clearly the layout rule decided (normalised, ≥ 0)
    confidence: float  # min of the shape and placement margins, in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene": None if self.scene is None else self.scene.to_dict(),
            "objects": [vars(o).copy() for o in self.objects],
            "specks": self.specks,
            "off_palette": self.off_palette,
            "placement_margin": self.placement_margin,
            "confidence": self.confidence,
        }


def _to_rgb(img: ImageLike, value_range: tuple[float, float] | None) -> np.ndarray:
    """Any supported image → float64 H×W×3 in [0, 1]."""
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), np.float64)
        lo, hi = value_range or (0.0, 255.0)
    elif isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got shape {tuple(img.shape)}")
        default = (-1.0, 1.0) if t.is_floating_point() else (0.0, 255.0)
        arr = t.permute(1, 2, 0).to(torch.float64).numpy()
        lo, hi = value_range or default
    elif isinstance(img, np.ndarray):
        arr = img
        if arr.ndim == 3 and arr.shape[-1] != 3 and arr.shape[0] == 3:
            arr = arr.transpose(1, 2, 0)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"image array must be (H, W, 3) or (3, H, W), got shape {img.shape}")
        default = (0.0, 255.0) if np.issubdtype(arr.dtype, np.integer) else (0.0, 1.0)
        arr = arr.astype(np.float64)
        lo, hi = value_range or default
    else:
        raise TypeError(f"expected a PIL image, a (3,H,W) tensor or an ndarray, got {type(img).__name__}")
    if hi <= lo:
        raise ValueError(f"value_range must be (low, high) with low < high, got {(lo, hi)}")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def _soft_features(
    proj: np.ndarray, own: np.ndarray, other: np.ndarray, k: int, y0: int, x0: int
) -> tuple[float, float, float, complex, complex]:
    """Area, centroid and raw complex moments Σα z³, Σα z⁴ of one object's soft mask.

    ``proj``: the window's ink projections (h,w,K); ``own``: its object pixels; ``other``:
    pixels of other objects (excluded). Coverage is normalised between the local background
    (median of the ring around the object) and the interior (median of the eroded mask), so
    a global colour shift or a lighter/darker shade does not change the area.
    """
    alpha = proj[..., k] / _INK_LEN[k]
    grown = ndimage.binary_dilation(own, iterations=_SOFT_REACH)
    near = grown & ~other
    ring = ~grown & ~other
    bg = float(np.median(alpha[ring])) if ring.sum() >= 8 else 0.0
    bg = min(max(bg, -0.3), 0.3)
    core = ndimage.binary_erosion(own)
    fg = float(np.median(alpha[core])) if core.sum() >= 3 else float(alpha[own].max())
    fg = max(fg, bg + 0.4)
    # No dead zone for noise: thresholding the faint blurred rim changes the moments more than
    # the background noise does (measured on blurred and on noisy renders).
    a = np.clip((alpha - bg) / (fg - bg), 0.0, 1.0) * near
    area = float(a.sum())
    if area <= 0:
        area = float(own.sum())
        a = own.astype(np.float64)
    h, w = a.shape
    ys = np.arange(h, dtype=np.float64)[:, None] + (y0 + 0.5)  # pixel centres
    xs = np.arange(w, dtype=np.float64)[None, :] + (x0 + 0.5)
    cx = float((a * xs).sum() / area)
    cy = float((a * ys).sum() / area)
    z = (xs - cx) + 1j * (ys - cy)
    z2 = z * z
    c3 = complex((a * z2 * z).sum())
    c4 = complex((a * z2 * z2).sum())
    return area, cx, cy, c3, c4


def _shape_descriptors(area: float, c3: complex, c4: complex) -> tuple[float, float]:
    """Scale-free (|c3|/A^2.5, Re c4/A^3)."""
    return abs(c3) / area**2.5, c4.real / area**3


@dataclass(frozen=True)
class _Prototype:
    t: float  # |c3| / A^2.5
    q: float  # Re c4 / A^3
    fill: float  # area / extent²
    dx: float  # centroid − box centre, in extents
    dy: float


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[str, _Prototype]:
    """Features of each shape measured on the dataset's own renderer (large, 128 px)."""
    res, out = 128, {}
    for shape in SHAPES:
        scene = Scene([ShapeObject(shape, _COLOUR_NAMES[0], "large", 0.5, 0.5)], position="center")
        rgb = np.asarray(render(scene, res), np.float64) / 255.0
        proj = (_WHITE - rgb) @ _INK_DIR.T
        own = proj[..., 0] / _INK_LEN[0] >= _OBJECT_ALPHA
        area, cx, cy, c3, c4 = _soft_features(proj, own, np.zeros_like(own), 0, 0, 0)
        t, q = _shape_descriptors(area, c3, c4)
        ext = SIZES["large"] * res
        out[shape] = _Prototype(t, q, area / ext**2, (cx - res / 2) / ext, (cy - res / 2) / ext)
    return out


def _classify_shape(t: float, q: float) -> tuple[str, float]:
    """Nearest prototype in (t/t_triangle, q/|q_square|) space; returns (shape, margin)."""
    protos = _prototypes()
    t_scale = max(p.t for p in protos.values())
    q_scale = max(abs(p.q) for p in protos.values())
    d = sorted(
        (math.hypot((t - p.t) / t_scale, (q - p.q) / q_scale), s) for s, p in protos.items()
    )
    return d[0][1], d[1][0] - d[0][0]


def _classify_size(extent: float) -> str:
    """Nearest of ``SIZES`` on a log scale: small/large split at √(0.18·0.30) ≈ 0.23."""
    return min(SIZES, key=lambda s: abs(math.log(max(extent, 1e-6) / SIZES[s])))


def _placement(objs: list[ObjectReading]) -> tuple[list[ObjectReading], str | None, str | None, float]:
    """Order, relation / position and decision margin, by the dataset's layout rule."""
    if len(objs) == 1:
        dx, dy = objs[0].x - 0.5, objs[0].y - 0.5
        off = max(abs(dx), abs(dy))
        if off < _CENTER_RADIUS:
            return objs, None, "center", (_CENTER_RADIUS - off) / _CENTER_RADIUS
        if abs(dx) >= abs(dy):
            pos = "left" if dx < 0 else "right"
        else:
            pos = "top" if dy < 0 else "bottom"
        margin = min((off - _CENTER_RADIUS) / _CENTER_RADIUS, (off - min(abs(dx), abs(dy))) / off)
        return objs, None, pos, margin
    xs = np.array([o.x for o in objs])
    ys = np.array([o.y for o in objs])
    horizontal = np.ptp(xs) >= np.ptp(ys)
    along, across = (xs, ys) if horizontal else (ys, xs)
    order = np.argsort(along, kind="stable")
    # Each neighbouring pair must be further apart along the axis than across it.
    d_along = np.diff(along[order])
    d_across = np.abs(np.diff(across[order]))
    margin = float(np.min((d_along - d_across) / np.maximum(d_along + d_across, 1e-9)))
    return [objs[i] for i in order], ("left" if horizontal else "above"), None, max(margin, 0.0)


def read_image_detailed(
    img: ImageLike,
    *,
    value_range: tuple[float, float] | None = None,
    min_area_frac: float = _MIN_AREA_FRAC,
) -> ReadResult:
    """Read the scene of a Shapes-style image, with per-object evidence.

    ``img``: a PIL image, a (3,H,W) tensor (float in [-1,1] like the dataset's, or integer
    0..255), or an ndarray (H,W,3)/(3,H,W) (integer 0..255 or float 0..1); ``value_range``
    overrides the assumed range. Objects smaller than ``min_area_frac`` of the canvas are
    dropped as specks. Works from 32 px up (at 16 px a small object is 3 pixels wide).

    Known limit: two objects of the *same* colour that touch are read as one object (objects
    of different colours are split); the dataset keeps objects apart, so this only happens
    on generated images that merge them, where it is counted as wrong.
    """
    rgb = _to_rgb(img, value_range)
    h, w, _ = rgb.shape
    ink = _WHITE - rgb
    proj = ink @ _INK_DIR.T  # (h,w,K) ink along each palette direction
    dist2 = (ink * ink).sum(-1)[..., None] - proj * proj  # squared distance to each line
    dist2 = np.where(proj > 0, dist2, np.inf)
    best = dist2.argmin(-1)
    best_proj = np.take_along_axis(proj, best[..., None], -1)[..., 0]
    best_dist2 = np.take_along_axis(dist2, best[..., None], -1)[..., 0]
    inked = best_proj / _INK_LEN[best] >= _OBJECT_ALPHA
    on_palette = best_dist2 <= _MAX_LINE_DIST**2
    fg = inked & on_palette
    off_palette = float((inked & ~on_palette).mean())

    labels, n = ndimage.label(fg)
    min_area = max(3, int(round(min_area_frac * h * w)))
    k_count = len(_COLOUR_NAMES)
    counts = np.bincount((labels * k_count + best)[fg], minlength=(n + 1) * k_count).reshape(n + 1, k_count)
    specks = 0
    # (mask slice origin, own mask, other mask, colour index, purity) per object
    pieces: list[tuple[tuple[slice, slice], np.ndarray, np.ndarray, int, float]] = []
    pad = _SOFT_REACH + 1
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        area = int(counts[i].sum())
        if area < min_area:
            specks += 1
            continue
        ys = slice(max(sl[0].start - pad, 0), min(sl[0].stop + pad, h))
        xs = slice(max(sl[1].start - pad, 0), min(sl[1].stop + pad, w))
        lab_win = labels[ys, xs]
        own = lab_win == i
        other = (lab_win != 0) & ~own
        # Usually one colour per component; two touching objects of different colours form
        # one component with two big colour groups: split it by colour.
        major = [k for k in range(k_count) if counts[i, k] >= max(min_area, 0.2 * area)]
        if len(major) <= 1:
            k = int(counts[i].argmax())
            pieces.append(((ys, xs), own, other, k, float(counts[i, k] / area)))
            continue
        best_win = best[ys, xs]
        for k in major:
            sub, m = ndimage.label(own & (best_win == k))
            for j in range(1, m + 1):
                part = sub == j
                if part.sum() >= min_area:
                    pieces.append(((ys, xs), part, other | (own & ~part), k, 1.0))
                else:
                    specks += 1

    readings: list[ObjectReading] = []
    canvas = math.sqrt(h * w)
    protos = _prototypes()
    for (ys, xs), own, other, k, purity in pieces:
        area, cx, cy, c3, c4 = _soft_features(proj[ys, xs], own, other, k, ys.start, xs.start)
        t, q = _shape_descriptors(area, c3, c4)
        shape, margin = _classify_shape(t, q)
        p = protos[shape]
        ext_px = math.sqrt(area / p.fill)
        readings.append(
            ObjectReading(
                shape=shape,
                colour=_COLOUR_NAMES[k],
                size=_classify_size(ext_px / canvas),
                x=round((cx - p.dx * ext_px) / w, 4),
                y=round((cy - p.dy * ext_px) / h, 4),
                area=area / (h * w),
                extent=ext_px / canvas,
                shape_margin=margin,
                colour_purity=purity,
                features={"c3": t, "c4": q},
            )
        )
    if not readings:
        return ReadResult(None, [], specks, off_palette, 0.0, 0.0)
    ordered, relation, position, pmargin = _placement(readings)
    scene = Scene([o.to_object() for o in ordered], relation=relation, position=position)
    confidence = min([min(1.0, o.shape_margin) for o in ordered] + [min(1.0, pmargin)])
    return ReadResult(scene, ordered, specks, off_palette, pmargin, max(0.0, confidence))


def read_image(img: ImageLike, **kwargs: Any) -> Scene | None:
    """The scene of an image (None when no object is found); see :func:`read_image_detailed`."""
    return read_image_detailed(img, **kwargs).scene


def read_images(images: Sequence[ImageLike] | torch.Tensor | np.ndarray, **kwargs: Any) -> list[Scene | None]:
    """:func:`read_image` over a sequence or a batch ((N,3,H,W) tensor, (N,H,W,3) array)."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return [read_image(images[i], **kwargs) for i in range(images.shape[0])]
    return [read_image(im, **kwargs) for im in images]


# =============================================================================================
# Scores
# =============================================================================================
ATTRIBUTES: tuple[str, ...] = ("exact", "count", "colour", "shape", "size", "placement")
_MAX_PERMUTE = 6  # brute-force assignments up to this many objects, Hungarian above


def _pairs_placement_correct(pred: Scene, truth: Scene, assign: dict[int, int]) -> int:
    """How many of truth's neighbouring pairs (i, i+1) the prediction relates the same way."""
    if len(pred.objects) < 2 or pred.relation is None:
        return 0
    correct = 0
    for i in range(len(truth.objects) - 1):
        a, b = assign.get(i), assign.get(i + 1)
        if a is None or b is None:
            continue
        # In a chain, object a is pred.relation of object b whenever a < b.
        if (a < b and pred.relation == truth.relation) or (a > b and pred.relation == INVERSE[truth.relation]):  # type: ignore[index]
            correct += 1
    return correct


def _best_assignment(pred: Scene, truth: Scene) -> dict[int, int]:
    """truth index → pred index maximising (matching attributes, correctly placed pairs)."""
    nt, npred = len(truth.objects), len(pred.objects)
    same = np.array(
        [[sum(x == y for x, y in zip(_attrs(t), _attrs(p))) for p in pred.objects] for t in truth.objects]
    )
    if max(nt, npred) > _MAX_PERMUTE:
        rows, cols = linear_sum_assignment(-same)
        return dict(zip(rows.tolist(), cols.tolist()))
    best: tuple[tuple[int, int], dict[int, int]] | None = None
    if nt <= npred:
        candidates = (dict(enumerate(perm)) for perm in itertools.permutations(range(npred), nt))
    else:
        candidates = (
            {t: j for j, t in enumerate(perm)} for perm in itertools.permutations(range(nt), npred)
        )
    for assign in candidates:
        score = int(sum(same[t, p] for t, p in assign.items()))
        placed = _pairs_placement_correct(pred, truth, assign) if nt > 1 else 0
        if best is None or (score, placed) > best[0]:
            best = ((score, placed), assign)
    assert best is not None
    return best[1]


def attribute_scores(pred: Scene | dict | None, truth: Scene | dict) -> dict[str, float]:
    """Per-attribute correctness of ``pred`` against ``truth``, each in [0, 1].

    Objects are paired by the assignment that agrees on the most attributes (ties: the most
    correctly placed pairs). ``colour``/``shape``/``size``: share of paired objects that agree,
    over the larger of the two object counts (so missing and extra objects both cost);
    ``count``: same number of objects; ``placement``: the one-object position, or the share
    of truth's neighbouring pairs related the same way; ``exact``: :func:`match`.
    A ``pred`` of None (caption that did not parse, image with nothing readable) scores 0.
    """
    truth_s = _as_scene(truth)
    if truth_s is None:
        raise ValueError("attribute_scores needs a truth scene, got None")
    pred_s = _as_scene(pred)
    if pred_s is None:
        return {a: 0.0 for a in ATTRIBUTES}
    if match(pred_s, truth_s):
        return {a: 1.0 for a in ATTRIBUTES}
    assign = _best_assignment(pred_s, truth_s)
    denom = max(len(pred_s.objects), len(truth_s.objects))
    out = {"exact": 0.0, "count": float(len(pred_s.objects) == len(truth_s.objects))}
    for j, name in enumerate(("shape", "colour", "size")):
        agree = sum(_attrs(truth_s.objects[t])[j] == _attrs(pred_s.objects[p])[j] for t, p in assign.items())
        out[name] = agree / denom
    if len(truth_s.objects) == 1:
        out["placement"] = float(len(pred_s.objects) == 1 and pred_s.position == truth_s.position)
    else:
        out["placement"] = _pairs_placement_correct(pred_s, truth_s, assign) / (len(truth_s.objects) - 1)
    return {a: out[a] for a in ATTRIBUTES}


def judge_scenes(preds: Sequence[Scene | dict | None], truths: Sequence[Scene | dict]) -> dict[str, Any]:
    """Aggregate :func:`attribute_scores` over pairs: mean of each attribute, the share of
    predictions that could not be read (``parse_failure_rate``), exact accuracy per object
    count (``exact_by_objects``), and ``n``."""
    if len(preds) != len(truths):
        raise ValueError(f"judge_scenes: {len(preds)} predictions but {len(truths)} truths")
    n = len(truths)
    if n == 0:
        raise ValueError("judge_scenes: nothing to judge (0 pairs)")
    totals = dict.fromkeys(ATTRIBUTES, 0.0)
    failures = 0
    by_count: dict[str, list[float]] = {}
    for pred, truth in zip(preds, truths):
        truth_s = _as_scene(truth)
        assert truth_s is not None
        failures += pred is None
        scores = attribute_scores(pred, truth_s)
        for a in ATTRIBUTES:
            totals[a] += scores[a]
        by_count.setdefault(str(len(truth_s.objects)), []).append(scores["exact"])
    out: dict[str, Any] = {a: totals[a] / n for a in ATTRIBUTES}
    out["parse_failure_rate"] = failures / n
    out["exact_by_objects"] = {k: sum(v) / len(v) for k, v in sorted(by_count.items())}
    out["n"] = n
    return out


def _reference_scene(x: SceneLike, index: int) -> Scene:
    if isinstance(x, str):
        try:
            return parse_caption(x)
        except ParseError as e:
            raise ParseError(e.text, f"reference caption {index} is outside the grammar: {e.reason}", e.word, e.position) from e
    s = _as_scene(x)
    assert s is not None
    return s


def judge_pairs(
    images: Sequence[ImageLike] | torch.Tensor | np.ndarray,
    captions: Sequence[SceneLike],
    *,
    reference: Literal["caption", "image"] = "caption",
    **read_kwargs: Any,
) -> dict[str, Any]:
    """Judge image–caption pairs: does each image show what its caption says?

    ``captions`` are caption strings, :class:`Scene` objects or scene dicts.
    ``reference="caption"`` (text→image): the captions/scenes are the truth and each image is
    read and judged; an image with nothing readable counts as a failure. ``reference="image"``
    (image→text): the images are read as the truth and the captions judged; a caption outside
    the grammar counts as a failure. A reference that cannot be read is an error.
    Returns :func:`judge_scenes`' dict.
    """
    scenes_read = read_images(images, **read_kwargs)
    if len(scenes_read) != len(captions):
        raise ValueError(f"judge_pairs: {len(scenes_read)} images but {len(captions)} captions")
    if reference == "caption":
        truths = [_reference_scene(c, i) for i, c in enumerate(captions)]
        return judge_scenes(scenes_read, truths)
    if reference == "image":
        truths_img: list[Scene] = []
        for i, s in enumerate(scenes_read):
            if s is None:
                raise ValueError(f"judge_pairs: reference image {i} shows no readable object")
            truths_img.append(s)
        preds = [try_parse_caption(c) if isinstance(c, str) else _as_scene(c) for c in captions]
        return judge_scenes(preds, truths_img)
    raise ValueError(f"reference must be 'caption' or 'image', got {reference!r}")
