"""The generation protocols: ``captions`` (L-Verse Table 2) and ``t2i`` (L-Verse Table 3).

Both draw with a :class:`Job` (a bundle, its sampling settings and rerankers, a run directory),
item by item into the run directory (resumable, see :mod:`lverse.eval.run`), then rank 0 scores:

* ``captions``: one caption per image of a split (COCO Karpathy test: 5,000 images), scored
  against *all* its references with pycocoevalcap (:mod:`lverse.eval.captions`); the captions
  are also written in COCO's results format (``results.json``).
* ``t2i``: one image per caption for ``n`` captions drawn from a split (the paper: 30,000 of COCO
  val); FID at blur radii 0, 1, 2, 4, 8 against the images of those captions, the Inception
  Score (:mod:`lverse.eval.fid`) and the CLIP score (:mod:`lverse.eval.similarity`); optionally
  ``fd-clip``, the Fréchet distance of CLIP image embeddings (meaningful where the Inception is
  not, e.g. on Shapes with the Shapes CLIP).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from lverse.data.images import Skipped
from lverse.eval.captions import METRICS as CAPTION_METRICS
from lverse.eval.captions import coco_results, markdown_rows, score_captions
from lverse.eval.data import Split, sample_captions
from lverse.eval.fid import RADII, fid_at_radii, frechet_distance, load_inception, statistics, to_uint8
from lverse.eval.generation import caption_images, draw_images, items_per_chunk, text_tokens
from lverse.eval.run import Bars, RunDir, iter_batches, log, run_stage
from lverse.eval.similarity import clip_pair_cosines, clip_score_summary
from lverse.inference.defaults import Sampling
from lverse.inference.generate import Reranker
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import ClipReranker

# The papers' figures (L-Verse, MS-COCO), in their units.
PAPER_CAPTIONS = {"BLEU-4": 39.9, "METEOR": 31.4, "ROUGE-L": 60.4, "CIDEr": 102.2, "SPICE": 23.3}
PAPER_CAPTIONS_UNTRUNCATED = {"BLEU-4": 27.6, "METEOR": 23.6, "ROUGE-L": 43.9, "CIDEr": 181.6, "SPICE": 28.9}
PAPER_FID = {"L-Verse (COCO)": {"0": 45.8, "1": 41.9, "2": 35.5, "4": 30.2, "8": 29.8},
             "L-Verse-CC": {"0": 37.2, "1": 31.6, "2": 25.7, "4": 21.4, "8": 21.1}}
T2I_METRICS = ("fid", "is", "clip", "fd-clip")
BATCH = 32  # images per Inception / CLIP batch


@dataclass
class Job:
    """What draws: the bundle, each direction's settings and reranker, the run directory."""

    pipe: LVersePipeline
    run: RunDir
    seed: int = 0
    batch_size: int = 256
    max_text_tokens: int | None = None
    precision: str = "fp32"
    i2t: Sampling | None = None
    t2i: Sampling | None = None
    i2t_reranker: Reranker | None = None
    t2i_reranker: Reranker | None = None
    bars: Bars = field(default_factory=lambda: Bars(False))

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def settings(self) -> dict[str, Any]:
        """What changes the draws (the manifest's settings, with the data and the bundle)."""
        out: dict[str, Any] = {"seed": self.seed, "batch_size": self.batch_size, "device_type": self.device.type,
                               "precision": self.precision}
        if self.i2t is not None:
            out["image_to_text"] = dataclasses.asdict(self.i2t)
            out["max_text_tokens"] = text_tokens(self.pipe, self.max_text_tokens)
        if self.t2i is not None:
            out["text_to_image"] = dataclasses.asdict(self.t2i)
        return out


