"""The Shapes ablation's table (docs/reconstruction.md, section 4) from the runs of
``scripts/shapes/ablation_cycle.sh``: each variant's benchmark with the default sampler (the
default reranker's exact accuracy, seen and held-out pairs apart, and the random candidate's, which
shows the sampler's own quality), beside a benchmark of the shipped bundle on the same scenes; with
the caption metrics of the default reranker's captions where the report has them (``lverse
evaluate shapes``), and the mean of a variant's seeds (runs named ``<variant>_s<seed>``).

    python bench/cycle_ablation.py --shipped runs/cycle_ablation/shipped runs/cycle_ablation/*_s0
    python bench/cycle_ablation.py --report eval500/report.json --shipped checkpoints/shapes \\
        --captions shipped=runs/captions500_shipped runs/cycle_ablation/*_s?

A run is a directory holding ``bundle/report.json`` (the script's benchmark) or ``--report``
(a path inside the run); ``--captions NAME=DIR`` takes a run's caption metrics from another report
(an image->text-only ``lverse evaluate shapes --directions image_to_text``) when its own has none.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import mean

DIRECTIONS = ("image_to_text", "text_to_image")
CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def figures(report: dict, captions: dict | None = None) -> dict[str, float | None]:
    """The table's numbers of one report: per direction the default reranker's exact, seen and
    held-out rates and the random candidate's (fractions), and the default reranker's caption
    metrics (x100) from ``report`` or, failing that, ``captions``."""
    out: dict[str, float | None] = {}
    for d in DIRECTIONS:
        sec = report[d]
        s = sec[report["settings"][d]["rerank"]]
        for k in ("exact", "exact_seen", "exact_heldout"):
            out[f"{d}/{k}"] = s[k]
        out[f"{d}/random"] = sec["none"]["exact"]
    for src in (report, captions or {}):
        cm = src.get("caption_metrics")
        if cm and cm["default_reranker"] in cm["by_reranker"]:
            scores = cm["by_reranker"][cm["default_reranker"]]
            for m in CAPTION_METRICS:
                out[m] = scores.get(m)
            break
    else:
        out.update({m: None for m in CAPTION_METRICS})
    return out


def row(name: str, f: dict[str, float | None]) -> str:
    cells = [name]
    for d in DIRECTIONS:
        cells += [_pct(f[f"{d}/{k}"]) for k in ("exact", "exact_seen", "exact_heldout", "random")]
    cells += ["–" if f[m] is None else f"{f[m]:.1f}" for m in CAPTION_METRICS]
    return "| " + " | ".join(cells) + " |"


def _load(path: Path, report: str = "report.json") -> dict:
    """``path`` itself if it is a file, else ``path / report``."""
    p = path if path.is_file() else path / report
    if not p.is_file():
        raise SystemExit(f"error: {p}: no such report")
    return json.loads(p.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shipped", required=True, help="the shipped bundle's benchmark: a directory with report.json, or the file")
    ap.add_argument("--report", default="bundle/report.json", help="each run's report, relative to the run (default bundle/report.json)")
    ap.add_argument("--captions", action="append", default=[], metavar="NAME=DIR",
                    help="caption metrics of run NAME (or 'shipped') from another report; repeatable")
    ap.add_argument("runs", nargs="+", help="variant run directories")
    args = ap.parse_args(argv)
    extra = {k: _load(Path(v)) for k, v in (c.split("=", 1) for c in args.captions)}
    shipped = _load(Path(args.shipped))
    print(f"n = {shipped['n']} test scenes ({shipped['heldout_items']} with a held-out pair), seed {shipped['seed']}, "
          f"{shipped['candidates']} candidates; exact accuracy in %, default reranker "
          f"({shipped['settings']['image_to_text']['rerank']}); 'random' is the first candidate (no reranking); "
          "caption metrics (x100) of the default reranker's captions, every phrasing of a scene a reference\n")
    head = (["variant"] + [f"{d} {c}" for d in ("i→t", "t→i") for c in ("exact", "seen", "held-out", "random")]
            + list(CAPTION_METRICS))
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print(row("shipped (no finetuning)", figures(shipped, extra.get("shipped"))))
    seeds: dict[str, list[dict[str, float | None]]] = {}
    for r in args.runs:
        name = Path(r).name
        rep = _load(Path(r), args.report)
        if (rep["n"], rep["seed"], rep["candidates"]) != (shipped["n"], shipped["seed"], shipped["candidates"]):
            raise SystemExit(f"error: {r}: {rep['n']} scenes, seed {rep['seed']}, {rep['candidates']} candidates; the "
                             f"shipped report has {shipped['n']}, {shipped['seed']}, {shipped['candidates']}")
        f = figures(rep, extra.get(name))
        print(row(name, f))
        seeds.setdefault(re.sub(r"_s\d+$", "", name), []).append(f)
    for variant, fs in seeds.items():
        if len(fs) > 1:
            avg = {k: (None if any(f[k] is None for f in fs) else mean(f[k] for f in fs)) for k in fs[0]}  # type: ignore[misc]
            print(row(f"{variant}, mean of {len(fs)} seeds", avg))


if __name__ == "__main__":
    main()
