"""A tiny CLIP, trained contrastively on Shapes, built from open_clip's own model classes.

No pretrained CLIP can be downloaded where lverse's Shapes demo runs, yet the CLIP reranker
(:class:`lverse.inference.rerank.ClipReranker`) should be exercised on a model that means something. So
we train one: ``open_clip.CLIP(embed_dim, vision_cfg, text_cfg)`` with a small ViT on 64×64
images and a small causal text transformer, from a config dict only (no ``pretrained``, no
download, ever).

Choices (and why)
-----------------
* **Tokenizer**: open_clip's CLIP BPE (49,408 tokens, ``SimpleTokenizer``) at the model's
  ``context_length``. That is what ``ClipReranker`` uses by default, so any caption BiART
  writes can be scored with no tokenizer file to ship. Shapes uses only ~34 of those rows, so
  training runs on just those (:class:`CompactVocab`) and the saved model gets the full table
  back, the other rows at their random init (what training them would leave, less decay).
* **Image normalisation**: the model sees Shapes images in [-1, 1] exactly as the dataset
  gives them. ``clip.json`` stores ``preprocess_cfg = {"mean": [0.5]*3, "std": [0.5]*3}``;
  the reranker maps [-1, 1] to [0, 1] and then applies ``(x - mean) / std``, which gives the
  same [-1, 1] back. Images are 64×64 (``vision.image_size``), so no resizing happens either.
* **Hard negatives** (NegCLIP-style): in-batch negatives alone teach "which objects are
  there", not "which colour goes with which shape" or "which one is on top". Each image adds
  ``data.hard_negatives`` captions of *perturbed* scenes (:data:`NEGATIVE_KINDS`) as extra
  text negatives, in the batch softmax and in a softmax over its own negatives only
  (:func:`hard_negative_loss`). Captions are drawn from every phrasing the grammar allows, so
  "A above B" and "B below A" (the same scene) are both positives, "A below B" a negative.
  Negatives never contain a held-out colour–shape pair (see :func:`perturb`).
* **Hard negative images** (``data.hard_negative_images``, opt-in, off in the shipped config):
  the scene redrawn at the same coordinates with one attribute changed, so that each caption
  must pick its own picture out of near-copies (the text→image reranker's task;
  :func:`hard_negative_loss` with the roles swapped). Measured: the shipped CLIP already wins
  99.1% of those pairs without them (``hardneg_image/all``), and as a reranker they gained nothing.
* **Paraphrase loss** (:func:`text_text_loss`): without it the direction of a relation is not
  learnt at all in this budget (measured: 0.50-0.53 on flipped relations, chance); the text
  tower settles on a bag of words and the image tower, given no direction in its targets,
  never learns which object is on top. Contrasting each caption with a paraphrase against the
  hard negatives gives the text tower that structure directly (0.91 after 600 steps).
* **False negatives**: captions that describe another image of the batch equally well (common
  for one-object scenes) are masked out of every softmax, found by a canonical scene key
  (:func:`scene_key`).
* **Speed**: the text tower is causal and pools at the end-of-text token, so everything after
  the longest caption's end token cannot change the embedding; :func:`encode_text` trims the
  batch to that length (Shapes captions are <= 18 tokens of a 32-token context).
  ``train.time_limit_minutes`` caps the wall time: the cosine schedule runs on whichever of
  steps and time runs out first, so a slow machine stops on time with the schedule finished.

Files: ``RUN_DIR/clip.safetensors`` + ``clip.json`` (``{"kind": "clip", "model_name":
"shapes-tiny-clip", "model_cfg": {...open_clip config...}, "preprocess_cfg": {...}}``, the
format :func:`lverse.inference.pipeline.load_clip` reads), ``config.yaml``, ``metrics.json``.

CLI: ``lverse train-clip --config configs/shapes_clip.yaml [train.max_steps=100 ...]``.
"""
from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lverse.config import ConfigError, dump_yaml
from lverse.data.images import pil_to_tensor
from lverse.files import atomic_write_text
from lverse.inference import clip as clipio
from lverse.inference.clip import CLIP_FILE, load_clip  # noqa: F401  (the one reader and writer of clip files)
from lverse.shapes.scenes import (
    COLOURS,
    INVERSE,
    POS_WORDS,
    POSITIONS,
    REL_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    phrasings,
    render,
)

