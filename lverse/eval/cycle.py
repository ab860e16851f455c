"""The reconstruction paper's measurement ("DALL-E and Flamingo", section 3 and appendix A.1),
with BiART in both roles.

* **image → text → image**: each image of the split is captioned, the caption drawn back into an
  image; the two images are compared by the cosine of their CLIP image embeddings (and of their
  DINO embeddings where weights are given). The captions are scored against all references
  (pycocoevalcap), and the paper's Insight I is checked on our data: the rank correlation
  (Spearman) between an item's image similarity and its caption's CIDEr.
* **text → image → text**: one reference per image (drawn from the seed) is drawn into an image,
  the image captioned back; the two texts are compared by SBERT ``all-MiniLM-L6-v2`` cosine,
  CLIP text cosine and CIDEr (the input text as the one reference). Insight II: the rank
  correlation between text similarity and how close the generated image is to the real image
  of that reference (CLIP image cosine).

Each step is the bundle's default sampler and reranker (or the flags'), drawn and stored like
every protocol (resumable): ``i2t`` (captions), ``i2t2i`` (their images), ``t2i`` (images of the
references), ``t2i2t`` (their captions).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from lverse.eval.captions import METRICS as CAPTION_METRICS
from lverse.eval.captions import score_captions
from lverse.eval.data import Split, one_reference
from lverse.eval.protocols import Job, _ordered, _sampling_line, caption_stage, image_stage
from lverse.eval.run import iter_batches, log
from lverse.eval.similarity import Dino, Sbert, clip_image_cosines, clip_text_cosines
from lverse.inference.rerank import ClipReranker

BATCH = 64


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (scipy); ``None`` when undefined (a constant side, < 3 items)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    r = spearmanr(a, b).statistic
    return None if r is None or not math.isfinite(float(r)) else float(r)


def _mean(x: torch.Tensor | Sequence[float]) -> float:
    t = torch.as_tensor(x, dtype=torch.float64)
    return float(t.mean()) if t.numel() else float("nan")


def cycle_protocol(
    job: Job,
    split: Split,
    clip: tuple[ClipReranker | None, dict[str, Any]],
    sbert: Sbert | None = None,
    dino: Dino | None = None,
    caption_metrics: Sequence[str] = CAPTION_METRICS,
    corenlp: str | None = None,
) -> dict[str, Any] | None:
    """Both cycles on ``split``; the report on rank 0 (``None`` elsewhere)."""
    n = len(split)
    run = job.run
    fake = lambda rec: run.load_image(rec["file"]).float() / 127.5 - 1  # noqa: E731
    # --- draw -----------------------------------------------------------------------------
    caps = _ordered(caption_stage(job, "i2t", n, split.image, split.ids), n)
    back = _ordered(image_stage(job, "i2t2i", [c.get("caption", "") for c in caps], split.ids), n)
    texts = [one_reference(split, i, job.seed) for i in range(n)]
    imgs = _ordered(image_stage(job, "t2i", texts, split.ids), n)
    caps2 = _ordered(caption_stage(job, "t2i2t", n, lambda i: fake(imgs[i]), split.ids), n)
    if not run.shard.is_main:
        return None
    log(f"[evaluate] cycle: scoring {n} items")
    good = [i for i in range(n) if "caption" in caps[i]]
    scorer, clip_info = clip
    report: dict[str, Any] = {"protocol": "cycle", "n": len(good), "skipped_items": n - len(good),
                              "data": split.describe(), "bundle": str(job.pipe.path), "settings": job.settings(),
                              "image_text_image": {}, "text_image_text": {}, "implementations": {},
                              "skipped_metrics": {}}
    per: dict[str, list[Any]] = {"index": good, "id": [split.ids[i] for i in good],
                                 "caption": [caps[i]["caption"] for i in good], "text": [texts[i] for i in good],
                                 "text_back": [caps2[i]["caption"] for i in good]}
    # --- image -> text -> image -------------------------------------------------------------
    iti, tit = report["image_text_image"], report["text_image_text"]
    real_cache: dict[int, torch.Tensor] = {}

    def real(i: int) -> torch.Tensor:
        if i not in real_cache:
            real_cache[i] = split.image(i)  # type: ignore[assignment]
        return real_cache[i]

    if scorer is not None:
        img_cos, gen_vs_real, txt_cos = [], [], []
        for chunk in iter_batches(good, BATCH):
            a = torch.stack([real(i) for i in chunk])
            img_cos.append(clip_image_cosines(scorer, a, torch.stack([fake(back[i]) for i in chunk])))
            gen_vs_real.append(clip_image_cosines(scorer, a, torch.stack([fake(imgs[i]) for i in chunk])))
            txt_cos.append(clip_text_cosines(scorer, [texts[i] for i in chunk], [caps2[i]["caption"] for i in chunk]))
        per["clip_image"] = torch.cat(img_cos).tolist()
        per["clip_image_t2i_vs_real"] = torch.cat(gen_vs_real).tolist()
        per["clip_text"] = torch.cat(txt_cos).tolist()
        iti["clip_image_cosine"] = _mean(per["clip_image"])
        tit["clip_text_cosine"] = _mean(per["clip_text"])
        tit["clip_image_cosine_to_real"] = _mean(per["clip_image_t2i_vs_real"])
        note = " (the bundle's own CLIP, which also reranked: biased upward)" if clip_info.get("bundle_clip") else ""
        report["implementations"]["clip"] = clip_info["implementation"] + note
    else:
        report["skipped_metrics"]["clip"] = clip_info.get("skipped", "no CLIP")
    if dino is not None:
        cos = [dino.cosines(torch.stack([real(i) for i in chunk]), torch.stack([fake(back[i]) for i in chunk]))
               for chunk in iter_batches(good, BATCH)]
        per["dino_image"] = torch.cat(cos).tolist()
        iti["dino_image_cosine"] = _mean(per["dino_image"])
        report["implementations"]["dino"] = dino.implementation
    else:
        report["skipped_metrics"]["dino"] = "no --dino-weights given"
    scores = score_captions({i: split.captions[i] for i in good}, {i: caps[i]["caption"] for i in good},
                            caption_metrics, corenlp, run.root / "tmp")
    iti["captions"] = {k: 100 * v for k, v in scores["metrics"].items()}
    report["skipped_metrics"].update(scores["skipped"])
    report["implementations"].update(scores["implementations"])
    if "CIDEr" in scores["per_item"]:
        per["cider"] = scores["per_item"]["CIDEr"]
        iti["insight_I_spearman"] = {f"{k}_vs_cider": spearman(per[k], per["cider"])
                                     for k in ("clip_image", "dino_image") if k in per}
    # --- text -> image -> text -------------------------------------------------------------
    if sbert is not None:
        per["sbert"] = sbert.cosines([texts[i] for i in good], [caps2[i]["caption"] for i in good]).tolist()
        tit["sbert_cosine"] = _mean(per["sbert"])
        report["implementations"]["sbert"] = sbert.implementation
    else:
        report["skipped_metrics"]["sbert"] = "SBERT turned off (--no-sbert)"
    back_scores = score_captions({i: [texts[i]] for i in good}, {i: caps2[i]["caption"] for i in good}, ("CIDEr",),
                                 None, run.root / "tmp")
    per["cider_text_back"] = back_scores["per_item"]["CIDEr"]
    tit["cider"] = 100 * back_scores["metrics"]["CIDEr"]
    if "clip_image_t2i_vs_real" in per:
        tit["insight_II_spearman"] = {f"{k}_vs_clip_image_to_real": spearman(per[k], per["clip_image_t2i_vs_real"])
                                      for k in ("sbert", "clip_text", "cider_text_back") if k in per}
    run.write_json("per_item.json", per)
    report["examples"] = [{"id": split.ids[i], "caption": caps[i]["caption"], "text": texts[i],
                           "text_back": caps2[i]["caption"]} for i in good[:5]]
    return report


def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def cycle_markdown(report: dict[str, Any]) -> str:
    iti, tit, s = report["image_text_image"], report["text_image_text"], report["settings"]
    lines = [f"# Cycle ({report['data'].get('kind')}, {report['n']} items)", "",
             f"Captions: {_sampling_line(s.get('image_to_text', {}))}; images: {_sampling_line(s.get('text_to_image', {}))}; "
             f"seed {s['seed']}.", "",
             "Image → text → image:", "", "| measure | value |", "|---|---|",
             f"| CLIP image cosine (input vs reconstruction) | {_f(iti.get('clip_image_cosine'))} |",
             f"| DINO image cosine | {_f(iti.get('dino_image_cosine'))} |"]
    lines += [f"| caption {k} (x100, all references) | {_f(v, '.1f')} |" for k, v in iti.get("captions", {}).items()]
    for k, v in iti.get("insight_I_spearman", {}).items():
        lines.append(f"| Spearman {k.replace('_', ' ')} (Insight I) | {_f(v, '.3f')} |")
    lines += ["", "Text → image → text:", "", "| measure | value |", "|---|---|",
              f"| SBERT cosine (input vs reconstruction) | {_f(tit.get('sbert_cosine'))} |",
              f"| CLIP text cosine | {_f(tit.get('clip_text_cosine'))} |",
              f"| CIDEr (x100, the input text as reference) | {_f(tit.get('cider'), '.1f')} |",
              f"| CLIP image cosine, generated vs the real image | {_f(tit.get('clip_image_cosine_to_real'))} |"]
    for k, v in tit.get("insight_II_spearman", {}).items():
        lines.append(f"| Spearman {k.replace('_', ' ')} (Insight II) | {_f(v, '.3f')} |")
    for k, why in report["skipped_metrics"].items():
        lines += ["", f"{k} skipped: {why}."]
    lines += ["", "Implementations:", ""] + [f"- {k}: {v}" for k, v in report["implementations"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["cycle_markdown", "cycle_protocol", "spearman"]
