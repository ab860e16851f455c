"""Are the Shapes AugVAE's codes local? What one code says about its own 8×8-pixel cell, and how
much of an object the decoder reads from the codes of the empty cells around it.

1. On ``--train`` training images, every cell that an object covers for at least a quarter of its
   pixels is labelled with that object's colour (nearest palette colour). If each code drew its own
   cell, the code would give the colour away: H(colour | code) near 0. A code that says nothing
   leaves H(colour) of the cells (about 1.79 nats for six colours). A small MLP probe, trained on
   80% of those cells and scored on the rest, then asks whether the encoder's continuous latent of
   the cell (before quantization) holds the colour: if it does not, no codebook size will help.
2. On ``--n`` test images, the codes of the *empty* cells (no object pixel) are replaced, and the
   result decoded and read by the judge: by the codes of the same cells in another test scene
   where they are empty too, or by the most common empty-cell code. With local codes the objects
   would not change.

    python bench/shapes_codes.py --checkpoint checkpoints/shapes
    python bench/shapes_codes.py --augvae runs/shapes_augvae_ml   # part 1 for every level of any AugVAE
"""
from __future__ import annotations

import argparse
import math

import torch

from lverse.files import resolve_weights
from lverse.inference.pipeline import LVersePipeline
from lverse.models.augvae import AugVAE
from lverse.shapes.analysis import cell_colours, colour_given_code, empty_cells, probe_accuracy
from lverse.shapes.judge import judge_scenes, read_images
from lverse.shapes.scenes import ShapesDataset


def levels(path: str, images: torch.Tensor) -> None:
    """Part 1 for every level of an AugVAE (ML: finest first) whose grid is at least 4x4."""
    model = AugVAE.load(resolve_weights(path)).eval()
    codes = torch.cat([model.encode(images[i : i + 200]) for i in range(0, len(images), 200)])
    print(f"{path}: object cells of {len(images)} training images, per level")
    print("| level | codes used | H(colour) | H(colour given code) | most common colour right |")
    print("|---|---|---|---|---|")
    start = 0
    for h, w in model.token_grids:
        c, start = codes[:, start : start + h * w], start + h * w
        if h >= 4:
            s = colour_given_code(c, cell_colours(images, h))
            print(f"| {h}x{w} | {s['codes']} | {s['H_colour']:.3f} | {s['H_colour_given_code']:.3f} | {100 * s['majority']:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes")
    ap.add_argument("--train", type=int, default=2000, help="training images for part 1")
    ap.add_argument("--n", type=int, default=300, help="test images for part 2")
    ap.add_argument("--augvae", help="an AugVAE (weights file or run dir): part 1 only, for each of its levels")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = ShapesDataset("train", size=args.train, seed=0, resolution=64)
    images = torch.stack([ds[(i, 0)]["image"] for i in range(args.train)])
    if args.augvae:
        levels(args.augvae, images)
        return
    pipe = LVersePipeline.load(args.checkpoint)

    codes = pipe.encode_images(images, batch_size=128)
    grid = math.isqrt(codes.shape[1])
    s = colour_given_code(codes, cell_colours(images, grid))
    print(f"1. {s['cells']} object cells of {args.train} training images ({grid}x{grid} codes), {s['codes']} codes:")
    print(f"   H(colour) = {s['H_colour']:.3f} nats, H(colour | code) = {s['H_colour_given_code']:.3f} nats; "
          f"naming each code's most common colour is right for {100 * s['majority']:.1f}% of the cells")
    with torch.no_grad():
        latents = torch.cat([pipe.augvae.encode_latents(images[i : i + 128].to(pipe.device))[0].float().cpu()
                             for i in range(0, len(images), 128)])
    colours = cell_colours(images, grid)
    cells = latents.permute(0, 2, 3, 1).reshape(len(images), grid * grid, -1)[colours >= 0]
    print(f"   an MLP probe names the colour from the cell's pre-quantization latent for "
          f"{100 * probe_accuracy(cells, colours[colours >= 0]):.1f}% of held-out cells\n")

    test = ShapesDataset("test", size=args.n, seed=0, resolution=64)
    items = [test[(i, 0)] for i in range(args.n)]
    print("2. test images decoded after replacing the codes of their empty cells (judge, exact / colour / shape):\n")
    print("| scenes | empty cells | own codes | empty cells from another scene | most common empty-cell code |")
    print("|---|---|---|---|---|")
    for k in sorted({len(it["scene"]["objects"]) for it in items}):
        sel = [it for it in items if len(it["scene"]["objects"]) == k]
        imgs = torch.stack([it["image"] for it in sel])
        c = pipe.encode_images(imgs, batch_size=128)
        empty = empty_cells(imgs, grid)
        truths = [it["scene"] for it in sel]

        def judged(cs: torch.Tensor) -> str:
            r = judge_scenes(read_images(pipe.decode_images(cs, batch_size=64).cpu()), truths)
            return " / ".join(f"{100 * r[a]:.1f}%" for a in ("exact", "colour", "shape"))

        other = torch.roll(torch.arange(len(sel)), 1)
        both = empty & empty[other]
        swapped = c.clone()
        swapped[both] = c[other][both]
        common = int(torch.mode(c[empty]).values)
        flat = c.masked_fill(empty, common)
        print(f"| {k} object{'s' if k > 1 else ''} ({len(sel)}) | {empty.float().sum(1).mean():.1f} of {grid * grid} | "
              f"{judged(c)} | {judged(swapped)} | {judged(flat)} |")


if __name__ == "__main__":
    main()
