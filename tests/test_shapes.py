"""The procedural Shapes dataset: determinism, hold-out, grammar and rendering geometry."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lverse.data import collate_skip_none
from lverse.shapes.scenes import (
    ALL_PAIRS,
    BACKGROUND,
    COLOURS,
    HELDOUT_PAIRS,
    INVERSE,
    POS_WORDS,
    REL_WORDS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    phrasings,
    render,
    sample_scene,
)


def _pixel(image: torch.Tensor, x: float, y: float) -> tuple[int, int, int]:
    """RGB (0..255) of the pixel containing normalised point (x, y) of a [-1,1] image."""
    r = image.shape[-1]
    px, py = min(int(x * r), r - 1), min(int(y * r), r - 1)
    return tuple(int(v) for v in ((image[:, py, px] + 1) * 127.5).round().tolist())  # type: ignore[return-value]


def test_determinism_same_seed_same_item() -> None:
    a, b = ShapesDataset("train", size=50, seed=3), ShapesDataset("train", size=50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["scene"] == y["scene"] and x["index"] == i
    # Negative indices address the same items.
    assert a[-1]["scene"] == a[49]["scene"]


def test_different_index_and_seed_differ() -> None:
    ds = ShapesDataset("train", size=50, seed=0)
    scenes = [json.dumps(ds.scene(i).to_dict()) for i in range(50)]
    assert len(set(scenes)) >= 45  # a few collisions are possible, most must differ
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    other = ShapesDataset("train", size=50, seed=1)
    assert sum(ds.scene(i) == other.scene(i) for i in range(50)) <= 2


def test_train_and_test_differ() -> None:
    train, test = ShapesDataset("train", size=100), ShapesDataset("test", size=100)
    same = sum(train.scene(i) == test.scene(i) for i in range(100))
    assert same <= 2


def test_heldout_pairs_never_in_train_and_present_in_test() -> None:
    assert len(HELDOUT_PAIRS) == 4 and HELDOUT_PAIRS <= set(ALL_PAIRS)
    # Every colour and every shape still occurs in training.
    assert len({c for c, _ in HELDOUT_PAIRS}) == 4  # each colour held out at most once
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)

    train = ShapesDataset("train", size=2000, seed=0)
    seen_train = set()
    for i in range(2000):
        for o in train.scene(i).objects:
            seen_train.add(o.pair)
    assert not seen_train & HELDOUT_PAIRS
    assert seen_train == set(ALL_PAIRS) - HELDOUT_PAIRS  # all 20 allowed pairs show up
    assert not any(train[i]["heldout"] for i in range(0, 2000, 50))

    test = ShapesDataset("test", size=500, seed=0)
    seen_test, flagged = set(), 0
    for i in range(500):
        scene = test.scene(i)
        pairs = {o.pair for o in scene.objects}
        seen_test |= pairs
        item_flag = test[i]["heldout"] if i < 60 else scene.heldout
        assert item_flag == bool(pairs & HELDOUT_PAIRS)
        flagged += item_flag
    assert HELDOUT_PAIRS <= seen_test
    assert 0 < flagged < 500

    # holdout=False puts every pair in training.
    open_train = ShapesDataset("train", size=600, seed=0, holdout=False)
    assert any(open_train.scene(i).heldout for i in range(600))


@pytest.mark.parametrize("resolution", [64, 32])
def test_image_shape_and_range(resolution: int) -> None:
    ds = ShapesDataset("test", size=20, resolution=resolution)
    item = ds[4]
    img = item["image"]
    assert img.shape == (3, resolution, resolution) and img.dtype == torch.float32
    assert img.min() >= -1.0 and img.max() <= 1.0
    assert img.min() < -0.5  # saturated colours reach near 0 in some channel
    assert set(item) == {"image", "caption", "scene", "index", "heldout"}
    json.dumps(item["scene"])  # JSON-able


def test_phrasings_mention_every_object_and_follow_grammar() -> None:
    rel_alt = "|".join(re.escape(w) for ws in REL_WORDS.values() for w in ws)
    np_re = r"a (small|large) (\w+) (\w+)"
    word_to_rel = {w: r for r, ws in REL_WORDS.items() for w in ws}
    for max_objects in (2, 3):
        ds = ShapesDataset("test", size=150, seed=5, max_objects=max_objects)
        for i in range(150):
            scene = ds.scene(i)
            ps = phrasings(scene)
            assert len(ps) == len(set(ps)) == {1: 3, 2: 8, 3: 32}[len(scene.objects)]
            for p in ps:
                for o in scene.objects:
                    assert f"{o.size} {o.colour} {o.shape}" in p
                if len(scene.objects) == 1:
                    assert POS_WORDS[scene.position] in p
                    continue
                # Parse each clause back and check it against the scene geometry.
                body = p[len("there is "):] if p.startswith("there is ") else p
                clauses = body.split(" and ")
                assert len(clauses) == len(scene.objects) - 1
                for clause in clauses:
                    m = re.fullmatch(rf"{np_re} ({rel_alt}) {np_re}", clause)
                    assert m, clause
                    a = next(o for o in scene.objects if (o.size, o.colour, o.shape) == m.group(1, 2, 3))
                    b = next(o for o in scene.objects if (o.size, o.colour, o.shape) == m.group(5, 6, 7))
                    rel = word_to_rel[m.group(4)]
                    dx, dy = a.x - b.x, a.y - b.y
                    expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                    assert rel == expected, (clause, scene)
            assert caption(scene, random.Random(1)) in ps


def test_caption_choice_is_seeded() -> None:
    scene = ShapesDataset("train", size=5, seed=0, min_objects=2).scene(0)
    assert caption(scene, 42) == caption(scene, random.Random(42))
    assert len({caption(scene, s) for s in range(40)}) > 3


def test_access_seed_varies_caption_not_image() -> None:
    ds = ShapesDataset("train", size=10, seed=0, min_objects=2)
    base = ds[3]
    assert ds[3]["caption"] == base["caption"]  # int index: fixed caption
    seeded = [ds[(3, s)] for s in range(12)]
    assert all(torch.equal(it["image"], base["image"]) for it in seeded)
    assert len({it["caption"] for it in seeded}) > 1
    assert ds[(3, 5)]["caption"] == ds[(3, 5)]["caption"]
    assert all(it["caption"] in phrasings(Scene.from_dict(base["scene"])) for it in seeded)


def test_render_puts_colours_at_stated_positions() -> None:
    for max_objects in (2, 3):
        ds = ShapesDataset("test", size=120, seed=11, max_objects=max_objects)
        for i in range(120):
            item = ds[i]
            scene = Scene.from_dict(item["scene"])
            for o in scene.objects:
                assert _pixel(item["image"], o.x, o.y) == COLOURS[o.colour], (i, o)
            for cx, cy in ((0.0, 0.0), (0.999, 0.0), (0.0, 0.999), (0.999, 0.999)):
                assert _pixel(item["image"], cx, cy) == BACKGROUND


def test_render_shapes_and_sizes_differ() -> None:
    # Coverage (share of coloured pixels in the bounding box) separates the shapes; the
    # large variant covers clearly more pixels than the small one.
    res = 64
    cover: dict[tuple[str, str], int] = {}
    for shape in SHAPES:
        for size in SIZES:
            img = render(Scene([ShapeObject(shape, "red", size, 0.5, 0.5)], position="center"), res)
            t = torch.from_numpy(np.asarray(img).astype(np.int64))
            cover[(shape, size)] = int((t != torch.tensor(BACKGROUND)).any(-1).sum())
    for shape in SHAPES:
        assert cover[(shape, "large")] > 2 * cover[(shape, "small")]
    side = SIZES["large"] * res
    assert cover[("square", "large")] == pytest.approx(side**2, rel=0.15)
    assert cover[("circle", "large")] == pytest.approx(3.1416 * (side / 2) ** 2, rel=0.15)
    assert cover[("triangle", "large")] == pytest.approx(side**2 / 2, rel=0.2)
    assert cover[("diamond", "large")] == pytest.approx(side**2 / 2, rel=0.2)


def test_objects_do_not_overlap() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng, max_objects=3, min_objects=2)
        objs = scene.objects
        for a, b in zip(objs, objs[1:]):
            gap_x = abs(a.x - b.x) - (a.extent + b.extent) / 2
            gap_y = abs(a.y - b.y) - (a.extent + b.extent) / 2
            assert max(gap_x, gap_y) > 0


def test_scene_roundtrip_and_validation() -> None:
    scene = ShapesDataset("test", size=3, seed=2, min_objects=2).scene(0)
    d = json.loads(json.dumps(scene.to_dict()))
    assert Scene.from_dict(d) == scene
    with pytest.raises(ValueError, match="colour"):
        Scene([ShapeObject("circle", "pink", "small", 0.5, 0.5)], position="center")
    with pytest.raises(ValueError, match="relation"):
        Scene([ShapeObject("circle", "red", "small", 0.2, 0.5), ShapeObject("square", "red", "small", 0.8, 0.5)])
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("validation")
    with pytest.raises(IndexError):
        ShapesDataset("train", size=4)[4]
    assert INVERSE["left"] == "right" and INVERSE["above"] == "below"


def test_dataloader_batches() -> None:
    ds = ShapesDataset("train", size=10, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["batch_size"] == 4 and batch["skipped"] == 0
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["heldout"].dtype == torch.bool
    assert len(batch["caption"]) == 4 and isinstance(batch["scene"][0], dict)