MODEL_NAME = "shapes-tiny-clip"
CLIP_BPE_VOCAB = 49408  # ids of open_clip's CLIP BPE tokenizer (incl. start/end of text)
# [-1, 1] in, [-1, 1] to the model: ClipReranker does (x01 - mean) / std with these.
IDENTITY_PREPROCESS: dict[str, Any] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

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


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@dataclass
class ClipModelConfig:
    """Sizes of the open_clip ``CLIP``: a ViT image tower and a causal text transformer."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8           # 16-px patches on 64-px Shapes do not learn shapes (measured)
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32   # heads = width // head_width
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 3
    context_length: int = 32      # Shapes captions take <= 18 tokens (two objects), 30 (three)
    vocab_size: int = CLIP_BPE_VOCAB
    mlp_ratio: float = 4.0
    compact_vocab: bool = True    # train only the BPE rows Shapes uses (see CompactVocab); saved full

    def open_clip_cfg(self) -> dict[str, Any]:
        """open_clip's model config dict (``open_clip.CLIP(**cfg)``); JSON-able."""
        if self.vocab_size < CLIP_BPE_VOCAB:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size}: the CLIP BPE tokenizer this trainer (and "
                f"ClipReranker) uses needs {CLIP_BPE_VOCAB} token ids"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}")
        if self.vision_width % self.vision_head_width:
            raise ConfigError(
                f"model.vision_width={self.vision_width} is not a multiple of model.vision_head_width={self.vision_head_width}"
            )
        if self.text_width % self.text_heads:
            raise ConfigError(f"model.text_width={self.text_width} is not a multiple of model.text_heads={self.text_heads}")
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "mlp_ratio": self.mlp_ratio,
            },
        }


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
    # its own image out of near-identical pictures (:func:`hard_negative_loss` with the roles of
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


@dataclass
class ClipOptimConfig:
    name: str = "shapes_clip"
    run_dir: str = ""             # "" -> runs/<name>
    seed: int = 0
    batch_size: int = 128
    max_steps: int = 600
    time_limit_minutes: float = 0.0  # > 0: stop (and finish the cosine) at this wall time if it comes first
    lr: float = 2e-3
    min_lr_ratio: float = 0.05    # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.1     # on weight matrices only (not norms, biases, embeddings, logit scale)
    grad_clip: float = 1.0
    hard_negative_loss: float = 1.0  # weight of hard_negative_loss (image vs its own negatives); 0 = off
    hard_negative_image_loss: float = 1.0  # the same, caption vs its image and data.hard_negative_images perturbed ones
    text_loss: float = 1.0        # weight of text_text_loss (paraphrase vs negatives); 0 = off
    init_logit_scale: float = 1 / 0.07  # exp(logit_scale) at the start (CLIP's 1/temperature)
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    threads: int = 0              # torch intra-op threads; 0 = leave PyTorch's default
    log_every: int = 25
    progress: bool = True


@dataclass
class ClipEvalConfig:
    test_size: int = 500          # items of the Shapes test split (held-out pairs included)
    negatives_per_kind: int = 2   # perturbed captions per kind and image
    batch_size: int = 256


@dataclass
class ClipTrainConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    train: ClipOptimConfig = field(default_factory=ClipOptimConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)


# ------------------------------------------------------------------------------------------
# Model, tokenizer, files
# ------------------------------------------------------------------------------------------


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """An untrained ``open_clip.CLIP`` from its config dict (nothing is downloaded); a config
    that does not build one is a :class:`ConfigError`."""
    try:
        return clipio.build_open_clip(model_cfg)
    except TypeError as e:
        raise ConfigError(f"model_cfg does not build an open_clip CLIP ({e}): {model_cfg}") from None


