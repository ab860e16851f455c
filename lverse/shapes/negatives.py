"""The tiny Shapes CLIP's data: its config, hard negatives (scenes with one thing changed) and
the batches that carry them (a true caption per image, perturbed captions, optionally
perturbed pictures).

Scenes are compared by :func:`lverse.shapes.parse.scene_key` (equal exactly when every caption
of one describes the other), so a "negative" that is the same scene in other words never occurs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch
from torch.utils.data import Dataset

from lverse.config import ConfigError
from lverse.data.images import pil_to_tensor
from lverse.shapes.parse import scene_key
from lverse.shapes.scenes import (
    COLOURS,
    INVERSE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    phrasings,
    render,
)

# Perturbation kinds for hard negatives (training) and the hard-negative test (evaluation):
# colour / shape / size of one object; "relation": the chain's direction flipped with the
# objects kept in order ("A above B" -> "A below B", the same words as "B above A": only word
# order tells them apart); "axis": the relation moved to the other axis ("A left of B");
# "position" (one-object scenes) another position; "swap": one attribute exchanged between two
# neighbouring objects (a binding error: "red circle, blue square" -> "blue circle, red square").
NEGATIVE_KINDS: tuple[str, ...] = ("colour", "shape", "size", "relation", "axis", "position", "swap")
# Hard negative *images* (``data.hard_negative_images``) re-render the scene with one object's
# attribute changed, at the same coordinates: a minimal pair of pictures. Only kinds that change
# what is drawn qualify; a flipped relation with unchanged coordinates would draw the same image.
IMAGE_NEGATIVE_KINDS: tuple[str, ...] = ("colour", "shape", "size", "swap")


@dataclass
class ClipDataConfig:
    """Shapes train/test splits (see :mod:`lverse.shapes.scenes`) and the hard negatives."""

    resolution: int = 64
    train_size: int = 50_000      # distinct training scenes; batches draw from them at random
    seed: int = 0
    max_objects: int = 2
    min_objects: int = 1
    holdout: bool = True          # keep the held-out colour–shape pairs out of training
    hard_negatives: int = 3       # perturbed captions per image, extra text negatives (0 = off)
    # How often each kind of perturbation is picked (relative; 0 = never). Colour and size are
    # learnt almost at once; shape, relation and swap (binding) need the extra negatives.
    negative_weights: dict[str, float] = field(default_factory=lambda: {
        "colour": 0.5, "size": 0.5, "position": 1.0, "axis": 0.5, "shape": 2.0, "relation": 3.0, "swap": 2.0})
    # Perturbed scenes rendered as extra images per image (0 = off): each caption must then pick
    # its own image out of near-identical pictures (``hard_negative_loss`` with the roles of
    # images and captions swapped). That is the text→image reranker's task: the in-batch softmax
    # only ever compares a caption with unrelated scenes.
    hard_negative_images: int = 0
    image_negative_weights: dict[str, float] = field(default_factory=lambda: {
        "colour": 1.0, "shape": 2.0, "size": 1.0, "swap": 2.0})

    def __post_init__(self) -> None:
        if self.hard_negative_images < 0:
            raise ConfigError(f"data.hard_negative_images must be >= 0, got {self.hard_negative_images}")
        bad_img = sorted(set(self.image_negative_weights) - set(IMAGE_NEGATIVE_KINDS))
        if bad_img:
            raise ConfigError(f"data.image_negative_weights: unknown kind(s) {bad_img}; valid: {list(IMAGE_NEGATIVE_KINDS)} "
                              "(a relation or position change at the same coordinates would draw the same image)")
        if any(v < 0 for v in self.image_negative_weights.values()):
            raise ConfigError(f"data.image_negative_weights must be >= 0, got {self.image_negative_weights}")
        bad = sorted(set(self.negative_weights) - set(NEGATIVE_KINDS))
        if bad:
            raise ConfigError(f"data.negative_weights: unknown kind(s) {bad}; valid: {list(NEGATIVE_KINDS)}")
        if any(v < 0 for v in self.negative_weights.values()):
            raise ConfigError(f"data.negative_weights must be >= 0, got {self.negative_weights}")


def _replace(scene: Scene, i: int, **attrs: str) -> Scene:
    objs = [ShapeObject(**{**o.__dict__}) for o in scene.objects]
    for k, v in attrs.items():
        setattr(objs[i], k, v)
    return Scene(objs, relation=scene.relation, position=scene.position)


def perturb(
    scene: Scene, kind: str, rng: random.Random, pairs: Collection[tuple[str, str]] | None = None
) -> Scene | None:
    """``scene`` with one thing changed (``kind`` in :data:`NEGATIVE_KINDS`), or None when the
    kind does not apply (e.g. ``swap`` on one object) or only yields the same scene.

    ``pairs``: the (colour, shape) pairs the result may contain (default: any). Training passes
    its split's pairs: a held-out pair must not reach the text tower even as a negative, or
    the model learns that "blue circle" is always wrong, the opposite of generalising to it.
    """
    n = len(scene.objects)
    ok: Callable[[str, str], bool] = (lambda c, sh: True) if pairs is None else (lambda c, sh: (c, sh) in pairs)
    for _ in range(8):  # a few tries: some random choices give back an equivalent scene
        i = rng.randrange(n)
        o = scene.objects[i]
        if kind == "colour":
            options = [c for c in COLOURS if c != o.colour and ok(c, o.shape)]
            if not options:
                continue
            new = _replace(scene, i, colour=rng.choice(options))
        elif kind == "shape":
            options = [sh for sh in SHAPES if sh != o.shape and ok(o.colour, sh)]
            if not options:
                continue
            new = _replace(scene, i, shape=rng.choice(options))
        elif kind == "size":
            new = _replace(scene, i, size=rng.choice([s for s in SIZES if s != o.size]))
        elif kind in ("relation", "axis"):
            if n < 2:
                return None
            rel = scene.relation
            assert rel is not None
            choices = [INVERSE[rel]] if kind == "relation" else [r for r in RELATIONS if r not in (rel, INVERSE[rel])]
            new = Scene([ShapeObject(**o.__dict__) for o in scene.objects], relation=rng.choice(choices))
        elif kind == "position":
            if n != 1:
                return None
            new = Scene([ShapeObject(**o.__dict__)], position=rng.choice([p for p in POSITIONS if p != scene.position]))
        elif kind == "swap":
            if n < 2:
                return None
            j = rng.randrange(n - 1)
            a, b = scene.objects[j], scene.objects[j + 1]
            attrs = [k for k in ("colour", "shape", "size") if getattr(a, k) != getattr(b, k)]
            if not attrs:
                return None
            k = rng.choice(attrs)
            new = _replace(_replace(scene, j, **{k: getattr(b, k)}), j + 1, **{k: getattr(a, k)})
        else:
            raise ValueError(f"unknown perturbation kind {kind!r}; valid: {NEGATIVE_KINDS}")
        if scene_key(new) != scene_key(scene) and all(ok(ob.colour, ob.shape) for ob in new.objects):
            return new
    return None


def applicable_kinds(scene: Scene) -> list[str]:
    if len(scene.objects) == 1:
        return ["colour", "shape", "size", "position"]
    return ["colour", "shape", "size", "relation", "axis", "swap"]


def hard_negatives(
    scene: Scene,
    n: int,
    rng: random.Random,
    weights: dict[str, float] | None = None,
    pairs: Collection[tuple[str, str]] | None = None,
) -> list[Scene]:
    """``n`` perturbed scenes, all distinct from ``scene`` and from each other, containing only
    colour–shape ``pairs`` (default: any; see :func:`perturb`).

    Kinds are taken in a random order, drawn without replacement with probability
    proportional to ``weights`` (default: all 1; weight 0 = never), then cycled.
    """
    w = weights or {}
    kinds = [k for k in applicable_kinds(scene) if w.get(k, 1.0) > 0]
    # Weighted order without replacement (Efraimidis-Spirakis keys u^(1/w)).
    kinds.sort(key=lambda k: rng.random() ** (1.0 / w.get(k, 1.0)), reverse=True)
    out: list[Scene] = []
    keys = {scene_key(scene)}
    for t in range(4 * n if kinds else 0):
        if len(out) == n:
            break
        neg = perturb(scene, kinds[t % len(kinds)], rng, pairs)
        if neg is not None and scene_key(neg) not in keys:
            keys.add(scene_key(neg))
            out.append(neg)
    return out



# ------------------------------------------------------------------------------------------
# Items and batches
# ------------------------------------------------------------------------------------------


@dataclass
class ClipItem:
    """One training image with its captions: what :func:`collate` stacks into a :class:`ClipBatch`."""

    image: torch.Tensor                       # (3, R, R) in [-1, 1]
    caption: str                              # one phrasing of the scene
    key: tuple                                # its scene key
    paraphrase: str | None                    # another phrasing (text_text_loss), or None
    negatives: list[tuple[str, tuple]]        # perturbed scenes: (one phrasing, scene key)
    negative_images: list[torch.Tensor]       # perturbed scenes drawn at the same coordinates


@dataclass
class ClipBatch:
    images: torch.Tensor                      # (B, 3, R, R) in [-1, 1]
    captions: list[str]                       # B true captions, then B*K negatives (K varies <= hard_negatives)
    text_keys: list[tuple]                    # scene key of every caption
    image_keys: list[tuple]                   # scene key of every image
    negative_owner: list[int]                 # for each negative caption, its image's index
    paraphrases: list[str]                    # per image another phrasing of its scene (may be empty)
    negative_images: torch.Tensor | None = None  # (M, 3, R, R) perturbed scenes, drawn at the same coordinates
    negative_image_owner: list[int] = field(default_factory=list)  # for each negative image, its caption's index
    tokens: torch.Tensor | None = None        # captions then paraphrases, tokenized (filled by the task's collate)


def make_item(
    ds: ShapesDataset,
    index: int,
    hard_neg: int,
    rng: random.Random,
    weights: dict[str, float] | None = None,
    paraphrase: bool = False,
    neg_images: int = 0,
    image_weights: dict[str, float] | None = None,
) -> ClipItem:
    """Render item ``index``; one random phrasing, plus ``hard_neg`` perturbed captions (kinds
    weighted by ``weights``, see :func:`hard_negatives`) and, with ``paraphrase``, a second
    phrasing (a different one where the grammar has one) for the paraphrase loss.
    ``neg_images`` perturbed scenes are rendered as hard negative images (kinds of
    :data:`IMAGE_NEGATIVE_KINDS`, weighted by ``image_weights``).
    Negatives use only the colour–shape pairs of ``ds``'s split (held-out pairs stay unseen)."""
    scene = ds.scene(index)
    options = phrasings(scene)
    caption = rng.choice(options)
    para = None
    if paraphrase:
        para = rng.choice([o for o in options if o != caption] or options)
    negatives = [(rng.choice(phrasings(neg)), scene_key(neg))
                 for neg in (hard_negatives(scene, hard_neg, rng, weights, ds.pairs) if hard_neg > 0 else [])]
    neg_imgs = []
    if neg_images > 0:
        # Every kind named, the others at weight 0 (hard_negatives treats a missing kind as weight 1).
        given = image_weights if image_weights is not None else dict.fromkeys(IMAGE_NEGATIVE_KINDS, 1.0)
        iw = {k: given.get(k, 0.0) if k in IMAGE_NEGATIVE_KINDS else 0.0 for k in NEGATIVE_KINDS}
        neg_imgs = [pil_to_tensor(render(neg, ds.resolution)) for neg in hard_negatives(scene, neg_images, rng, iw, ds.pairs)]
    return ClipItem(pil_to_tensor(render(scene, ds.resolution)), caption, scene_key(scene), para, negatives, neg_imgs)


