"""``sample.py``: text -> image and image -> text with reranking (L-Verse section 3.6).

Text -> image: for each prompt, ``--keep`` rounds; each round draws ``--candidates`` images
with its own seed (``--seed + round``), reranks them and keeps the best (the paper: 64
candidates, top 1, repeated k times with different seeds for k images). Writes one PNG per
kept image, ``grid.png`` (a row per prompt) and ``samples.json`` (prompts, seeds, scores).

Image -> text: for each image, draws ``--candidates`` captions of ``--max-text-tokens`` tokens
(32 in the paper), cuts each at its first full stop, reranks, prints the best caption per image
and writes ``captions.json`` with every candidate and its scores.

Bad input (missing/corrupt image, empty prompt, a checkpoint whose parts do not fit) ends with
one ``error: ...`` line on stderr and a non-zero exit code; no traceback (set
``LVERSE_DEBUG=1`` to see it).
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
from PIL import Image
from tqdm import tqdm

from lverse.files import atomic_write_text, save_grid
from lverse.inference.clip import load_clip
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import RERANKERS, ClipReranker, CycleReranker, combine_scores, resolve_reranker
from lverse.inference.sampling import SamplingParams, generate_captions, generate_images, truncate_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Direction-specific defaults when --top-k/--top-p are not given: a top-k cut for the 1024
# image tokens (sampling the long tail of 1024 draws degrades images; the reranker cannot
# repair every candidate), nucleus sampling for the short caption.
IMAGE_TOP_K, CAPTION_TOP_P = 256, 0.9
EXIT_ERROR = 1
DEFAULT_TEXT_TOKENS = 32  # caption tokens drawn per candidate (L-Verse section 3.6)
DECODE_BATCH = 16  # images through the AugVAE decoder at once (full-resolution activations are large)


class CLIError(Exception):
    """A problem with the user's input: reported as one ``error:`` line."""


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="L-Verse sampling: --text makes images, --image makes captions (reranked candidates).",
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

    s = p.add_argument_group("sampling")
    s.add_argument("--candidates", type=int, default=64, help="candidates drawn per image/caption (default 64)")
    s.add_argument("--keep", type=int, default=1,
                   help="images kept per prompt; each is the best of its own --candidates draw (default 1)")
    s.add_argument("--batch-size", type=int, default=64, help="rows decoded at once (default 64)")
    s.add_argument("--top-k", type=int, default=None,
                   help=f"top-k filter, 0 = off (default: {IMAGE_TOP_K} for images, off for captions)")
    s.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus filter, 1 = off (default: off for images, {CAPTION_TOP_P} for captions)")
    s.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: for images the checkpoint's sampling.json image_temperature, "
                        "else 1; for captions 1)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for images, 1 = off (default: the checkpoint's "
                        "sampling.json, else 1; needs a BiART trained with text_dropout > 0)")
    s.add_argument("--seed", type=int, default=0, help="base seed; round r of a prompt uses seed + r (default 0)")
    s.add_argument("--max-text-tokens", type=int, default=None,
                   help="caption tokens drawn (default 32, as in the paper, or the model's text length if shorter)")

    r = p.add_argument_group("reranking")
    r.add_argument("--rerank", choices=RERANKERS, default=None,
                   help="clip | cycle (BiART's reverse direction) | clip+cycle | none "
                        "(default: clip if a CLIP is available, else cycle; with none one candidate is drawn)")
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
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CLIError(f"folder {p} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
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


# ------------------------------------------------------------------------------------------
# Reranking
# ------------------------------------------------------------------------------------------


class Scorer:
    """Scores one candidate set with the chosen reranker(s); returns named score tensors."""

    def __init__(self, mode: str, pipe: LVersePipeline, clip: ClipReranker | None, batch_size: int) -> None:
        self.mode = mode
        self.pipe = pipe
        self.clip = clip
        self.cycle = CycleReranker(pipe.biart, batch_size)

    @property
    def needs_pixels(self) -> bool:
        return "clip" in self.mode

    def images(self, prompt: str, text_ids: torch.Tensor, codes: torch.Tensor, pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if "clip" in self.mode:
            assert self.clip is not None and pixels is not None
            parts["clip"] = self.clip.score_images(pixels, prompt).cpu()
        if "cycle" in self.mode:
            parts["cycle"] = self.cycle.score_images(text_ids, codes).cpu()
        return self._finish(parts, codes.shape[0])

    def captions(self, image: torch.Tensor, codes: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if "clip" in self.mode:
            assert self.clip is not None
            parts["clip"] = self.clip.score_texts(image, captions).cpu()
        if "cycle" in self.mode:
            parts["cycle"] = self.cycle.score_captions(codes, self.pipe.captions_to_ids(captions)).cpu()
        return self._finish(parts, len(captions))

    def _finish(self, parts: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        if not parts:  # "none": keep the first candidate
            parts["score"] = torch.zeros(n)
        elif len(parts) == 1:
            parts["score"] = next(iter(parts.values()))
        else:
            parts["score"] = combine_scores(list(parts.values()))
        return parts


def make_clip(args: argparse.Namespace, pipe: LVersePipeline, mode: str) -> ClipReranker | None:
    if "clip" not in mode:
        return None
    dev = pipe.device
    if args.clip_model is not None:
        if args.clip_weights is None:
            raise CLIError("--clip-model needs --clip-weights FILE (CLIP weights are never downloaded); "
                           "or use --rerank cycle")
        return ClipReranker.from_open_clip(args.clip_model, args.clip_weights, dev, args.batch_size)
    if args.clip_weights is not None:
        w = args.clip_weights
        if not w.is_file():
            raise CLIError(f"CLIP weights not found: {w} (or use --rerank cycle, which needs no CLIP)")
        if not w.with_suffix(".json").is_file():
            raise CLIError(f"--clip-weights {w}: give --clip-model NAME for an open_clip weights file "
                           f"(or a clip.safetensors with its clip.json beside it)")
        model, _ = load_clip(w, device=dev)
        return ClipReranker(model, dev, batch_size=args.batch_size)
    if pipe.has_clip:
        model, _ = pipe.clip()
        return ClipReranker(model, dev, batch_size=args.batch_size)
    raise CLIError(f"--rerank {mode} needs a CLIP: the checkpoint {pipe.path} has no clip.safetensors and no "
                   "--clip-model/--clip-weights were given; use --rerank cycle")


# ------------------------------------------------------------------------------------------
# The two modes
# ------------------------------------------------------------------------------------------


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def _save_png(image: torch.Tensor, path: Path) -> None:
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)


def _sampling_params(args: argparse.Namespace, direction: str, pipe: LVersePipeline | None = None) -> SamplingParams:
    guidance, temperature = 1.0, 1.0
    if direction == "t2i":
        top_k = IMAGE_TOP_K if args.top_k is None else args.top_k
        top_p = 1.0 if args.top_p is None else args.top_p
        default = pipe.guidance if pipe is not None else 1.0
        guidance = default if args.guidance is None else args.guidance
        temperature = pipe.image_temperature if pipe is not None else 1.0
    else:
        top_k = 0 if args.top_k is None else args.top_k
        top_p = CAPTION_TOP_P if args.top_p is None else args.top_p
    if args.temperature is not None:
        temperature = args.temperature
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance)


def _settings(args: argparse.Namespace, pipe: LVersePipeline, mode: str, params: SamplingParams, n_draw: int) -> dict[str, Any]:
    return {
        "checkpoint": str(pipe.path),
        "device": str(pipe.device),
        "precision": args.precision,
        "rerank": mode,
        "candidates": n_draw,
        "batch_size": args.batch_size,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "guidance": params.guidance,
        "seed": args.seed,
    }


def _progress(args: argparse.Namespace, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=args.no_progress,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def run_text(args: argparse.Namespace, pipe: LVersePipeline, prompts: list[str], scorer: Scorer) -> dict[str, Any]:
    text_ids, counts = pipe.encode_prompts(prompts, warn=False)
    for i, (p, n) in enumerate(zip(prompts, counts)):
        if n + 1 > pipe.text_len:
            print(f"warning: prompt {i + 1} ({p[:40]!r}...) has {n} tokens; the model reads {pipe.text_len} "
                  "including the end token: truncated", file=sys.stderr)
    params = _sampling_params(args, "t2i", pipe)
    n_draw = 1 if scorer.mode == "none" else args.candidates
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    kept: list[torch.Tensor] = []
    bar = _progress(args, len(prompts) * args.keep * n_draw * pipe.image_len, "drawing images")
    try:
        for p, prompt in enumerate(prompts):
            entry: dict[str, Any] = {"prompt": prompt, "tokens": counts[p], "truncated": counts[p] + 1 > pipe.text_len,
                                     "images": []}
            for r in range(args.keep):
                seed = args.seed + r
                codes = generate_images(pipe.biart, text_ids[p : p + 1], n_draw, params=params, seed=seed,
                                        batch_size=args.batch_size, progress=bar.update)[0]
                pixels = pipe.decode_images(codes, DECODE_BATCH) if scorer.needs_pixels else None
                scores = scorer.images(prompt, text_ids[p], codes, pixels)
                best = int(scores["score"].argmax())
                image = pixels[best] if pixels is not None else pipe.decode_images(codes[best : best + 1])[0]
                name = f"{p:03d}-{_slug(prompt)}-{r}.png"
                _save_png(image, out / name)
                kept.append(image.cpu())
                entry["images"].append({
                    "file": name,
                    "seed": seed,
                    "candidate": best,
                    "score": float(scores["score"][best]),
                    "scores": {k: [float(v) for v in t] for k, t in scores.items()},
                })
            results.append(entry)
    finally:
        bar.close()
    save_grid(torch.stack(kept), out / "grid.png", nrow=args.keep)
    report = {"mode": "text-to-image", **_settings(args, pipe, scorer.mode, params, n_draw), "keep": args.keep,
              "grid": "grid.png", "prompts": results}
    atomic_write_text(out / "samples.json", json.dumps(report, indent=2))
    print(f"wrote {len(kept)} image(s), grid.png and samples.json to {out}")
    return report


def run_image(
    args: argparse.Namespace, pipe: LVersePipeline, paths: list[Path], images: torch.Tensor, scorer: Scorer
) -> dict[str, Any]:
    codes = pipe.encode_images(images, DECODE_BATCH)
    params = _sampling_params(args, "i2t")
    n_draw = 1 if scorer.mode == "none" else args.candidates
    results: list[dict[str, Any]] = []
    bar = _progress(args, len(paths) * n_draw * args.max_text_tokens, "drawing captions")
    try:
        for i, path in enumerate(paths):
            ids = generate_captions(pipe.biart, codes[i : i + 1], n_draw, args.max_text_tokens,
                                    eot_id=pipe.tokenizer.eot_id, params=params, seed=args.seed,
                                    batch_size=args.batch_size, progress=bar.update)[0]
            raw = pipe.captions_to_text(ids, truncate=False)
            caps = [truncate_caption(t) for t in raw]
            scores = scorer.captions(images[i], codes[i], caps)
            order = torch.argsort(scores["score"], descending=True, stable=True).tolist()
            best = order[0]
            results.append({
                "file": str(path),
                "seed": args.seed,
                "caption": caps[best],
                "score": float(scores["score"][best]),
                "candidates": [
                    {"caption": caps[j], "raw": raw[j], **{k: float(t[j]) for k, t in scores.items()}}
                    for j in order
                ],
            })
            tqdm.write(f"{path}: {caps[best]}", file=sys.stdout)
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "image-to-text", **_settings(args, pipe, scorer.mode, params, n_draw),
              "max_text_tokens": args.max_text_tokens, "images": results}
    atomic_write_text(args.out / "captions.json", json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    prompts = read_prompts(args.text, args.prompts) if (args.text or args.prompts is not None) else []
    paths = expand_image_paths(args.image) if args.image else []
    pipe = LVersePipeline.load(args.checkpoint, device=args.device, precision=args.precision)
    # Read every image before any sampling: a bad file fails the run at once, naming it.
    images = torch.stack([pipe.load_image(p) for p in paths]) if paths else None
    if args.max_text_tokens is None:
        args.max_text_tokens = min(DEFAULT_TEXT_TOKENS, pipe.text_len)
    elif args.max_text_tokens > pipe.text_len:
        raise CLIError(f"--max-text-tokens {args.max_text_tokens} exceeds the model's text length {pipe.text_len}")
    mode = resolve_reranker(args.rerank, pipe.has_clip or args.clip_model is not None or args.clip_weights is not None)
    scorer = Scorer(mode, pipe, make_clip(args, pipe, mode), args.batch_size)
    if prompts:
        run_text(args, pipe, prompts, scorer)
    if images is not None:
        run_image(args, pipe, paths, images, scorer)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
