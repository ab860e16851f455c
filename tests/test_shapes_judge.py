"""The Shapes judge: caption parser, image reader, scores, and its self-check on ground truth."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lverse.shapes.judge import (
    ATTRIBUTES,
    ObjectReading,
    _placement,
    attribute_scores,
    judge_pairs,
    judge_scenes,
    read_image,
    read_image_detailed,
    read_images,
)
from lverse.shapes.parse import ParseError, canonical_layout, match, parse_caption, scene_key, try_parse_caption
from lverse.shapes.scenes import (
    COLOURS,
    INVERSE,
    POS_WORDS,
    REL_WORDS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    phrasings,
    render,
    sample_scene,
)


def _scene(*objs: tuple[str, str, str], relation: str | None = None, position: str | None = None) -> Scene:
    """A scene from (shape, colour, size) triples at the canonical layout."""
    return canonical_layout(list(objs), relation=relation, position=position)


def _same_description(parsed: Scene, truth: Scene) -> bool:
    """Independent of :func:`match`: attributes plus relation, allowing the chain reversed."""
    p = [(o.shape, o.colour, o.size) for o in parsed.objects]
    t = [(o.shape, o.colour, o.size) for o in truth.objects]
    if len(t) == 1:
        return p == t and parsed.position == truth.position and parsed.relation is None
    forward = p == t and parsed.relation == truth.relation
    backward = p == t[::-1] and parsed.relation == INVERSE[truth.relation]  # type: ignore[index]
    return forward or backward


# --- caption parser -------------------------------------------------------------------------
def test_parse_roundtrips_every_phrasing_of_random_scenes() -> None:
    rng = random.Random(0)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(2000):
        scene = sample_scene(rng, max_objects=3)
        options = phrasings(scene)
        assert len(options) == {1: 3, 2: 8, 3: 32}[len(scene.objects)]
        for text in options:
            parsed = parse_caption(text)
            assert _same_description(parsed, scene), (text, parsed)
            assert match(parsed, scene) and match(scene, parsed)
        counts[len(scene.objects)] += 1
    assert min(counts.values()) > 400  # every tier exercised


def test_parse_tolerates_case_whitespace_and_full_stop() -> None:
    rng = random.Random(1)
    for _ in range(200):
        scene = sample_scene(rng, max_objects=3)
        text = rng.choice(phrasings(scene))
        words = [w.upper() if rng.random() < 0.3 else w.capitalize() if rng.random() < 0.3 else w for w in text.split()]
        noisy = "  " + "   ".join(words) + rng.choice([".", " .", "", ".  "]) + "\n"
        assert match(parse_caption(noisy), scene), noisy


def test_parse_uses_the_dataset_tables() -> None:
    # Every word of the tables is understood in its slot (so new entries there would be too).
    for size in SIZES:
        for colour in COLOURS:
            for shape in SHAPES:
                for pos, words in POS_WORDS.items():
                    s = parse_caption(f"a {size} {colour} {shape} {words}")
                    assert (s.objects[0].shape, s.objects[0].colour, s.objects[0].size, s.position) == (
                        shape, colour, size, pos)
    for rel, phrases in REL_WORDS.items():
        for words in phrases:
            s = parse_caption(f"a small red circle {words} a large blue square")
            assert s.relation == rel and s.objects[0].shape == "circle"


@pytest.mark.parametrize(
    "text, word, position",
    [
        ("a small red blob on the left", "blob", 3),  # unknown word
        ("a small red circle on the left!", "left!", 6),  # punctuation is not a word
        ("a red small circle on the left", "red", 1),  # attribute order
        ("a small red circle", "", 4),  # nothing after the object
        ("there is a small red circle", "", 6),
        ("a small red circle on the left and", "and", 7),  # trailing words
        ("on the left a small red circle", "a", 3),  # "there is" missing
        ("a small red circle on the left there is", "there", 7),
        ("a small red circle in the left", "in", 4),  # half a position phrase
        ("a small red circle left a large blue square", "left", 4),  # "of" missing
        ("a small red circle left of a large blue square a large green square", "a", 10),
        ("a small red circle left of a large blue square and", "", 11),
        # two clauses that do not chain through one object
        ("a small red circle left of a large blue square and a small green circle left of a large cyan square",
         "a", 11),
        # a chain mixing axes: error at the offending relation
        ("a small red circle left of a large blue square and a large blue square above a small green circle",
         "above", 15),
        # contradicting / ambiguous chains
        ("a small red circle left of a large blue square and a small red circle right of a large blue square",
         "a", 11),
        ("a small red circle left of a large blue square and a large blue square left of a small red circle",
         "a", 11),
    ],
)
def test_parse_errors_name_the_offending_word(text: str, word: str, position: int) -> None:
    with pytest.raises(ParseError) as info:
        parse_caption(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.word, err.position) == (word, position), str(err)
    assert text in str(err)
    assert try_parse_caption(text) is None


def test_parse_rejects_empty_and_non_strings() -> None:
    for text in ("", "   ", "."):
        with pytest.raises(ParseError, match="empty"):
            parse_caption(text)
    with pytest.raises(TypeError):
        parse_caption(None)  # type: ignore[arg-type]


def test_three_object_chain_semantics() -> None:
    a, b, c = ("circle", "red", "small"), ("square", "blue", "large"), ("triangle", "green", "small")
    # Clauses may be written either way round; the chain is a left of b left of c.
    s = parse_caption(
        "there is a large blue square to the right of a small red circle and a small green triangle right of a large blue square"
    )
    assert match(s, _scene(a, b, c, relation="left"))
    assert match(s, _scene(c, b, a, relation="right"))
    assert not match(s, _scene(b, a, c, relation="left"))
    assert not match(s, _scene(a, b, c, relation="above"))


def test_canonical_layout_follows_the_dataset_rules_and_renders_back() -> None:
    rng = random.Random(2)
    for _ in range(60):
        scene = sample_scene(rng, max_objects=3)
        parsed = parse_caption(rng.choice(phrasings(scene)))
        n = len(parsed.objects)
        for o in parsed.objects:
            half = SIZES[o.size] / 2
            assert half <= o.x <= 1 - half and half <= o.y <= 1 - half
        if n > 1:
            horizontal = parsed.relation in ("left", "right")
            along = [o.x if horizontal else o.y for o in parsed.objects]
            assert all(abs(d) >= 0.24 for d in np.diff(along))
        assert match(read_image(render(parsed)), parsed)


# --- comparison -------------------------------------------------------------------------------
def test_match_semantics() -> None:
    a, b = ("circle", "red", "small"), ("square", "blue", "large")
    left = _scene(a, b, relation="left")
    assert match(left, _scene(b, a, relation="right"))  # "A left of B" == "B right of A"
    assert match(left, left.to_dict())  # scene dicts are accepted
    assert not match(left, _scene(b, a, relation="left"))
    assert not match(left, _scene(a, b, relation="above"))
    assert not match(left, _scene(a, ("square", "blue", "small"), relation="left"))
    assert not match(left, _scene(a, position="left"))
    assert not match(left, None) and not match(None, None)
    one = _scene(a, position="top")
    assert match(one, _scene(a, position="top")) and not match(one, _scene(a, position="bottom"))
    # coordinates are not part of a scene's description
    moved = Scene([ShapeObject("circle", "red", "small", 0.31, 0.77)], position="top")
    assert match(one, moved) and scene_key(one) == scene_key(moved)


def test_placement_rule_reproduces_the_dataset_layout() -> None:
    # On the true coordinates of many sampled scenes the reader's rule gives the stated
    # relation/position, with room to spare (it decides at the midpoints of the guarantees).
    rng = random.Random(3)
    for _ in range(5000):
        scene = sample_scene(rng, max_objects=3)
        readings = [ObjectReading(o.shape, o.colour, o.size, o.x, o.y, 0.0, 0.0, 1.0, 1.0) for o in scene.objects]
        ordered, relation, position, margin = _placement(readings)
        got = Scene([r.to_object() for r in ordered], relation=relation, position=position)
        assert match(got, scene)
        assert margin > 0.15


# --- image reader -----------------------------------------------------------------------------
def _blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=1))


def _noise(img: Image.Image, rng: random.Random) -> Image.Image:
    arr = np.asarray(img, np.float64) / 255 + np.random.default_rng(rng.randrange(2**31)).normal(0, 0.05, (*img.size[::-1], 3))
    return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8))


def _shift(img: Image.Image, rng: random.Random) -> Image.Image:
    delta = np.array([rng.randint(-20, 20) for _ in range(3)])
    return Image.fromarray(np.clip(np.asarray(img, np.int32) + delta, 0, 255).astype(np.uint8))


def _down_up(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.resize((32, 32), Image.Resampling.BILINEAR).resize(img.size, Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


DEGRADATIONS = {"blur": _blur, "noise": _noise, "shift": _shift, "down_up": _down_up, "jpeg": _jpeg}


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_reader_is_robust_to_degradations(name: str) -> None:
    rng = random.Random(f"degrade/{name}")
    scenes = [sample_scene(rng, max_objects=2) for _ in range(400)]
    images = [DEGRADATIONS[name](render(s), rng) for s in scenes]
    acc = float(np.mean([match(read_image(im), s) for im, s in zip(images, scenes)]))
    assert acc >= 0.97, f"{name}: exact {acc:.3f}"


def test_reader_three_object_tier() -> None:
    rng = random.Random(4)
    scenes = [sample_scene(rng, max_objects=3, min_objects=3) for _ in range(150)]
    for degrade in (lambda im: im, lambda im: _blur(im, rng)):
        acc = float(np.mean([match(read_image(degrade(render(s))), s) for s in scenes]))
        assert acc >= 0.97


@pytest.mark.parametrize("resolution", [32, 128])
def test_reader_other_resolutions(resolution: int) -> None:
    rng = random.Random(resolution)
    scenes = [sample_scene(rng, max_objects=3) for _ in range(60)]
    assert all(match(read_image(render(s, resolution)), s) for s in scenes)


def test_reader_measures_coordinates_and_sizes() -> None:
    rng = random.Random(5)
    for _ in range(100):
        scene = sample_scene(rng, max_objects=2)
        res = read_image_detailed(render(scene))
        assert res.scene is not None and match(res.scene, scene)
        assert 0 < res.confidence <= 1 and res.specks == 0 and res.off_palette == 0
        for o in res.objects:  # pair each reading with its true object by colour+shape+size
            (t,) = [t for t in scene.objects if (t.shape, t.colour, t.size) == (o.shape, o.colour, o.size)]
            assert abs(o.x - t.x) < 0.02 and abs(o.y - t.y) < 0.02  # bounding-box centres
            assert abs(o.extent / t.extent - 1) < 0.1
    json.dumps(res.to_dict())  # debug info is JSON-able


def test_reader_accepts_every_image_form() -> None:
    scene = _scene(("triangle", "purple", "large"), ("diamond", "cyan", "small"), relation="below")
    img = render(scene)
    u8 = np.asarray(img)
    t = torch.from_numpy(u8.copy()).permute(2, 0, 1)
    forms = [
        img,
        img.convert("RGBA"),
        t.float() / 127.5 - 1,  # the dataset's tensors
        (t.float() / 127.5 - 1)[None],
        t,  # uint8 tensor
        u8,
        u8.astype(np.float32) / 255,
        (u8.astype(np.float32) / 255).transpose(2, 0, 1),
    ]
    for form in forms:
        assert match(read_image(form), scene), type(form)
    assert match(read_image(u8.astype(np.float32), value_range=(0, 255)), scene)
    batch = torch.stack([t.float() / 127.5 - 1] * 3)
    assert all(match(s, scene) for s in read_images(batch))
    with pytest.raises(ValueError, match="shape"):
        read_image(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        read_image(np.zeros((8, 8)))
    with pytest.raises(TypeError):
        read_image([[0, 1]])  # type: ignore[arg-type]


def test_reader_drops_specks_and_off_palette_ink() -> None:
    scene = _scene(("square", "green", "small"), position="left")
    arr = np.array(render(scene))
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(40, 64, 12), rng.integers(30, 64, 12)
    arr[ys, xs] = COLOURS["red"]  # stray pixels
    arr[5:12, 45:58] = (60, 60, 60)  # a dark grey blob: ink of no palette colour
    res = read_image_detailed(Image.fromarray(arr))
    assert match(res.scene, scene)
    assert res.specks >= 1 and res.off_palette > 0.01
    empty = read_image_detailed(Image.new("RGB", (64, 64), "white"))
    assert empty.scene is None and empty.objects == []


def test_reader_splits_touching_objects_of_different_colours() -> None:
    scene = Scene(
        [ShapeObject("square", "red", "large", 0.35, 0.5), ShapeObject("square", "blue", "large", 0.65, 0.5)],
        relation="left",
    )
    read = read_image(render(scene))
    assert read is not None and match(read, scene)


# --- scores -----------------------------------------------------------------------------------
RC, BS, GT = ("circle", "red", "small"), ("square", "blue", "large"), ("triangle", "green", "small")


@pytest.mark.parametrize(
    "pred, expected",
    [
        (_scene(RC, BS, relation="left"), dict(exact=1, count=1, colour=1, shape=1, size=1, placement=1)),
        (_scene(BS, RC, relation="right"), dict(exact=1, count=1, colour=1, shape=1, size=1, placement=1)),
        # one colour wrong
        (_scene(("circle", "yellow", "small"), BS, relation="left"),
         dict(exact=0, count=1, colour=0.5, shape=1, size=1, placement=1)),
        # right objects, relation backwards
        (_scene(BS, RC, relation="left"), dict(exact=0, count=1, colour=1, shape=1, size=1, placement=0)),
        # right objects, other axis
        (_scene(RC, BS, relation="above"), dict(exact=0, count=1, colour=1, shape=1, size=1, placement=0)),
        # one object missing: half the objects agree, no relation left
        (_scene(BS, position="right"), dict(exact=0, count=0, colour=0.5, shape=0.5, size=0.5, placement=0)),
        # one object extra: the two true ones are found; "left of" holds along a whole chain,
        # so the red circle is still left of the blue square with a triangle between them
        (_scene(RC, GT, BS, relation="left"),
         dict(exact=0, count=0, colour=2 / 3, shape=2 / 3, size=2 / 3, placement=1)),
        (_scene(GT, BS, RC, relation="left"),
         dict(exact=0, count=0, colour=2 / 3, shape=2 / 3, size=2 / 3, placement=0)),
        # sizes swapped
        (_scene(("circle", "red", "large"), ("square", "blue", "small"), relation="left"),
         dict(exact=0, count=1, colour=1, shape=1, size=0, placement=1)),
        (None, dict(exact=0, count=0, colour=0, shape=0, size=0, placement=0)),
    ],
)
def test_attribute_scores(pred: Scene | None, expected: dict[str, float]) -> None:
    truth = _scene(RC, BS, relation="left")
    got = attribute_scores(pred, truth)
    assert set(got) == set(ATTRIBUTES)
    assert got == pytest.approx(expected)


def test_attribute_scores_one_object_position() -> None:
    truth = _scene(RC, position="center")
    assert attribute_scores(_scene(RC, position="left"), truth) == pytest.approx(
        dict(exact=0, count=1, colour=1, shape=1, size=1, placement=0))
    assert attribute_scores(_scene(RC, BS, relation="left"), truth)["placement"] == 0
    with pytest.raises(ValueError):
        attribute_scores(truth, None)  # type: ignore[arg-type]


def test_judge_scenes_aggregates() -> None:
    truths = [_scene(RC, BS, relation="left"), _scene(RC, position="top"), _scene(GT, position="left")]
    preds = [_scene(BS, RC, relation="right"), _scene(("circle", "blue", "small"), position="top"), None]
    out = judge_scenes(preds, truths)
    per = [attribute_scores(p, t) for p, t in zip(preds, truths)]
    for a in ATTRIBUTES:
        assert out[a] == pytest.approx(np.mean([s[a] for s in per]))
    assert out["exact"] == pytest.approx(1 / 3) and out["colour"] == pytest.approx(1 / 3)
    assert out["parse_failure_rate"] == pytest.approx(1 / 3) and out["n"] == 3
    assert out["exact_by_objects"] == {"1": 0.0, "2": 1.0}
    json.dumps(out)
    with pytest.raises(ValueError, match="2 predictions but 3"):
        judge_scenes(preds[:2], truths)


def test_self_check_ground_truth_pairs_and_shuffled_pairs() -> None:
    """Ground-truth images against their captions score (almost) perfectly; shuffled pairs
    score near chance, so a high score really means the images show the captions."""
    ds = ShapesDataset("test", size=500, seed=0, max_objects=2)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    out = judge_pairs(images, captions)
    assert out["n"] == 500 and out["exact"] >= 0.99 and out["parse_failure_rate"] == 0
    for a in ("count", "colour", "shape", "size", "placement"):
        assert out[a] >= 0.99
    # the other direction: captions judged against the images they describe
    assert judge_pairs(images, captions, reference="image")["exact"] >= 0.99
    # scene dicts as references
    assert judge_pairs(images, [it["scene"] for it in items])["exact"] >= 0.99

    perm = np.random.default_rng(0).permutation(500)
    perm = np.where(perm == np.arange(500), (perm + 1) % 500, perm)  # no item keeps its caption
    shuffled = judge_pairs(images, [captions[i] for i in perm])
    assert shuffled["exact"] < 0.10
    assert shuffled["colour"] < 0.6 and shuffled["placement"] < 0.6


def test_judge_pairs_failures_and_errors() -> None:
    scene = _scene(RC, BS, relation="above")
    img = render(scene)
    blank = Image.new("RGB", (64, 64), "white")
    out = judge_pairs([img, blank], [scene, scene])  # an image with nothing on it fails
    assert out["exact"] == 0.5 and out["parse_failure_rate"] == 0.5
    out = judge_pairs([img, img], ["a small red circle above a large blue square", "a small red circle above"],
                      reference="image")  # a generated caption outside the grammar fails
    assert out["exact"] == 0.5 and out["parse_failure_rate"] == 0.5
    with pytest.raises(ParseError, match="reference caption 0"):
        judge_pairs([img], ["a small red circle above"])  # a reference must be readable
    with pytest.raises(ValueError, match="reference image 0"):
        judge_pairs([blank], ["a small red circle on the left"], reference="image")
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        judge_pairs([img], [scene, scene])
    with pytest.raises(ValueError, match="reference must be"):
        judge_pairs([img], [scene], reference="text")  # type: ignore[arg-type]
