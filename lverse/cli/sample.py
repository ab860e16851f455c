"""``sample.py`` / ``lverse sample``: text -> images and image -> captions, reranked.

Text -> image: for each prompt, ``--keep`` images, each the best of its own draw of
``--candidates`` (seeds ``--seed .. --seed + keep - 1``); writes one PNG per kept image,
``grid.png`` (a row per prompt) and ``samples.json`` (prompts, seeds, settings, every score).
Image -> text: for each image the best of ``--candidates`` captions is printed, and every
candidate with its scores goes to ``captions.json``.

Every setting left out comes from :mod:`lverse.inference.defaults` and the bundle's
``sampling.json``: with no flags this is exactly what the README's results table measures. The
work itself is :mod:`lverse.inference.generate`; this module parses arguments and writes files.

Bad input (missing/corrupt image, empty prompt, a checkpoint whose parts do not fit) ends with
one ``error: ...`` line on stderr and a non-zero exit code; no traceback (``LVERSE_DEBUG=1``
shows it).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from lverse.data.images import IMAGE_EXTENSIONS
from lverse.files import atomic_write_text, save_grid, save_image
from lverse.inference.defaults import DEFAULTS, Sampling
from lverse.inference.generate import image_to_text, load_reranker, text_to_image
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import check_reranker

EXIT_ERROR = 1


class CLIError(Exception):
    """A problem with the user's input: reported as one ``error:`` line."""


