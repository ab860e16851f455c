"""The tiny Shapes CLIP: hard negatives, the loss, the fast text path, training, files, CLI.

Everything runs on the CPU with tiny widths; open_clip is only ever given config dicts (no
``pretrained``), so nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lverse.cli.shapes import train_clip as main
from lverse.config import ConfigError, from_dict
from lverse.inference.clip import load_clip
from lverse.shapes.clip_model import CLIP_BPE_VOCAB, CompactVocab, build_clip, build_tokenizer, encode_text, shapes_words
from lverse.shapes.clip_train import ClipTrainConfig, contrastive_loss, fit_clip, save_run
from lverse.shapes.negatives import IMAGE_NEGATIVE_KINDS, NEGATIVE_KINDS, hard_negatives, make_batch, perturb
from lverse.shapes.parse import scene_key
from lverse.shapes.scenes import HELDOUT_PAIRS, INVERSE, Scene, ShapeObject, ShapesDataset, phrasings
from lverse.train.optim import weight_decay_groups

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "model": {"embed_dim": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_head_width": 16,
              "text_width": 32, "text_heads": 2, "text_layers": 1, "context_length": 32},
    "data": {"train_size": 2000, "hard_negatives": 2},
    "train": {"batch_size": 32, "max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "progress": False, "log_every": 1,
              "tensorboard": False, "ckpt_every": 0},
    "eval": {"test_size": 24, "negatives_per_kind": 1},
}


def tiny_cfg(**sections: dict) -> ClipTrainConfig:
    data = {k: {**v, **sections.get(k, {})} for k, v in TINY.items()}
    return from_dict(ClipTrainConfig, data)


def _obj(shape: str, colour: str, size: str, x: float = 0.5, y: float = 0.5) -> ShapeObject:
    return ShapeObject(shape, colour, size, x, y)


# --- scenes and hard negatives ----------------------------------------------------------------


def test_scene_key_is_equal_exactly_when_captions_coincide() -> None:
    a, b = _obj("circle", "red", "small"), _obj("square", "blue", "large")
    above = Scene([a, b], relation="above")
    below = Scene([b, a], relation="below")  # the same picture, chained the other way
    assert scene_key(above) == scene_key(below)
    assert set(phrasings(above)) == set(phrasings(below))
    swapped = Scene([a, b], relation="below")  # "red circle below blue square": another scene
    assert scene_key(swapped) != scene_key(above)
    assert not set(phrasings(swapped)) & set(phrasings(above))
    one = Scene([a], position="left")
    assert scene_key(one) != scene_key(Scene([a], position="right"))


def _diff(scene: Scene, neg: Scene) -> dict[str, int]:
    if len(scene.objects) != len(neg.objects):
        return {"count": 1}
    out = {k: sum(getattr(o, k) != getattr(p, k) for o, p in zip(scene.objects, neg.objects))
           for k in ("colour", "shape", "size")}
    out["relation"] = int(scene.relation != neg.relation)
    out["position"] = int(scene.position != neg.position)
    return out


def test_perturbations_change_exactly_what_their_kind_names() -> None:
    ds = ShapesDataset("test", size=80, max_objects=3)
    rng = random.Random(0)
    seen: set[str] = set()
    for i in range(len(ds)):
        sc = ds.scene(i)
        for kind in NEGATIVE_KINDS:
            neg = perturb(sc, kind, rng)
            if neg is None:
                n = len(sc.objects)
                assert (kind == "position" and n > 1) or (kind in ("relation", "axis", "swap") and n == 1) or kind == "swap"
                continue
            seen.add(kind)
            assert scene_key(neg) != scene_key(sc)
            assert not set(phrasings(neg)) & set(phrasings(sc)), (kind, phrasings(sc)[0], phrasings(neg)[0])
            d = _diff(sc, neg)
            if kind in ("colour", "shape", "size"):
                assert d[kind] == 1 and sum(d.values()) == 1, (kind, d)
            elif kind == "position":
                assert d["position"] == 1 and sum(d.values()) == 1, d
            elif kind in ("relation", "axis"):
                assert d["relation"] == 1 and sum(d.values()) == 1, d
                flipped = neg.relation == INVERSE[sc.relation]
                assert flipped == (kind == "relation"), (kind, sc.relation, neg.relation)
            else:  # swap: one attribute exchanged between two neighbours
                changed = [k for k in ("colour", "shape", "size") if d[k]]
                assert len(changed) == 1 and d[changed[0]] == 2 and d["relation"] == 0
                k = changed[0]
                assert sorted(getattr(o, k) for o in sc.objects) == sorted(getattr(o, k) for o in neg.objects)
    assert seen == set(NEGATIVE_KINDS)
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        perturb(ds.scene(0), "texture", rng)


def test_hard_negatives_are_distinct_scenes_without_heldout_pairs() -> None:
    ds = ShapesDataset("train", size=200)
    rng = random.Random(1)
    heldout_seen = False
    for i in range(len(ds)):
        sc = ds.scene(i)
        negs = hard_negatives(sc, 4, rng)
        keys = {scene_key(n) for n in negs}
        assert len(negs) == 4 and len(keys) == 4 and scene_key(sc) not in keys
        heldout_seen |= any(n.heldout for n in negs)
        # restricted to the split's pairs, a held-out pair never shows up, even in a negative
        negs = hard_negatives(sc, 4, rng, pairs=ds.pairs)
        assert len(negs) == 4 and not any(n.heldout for n in negs)
    assert heldout_seen  # unrestricted, they would
    b = make_batch(ds, range(64), 4, rng)
    assert not any(p in HELDOUT_PAIRS for k in b.text_keys for p in [(c, sh) for sh, c, _ in k[2]])  # (shape, colour, size)


def test_negative_weights_pick_kinds() -> None:
    ds = ShapesDataset("train", size=30)
    only_size = {k: 0.0 for k in NEGATIVE_KINDS} | {"size": 1.0}
    rng = random.Random(2)
    for i in range(len(ds)):
        sc = ds.scene(i)
        negs = hard_negatives(sc, 3, rng, only_size)
        assert 1 <= len(negs) <= len(sc.objects)  # one size flip per object is all there is
        for n in negs:
            d = _diff(sc, n)
            assert d["size"] == 1 and sum(d.values()) == 1
    with pytest.raises(ConfigError, match="unknown kind"):
        tiny_cfg(data={"negative_weights": {"texture": 1.0}})
    with pytest.raises(ConfigError, match=">= 0"):
        tiny_cfg(data={"negative_weights": {"shape": -1.0}})


def test_make_batch_layout() -> None:
    ds = ShapesDataset("train", size=16)
    b = make_batch(ds, range(8), 3, random.Random(0), paraphrase=True)
    assert len(b.paraphrases) == 8
    for i, p in enumerate(b.paraphrases):
        assert p in phrasings(ds.scene(i)) and p != b.captions[i]  # every Shapes scene has >= 3 phrasings
    assert b.images.shape == (8, 3, 64, 64) and float(b.images.min()) >= -1 and float(b.images.max()) <= 1
    assert len(b.captions) == len(b.text_keys) == 8 + len(b.negative_owner) == 8 + 24
    for i in range(8):
        sc = ds.scene(i)
        assert b.captions[i] in phrasings(sc) and b.image_keys[i] == b.text_keys[i] == scene_key(sc)
    for j, owner in enumerate(b.negative_owner):
        assert b.text_keys[8 + j] != b.image_keys[owner]


def test_make_batch_negative_images_are_minimal_pairs() -> None:
    ds = ShapesDataset("train", size=16)
    assert make_batch(ds, range(8), 1, random.Random(0)).negative_images is None  # off by default
    b = make_batch(ds, range(8), 1, random.Random(0), neg_images=2, image_weights={"shape": 1.0})
    assert b.negative_images is not None and b.negative_images.shape == (len(b.negative_image_owner), 3, 64, 64)
    assert sorted(set(b.negative_image_owner)) == list(range(8))  # every scene has another shape to draw
    for img, owner in zip(b.negative_images, b.negative_image_owner):
        changed = (img != b.images[owner]).any(0)
        assert changed.any()  # a different picture ...
        ys, xs = changed.nonzero(as_tuple=True)  # ... that differs inside one object's box only
        box = max(o.extent for o in ds.scene(owner).objects) * 64 + 2
        assert int(ys.max() - ys.min()) <= box and int(xs.max() - xs.min()) <= box
    # Kinds that would draw the same picture are refused, naming the field.
    assert "relation" not in IMAGE_NEGATIVE_KINDS
    with pytest.raises(ConfigError, match="image_negative_weights"):
        tiny_cfg(data={"image_negative_weights": {"relation": 1.0}})
    with pytest.raises(ConfigError, match="hard_negative_images"):
        tiny_cfg(data={"hard_negative_images": -1})


# --- loss and the fast text path ----------------------------------------------------------------


def test_contrastive_loss_matches_open_clip_and_masks_false_negatives() -> None:
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 16), dim=-1)
    txt = F.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(10.0)
    keys = [("k", i) for i in range(6)]
    loss, logs = contrastive_loss(img, txt, scale, keys, keys)
    torch.testing.assert_close(loss, ClipLoss()(img, txt, scale))

    # Extra negatives enter image->text only; a caption describing image 0 as well as its own
    # (same key) leaves both softmaxes of image 0 / caption 0.
    extra = F.normalize(torch.randn(3, 16), dim=-1)
    ikeys = [("k", 0)] + keys[1:5] + [("k", 0)]  # images 0 and 5 show the same scene
    tkeys = ikeys + [("n", 0), ("n", 1), ("k", 0)]  # the last extra text describes images 0 and 5
    allt = torch.cat([txt, extra])
    loss, _ = contrastive_loss(img, allt, scale, ikeys, tkeys)
    logits = scale * img @ allt.T
    ref_i2t = []
    for i in range(6):
        keep = [j for j in range(9) if j == i or tkeys[j] != ikeys[i]]
        ref_i2t.append(-torch.log_softmax(logits[i, keep], 0)[keep.index(i)])
    ref_t2i = []
    for j in range(6):
        keep = [i for i in range(6) if i == j or ikeys[i] != tkeys[j]]
        ref_t2i.append(-torch.log_softmax(logits[keep, j], 0)[keep.index(j)])
    ref = (torch.stack(ref_i2t).mean() + torch.stack(ref_t2i).mean()) / 2
    torch.testing.assert_close(loss, ref)


def test_hard_negative_loss_is_a_softmax_over_own_negatives() -> None:
    from lverse.shapes.clip_train import hard_negative_loss

    torch.manual_seed(1)
    img = F.normalize(torch.randn(3, 8), dim=-1)
    txt = F.normalize(torch.randn(3 + 4, 8), dim=-1)
    owner = [0, 0, 2, 0]  # image 1 has no negatives: its term is 0
    scale = torch.tensor(7.0)
    ref = []
    for i in range(3):
        cand = [i] + [3 + j for j, o in enumerate(owner) if o == i]
        ref.append(-torch.log_softmax(scale * txt[cand] @ img[i], 0)[0])
    torch.testing.assert_close(hard_negative_loss(img, txt, scale, owner), torch.stack(ref).mean())
    assert float(hard_negative_loss(img, txt[:3], scale, [])) == 0.0


def test_text_text_loss_matches_reference() -> None:
    from lverse.shapes.clip_train import text_text_loss

    torch.manual_seed(2)
    B = 4
    txt = F.normalize(torch.randn(B + 3, 8), dim=-1)  # 4 captions, 3 hard negatives
    para = F.normalize(torch.randn(B, 8), dim=-1)
    keys = [("s", 0), ("s", 1), ("s", 0), ("s", 3), ("n", 0), ("s", 1), ("n", 2)]  # 0 and 2 share a scene
    scale = torch.tensor(5.0)
    cands = torch.cat([para, txt[B:]])
    ckeys = keys[:B] + keys[B:]
    ref = []
    for i in range(B):
        keep = [j for j in range(len(ckeys)) if j == i or ckeys[j] != keys[i]]
        ref.append(-torch.log_softmax(scale * cands[keep] @ txt[i], 0)[keep.index(i)])
    torch.testing.assert_close(text_text_loss(txt, para, scale, keys), torch.stack(ref).mean())


def test_encode_text_trimmed_equals_open_clip() -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_clip(cfg.model.open_clip_cfg()).eval()
    tok = build_tokenizer(32)
    texts = ["a small red circle on the left", "there is a large blue square above a small green diamond", "a"]
    ids = tok(texts)
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, ids), model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_compact_vocab_trains_the_same_function() -> None:
    cfg = tiny_cfg()
    bpe = build_tokenizer(32)
    vocab = CompactVocab.for_shapes(bpe, CLIP_BPE_VOCAB)
    # every word of the grammar, and the start/end/pad ids, are in it
    assert {0, 49406, 49407} <= set(vocab.ids.tolist()) and len(vocab) < 60
    full_cfg = cfg.model.open_clip_cfg()
    small_cfg = {**full_cfg, "text_cfg": {**full_cfg["text_cfg"], "vocab_size": len(vocab)}}
    torch.manual_seed(0)
    small = build_clip(small_cfg).eval()
    full = vocab.expand(small, build_clip(full_cfg)).eval()
    texts = [" ".join(shapes_words()[:12]), "there is a large purple triangle to the right of a small cyan square"]
    ids = bpe(texts)
    with torch.no_grad():
        torch.testing.assert_close(full.encode_text(ids), small.encode_text(vocab.compact(ids)))
    with pytest.raises(ValueError, match="not in the compact Shapes vocabulary"):
        vocab.compact(bpe(["a zebra"]))


# --- training, files, reranker contract ----------------------------------------------------------


def test_param_groups_decay_weight_matrices_only() -> None:
    """The CLIP's AdamW groups (lverse.train.optim, as BiART's): what its own rule gave before
    the one rule existed: no decay for tensors below 2-d, embeddings and the logit scale."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_clip(cfg.model.open_clip_cfg())
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ref = [p for n, p in model.named_parameters()
           if not (p.ndim < 2 or "embedding" in n or "class_embedding" in n or n.endswith("logit_scale"))]
    assert [id(p) for p in decay["params"]] == [id(p) for p in ref]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p.ndim == 4 for p in decay["params"])  # the patch convolution is a weight matrix too