@functools.lru_cache(maxsize=4)  # reading the BPE merges takes about a second; the tokenizer is pure
def build_tokenizer(context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer (the one ClipReranker uses by default)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CachedTokenizer:
    """Memoises the BPE per caption: Shapes repeats its phrases over and over."""

    def __init__(self, tokenizer: Callable[[Sequence[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def shapes_words() -> list[str]:
    """Every word the Shapes caption grammar (:mod:`lverse.shapes.scenes`) can write."""
    phrases = [*COLOURS, *SHAPES, *SIZES, *(w for ws in REL_WORDS.values() for w in ws), *POS_WORDS.values(),
               "a", "there is", "and"]
    return sorted({w for p in phrases for w in p.split()})


class CompactVocab:
    """Train on the few dozen CLIP BPE ids Shapes captions use; save the full 49,408-row table.

    With the full table every step would zero, fill and Adam-update ~49k embedding rows of
    which Shapes touches 34: at the sizes here that is ~90% of the parameters and ~10% of the
    step time (measured, noisily). So training runs a model whose token embedding has one row
    per id in :attr:`ids` (sorted, so the end-of-text id is still the largest, which argmax
    pooling relies on), and :meth:`expand` writes those rows into a full-vocabulary model whose
    other rows keep their random init: exactly where training the full table would leave them
    (they get no gradient, and embeddings are not weight-decayed).
    """

    def __init__(self, ids: Sequence[int], full_size: int) -> None:
        self.ids = torch.tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)
        if int(self.ids.max()) >= full_size:
            raise ValueError(f"token id {int(self.ids.max())} does not fit a vocabulary of {full_size}")
        self.full_size = full_size
        self.lut = torch.full((full_size,), -1, dtype=torch.long)
        self.lut[self.ids] = torch.arange(len(self.ids))

    @classmethod
    def for_shapes(cls, tokenizer: Callable[[Sequence[str]], torch.Tensor], full_size: int) -> "CompactVocab":
        # The CLIP BPE splits on whitespace first, so a word's ids do not depend on its neighbours.
        ids = tokenizer(shapes_words()).flatten().tolist()  # one word per row: no truncation
        return cls([0, *ids], full_size)  # 0: the padding id

    def __len__(self) -> int:
        return len(self.ids)

    def compact(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.lut[tokens]
        if bool((out < 0).any()):
            bad = sorted(set(tokens[out < 0].tolist()))
            raise ValueError(f"token ids {bad[:10]} are not in the compact Shapes vocabulary (a caption outside the "
                             "Shapes grammar?); set model.compact_vocab=false to train the full table")
        return out

    def expand(self, compact_model: nn.Module, full_model: nn.Module) -> nn.Module:
        """Copy ``compact_model`` into ``full_model`` (same config but the vocabulary size)."""
        state = compact_model.state_dict()
        table = full_model.token_embedding.weight.detach().clone()
        table[self.ids] = state.pop("token_embedding.weight").to(table.dtype)
        state["token_embedding.weight"] = table
        full_model.load_state_dict(state, strict=True)
        return full_model


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, computed on the tokens up to the longest caption's end.

    The text tower is causal and (``pool_type='argmax'``) reads the end-of-text position, the
    largest id of each row: no position after it can change the result, so dropping the
    all-padding tail gives the same embedding for less work. Falls back to ``encode_text`` for
    any other pooling.
    """
    if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(model.text_projection, torch.Tensor):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :length]
    x = model.token_embedding(t) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    return x @ model.text_projection


def save_clip(path: str | Path, model: nn.Module, model_cfg: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``clip.safetensors`` + ``clip.json`` (``path``: the weights file or a directory) with
    what a reader needs to use a Shapes CLIP: its tokenizer and the image range it expects."""
    notes = {"tokenizer": "open_clip SimpleTokenizer (CLIP BPE)", "image_range": [-1, 1], **(extra or {})}
    return clipio.save_clip(path, model, model_cfg, MODEL_NAME, dict(IDENTITY_PREPROCESS), notes)


# ------------------------------------------------------------------------------------------
# Scenes: canonical keys and perturbations (hard negatives)
# ------------------------------------------------------------------------------------------


def scene_key(scene: Scene) -> tuple:
    """A key equal for two scenes iff every caption of one describes the other.

    Captions name attributes, the relation and the one-object position, not coordinates; a
    chain "A right of B" is the chain "B left of A", so chains are stored left/above-wards.
    """
    objs = [(o.size, o.colour, o.shape) for o in scene.objects]
    if len(objs) == 1:
        return (tuple(objs), scene.position)
    rel = scene.relation
    if rel in ("right", "below"):
        objs, rel = objs[::-1], INVERSE[rel]  # type: ignore[index]
    return (tuple(objs), rel)


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
# Batches and loss
# ------------------------------------------------------------------------------------------


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
    """Render ``indices``; one random phrasing each, plus ``hard_neg`` perturbed captions
    (kinds weighted by ``weights``, see :func:`hard_negatives`) and, with ``paraphrase``, a
    second phrasing (a different one where the grammar has one) for :func:`text_text_loss`.
    ``neg_images`` perturbed scenes per item are rendered as hard negative images (kinds of
    :data:`IMAGE_NEGATIVE_KINDS`, weighted by ``image_weights``).
    Negatives use only the colour–shape pairs of ``ds``'s split (held-out pairs stay unseen)."""
    images, caps, keys, neg_caps, neg_keys, owner, paras = [], [], [], [], [], [], []
    neg_imgs: list[torch.Tensor] = []
    neg_img_owner: list[int] = []
    # Every kind named, the others at weight 0 (hard_negatives treats a missing kind as weight 1).
    iw_given = image_weights if image_weights is not None else dict.fromkeys(IMAGE_NEGATIVE_KINDS, 1.0)
    iw = {k: iw_given.get(k, 0.0) if k in IMAGE_NEGATIVE_KINDS else 0.0 for k in NEGATIVE_KINDS}
    for b, i in enumerate(indices):
        scene = ds.scene(i)
        images.append(pil_to_tensor(render(scene, ds.resolution)))
        options = phrasings(scene)
        caps.append(rng.choice(options))
        keys.append(scene_key(scene))
        if paraphrase:
            others = [o for o in options if o != caps[-1]] or options
            paras.append(rng.choice(others))
        for neg in hard_negatives(scene, hard_neg, rng, weights, ds.pairs) if hard_neg > 0 else []:
            neg_caps.append(rng.choice(phrasings(neg)))
            neg_keys.append(scene_key(neg))
            owner.append(b)
        for neg in hard_negatives(scene, neg_images, rng, iw, ds.pairs) if neg_images > 0 else []:
            neg_imgs.append(pil_to_tensor(render(neg, ds.resolution)))
            neg_img_owner.append(b)
    return ClipBatch(torch.stack(images), caps + neg_caps, keys + neg_keys, keys, owner, paras,
                     torch.stack(neg_imgs) if neg_imgs else None, neg_img_owner)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: Sequence[tuple],
    text_keys: Sequence[tuple],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE (CLIP) with extra text negatives and false negatives masked.

    ``image_features`` (B, D) and ``text_features`` (T >= B, D), both unit norm; text ``i < B``
    is image ``i``'s caption, texts ``>= B`` are extra negatives (image→text direction only).
    A caption whose scene key equals image ``i``'s key, other than caption ``i``, describes
    image ``i`` just as well: it is dropped from image ``i``'s softmax (and the image from that
    caption's), instead of being pushed away.
    """
    B = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T  # (B, T)
    key_id: dict[tuple, int] = {}
    ik = torch.tensor([key_id.setdefault(k, len(key_id)) for k in image_keys])
    tk = torch.tensor([key_id.setdefault(k, len(key_id)) for k in text_keys])
    same = (ik[:, None] == tk[None, :]).to(logits.device)
    same[torch.arange(B), torch.arange(B)] = False
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(B, device=logits.device)
    i2t = F.cross_entropy(logits, target)
    t2i = F.cross_entropy(logits[:, :B].T, target)
    loss = (i2t + t2i) / 2
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean().item()
        logs = {"loss": loss.item(), "i2t": i2t.item(), "t2i": t2i.item(), "acc": acc}
    return loss, logs


def text_text_loss(
    text_features: torch.Tensor,
    para_features: torch.Tensor,
    logit_scale: torch.Tensor,
    text_keys: Sequence[tuple],
) -> torch.Tensor:
    """InfoNCE among captions: caption ``i`` must pick its paraphrase ``i`` out of every
    paraphrase and every hard negative of the batch (same-scene candidates masked).

    Why: "A above B" and "B below A" are the same scene while "A below B" is not, but the
    three hold the same words. Image–text training alone starts from a text tower that cannot
    tell them apart and an image tower that cannot tell which object is on top; each gives the
    other no gradient to learn direction from, and the easiest way to make paraphrases agree is
    to ignore word order altogether (a bag of words). Telling the text tower directly which
    captions mean the same scene breaks that deadlock; the image tower then learns direction
    from the (now different) text targets.

    ``text_features``: the B captions then the extra negatives (as in :func:`contrastive_loss`);
    ``para_features``: B paraphrases; ``text_keys``: scene keys of ``text_features``.
    """
    B = para_features.shape[0]
    anchors = text_features[:B]
    cands = torch.cat([para_features, text_features[B:]])
    cand_keys = list(text_keys[:B]) + list(text_keys[B:])
    logits = logit_scale * anchors @ cands.T
    key_id: dict[tuple, int] = {}
    ak = torch.tensor([key_id.setdefault(k, len(key_id)) for k in text_keys[:B]])
    ck = torch.tensor([key_id.setdefault(k, len(key_id)) for k in cand_keys])
    same = (ak[:, None] == ck[None, :]).to(logits.device)
    same[torch.arange(B), torch.arange(B)] = False
    target = torch.arange(B, device=logits.device)
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), target)


def hard_negative_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, owner: Sequence[int]
) -> torch.Tensor:
    """Cross-entropy of each image over its own caption and its own hard negatives only
    (or, called with the roles swapped, of each caption over its own image and its negative images).

    In the batch softmax a hard negative is one of hundreds of captions, and while the easy
    ones dominate, "A below B" gets little gradient; this term (a (1 + K)-way softmax per
    image) puts the ranking the benchmark asks for into the loss directly. Texts ``< B`` are
    the images' captions, text ``B + j`` is a negative of image ``owner[j]``.
    """
    B = image_features.shape[0]
    if not owner:
        return image_features.new_zeros(())
    slots: list[int] = []
    seen: dict[int, int] = {}
    for o in owner:
        slots.append(seen.get(o, 0))
        seen[o] = slots[-1] + 1
    idx = torch.tensor(owner, device=image_features.device)
    slot = torch.tensor(slots, device=image_features.device)
    pos = (image_features * text_features[:B]).sum(-1)
    neg = (image_features[idx] * text_features[B:]).sum(-1)
    table = pos.new_full((B, max(seen.values())), float("-inf"))
    table = table.index_put((idx, slot), neg)
    logits = logit_scale * torch.cat([pos[:, None], table], dim=1)
    return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=logits.device))


def _hard_negative_batch_acc(image_features: torch.Tensor, text_features: torch.Tensor, owner: Sequence[int]) -> float:
    """Fraction of hard negatives scored below their own image's true caption."""
    if not owner:
        return float("nan")
    B = image_features.shape[0]
    idx = torch.tensor(owner)
    pos = (image_features * text_features[:B]).sum(-1)[idx]
    neg = (image_features[idx] * text_features[B:]).sum(-1)
    return (pos > neg).float().mean().item()


# ------------------------------------------------------------------------------------------
# Evaluation: retrieval and hard negatives on the test split
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_clip(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    data: ClipDataConfig,
    ev: ClipEvalConfig,
) -> dict[str, float]:
    """Hard-negative and retrieval accuracy on ``ev.test_size`` items of the Shapes test split.

    * ``hardneg/<kind>``: over images, every phrasing of the true scene and ``negatives_per_kind``
      perturbed scenes of that kind (one phrasing each): the fraction of (phrasing, negative)
      pairs in which the phrasing scores higher. So "A above B" and "B below A" must both beat
      "A below B". ``hardneg/all`` pools every kind; ``hardneg/strict`` is the fraction of images
      whose *lowest*-scoring true phrasing beats *every* negative. ``heldout/<kind>``,
      ``heldout/hardneg_all``: the same on the images containing a held-out colour–shape pair
      (a combination never seen in training).
    * ``hardneg_image/<kind>``: the text→image side (:data:`IMAGE_NEGATIVE_KINDS`): every true
      phrasing against its image and ``negatives_per_kind`` pictures of perturbed scenes drawn at
      the same coordinates; the fraction of (phrasing, picture) pairs where the true image wins.
    * ``retrieval/i2t_top1``: each image against one caption per test item (top-1 counts when
      the best caption describes the image's scene); ``retrieval/t2i_top1`` the other way.
    * ``phrasing_spread``: mean over images of (max − min) cosine over its true phrasings.
    """
    ds = ShapesDataset("test", size=ev.test_size, seed=data.seed, resolution=data.resolution,
                       max_objects=data.max_objects, holdout=data.holdout, min_objects=data.min_objects)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text_cache: dict[str, torch.Tensor] = {}

    def embed_texts(texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in text_cache]
        for s in range(0, len(missing), ev.batch_size):
            chunk = missing[s : s + ev.batch_size]
            f = F.normalize(encode_text(model, tokenizer(chunk).to(device)).float(), dim=-1)
            text_cache.update(zip(chunk, f))
        return torch.stack([text_cache[t] for t in texts])

    scenes = [ds.scene(i) for i in range(len(ds))]
    img = []
    for s in range(0, len(scenes), ev.batch_size):
        x = torch.stack([pil_to_tensor(render(sc, data.resolution)) for sc in scenes[s : s + ev.batch_size]])
        img.append(F.normalize(model.encode_image(x.to(device)).float(), dim=-1))
    img_f = torch.cat(img)

    wins: dict[str, list[float]] = {k: [] for k in NEGATIVE_KINDS}
    wins_heldout: dict[str, list[float]] = {k: [] for k in NEGATIVE_KINDS}
    strict, spread = [], []
    for i, sc in enumerate(scenes):
        rng = random.Random(f"lverse-clip-eval/{data.seed}/{i}")
        pos = embed_texts(phrasings(sc)) @ img_f[i]
        negs_all = []
        for kind in applicable_kinds(sc):
            seen = {scene_key(sc)}
            negs = []
            for _ in range(4 * ev.negatives_per_kind):
                if len(negs) == ev.negatives_per_kind:
                    break
                neg = perturb(sc, kind, rng)
                if neg is not None and scene_key(neg) not in seen:
                    seen.add(scene_key(neg))
                    negs.append(rng.choice(phrasings(neg)))
            if not negs:
                continue
            ns = embed_texts(negs) @ img_f[i]
            w = (pos[:, None] > ns[None, :]).float().flatten().tolist()
            wins[kind].extend(w)
            if sc.heldout:
                wins_heldout[kind].extend(w)
            negs_all.append(ns)
        if negs_all:
            strict.append(float(pos.min() > torch.cat(negs_all).max()))
        spread.append(float(pos.max() - pos.min()))

    # Hard negative images (the text→image reranker's task): each true phrasing must score its
    # own image above pictures of perturbed scenes drawn at the same coordinates.
    neg_scenes: list[tuple[int, str, Scene]] = []
    for i, sc in enumerate(scenes):
        rng = random.Random(f"lverse-clip-eval-img/{data.seed}/{i}")
        for kind in [k for k in applicable_kinds(sc) if k in IMAGE_NEGATIVE_KINDS]:
            seen = {scene_key(sc)}
            for _ in range(4 * ev.negatives_per_kind):
                if len(seen) > ev.negatives_per_kind:
                    break
                neg = perturb(sc, kind, rng)
                if neg is not None and scene_key(neg) not in seen:
                    seen.add(scene_key(neg))
                    neg_scenes.append((i, kind, neg))
    img_wins: dict[str, list[float]] = {k: [] for k in IMAGE_NEGATIVE_KINDS}
    if neg_scenes:
        neg_f = torch.cat([
            F.normalize(model.encode_image(torch.stack([pil_to_tensor(render(n, data.resolution))
                                                        for _i, _k, n in neg_scenes[s : s + ev.batch_size]]).to(device)).float(), dim=-1)
            for s in range(0, len(neg_scenes), ev.batch_size)
        ])
        for (i, kind, _n), nf in zip(neg_scenes, neg_f):
            t = embed_texts(phrasings(scenes[i]))
            img_wins[kind].extend(((t @ img_f[i]) > (t @ nf)).float().tolist())

    # Retrieval over one caption per item; duplicates of a scene count as correct.
    caps = [phrasings(sc)[random.Random(f"lverse-clip-eval-cap/{data.seed}/{i}").randrange(len(phrasings(sc)))]
            for i, sc in enumerate(scenes)]
    keys = [scene_key(sc) for sc in scenes]
    sim = img_f @ embed_texts(caps).T
    i2t = [keys[j] == keys[i] for i, j in enumerate(sim.argmax(1).tolist())]
    t2i = [keys[j] == keys[i] for i, j in enumerate(sim.argmax(0).tolist())]

    def mean(v: Sequence[float]) -> float:
        return float(sum(v) / len(v)) if v else float("nan")

    out: dict[str, float] = {f"hardneg/{k}": mean(v) for k, v in wins.items() if v}
    out["hardneg/all"] = mean([w for v in wins.values() for w in v])
    out["hardneg/strict"] = mean(strict)
    out.update({f"heldout/{k}": mean(v) for k, v in wins_heldout.items() if v})
    out["heldout/hardneg_all"] = mean([w for v in wins_heldout.values() for w in v])
    out["heldout/images"] = float(sum(sc.heldout for sc in scenes))
    out.update({f"hardneg_image/{k}": mean(v) for k, v in img_wins.items() if v})
    out["hardneg_image/all"] = mean([w for v in img_wins.values() for w in v])
    out["retrieval/i2t_top1"] = mean(i2t)
    out["retrieval/t2i_top1"] = mean(t2i)
    out["phrasing_spread"] = mean(spread)
    out["test_items"] = float(len(scenes))
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


@dataclass
class ClipRun:
    """What :func:`fit_clip` returns: the trained model and what happened."""

    model: nn.Module
    model_cfg: dict[str, Any]
    history: list[dict[str, float]]  # one entry per step: loss, acc, hardneg_acc, lr, logit_scale
    metrics: dict[str, float]        # evaluate_clip on the test split, plus timing
    seconds: float


def lr_at(step: int, progress: float, cfg: ClipOptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, times a cosine from ``lr`` to ``lr * min_lr_ratio``
    over ``progress`` in [0, 1] (the larger of step / max_steps and elapsed / time limit)."""
    lo = cfg.lr * cfg.min_lr_ratio
    cos = lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return cos * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cos


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay weight matrices only; norms, biases, embeddings and the temperature keep their scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "class_embedding" in name or name.endswith("logit_scale"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_clip(cfg: ClipTrainConfig, evaluate: bool = True) -> ClipRun:
    """Train a CLIP on Shapes from scratch (CPU or whatever device the model is moved to)."""
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if cfg.data.resolution != cfg.model.image_size:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} differs from model.image_size={cfg.model.image_size}; "
            "the reranker would resize every image, so train at the size it will see"
        )
    model_cfg = cfg.model.open_clip_cfg()
    bpe = build_tokenizer(cfg.model.context_length)
    vocab = CompactVocab.for_shapes(bpe, cfg.model.vocab_size) if cfg.model.compact_vocab else None
    torch.manual_seed(tc.seed)
    if vocab is None:
        model = build_clip(model_cfg)
        tokenizer: Callable[[Sequence[str]], torch.Tensor] = CachedTokenizer(bpe)
    else:
        train_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "vocab_size": len(vocab)}}
        model = build_clip(train_cfg)
        tokenizer = CachedTokenizer(lambda texts: vocab.compact(bpe(texts)))
    ds = ShapesDataset("train", size=cfg.data.train_size, seed=cfg.data.seed, resolution=cfg.data.resolution,
                       max_objects=cfg.data.max_objects, holdout=cfg.data.holdout, min_objects=cfg.data.min_objects)
    if len(ds) < tc.batch_size:
        raise ConfigError(f"data.train_size={len(ds)} is smaller than train.batch_size={tc.batch_size}")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(tc.init_logit_scale))
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=tc.eps)
    rng = random.Random(f"lverse-clip-train/{tc.seed}")
    max_log_scale = math.log(tc.max_logit_scale)

    bar = None
    if tc.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_steps, desc=tc.name, dynamic_ncols=True)
    history: list[dict[str, float]] = []
    order: list[int] = []
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    limit_s = tc.time_limit_minutes * 60
    step = 0
    while True:
        # Progress drives the cosine and the stop: steps, or wall time when that runs out first
        # (so a slow machine still ends on schedule, with a fully decayed learning rate).
        progress = step / tc.max_steps if tc.max_steps > 0 else 1.0
        if limit_s > 0:
            progress = max(progress, (time.perf_counter() - t0) / limit_s)
        if progress >= 1.0:
            break
        if len(order) < tc.batch_size:  # epochs of random order over the training scenes
            perm = list(range(len(ds)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: tc.batch_size], order[tc.batch_size :]
        batch = make_batch(ds, idx, cfg.data.hard_negatives, rng, cfg.data.negative_weights,
                           paraphrase=tc.text_loss > 0, neg_images=cfg.data.hard_negative_images,
                           image_weights=cfg.data.image_negative_weights)
        tokens = tokenizer(batch.captions + batch.paraphrases)
        lr = lr_at(step, progress, tc)
        for g in opt.param_groups:
            g["lr"] = lr

        images = batch.images if batch.negative_images is None else torch.cat([batch.images, batch.negative_images])
        all_img_f = F.normalize(model.encode_image(images), dim=-1)  # the batch's images, then the negative ones
        img_f = all_img_f[: len(idx)]
        txt_f = F.normalize(encode_text(model, tokens), dim=-1)
        txt_f, para_f = txt_f[: len(batch.captions)], txt_f[len(batch.captions) :]
        scale = model.logit_scale.exp()
        loss, logs = contrastive_loss(img_f, txt_f, scale, batch.image_keys, batch.text_keys)
        if tc.hard_negative_loss > 0:
            hn = hard_negative_loss(img_f, txt_f, scale, batch.negative_owner)
            loss = loss + tc.hard_negative_loss * hn
            logs.update(hn_loss=hn.item())
        if tc.hard_negative_image_loss > 0 and batch.negative_image_owner:
            # The same (1 + K)-way softmax with the roles swapped: each caption over its own image
            # and that image's perturbed copies.
            hni = hard_negative_loss(txt_f[: len(idx)], all_img_f, scale, batch.negative_image_owner)
            loss = loss + tc.hard_negative_image_loss * hni
            logs.update(hn_image_loss=hni.item())
        if tc.text_loss > 0:
            tt = text_text_loss(txt_f, para_f, scale, batch.text_keys)
            loss = loss + tc.text_loss * tt
            logs.update(text_loss=tt.item())
        logs.update(clip_loss=logs["loss"], loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        logs.update(
            hardneg_acc=_hard_negative_batch_acc(img_f.detach(), txt_f.detach(), batch.negative_owner),
            lr=lr, logit_scale=float(model.logit_scale.detach().exp()), step=step,
        )
        history.append(logs)
        if bar is not None:
            bar.update(1)
        if tc.log_every > 0 and ((step + 1) % tc.log_every == 0 or step == tc.max_steps - 1):
            recent = history[-tc.log_every :]
            avg = {k: sum(h[k] for h in recent) / len(recent) for k in ("loss", "acc", "hardneg_acc")}
            if bar is not None:
                bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['acc']:.2f}", hn=f"{avg['hardneg_acc']:.2f}",
                                T=f"{logs['logit_scale']:.1f}")
            else:  # no bar (logs, CI): one line per log interval
                print(f"step {step + 1}/{tc.max_steps} loss {avg['loss']:.3f} acc {avg['acc']:.3f} "
                      f"hardneg {avg['hardneg_acc']:.3f} scale {logs['logit_scale']:.1f} lr {lr:.2e} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        step += 1
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if bar is not None:
        bar.close()
    model.eval()
    if vocab is not None:  # the model that is saved (and evaluated): full CLIP BPE vocabulary
        torch.manual_seed(tc.seed)
        model = vocab.expand(model, build_clip(model_cfg)).eval()
    # CPU seconds (all threads) next to wall seconds: on a shared machine wall time says little.
    metrics: dict[str, float] = {"train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
                                 "threads": float(torch.get_num_threads()), "steps": float(step),
                                 "stopped_by_time_limit": float(step < tc.max_steps),
                                 "steps_per_second": step / seconds if seconds > 0 else float("nan")}
    if history:
        tail = history[-max(1, min(50, len(history) // 5)) :]
        for k in ("loss", "acc", "hardneg_acc"):
            metrics[f"train/{k}"] = sum(h[k] for h in tail) / len(tail)
    if evaluate:
        metrics.update(evaluate_clip(model, CachedTokenizer(bpe), cfg.data, cfg.eval))
    return ClipRun(model, model_cfg, history, metrics, seconds)


def save_run(run: ClipRun, cfg: ClipTrainConfig, run_dir: str | Path) -> Path:
    """``clip.safetensors`` + ``clip.json``, the resolved ``config.yaml`` and ``metrics.json``."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    save_clip(root / CLIP_FILE, run.model, run.model_cfg, {"metrics": run.metrics})
    atomic_write_text(root / "metrics.json", json.dumps({"metrics": run.metrics, "history": run.history}, indent=1))
    return root


def resolve_run_dir(cfg: ClipTrainConfig) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / cfg.train.name)


def train_clip(cfg: ClipTrainConfig) -> Path:
    """Train, evaluate and save into the run directory (``train.run_dir``, else runs/<name>)."""
    run = fit_clip(cfg)
    return save_run(run, cfg, resolve_run_dir(cfg))


__all__ = [
    "ClipModelConfig", "ClipDataConfig", "ClipOptimConfig", "ClipEvalConfig", "ClipTrainConfig",
    "ClipRun", "NEGATIVE_KINDS", "CompactVocab", "CachedTokenizer", "build_clip", "build_tokenizer", "encode_text", "save_clip", "load_clip",
    "scene_key", "perturb", "hard_negatives", "make_batch", "contrastive_loss", "hard_negative_loss", "text_text_loss", "evaluate_clip",
    "fit_clip", "save_run", "train_clip",
]

