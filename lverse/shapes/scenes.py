"""Shapes: a procedural image–caption dataset that small models can learn and a judge can parse.

Every image is ``R×R`` RGB (64 by default) showing one, two (or, optionally, three) flat
coloured objects on a plain white background. Objects never overlap, colours are saturated
and far apart, and the layout is chosen so that the stated relation is never ambiguous. That
makes the dataset useful at both ends: a tiny AugVAE/BiART can learn it on a CPU, and a
later judge can read the scene back from pixels (nearest palette colour → mask → bounding
box → shape/size/position) and compare it with a caption.

Vocabulary (the tables below are the single source of truth)
-------------------------------------------------------------
* shapes   : ``circle``, ``square``, ``triangle`` (apex up), ``diamond`` (square on its tip)
* colours  : ``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``cyan``  (:data:`COLOURS`)
* sizes    : ``small`` (bounding box 0.18 of the canvas side), ``large`` (0.30)
* relations: ``left`` / ``right`` / ``above`` / ``below`` — always "object i is <relation>
  object i+1" (:data:`RELATIONS`)
* positions (one-object scenes): ``left``, ``right``, ``top``, ``bottom``, ``center``

Held-out colour–shape pairs (:data:`HELDOUT_PAIRS`): red triangle, green diamond, blue
circle, yellow square. With ``holdout=True`` (the default) they never occur in the ``train``
split; the ``test`` split draws from all 24 pairs and flags items containing one
(``item["heldout"]``). Every colour and every shape still occurs in training, each held out
in exactly one combination, so the test measures compositional generalisation.

Caption grammar (lower case, no final full stop, single spaces)
----------------------------------------------------------------
::

    caption   := one_obj | chain
    one_obj   := NP " " POS | "there is " NP " " POS | POS " there is " NP
    chain     := [ "there is " ] CLAUSE(0,1) { " and " CLAUSE(i,i+1) }
    CLAUSE(i,j) := NP_i " " REL(r) " " NP_j  |  NP_j " " REL(inverse(r)) " " NP_i
    NP        := "a " SIZE " " COLOUR " " SHAPE
    REL(left)  := "to the left of"  | "left of"
    REL(right) := "to the right of" | "right of"
    REL(above) := "above" | "on top of"
    REL(below) := "below" | "under"
    POS(left) := "on the left"     POS(right)  := "on the right"
    POS(top)  := "at the top"      POS(bottom) := "at the bottom"
    POS(center) := "in the middle"

``r`` is the scene's relation (object i is ``r`` of object i+1) and ``inverse`` swaps
left↔right and above↔below. Two-object scenes have one clause, three-object scenes two
(joined with " and "). :func:`phrasings` lists every caption the grammar yields for a scene
(3 for one object, 8 for two, 32 for three); :func:`caption` picks one.

Layout (normalised coordinates, origin top-left, y down)
--------------------------------------------------------
``n`` objects in a relation chain sit in ``n`` equal cells along the relation's axis (left
to right for ``left``, right to left for ``right``, top to bottom for ``above``, bottom to
top for ``below``), each entirely inside its own cell; across the axis their centres stay
within 0.5 ± 0.06. Hence along-axis centre distance ≥ 0.24 > any across-axis distance (≤ 0.12):
the relation is the sign of the larger centre difference. A single object at ``left``
has its centre at x ≤ 0.3 (mirrored for right/top/bottom, y ±0.06 across) and at ``center``
within 0.5 ± 0.05 on both axes.

Determinism: item ``i`` of a split is a pure function of ``(seed, split, i)`` (a string-seeded
``random.Random``, stable across runs and platforms). The caption of a training item may be
re-drawn per access: index the dataset with ``(i, access_seed)``.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from lverse.data.images import crop_views, pil_to_tensor, split_key

# --- vocabulary ---------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Hues about 60° apart at high saturation; pairwise RGB distance ≥ 120, and ≥ 200 from the
# white background, so nearest-colour classification of a pixel is robust.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 210, 20),
    "purple": (160, 40, 200),
    "cyan": (20, 200, 210),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Bounding-box side as a fraction of the canvas side. 0.30 still fits a third of the canvas
# (three-object tier) with a margin.
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
INVERSE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
REL_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "on top of"),
    "below": ("below", "under"),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POS_WORDS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

_ACROSS_JITTER = 0.06  # max distance of a centre from 0.5 across the relation axis
_CENTER_JITTER = 0.05
_MARGIN = 0.03  # preferred gap between an object and its cell border
_SUPERSAMPLE = 4  # draw at 4× and box-filter down: smooth edges, exactly flat interiors


# --- scene description ----------------------------------------------------------------------
@dataclass
class ShapeObject:
    """One object: attributes plus its bounding-box centre ``(x, y)`` in [0, 1] (y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def extent(self) -> float:
        """Bounding-box side as a fraction of the canvas side."""
        return SIZES[self.size]

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def noun_phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    """A whole image. ``relation`` (≥2 objects): ``objects[i]`` is ``relation`` of
    ``objects[i+1]``. ``position`` (1 object): coarse position of the only object."""

    objects: list[ShapeObject]
    relation: str | None = None
    position: str | None = None
    background: tuple[int, int, int] = field(default=BACKGROUND)

    def __post_init__(self) -> None:
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; valid: {SHAPES}")
            if o.colour not in COLOURS:
                raise ValueError(f"unknown colour {o.colour!r}; valid: {tuple(COLOURS)}")
            if o.size not in SIZES:
                raise ValueError(f"unknown size {o.size!r}; valid: {tuple(SIZES)}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if len(self.objects) == 1:
            if self.position not in POSITIONS:
                raise ValueError(f"one-object scene needs position in {POSITIONS}, got {self.position!r}")
        elif self.relation not in RELATIONS:
            raise ValueError(f"multi-object scene needs relation in {RELATIONS}, got {self.relation!r}")

    @property
    def heldout(self) -> bool:
        """True when any object is a held-out colour–shape pair."""
        return any(o.pair in HELDOUT_PAIRS for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (lists, strings, floats only)."""
        return {
            "objects": [asdict(o) for o in self.objects],
            "relation": self.relation,
            "position": self.position,
            "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(
            objects=[ShapeObject(**o) for o in d["objects"]],
            relation=d.get("relation"),
            position=d.get("position"),
            background=tuple(d.get("background", BACKGROUND)),  # type: ignore[arg-type]
        )


# --- sampling ---------------------------------------------------------------------------------
def _cell_range(lo: float, hi: float, half: float) -> tuple[float, float]:
    """Range of centres keeping an object of half-extent ``half`` inside [lo, hi]."""
    slack = (hi - lo) - 2 * half
    if slack < 0:
        raise ValueError(f"object of extent {2 * half} does not fit a cell of {hi - lo}")
    m = min(_MARGIN, slack / 2)
    return lo + half + m, hi - half - m


def sample_scene(
    rng: random.Random,
    max_objects: int = 2,
    min_objects: int = 1,
    pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
) -> Scene:
    """Draw a random scene; objects' (colour, shape) come from ``pairs``.

    All objects in a scene differ in at least one attribute, so a caption always names
    distinguishable things.
    """
    if not 1 <= min_objects <= max_objects <= 3:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
    n = rng.randint(min_objects, max_objects)
    attrs: list[tuple[str, str, str]] = []
    while len(attrs) < n:
        colour, shape = pairs[rng.randrange(len(pairs))]
        size = rng.choice(tuple(SIZES))
        if (shape, colour, size) not in attrs:
            attrs.append((shape, colour, size))

    def r4(v: float) -> float:  # short, exactly reproducible floats in the JSON
        return round(v, 4)

    if n == 1:
        shape, colour, size = attrs[0]
        half = SIZES[size] / 2
        position = rng.choice(POSITIONS)
        if position == "center":
            x = 0.5 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER)
            y = 0.5 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER)
        else:
            lo, _ = _cell_range(0.0, 1.0, half)
            along = rng.uniform(lo, 0.3)
            if position in ("right", "bottom"):
                along = 1.0 - along
            across = 0.5 + rng.uniform(-_ACROSS_JITTER, _ACROSS_JITTER)
            x, y = (along, across) if position in ("left", "right") else (across, along)
        return Scene([ShapeObject(shape, colour, size, r4(x), r4(y))], position=position)

    relation = rng.choice(RELATIONS)
    objects = []
    for i, (shape, colour, size) in enumerate(attrs):
        cell = i if relation in ("left", "above") else n - 1 - i
        lo, hi = _cell_range(cell / n, (cell + 1) / n, SIZES[size] / 2)
        along = rng.uniform(lo, hi)
        across = 0.5 + rng.uniform(-_ACROSS_JITTER, _ACROSS_JITTER)
        x, y = (along, across) if relation in ("left", "right") else (across, along)
        objects.append(ShapeObject(shape, colour, size, r4(x), r4(y)))
    return Scene(objects, relation=relation)


# --- captions -----------------------------------------------------------------------------------
def _clauses(a: ShapeObject, b: ShapeObject, relation: str) -> list[str]:
    out = [f"{a.noun_phrase()} {w} {b.noun_phrase()}" for w in REL_WORDS[relation]]
    out += [f"{b.noun_phrase()} {w} {a.noun_phrase()}" for w in REL_WORDS[INVERSE[relation]]]
    return out


def phrasings(scene: Scene) -> list[str]:
    """Every caption the grammar (module docstring) produces for ``scene``, in a fixed order."""
    objs = scene.objects
    if len(objs) == 1:
        np_, pos = objs[0].noun_phrase(), POS_WORDS[scene.position]  # type: ignore[index]
        return [f"{np_} {pos}", f"there is {np_} {pos}", f"{pos} there is {np_}"]
    assert scene.relation is not None
    bodies = [""]
    for i in range(len(objs) - 1):
        joiner = "" if i == 0 else " and "
        bodies = [b + joiner + c for b in bodies for c in _clauses(objs[i], objs[i + 1], scene.relation)]
    return bodies + ["there is " + b for b in bodies]


def caption(scene: Scene, rng: random.Random | int | None = None) -> str:
    """One caption drawn uniformly from :func:`phrasings` (``rng`` a Random or an int seed)."""
    options = phrasings(scene)
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    return options[rng.randrange(len(options))]


# --- rendering ----------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    h = s / 2
    if shape == "triangle":  # apex up, base = height = s; the box centre lies inside
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    return None


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution``² pixels.

    Drawn at 4× and box-filtered down: edges are antialiased while every pixel fully inside
    an object keeps exactly the palette colour.
    """
    big = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, s = o.x * big, o.y * big, o.extent * big
        colour = COLOURS[o.colour]
        poly = _polygon(o.shape, cx, cy, s)
        # PIL boxes are inclusive of the far edge, hence the -1.
        box = (cx - s / 2, cy - s / 2, cx + s / 2 - 1, cy + s / 2 - 1)
        if poly is not None:
            draw.polygon(poly, fill=colour)
        elif o.shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


# --- dataset ----------------------------------------------------------------------------------
SPLITS = ("train", "test")


class ShapesDataset(Dataset):
    """``size`` procedural scenes of one split, item ``i`` fixed by ``(seed, split, i)``.

    ``ds[i]`` or ``ds[(i, access_seed)]`` →
    ``{"image": 3×R×R in [-1,1], "caption": str, "scene": dict, "index": int, "heldout": bool}``.
    Without an access seed the caption is fixed per item; with one it is re-drawn from
    ``(seed, split, i, access_seed)`` — pass a per-epoch seed to vary phrasing reproducibly.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        seed: int = 0,
        resolution: int = 64,
        max_objects: int = 2,
        holdout: bool = True,
        min_objects: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown Shapes split {split!r}; valid splits: {SPLITS}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if resolution < 8:
            raise ValueError(f"resolution {resolution} is too small to draw shapes (need >= 8)")
        if not 1 <= min_objects <= max_objects <= 3:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
        self.split, self.size, self.seed = split, size, seed
        self.resolution, self.max_objects, self.min_objects = resolution, max_objects, min_objects
        self.holdout = holdout
        # Held-out pairs are removed from training only; test draws from every pair.
        self.pairs = TRAIN_PAIRS if (holdout and split == "train") else ALL_PAIRS

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"Shapes {self.split} index {index} out of range [0, {self.size})")
        return index

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` without rendering it (cheap)."""
        index = self._check(index)
        # The split name is part of the seed string: train and test are independent streams.
        rng = random.Random(f"lverse-shapes/{self.seed}/{self.split}/{index}")
        return sample_scene(rng, self.max_objects, self.min_objects, self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, access_seed = split_key(key)
        index = self._check(index)
        scene = self.scene(index)
        tag = "fixed" if access_seed is None else f"access/{access_seed}"
        text = caption(scene, random.Random(f"lverse-shapes-caption/{self.seed}/{self.split}/{index}/{tag}"))
        return {
            "image": pil_to_tensor(render(scene, self.resolution)),
            "caption": text,
            "scene": scene.to_dict(),
            "index": index,
            "heldout": scene.heldout,
        }


class ShapesCaptionDataset(Dataset):
    """The Shapes dataset as a caption corpus: every phrasing of the scene is a caption.

    Items add ``"scene"`` (the structured description) and ``"heldout"`` to the common keys
    (:mod:`lverse.data.captions`). ``crops=K > 1``: K views of the rendered scene, the centre
    (the whole image) then K-1 random resized crops, as for photographs.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        seed: int = 0,
        resolution: int = 64,
        max_objects: int = 2,
        holdout: bool = True,
        load_images: bool = True,
        crops: int = 1,
    ) -> None:
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        self.shapes = ShapesDataset(split, size, seed, resolution, max_objects, holdout)
        self.load_images, self.crops = load_images, crops

    def __len__(self) -> int:
        return len(self.shapes)

    def skip_summary(self) -> dict[str, int]:
        return {}  # procedural: nothing can be bad

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key)
        index = self.shapes._check(index)
        scene = self.shapes.scene(index)
        name = f"shapes/{self.shapes.split}/{index}"
        image = None
        if self.load_images:
            picture = render(scene, self.shapes.resolution)
            image = (pil_to_tensor(picture) if self.crops == 1 else
                     crop_views(picture, self.shapes.resolution, self.crops, self.shapes.seed, name))
        return {
            "image": image,
            "captions": phrasings(scene),
            "key": name,
            "id": name,
            "scene": scene.to_dict(),
            "heldout": scene.heldout,
        }