def test_tiny_training_learns_and_round_trips(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_cfg(data={"hard_negative_images": 1}, train={"run_dir": str(tmp_path / "run")})
    run = fit_clip(cfg)
    losses = [h["loss"] for h in run.history]  # train.log_every=1: one entry per step
    assert len(losses) == cfg.train.max_steps and all(math.isfinite(v) for v in losses)
    assert run.metrics["steps"] == cfg.train.max_steps and run.metrics["stopped_by_time_limit"] == 0.0
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.3, (first, last)
    assert all(math.isfinite(h["hn_image_loss"]) for h in run.history)  # the negative-image term took part
    for k in ("hardneg/all", "hardneg/colour", "retrieval/i2t_top1", "retrieval/t2i_top1", "heldout/hardneg_all",
              "hardneg_image/all", "hardneg_image/shape"):
        assert 0.0 <= run.metrics[k] <= 1.0, (k, run.metrics[k])
    # the saved model has the full CLIP BPE vocabulary (what ClipReranker's tokenizer needs)
    assert run.model.token_embedding.weight.shape[0] == CLIP_BPE_VOCAB

    root = save_run(run, cfg, tmp_path / "run")
    for name in ("clip.safetensors", "clip.json", "config.yaml", "metrics.json"):
        assert (root / name).is_file(), name
    meta = json.loads((root / "clip.json").read_text())
    assert meta["kind"] == "clip" and meta["model_cfg"] == cfg.model.open_clip_cfg()
    assert meta["preprocess_cfg"] == {"mean": [0.5] * 3, "std": [0.5] * 3}

    model, meta2 = load_clip(root)
    assert meta2["model_name"] == meta["model_name"]
    ds = ShapesDataset("test", size=4)
    images = torch.stack([ds[i]["image"] for i in range(4)])
    tokens = build_tokenizer(32)([ds[i]["caption"] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), run.model.encode_image(images))
        assert torch.equal(model.encode_text(tokens), run.model.encode_text(tokens))
        assert torch.equal(model.logit_scale, run.model.logit_scale)

    # The reranker reads the same files and feeds the model exactly the [-1, 1] images.
    from lverse.inference.clip import load_clip as pipeline_load_clip
    from lverse.inference.rerank import ClipReranker

    pmodel, _ = pipeline_load_clip(root / "clip.safetensors")
    rr = ClipReranker(pmodel)
    texts = [ds[i]["caption"] for i in range(4)]
    with torch.no_grad():
        ref = (F.normalize(run.model.encode_image(images), dim=-1)
               * F.normalize(run.model.encode_text(tokens), dim=-1)).sum(-1)
    torch.testing.assert_close(rr.score(images, texts), ref, atol=1e-5, rtol=1e-5)


def test_cli_runs_shipped_config_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    overrides = [f"{s}.{k}={json.dumps(v)}" for s in ("model", "eval") for k, v in TINY[s].items()]
    run_dir = tmp_path / "cli"
    rc = main(["train.threads=1", "--config", str(REPO / "configs" / "shapes_clip.yaml"), *overrides,
               "train.max_steps=2", "train.batch_size=8", "data.hard_negatives=1", "train.progress=false",
               f"train.run_dir={run_dir}"])  # overrides on both sides of --config
    assert rc == 0
    printed = capsys.readouterr()
    assert printed.err.startswith("step 2/2 loss ")  # the trainer's per-interval line when there is no progress bar
    out = json.loads(printed.out)
    assert out["run_dir"] == str(run_dir) and out["steps"] == 2
    model, meta = load_clip(run_dir / "clip.safetensors")
    assert meta["model_cfg"]["vision_cfg"]["width"] == TINY["model"]["vision_width"]

    assert main(["--config", str(REPO / "configs" / "shapes_clip.yaml"), "model.vocab_size=1000"]) == 2
    assert "model.vocab_size=1000" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs" / "shapes_clip.yaml"), "model.image_size=32"]) == 2
    assert "data.resolution" in capsys.readouterr().err


def test_load_clip_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_clip(tmp_path)
    (tmp_path / "clip.json").write_text(json.dumps({"kind": "augvae"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="expected"):
        load_clip(tmp_path)
    cfg = tiny_cfg()
    (tmp_path / "clip.json").write_text(json.dumps({"kind": "clip", "model_cfg": cfg.model.open_clip_cfg()}))
    with pytest.raises(ValueError, match="weights do not fit"):
        load_clip(tmp_path)


def test_resume_continues_with_the_same_batches(tmp_path: Path) -> None:
    """The trainer's exact resume holds for the CLIP: each item's phrasing and negatives come
    from the sampler's seed, not from a stream that a restart would lose."""
    torch.set_num_threads(1)
    small = {"batch_size": 16, "log_every": 1}
    full = fit_clip(tiny_cfg(train={**small, "max_steps": 6, "run_dir": str(tmp_path / "a")}), evaluate=False)
    fit_clip(tiny_cfg(train={**small, "max_steps": 3, "run_dir": str(tmp_path / "b")}), evaluate=False)
    resumed = fit_clip(tiny_cfg(train={**small, "max_steps": 6, "run_dir": str(tmp_path / "b")}), evaluate=False,
                       resume=tmp_path / "b")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
