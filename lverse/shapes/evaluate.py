"""``lverse evaluate shapes``: the Shapes benchmark as one protocol, with the papers' caption metrics.

The benchmark (:mod:`lverse.shapes.benchmark`: the judge's exact-match rates per reranker, both
directions, reconstruction) runs unchanged; then the captions each reranker picked are scored
with pycocoevalcap (:mod:`lverse.eval.captions`), each test scene's references being *every*
phrasing the Shapes grammar has for it (:func:`lverse.shapes.scenes.phrasings`), so the Shapes
figures read like the paper's Table 2. The default reranker's captions (or, when it was not
measured, the first other one's) are also written in COCO's results format. The benchmark draws all items at once: this protocol is not resumable
(n=500 takes minutes on a CPU).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence

from lverse.eval.captions import METRICS, coco_results, score_captions
from lverse.eval.run import RunDir, bundle_identity, environment, log
from lverse.inference.pipeline import LVersePipeline
from lverse.shapes.benchmark import CANDIDATES, DIRECTIONS, RERANKERS, markdown_table, run_benchmark
from lverse.shapes.scenes import ShapesDataset, phrasings

BUNDLE_FILES = ("augvae.safetensors", "biart.safetensors", "tokenizer.json", "clip.safetensors", "sampling.json")


def references(n: int, seed: int, resolution: int) -> list[list[str]]:
    """Every phrasing of each of the benchmark's ``n`` test scenes (the same scenes it draws)."""
    ds = ShapesDataset("test", size=n, seed=seed, resolution=resolution)
    return [phrasings(ds.scene(i)) for i in range(n)]


def shapes_protocol(
    pipe: LVersePipeline,
    run: RunDir,
    n: int = 500,
    candidates: int = CANDIDATES,
    seed: int = 0,
    rerankers: Sequence[str] = RERANKERS,
    batch_size: int = 256,
    metrics: Sequence[str] = METRICS,
    corenlp: str | None = None,
    precision: str = "fp32",
    log_fn: Callable[[str], None] = log,
    directions: Sequence[str] = DIRECTIONS,
) -> dict[str, Any]:
    """Run the benchmark and score every reranker's captions; writes report.json, report.md and
    results.json (the default reranker's captions) into ``run``. ``directions``: as the
    benchmark's; the caption metrics need ``image_to_text`` only (without it none are scored)."""
    run.open("shapes", {"bundle": bundle_identity(pipe.path, BUNDLE_FILES), "n": n, "candidates": candidates,
                        "seed": seed, "rerankers": list(rerankers), "batch_size": batch_size,
                        "device_type": pipe.device.type, "precision": precision,
                        **({} if list(directions) == list(DIRECTIONS) else {"directions": list(directions)})})
    done = run.root / "report.json"
    if done.is_file():  # the benchmark draws everything at once: a finished run is only read back
        log_fn(f"[evaluate] {done} exists with these settings: nothing to draw")
        return json.loads(done.read_text("utf-8"))
    t0 = time.time()
    picks: dict[str, Any] = {}
    report = run_benchmark(pipe, n, candidates, seed, rerankers, batch_size, log=log_fn, picks=picks,
                           directions=directions)
    refs = references(n, seed, pipe.resolution)
    ids = [f"shapes/test/{i}" for i in range(n)]
    default = report["settings"]["image_to_text"]["rerank"]
    measured = [r for r in report["rerankers"] if f"captions/{r}" in picks]
    written = default if default in measured else next((r for r in measured if r != "none"), measured[0] if measured else None)
    scored: dict[str, Any] = {}
    impl: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for r in report["rerankers"]:
        caps = picks.get(f"captions/{r}")
        if caps is None:
            continue
        s = score_captions(dict(enumerate(refs)), dict(enumerate(caps)), metrics, corenlp, run.root / "tmp")
        scored[r] = {k: 100 * v for k, v in s["metrics"].items()}
        impl, skipped = s["implementations"], s["skipped"]
        if r == written:
            run.write_json("results.json", coco_results(ids, caps))
    report["caption_metrics"] = {"by_reranker": scored, "default_reranker": default, "results_file_reranker": written,
                                 "references": "every phrasing of the scene's grammar",
                                 "references_per_scene": sum(map(len, refs)) / max(1, n),
                                 "units": "x100, as the papers print them", "skipped_metrics": skipped,
                                 "implementations": impl}
    report["protocol_seconds"] = round(time.time() - t0, 1)
    report["environment"] = environment()
    run.write_json("report.json", report)
    run.write_text("report.md", shapes_markdown(report))
    return report


def shapes_markdown(report: dict[str, Any]) -> str:
    cm = report["caption_metrics"]
    lines = [markdown_table(report).rstrip(), "",
             f"Caption metrics of the chosen captions (references: {cm['references']}, "
             f"{cm['references_per_scene']:.1f} per scene on average; x100):", ""]
    names = [m for m in METRICS if any(m in s for s in cm["by_reranker"].values())]
    lines += ["| reranker | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r, s in cm["by_reranker"].items():
        label = ("none (random candidate)" if r == "none" else r) + (" (default)" if r == cm["default_reranker"] else "")
        lines.append(f"| {label} | " + " | ".join(f"{s[m]:.1f}" if m in s else "–" for m in names) + " |")
    for m, why in cm["skipped_metrics"].items():
        lines += ["", f"{m} skipped: {why}."]
    lines += ["", "Implementations:", ""] + [f"- {k}: {v}" for k, v in cm["implementations"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["references", "shapes_markdown", "shapes_protocol"]
