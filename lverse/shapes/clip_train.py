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
  text negatives (:mod:`lverse.shapes.negatives`), in the batch softmax and in a softmax over its own negatives only
  (:func:`hard_negative_loss`). Captions are drawn from every phrasing the grammar allows, so
  "A above B" and "B below A" (the same scene) are both positives, "A below B" a negative.
  Negatives never contain a held-out colour–shape pair (see :func:`~lverse.shapes.negatives.perturb`).
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
  (:func:`lverse.shapes.parse.scene_key`).
* **Speed**: the text tower is causal and pools at the end-of-text token, so everything after
  the longest caption's end token cannot change the embedding;
  :func:`~lverse.shapes.clip_model.encode_text` trims the batch to that length (Shapes
  captions are <= 18 tokens of a 32-token context). ``train.time_limit_minutes`` caps the wall
  time: the cosine schedule runs on whichever of steps and time runs out first, so a slow
  machine stops on time with the schedule finished.

Training
--------
:class:`ClipTask` is a :class:`lverse.train.loop.Task`: the one trainer of AugVAE and BiART
runs it, so a CLIP run has a run directory, TensorBoard scalars and ``metrics.jsonl``,
checkpoints, ``--resume`` and DDP like the stages (``train.*`` are the same keys). The sampler
hands each item a seed, from which its phrasing and negatives are drawn
(:class:`~lverse.shapes.negatives.ClipTrainData`), so a resumed run sees the same batches.
The logit scale is clamped after every step (:meth:`ClipTask.after_step`), on the model's own
weight: fp16-o2, whose optimizer steps master copies, is refused. Under DDP each rank's
softmax covers its own batch only (features are not gathered across ranks).

Files: ``RUN_DIR/clip.safetensors`` + ``clip.json`` (``{"kind": "clip", "model_name":
"shapes-tiny-clip", "model_cfg": {...open_clip config...}, "preprocess_cfg": {...}}``, the
format :func:`lverse.inference.clip.load_clip` reads), ``config.yaml``, ``metrics.json``
(evaluation and the logged training curve), and the trainer's ``metrics.jsonl``,
``checkpoints/``, ``tb/``.

CLI: ``lverse train-clip --config configs/shapes_clip.yaml [train.max_steps=100 ...] [--resume [RUN_DIR]]``.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lverse.config import ConfigError, dump_yaml
from lverse.data.images import pil_to_tensor
from lverse.files import atomic_write_text
from lverse.inference.clip import CLIP_FILE
from lverse.shapes.clip_model import (
    CachedTokenizer,
    ClipModelConfig,
    CompactVocab,
    TwoTowers,
    build_clip,
    build_tokenizer,
    encode_text,
    save_clip,
)
from lverse.shapes.negatives import (
    IMAGE_NEGATIVE_KINDS,
    NEGATIVE_KINDS,
    ClipBatch,
    ClipDataConfig,
    ClipItem,
    ClipTrainData,
    applicable_kinds,
    collate,
    perturb,
)
from lverse.shapes.parse import scene_key
from lverse.shapes.scenes import Scene, ShapesDataset, phrasings, render
from lverse.train.logger import read_metrics
from lverse.train.loop import Task, TrainConfig, Trainer
from lverse.train.optim import weight_decay_groups

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@dataclass
class ClipLossConfig:
    hard_negative: float = 1.0        # weight of hard_negative_loss (image vs its own negatives); 0 = off
    hard_negative_image: float = 1.0  # the same, caption vs its image and data.hard_negative_images perturbed ones
    text: float = 1.0                 # weight of text_text_loss (paraphrase vs negatives); 0 = off
    init_logit_scale: float = 1 / 0.07  # exp(logit_scale) at the start (CLIP's 1/temperature)
    max_logit_scale: float = 100.0    # CLIP clamps exp(logit_scale) at 100


def clip_train_defaults() -> TrainConfig:
    """The trainer's settings for the CLIP: AdamW with CLIP's betas and eps, decay 0.1 on weight
    matrices, a warm-up and a cosine to 5% of the rate, gradient clipping at 1, batches made in
    the main process."""
    return TrainConfig(name="shapes_clip", batch_size=128, max_steps=600, lr=2e-3, schedule="cosine",
                       warmup_steps=50, min_lr_ratio=0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1,
                       grad_clip=1.0, log_every=25, image_every=0, num_workers=0)


@dataclass
class ClipEvalConfig:
    test_size: int = 500          # items of the Shapes test split (held-out pairs included)
    negatives_per_kind: int = 2   # perturbed captions per kind and image
    batch_size: int = 256