def build_parser() -> argparse.ArgumentParser:
    t2i, i2t = DEFAULTS["text_to_image"], DEFAULTS["image_to_text"]
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="L-Verse sampling: --text makes images, --image makes captions (reranked candidates). "
                    "Settings not given come from the defaults below and the checkpoint's sampling.json.",
    )
    src = p.add_argument_group("inputs (at least one)")
    src.add_argument("--text", action="append", default=[], metavar="PROMPT", help="a prompt (repeatable)")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="a text file with one prompt per line")
    src.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image file, a glob or a folder (repeatable)")

    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: $LVERSE_CHECKPOINT or the shipped checkpoints/shapes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="BiART precision (AugVAE always runs in fp32)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output directory (default: samples)")

    s = p.add_argument_group("sampling (defaults: images / captions)")
    s.add_argument("--candidates", type=int, default=None,
                   help=f"candidates drawn per image or caption ({t2i.candidates} / {i2t.candidates})")
    s.add_argument("--keep", type=int, default=1,
                   help="images kept per prompt; each is the best of its own --candidates draw (default 1)")
    s.add_argument("--batch-size", type=int, default=64, help="rows decoded at once (default 64)")
    s.add_argument("--top-k", type=int, default=None, help=f"top-k filter, 0 = off ({t2i.top_k} / {i2t.top_k})")
    s.add_argument("--top-p", type=float, default=None, help=f"nucleus filter, 1 = off ({t2i.top_p:g} / {i2t.top_p:g})")
    s.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy ({t2i.temperature:g} / {i2t.temperature:g})")
    s.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale for images, 1 = off ({t2i.guidance:g}; needs a BiART "
                        f"trained with text_dropout > 0)")
    s.add_argument("--seed", type=int, default=0, help="base seed; round r of a prompt uses seed + r (default 0)")
    s.add_argument("--max-text-tokens", type=int, default=None,
                   help="caption tokens drawn (default 32, as in the paper, or the model's text length if shorter)")

    r = p.add_argument_group("reranking")
    r.add_argument("--rerank", type=check_reranker, default=None, metavar="RERANKER",
                   help=f"clip | likelihood (BiART's reverse direction; old name cycle) | reconstruct[:clip|latent|tokens] "
                        f"(draw each candidate back, compare with the source) | families joined by '+' | none "
                        f"({t2i.rerank} / {i2t.rerank}; cycle when no CLIP is at hand; with none one candidate is drawn)")
    r.add_argument("--clip-model", default=None, help="open_clip architecture name, e.g. ViT-B-32")
    r.add_argument("--clip-weights", type=Path, default=None,
                   help="local CLIP weights file for --clip-model (never downloaded), or a clip.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.text and args.prompts is None and not args.image:
        raise CLIError("nothing to do: give --text, --prompts or --image")
    for name in ("candidates", "keep", "batch_size", "max_text_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature is not None and args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.guidance is not None and not args.guidance >= 0:
        raise CLIError(f"--guidance must be >= 0 (1 = off), got {args.guidance}")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")


def read_prompts(texts: Sequence[str], file: Path | None) -> list[str]:
    """Prompts from ``--text`` (each must be non-empty) then ``--prompts`` (blank lines skipped)."""
    prompts: list[str] = []
    for i, t in enumerate(texts):
        if not t.strip():
            raise CLIError(f"empty prompt (--text number {i + 1})")
        prompts.append(t.strip())
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise CLIError(f"prompts file not found: {file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read prompts file {file}: {e}") from None
        from_file = [ln.strip() for ln in lines if ln.strip()]
        if not from_file:
            raise CLIError(f"prompts file {file} holds no prompt")
        prompts += from_file
    return prompts


def expand_image_paths(specs: Sequence[str]) -> list[Path]:
    """Files as given, folders -> their image files (sorted), globs -> their matches (sorted)."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
            if not found:
                raise CLIError(f"folder {p} holds no image file (.{', .'.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not found:
                raise CLIError(f"no file matches {spec}")
            out += found
        else:
            raise CLIError(f"image not found: {p}")
    return out


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def _settings(args: argparse.Namespace, pipe: LVersePipeline, s: Sampling, n_draw: int) -> dict[str, Any]:
    return {"checkpoint": str(pipe.path), "device": str(pipe.device), "precision": args.precision, "rerank": s.rerank,
            "candidates": n_draw, "batch_size": args.batch_size, "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "guidance": s.guidance, "seed": args.seed}


def _progress(args: argparse.Namespace, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=args.no_progress,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _resolve(args: argparse.Namespace, pipe: LVersePipeline, direction: str) -> Sampling:
    has_clip = pipe.has_clip or args.clip_model is not None or args.clip_weights is not None
    flags = dict(candidates=args.candidates, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 rerank=args.rerank)
    if direction == "text_to_image":
        flags["guidance"] = args.guidance
    return pipe.defaults(direction, has_clip, **flags)


def run_text(args: argparse.Namespace, pipe: LVersePipeline, prompts: list[str]) -> dict[str, Any]:
    s = _resolve(args, pipe, "text_to_image")
    reranker = load_reranker(pipe, s.rerank, args.clip_model, args.clip_weights, args.batch_size)
    n_draw = 1 if s.rerank == "none" else s.candidates
    _, counts = pipe.encode_prompts(prompts, warn=False)
    for i, (p, n) in enumerate(zip(prompts, counts)):
        if n + 1 > pipe.text_len:
            print(f"warning: prompt {i + 1} ({p[:40]!r}...) has {n} tokens; the model reads {pipe.text_len} "
                  "including the end token: truncated", file=sys.stderr)
    bar = _progress(args, len(prompts) * args.keep * n_draw * pipe.image_len, "drawing images")
    try:
        results = text_to_image(pipe, prompts, s, args.keep, args.seed, reranker, args.batch_size, bar.update)
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    kept = []
    for p, entry in enumerate(results):
        for r, im in enumerate(entry["images"]):
            im["file"] = f"{p:03d}-{_slug(entry['prompt'])}-{r}.png"
            save_image(im["image"], args.out / im["file"])
            kept.append(im.pop("image"))
            im["scores"] = {k: [float(v) for v in t] for k, t in im["scores"].items()}
    save_grid(torch.stack(kept), args.out / "grid.png", nrow=args.keep)
    report = {"mode": "text-to-image", **_settings(args, pipe, s, n_draw), "keep": args.keep, "grid": "grid.png",
              "prompts": [{"prompt": e["prompt"], "tokens": e["tokens"], "truncated": e["truncated"],
                           "images": [{k: im[k] for k in ("file", "seed", "candidate", "score", "scores")}
                                      for im in e["images"]]} for e in results]}
    atomic_write_text(args.out / "samples.json", json.dumps(report, indent=2))
    print(f"wrote {len(kept)} image(s), grid.png and samples.json to {args.out}")
    return report


def run_image(args: argparse.Namespace, pipe: LVersePipeline, paths: list[Path], images: torch.Tensor) -> dict[str, Any]:
    s = _resolve(args, pipe, "image_to_text")
    reranker = load_reranker(pipe, s.rerank, args.clip_model, args.clip_weights, args.batch_size)
    n_draw = 1 if s.rerank == "none" else s.candidates
    max_tokens = args.max_text_tokens or min(32, pipe.text_len)
    bar = _progress(args, len(paths) * n_draw * max_tokens, "drawing captions")
    try:
        results = image_to_text(pipe, images, s, args.seed, reranker, max_tokens, args.batch_size, bar.update,
                                on_caption=lambda i, c: tqdm.write(f"{paths[i]}: {c}", file=sys.stdout))
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "image-to-text", **_settings(args, pipe, s, n_draw), "max_text_tokens": max_tokens,
              "images": [{"file": str(path), "seed": args.seed, **res} for path, res in zip(paths, results)]}
    atomic_write_text(args.out / "captions.json", json.dumps(report, indent=2))
    return report


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    prompts = read_prompts(args.text, args.prompts) if (args.text or args.prompts is not None) else []
    paths = expand_image_paths(args.image) if args.image else []
    pipe = LVersePipeline.load(args.checkpoint, device=args.device, precision=args.precision)
    # Read every image before any sampling: a bad file fails the run at once, naming it.
    images = torch.stack([pipe.load_image(p) for p in paths]) if paths else None
    if args.max_text_tokens is not None and args.max_text_tokens > pipe.text_len:
        raise CLIError(f"--max-text-tokens {args.max_text_tokens} exceeds the model's text length {pipe.text_len}")
    if args.clip_model is not None and args.clip_weights is None:
        raise CLIError("--clip-model needs --clip-weights FILE (CLIP weights are never downloaded); or use --rerank cycle")
    if prompts:
        run_text(args, pipe, prompts)
    if images is not None:
        run_image(args, pipe, paths, images)
    return 0


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 on success)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage line and error
        return int(e.code) if isinstance(e.code, int) else EXIT_ERROR
    try:
        with warnings.catch_warnings():
            # Library warnings are reported by the CLI itself, on one line each.
            warnings.simplefilter("ignore", UserWarning)
            return run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory; lower --batch-size (now {args.batch_size})", file=sys.stderr)
        return EXIT_ERROR
    except (CLIError, ValueError, OSError, RuntimeError) as e:
        # ValueError/OSError: what the library raises for bad files and mismatched checkpoints
        # (their messages name the file); RuntimeError: e.g. an unusable --device.
        if os.environ.get("LVERSE_DEBUG"):
            raise  # developers: the full traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
