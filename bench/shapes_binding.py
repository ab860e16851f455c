"""Text→image on two-object Shapes scenes: does each object take its own noun phrase's attributes?

For every two-object test caption, draws ``--samples`` images, reads each back with the judge and,
where two objects are read, pairs them with the caption's objects by their order along the
relation's axis (left to right, or top to bottom). Each generated object's colour, shape and size
is then the object's own, the *other* object's (a binding error), or in neither noun phrase
(the caption ignored). A uniform guess of colour gives 1/6, 1/6 and 4/6.

It then scores the test images' own tokens under three captions: the true one, the true one with
the two colour words swapped, and one with every colour replaced. If the BiART binds each noun
phrase to its object, swapping costs about as much as replacing.

    python bench/shapes_binding.py --checkpoint checkpoints/shapes --n 300 --samples 8
"""
from __future__ import annotations

import argparse
import collections

import torch

from lverse.inference.pipeline import LVersePipeline
from lverse.inference.sampling import generate_images
from lverse.shapes.judge import read_images
from lverse.shapes.parse import match
from lverse.shapes.scenes import COLOURS, Scene, ShapeObject, ShapesDataset

ATTRS = ("colour", "shape", "size")
OUTCOMES = ("own", "other object's", "in neither")
AXES = ("side by side (left/right)", "stacked (above/below)")


def along_axis(scene: Scene, objects: list[ShapeObject]) -> list[ShapeObject]:
    """Objects in order along the scene's relation axis (x for left/right, y for above/below)."""
    horizontal = scene.relation in ("left", "right")
    return sorted(objects, key=lambda o: o.x if horizontal else o.y)


def swap_colours(caption: str) -> str:
    """The caption with its two colour words exchanged (unchanged if it has not two)."""
    words = caption.split()
    at = [i for i, w in enumerate(words) if w in COLOURS]
    if len(at) == 2:
        words[at[0]], words[at[1]] = words[at[1]], words[at[0]]
    return " ".join(words)


def other_colours(caption: str) -> str:
    """Every colour word replaced by the colour three places on in the palette (a different one)."""
    names = list(COLOURS)
    return " ".join(names[(names.index(w) + 3) % len(names)] if w in COLOURS else w for w in caption.split())


@torch.no_grad()
def image_nll(pipe: LVersePipeline, captions: list[str], codes: torch.Tensor) -> float:
    """Mean per-token NLL of the image codes given the captions (text->image)."""
    ids, _ = pipe.encode_prompts(captions, warn=False)
    _, logs = pipe.biart.loss(*pipe.biart.build_sequence(ids, codes, "t2i"))
    return float(logs["nll_image"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/shapes")
    ap.add_argument("--n", type=int, default=300, help="test scenes to draw from (about half have two objects)")
    ap.add_argument("--samples", type=int, default=8, help="images per caption")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    pipe = LVersePipeline.load(args.checkpoint, device=args.device)
    ds = ShapesDataset("test", size=args.n, seed=0, resolution=pipe.resolution)
    scenes = [ds[(i, 0)] for i in range(args.n)]
    items = [it for it in scenes if len(it["scene"]["objects"]) == 2]
    if not items:
        raise SystemExit(f"no two-object scene among the first {args.n} test scenes: raise --n")
    ids, _ = pipe.encode_prompts([it["caption"] for it in items], warn=False)
    gen = generate_images(pipe.biart, ids, args.samples, seed=args.seed)

    counts: collections.Counter[str] = collections.Counter()
    tally = {a: collections.Counter() for a in ATTRS}
    first_second = [collections.Counter(), collections.Counter()]  # colour outcome of object 1 / 2 along the axis
    # Side by side (left/right), raster order alternates between the two objects on every row
    # of codes; stacked (above/below), it writes one object and then the other.
    by_axis = {ax: collections.Counter() for ax in AXES}
    for i, it in enumerate(items):
        truth = Scene.from_dict(it["scene"])
        want = along_axis(truth, truth.objects)
        axis = AXES[0] if truth.relation in ("left", "right") else AXES[1]
        for read in read_images(pipe.decode_images(gen[i]).cpu()):
            counts["unreadable" if read is None else f"{len(read.objects)} objects read"] += 1
            by_axis[axis]["images"] += 1
            by_axis[axis]["exact"] += int(match(read, truth))
            if read is None or len(read.objects) != 2:
                continue
            got = along_axis(truth, read.objects)
            for k in range(2):
                for a in ATTRS:
                    v, own, other = getattr(got[k], a), getattr(want[k], a), getattr(want[1 - k], a)
                    outcome = "own" if v == own else "other object's" if v == other else "in neither"
                    tally[a][outcome] += 1
                    if a == "colour":
                        first_second[k][outcome] += 1
                        by_axis[axis]["colour objects"] += 1
                        by_axis[axis]["own colour"] += int(outcome == "own")

    total = len(items) * args.samples
    print(f"{len(items)} two-object captions x {args.samples} samples = {total} images; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("\n| attribute | " + " | ".join(OUTCOMES) + " |\n|---|---|---|---|")
    for a in ATTRS:
        n = sum(tally[a].values()) or 1
        print(f"| {a} | " + " | ".join(f"{100 * tally[a][o] / n:.1f}%" for o in OUTCOMES) + " |")
    own = [100 * c["own"] / max(1, sum(c.values())) for c in first_second]
    print(f"\nown colour: first object along the axis {own[0]:.1f}%, second {own[1]:.1f}%")
    print("\n| relation axis | images | exact scene | own colour (of objects read in two-object images) |\n|---|---|---|---|")
    for ax, c in by_axis.items():
        print(f"| {ax} | {c['images']} | {100 * c['exact'] / max(1, c['images']):.1f}% | "
              f"{100 * c['own colour'] / max(1, c['colour objects']):.1f}% |")

    print("\nimage NLL (nats per code) of the test images' own tokens, given:\n")
    print("| scenes | true caption | colours swapped | other colours |\n|---|---|---|---|")
    for k in (1, 2):
        group = [it for it in scenes if len(it["scene"]["objects"]) == k]
        caps = [it["caption"] for it in group]
        codes = pipe.encode_images(torch.stack([it["image"] for it in group]), batch_size=64)
        row = [image_nll(pipe, c, codes) for c in (caps, [swap_colours(c) for c in caps], [other_colours(c) for c in caps])]
        print(f"| {k} object{'s' if k > 1 else ''} ({len(group)}) | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