@dataclass
class ClipTrainConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    train: TrainConfig = field(default_factory=clip_train_defaults)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)


def check_config(cfg: ClipTrainConfig) -> None:
    """The mistakes to report before any process group, model or run directory exists."""
    cfg.model.open_clip_cfg()  # raises on sizes that do not fit
    if cfg.data.resolution != cfg.model.image_size:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} differs from model.image_size={cfg.model.image_size}; "
            "the reranker would resize every image, so train at the size it will see"
        )
    if cfg.data.train_size < cfg.train.batch_size:
        raise ConfigError(f"data.train_size={cfg.data.train_size} is smaller than train.batch_size={cfg.train.batch_size}")
    if cfg.train.precision == "fp16-o2":
        raise ConfigError("train.precision=fp16-o2: the logit-scale clamp acts on the model's weight, which "
                          "fp16-o2 overwrites from its master copy; use fp32, bf16 or fp16")


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------


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
# The task the trainer runs
# ------------------------------------------------------------------------------------------


class ClipTask(Task):
    """Contrastive training of a Shapes CLIP (see the module doc) for :class:`lverse.train.loop.Trainer`."""

    def __init__(self, cfg: ClipTrainConfig) -> None:
        check_config(cfg)
        self.cfg = cfg
        bpe = build_tokenizer(cfg.model.context_length)
        full_cfg = cfg.model.open_clip_cfg()
        self.vocab = CompactVocab.for_shapes(bpe, cfg.model.vocab_size) if cfg.model.compact_vocab else None
        if self.vocab is None:
            self.model_cfg = full_cfg
            self.tokenizer = CachedTokenizer(bpe)
        else:  # the model trained has one embedding row per id Shapes uses
            self.model_cfg = {**full_cfg, "text_cfg": {**full_cfg["text_cfg"], "vocab_size": len(self.vocab)}}
            vocab = self.vocab
            self.tokenizer = CachedTokenizer(lambda texts: vocab.compact(bpe(texts)))
        self.model = TwoTowers(build_clip(self.model_cfg))
        with torch.no_grad():
            self.model.clip.logit_scale.fill_(math.log(cfg.loss.init_logit_scale))
        self.data = ClipTrainData(cfg.data, paraphrase=cfg.loss.text > 0)

    def model_meta(self) -> dict[str, Any]:
        # Checkpoints hold the training model (compact vocabulary); the run's clip.safetensors
        # is the full CLIP (export_model).
        return {"kind": "shapes-clip-train", "model_cfg": self.model_cfg}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return weight_decay_groups(self.model, weight_decay)

    def train_dataset(self) -> ClipTrainData:
        return self.data

    def collate(self, items: list[ClipItem]) -> ClipBatch:
        batch = collate(items)
        batch.tokens = self.tokenizer(batch.captions + batch.paraphrases)
        return batch

    def batch_size_of(self, batch: ClipBatch) -> int:
        return batch.images.shape[0]

    def prepare(self, device: torch.device) -> None:
        self.device = device

    def training_step(self, model: nn.Module, batch: ClipBatch, step: int, autocast: Callable) -> tuple[torch.Tensor, dict[str, float]]:
        lc = self.cfg.loss
        B = batch.images.shape[0]
        images = batch.images if batch.negative_images is None else torch.cat([batch.images, batch.negative_images])
        with autocast():  # the batch's images, then the negative ones; captions, then paraphrases
            all_img_f, all_txt_f, scale = model(images.to(self.device), batch.tokens.to(self.device))  # type: ignore[union-attr]
        all_img_f, all_txt_f = all_img_f.float(), all_txt_f.float()
        img_f = all_img_f[:B]
        txt_f, para_f = all_txt_f[: len(batch.captions)], all_txt_f[len(batch.captions) :]
        loss, logs = contrastive_loss(img_f, txt_f, scale, batch.image_keys, batch.text_keys)
        if lc.hard_negative > 0:
            hn = hard_negative_loss(img_f, txt_f, scale, batch.negative_owner)
            loss = loss + lc.hard_negative * hn
            logs.update(hn_loss=hn.item())
        if lc.hard_negative_image > 0 and batch.negative_image_owner:
            # The same (1 + K)-way softmax with the roles swapped: each caption over its own image
            # and that image's perturbed copies.
            hni = hard_negative_loss(txt_f[:B], all_img_f, scale, batch.negative_image_owner)
            loss = loss + lc.hard_negative_image * hni
            logs.update(hn_image_loss=hni.item())
        if lc.text > 0:
            tt = text_text_loss(txt_f, para_f, scale, batch.text_keys)
            loss = loss + lc.text * tt
            logs.update(text_loss=tt.item())
        logs.update(clip_loss=logs["loss"], loss=loss.item(),
                    hardneg_acc=_hard_negative_batch_acc(img_f.detach(), txt_f.detach(), batch.negative_owner))
        return loss, logs

    def after_step(self, step: int) -> None:
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/max_logit_scale is not allowed
            self.model.clip.logit_scale.clamp_(0, math.log(self.cfg.loss.max_logit_scale))

    def periodic_logs(self) -> dict[str, float]:
        return {"logit_scale": float(self.model.clip.logit_scale.detach().exp())}

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The CLIP to save, from the trained weights ``state``: with the compact vocabulary, a
        full-vocabulary model whose other rows keep their random init. On the CPU, eval mode."""
        trained = TwoTowers(build_clip(self.model_cfg))
        trained.load_state_dict(state)
        model = trained.clip.eval()
        if self.vocab is None:
            return model
        torch.manual_seed(self.cfg.train.seed)  # the init of the rows training never touched
        return self.vocab.expand(model, build_clip(self.cfg.model.open_clip_cfg())).eval()


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
# A run: train, export, evaluate, save
# ------------------------------------------------------------------------------------------


@dataclass
class ClipRun:
    """What :func:`fit_clip` returns: the trained model and what happened."""

    model: nn.Module | None          # the full-vocabulary CLIP; None on other ranks or when a signal stopped the run
    model_cfg: dict[str, Any]
    history: list[dict[str, float]]  # the trainer's metrics.jsonl: one entry per train.log_every steps
    metrics: dict[str, float]        # evaluate_clip on the test split, plus timing and the last training window
    seconds: float
    run_dir: Path
    stopped: bool = False            # a signal stopped the run (resume it with --resume)


def fit_clip(cfg: ClipTrainConfig, evaluate: bool = True, resume: str | Path | None = None) -> ClipRun:
    """Train a CLIP on Shapes with the shared trainer (into ``train.run_dir``, else
    runs/<name>), then export and evaluate it (rank 0)."""
    check_config(cfg)
    trainer = Trainer(cfg.train, lambda: ClipTask(cfg), full_config=cfg, resume=resume)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    state, _ = trainer.final_weights()  # collective under FSDP: every rank
    run = ClipRun(None, cfg.model.open_clip_cfg(), [], {}, seconds, trainer.run_dir, result["stopped"])
    if run.stopped or not trainer.info.is_main:
        return run
    task: ClipTask = trainer.task  # type: ignore[assignment]
    run.model = task.export_model(state)
    run.history = read_metrics(trainer.run_dir)
    step = result["step"]
    # CPU seconds (all threads) next to wall seconds: on a shared machine wall time says little.
    run.metrics = {"train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
                   "threads": float(torch.get_num_threads()), "steps": float(step),
                   "stopped_by_time_limit": float(step < cfg.train.max_steps),
                   "steps_per_second": step / seconds if seconds > 0 else float("nan")}
    if run.history:  # the mean over the last logging window
        for k in ("loss", "acc", "hardneg_acc"):
            run.metrics[f"train/{k}"] = run.history[-1][k]
    if evaluate:
        run.metrics.update(evaluate_clip(run.model, CachedTokenizer(build_tokenizer(cfg.model.context_length)),
                                         cfg.data, cfg.eval))
    return run


def save_run(run: ClipRun, cfg: ClipTrainConfig, run_dir: str | Path) -> Path:
    """``clip.safetensors`` + ``clip.json``, the resolved ``config.yaml`` and ``metrics.json``."""
    if run.model is None:
        raise ValueError("no model to save (not rank 0, or the run was stopped)")
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    save_clip(root / CLIP_FILE, run.model, run.model_cfg, {"metrics": run.metrics})
    atomic_write_text(root / "metrics.json", json.dumps({"metrics": run.metrics, "history": run.history}, indent=1))
    return root


def train_clip(cfg: ClipTrainConfig, resume: str | Path | None = None) -> ClipRun:
    """Train, evaluate and save into the run directory (``train.run_dir``, else runs/<name>)."""
    run = fit_clip(cfg, resume=resume)
    if run.model is not None:
        save_run(run, cfg, run.run_dir)
    return run