def caption_stage(job: Job, stage: str, n: int, image_of: Callable[[int], Any], ids: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Caption items ``0..n-1`` (``image_of(i)``: ``(3, R, R)`` or a :class:`Skipped`)."""
    assert job.i2t is not None and job.i2t_reranker is not None
    settings, reranker = job.i2t, job.i2t_reranker

    def draw(items: range, seed: int) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = []
        ok, images = [], []
        for i in items:
            x = image_of(i)
            if isinstance(x, Skipped):
                recs.append({"index": i, "id": ids[i], "skipped": x.reason})
            else:
                ok.append(i)
                images.append(x)
        if ok:
            res = caption_images(job.pipe, torch.stack(images), settings, reranker, seed, job.max_text_tokens,
                                 job.batch_size)
            recs += [{"index": i, "id": ids[i], **r} for i, r in zip(ok, res)]
        return recs

    return run_stage(job.run, stage, n, items_per_chunk(settings, reranker, job.batch_size), draw, job.seed, job.bars)


def image_stage(job: Job, stage: str, prompts: Sequence[str], ids: Sequence[str]) -> dict[int, dict[str, Any]]:
    """One image per prompt, saved as ``stage/NNNNNN.png``."""
    assert job.t2i is not None and job.t2i_reranker is not None
    settings, reranker = job.t2i, job.t2i_reranker

    def draw(items: range, seed: int) -> list[dict[str, Any]]:
        res = draw_images(job.pipe, [prompts[i] for i in items], settings, reranker, seed, job.batch_size)
        recs = []
        for i, r in zip(items, res):
            rel = job.run.image_path(stage, i)
            job.run.save_image(rel, r.pop("image"))
            recs.append({"index": i, "id": ids[i], "caption": prompts[i], "file": rel, **r})
        return recs

    return run_stage(job.run, stage, len(prompts), items_per_chunk(settings, reranker, job.batch_size), draw,
                     job.seed, job.bars)


def _ordered(recs: dict[int, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    missing = [i for i in range(n) if i not in recs]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) were not drawn (e.g. item {missing[0]})")
    return [recs[i] for i in range(n)]


# ------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------


def captions_protocol(job: Job, split: Split, metrics: Sequence[str] = CAPTION_METRICS,
                      corenlp: str | None = None) -> dict[str, Any] | None:
    """L-Verse Table 2 on ``split``; returns the report on rank 0 (``None`` elsewhere)."""
    recs = _ordered(caption_stage(job, "captions", len(split), split.image, split.ids), len(split))
    if not job.run.shard.is_main:
        return None
    good = [r for r in recs if "caption" in r]
    job.run.write_json("results.json", coco_results([r["id"] for r in good], [r["caption"] for r in good]))
    log(f"[evaluate] scoring {len(good)} captions against {sum(len(split.captions[r['index']]) for r in good)} references")
    scores = score_captions({r["index"]: split.captions[r["index"]] for r in good},
                            {r["index"]: r["caption"] for r in good}, metrics, corenlp, job.run.root / "tmp")
    job.run.write_json("per_item.json", {"index": [r["index"] for r in good], "id": [r["id"] for r in good],
                                         **scores["per_item"]})
    report = {"protocol": "captions", "n": len(good), "skipped_items": len(recs) - len(good),
              "skipped_records": split.skipped, "data": split.describe(), "bundle": str(job.pipe.path),
              "settings": job.settings(),
              "metrics": {k: 100 * v for k, v in scores["metrics"].items()}, "units": "x100, as the papers print them",
              "skipped_metrics": scores["skipped"], "implementations": scores["implementations"],
              "results_file": "results.json", "examples": [{"id": r["id"], "caption": r["caption"],
                                                             "references": split.captions[r["index"]][:3]} for r in good[:5]]}
    return report


def captions_markdown(report: dict[str, Any]) -> str:
    coco = report["data"].get("kind") == "coco"
    lines = [f"# Captions ({report['data'].get('kind')}, {report['n']} images)", "",
             f"Sampling: {_sampling_line(report['settings'].get('image_to_text', {}))}, "
             f"{report['settings'].get('max_text_tokens')} tokens cut at the first full stop; "
             f"seed {report['settings']['seed']}.", "",
             "| metric | this run | L-Verse paper (COCO Karpathy test, Table 2) |" if coco else "| metric | this run | – |",
             "|---|---|---|"]
    lines += markdown_rows({k: v / 100 for k, v in report["metrics"].items()}, report["skipped_metrics"],
                           PAPER_CAPTIONS if coco else None)
    for m, why in report["skipped_metrics"].items():
        lines += ["", f"{m} skipped: {why}."]
    lines += ["", "Implementations:", ""] + [f"- {k}: {v}" for k, v in report["implementations"].items()]
    return "\n".join(lines) + "\n"


def _sampling_line(s: dict[str, Any]) -> str:
    if not s:
        return "–"
    return (f"{s['candidates']} candidates reranked by {s['rerank']}, temperature {s['temperature']:g}, "
            f"top-k {s['top_k'] or 'off'}, top-p {s['top_p']:g}" + (f", guidance {s['guidance']:g}" if s.get("guidance", 1) != 1 else ""))


# ------------------------------------------------------------------------------------------
# t2i
# ------------------------------------------------------------------------------------------


def _key(parts: Sequence[Any]) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def _batches(images: Callable[[int], Any], index: Sequence[int], to_uint: bool) -> Iterator[torch.Tensor]:
    for chunk in iter_batches(list(index), BATCH):
        xs = [images(i) for i in chunk]
        xs = [x for x in xs if not isinstance(x, Skipped)]
        if xs:
            x = torch.stack(xs)
            yield to_uint8(x, (-1.0, 1.0)) if to_uint else x


def t2i_protocol(job: Job, split: Split, n: int, metrics: Sequence[str] = ("fid", "is", "clip"),
                 radii: Sequence[float] = RADII, inception: str | None = None,
                 clip: tuple[ClipReranker | None, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """L-Verse Table 3: ``n`` captions of ``split``, one image each, then FID-k, IS, CLIP score."""
    pairs = sample_captions(split, n, job.seed)
    prompts, ids = [c for _, c in pairs], [split.ids[i] for i, _ in pairs]
    recs = _ordered(image_stage(job, "images", prompts, ids), len(prompts))
    if not job.run.shard.is_main:
        return None
    real_items = sorted({i for i, _ in pairs})
    report: dict[str, Any] = {"protocol": "t2i", "n": len(recs), "real_images": len(real_items),
                              "data": split.describe(), "bundle": str(job.pipe.path), "settings": job.settings(),
                              "metrics": {}, "implementations": {}, "skipped_metrics": {}}
    fake_img = lambda i: job.run.load_image(recs[i]["file"]).float() / 127.5 - 1  # noqa: E731
    if "fid" in metrics or "is" in metrics:
        model, desc, sha = load_inception(inception, job.device)
        out = fid_at_radii(model, lambda: _batches(split.image, real_items, True),
                           lambda: _batches(lambda i: job.run.load_image(recs[i]["file"]), range(len(recs)), False),
                           (_key(real_items), _key([r["file"] for r in recs])),
                           radii if "fid" in metrics else (), job.device, job.run.root / "features" / sha[:12],
                           with_is="is" in metrics, bars=job.bars, counts=(len(real_items), len(recs)))
        if "fid" in metrics:
            report["metrics"]["fid"] = out["fid"]
            report["implementations"]["fid"] = (f"{desc}; pool 2048 features, torch-fidelity fid_statistics_to_metric; "
                                                f"Gaussian blur sigma=radius (true kernel, 4 sigma) on both sets at "
                                                f"{job.pipe.resolution} px before 8-bit quantisation")
        if "is" in metrics:
            report["metrics"]["inception_score"] = out["inception_score"]
            report["implementations"]["inception_score"] = f"{desc}; torch-fidelity isc_features_to_metric"
    scorer, info = clip if clip is not None else (None, {"skipped": "no CLIP given"})
    if ("clip" in metrics or "fd-clip" in metrics) and scorer is None:
        for m in ("clip", "fd-clip"):
            if m in metrics:
                report["skipped_metrics"][m] = info["skipped"]
    elif scorer is not None:
        fake_emb, real_emb, cos, cos_real = [], [], [], []
        first = {i: c for i, c in reversed(pairs)}  # each real image with the first caption drawn of it
        for chunk in iter_batches(list(range(len(recs))), BATCH):
            x = torch.stack([fake_img(i) for i in chunk])
            if "clip" in metrics:
                cos.append(clip_pair_cosines(scorer, x, [prompts[i] for i in chunk]))
            if "fd-clip" in metrics:
                fake_emb.append(scorer.embed_images(x).double().cpu())
        for batch_idx in iter_batches(real_items, BATCH):
            xs = [split.image(i) for i in batch_idx]
            keep = [(i, x) for i, x in zip(batch_idx, xs) if not isinstance(x, Skipped)]
            if not keep:
                continue
            x = torch.stack([x for _, x in keep])
            if "fd-clip" in metrics:
                real_emb.append(scorer.embed_images(x).double().cpu())
            if "clip" in metrics:  # the real images with one of the sampled captions each: a ceiling
                cos_real.append(clip_pair_cosines(scorer, x, [first[i] for i, _ in keep]))
        note = " (the bundle's own CLIP, which also reranked: biased upward)" if info.get("bundle_clip") else ""
        if "clip" in metrics:
            report["metrics"]["clip"] = {**clip_score_summary(torch.cat(cos)),
                                         "real_images": clip_score_summary(torch.cat(cos_real))}
            report["implementations"]["clip"] = f"{info['implementation']}; 100 * mean(max(cos, 0)){note}"
        if "fd-clip" in metrics:
            sa, sb = statistics(torch.cat(real_emb)), statistics(torch.cat(fake_emb))
            report["metrics"]["fd_clip"] = frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
            report["implementations"]["fd_clip"] = (f"Fréchet distance (torch-fidelity fid_statistics_to_metric) of "
                                                    f"unit CLIP image embeddings; {info['implementation']}{note}")
    return report


def t2i_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    coco = report["data"].get("kind") == "coco"
    lines = [f"# Text→image ({report['data'].get('kind')}, {report['n']} captions, {report['real_images']} real images)", "",
             f"Sampling: {_sampling_line(report['settings'].get('text_to_image', {}))}; seed {report['settings']['seed']}.", ""]
    if "fid" in m:
        radii = list(m["fid"])
        lines += ["| | " + " | ".join(f"FID-{r}" for r in radii) + " |", "|---|" + "---|" * len(radii),
                  "| this run | " + " | ".join(f"{m['fid'][r]:.1f}" for r in radii) + " |"]
        if coco:
            for name, row in PAPER_FID.items():
                lines.append(f"| paper: {name} | " + " | ".join(f"{row[r]:.1f}" if r in row else "–" for r in radii) + " |")
        lines.append("")
    if "inception_score" in m:
        lines.append(f"Inception Score: {m['inception_score']['mean']:.2f} ± {m['inception_score']['std']:.2f}")
    if "clip" in m:
        lines.append(f"CLIP score: {m['clip']['clip_score']:.2f} (mean cosine {m['clip']['cosine']:.4f}; the real "
                     f"images with the same captions: {m['clip']['real_images']['clip_score']:.2f})")
    if "fd_clip" in m:
        lines.append(f"FD-CLIP (Fréchet distance of CLIP image embeddings, generated vs real): {m['fd_clip']:.4f}")
    for k, why in report["skipped_metrics"].items():
        lines.append(f"{k} skipped: {why}")
    lines += ["", "Implementations:", ""] + [f"- {k}: {v}" for k, v in report["implementations"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["Job", "PAPER_CAPTIONS", "PAPER_FID", "T2I_METRICS", "caption_stage", "captions_markdown",
           "captions_protocol", "image_stage", "t2i_markdown", "t2i_protocol"]