def collate(items: Sequence[ClipItem]) -> ClipBatch:
    """Images stacked; the true captions first, then every item's negatives, each tagged with its owner."""
    captions = [it.caption for it in items]
    keys = [it.key for it in items]
    neg_caps = [c for it in items for c, _ in it.negatives]
    neg_keys = [k for it in items for _, k in it.negatives]
    owner = [b for b, it in enumerate(items) for _ in it.negatives]
    neg_imgs = [img for it in items for img in it.negative_images]
    neg_img_owner = [b for b, it in enumerate(items) for _ in it.negative_images]
    return ClipBatch(torch.stack([it.image for it in items]), captions + neg_caps, keys + neg_keys, keys, owner,
                     [it.paraphrase for it in items if it.paraphrase is not None],
                     torch.stack(neg_imgs) if neg_imgs else None, neg_img_owner)


def make_batch(
    ds: ShapesDataset,
    indices: Sequence[int],
    hard_neg: int,
    rng: random.Random,
    weights: dict[str, float] | None = None,
    paraphrase: bool = False,
    neg_images: int = 0,
    image_weights: dict[str, float] | None = None,
) -> ClipBatch:
    """:func:`make_item` for each of ``indices`` (one ``rng`` for all), collated."""
    return collate([make_item(ds, i, hard_neg, rng, weights, paraphrase, neg_images, image_weights) for i in indices])


class ClipTrainData(Dataset):
    """The training items: ``data[(index, seed)]`` is :func:`make_item` of Shapes scene ``index``
    with its random choices (phrasing, negatives) drawn from ``seed``, which the trainer's
    sampler derives from the epoch and position: any worker, or a resumed run, draws the same."""

    def __init__(self, cfg: ClipDataConfig, paraphrase: bool) -> None:
        self.cfg, self.paraphrase = cfg, paraphrase
        self.ds = ShapesDataset("train", size=cfg.train_size, seed=cfg.seed, resolution=cfg.resolution,
                                max_objects=cfg.max_objects, holdout=cfg.holdout, min_objects=cfg.min_objects)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> ClipItem:
        index, seed = key
        c = self.cfg
        return make_item(self.ds, index, c.hard_negatives, random.Random(seed), c.negative_weights, self.paraphrase,
                         c.hard_negative_images, c.image_negative_weights)
