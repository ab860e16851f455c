"""The Shapes ablation's table (docs/reconstruction.md, section 4) from the runs of
``scripts/shapes/ablation_cycle.sh``: each variant's benchmark with the default sampler (the
default reranker's exact accuracy, seen and held-out pairs apart, and the random candidate's, which
shows the sampler's own quality), beside a benchmark of the shipped bundle on the same scenes.

    python bench/cycle_ablation.py --shipped runs/cycle_ablation/shipped runs/cycle_ablation/*_s0
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def row(name: str, report: dict) -> str:
    cells = [name]
    for d in ("image_to_text", "text_to_image"):
        sec = report[d]
        best = report["settings"][d]["rerank"]
        s = sec[best]
        cells += [_pct(s["exact"]), _pct(s["exact_seen"]), _pct(s["exact_heldout"]), _pct(sec["none"]["exact"]),
                  _pct(sec.get("pairwise_auc_cycle"))]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shipped", required=True, help="a benchmark output directory (report.json) of the shipped bundle")
    ap.add_argument("runs", nargs="+", help="variant run directories (their bundle/report.json)")
    args = ap.parse_args()
    shipped = json.loads((Path(args.shipped) / "report.json").read_text())
    print(f"n = {shipped['n']} test scenes ({shipped['heldout_items']} with a held-out pair), seed {shipped['seed']}, "
          f"{shipped['candidates']} candidates; exact accuracy in %, default reranker "
          f"({shipped['settings']['image_to_text']['rerank']}); 'random' is the first candidate (no reranking); "
          "AUC: pairwise AUC of the likelihood (cycle) score\n")
    head = ["variant"] + [f"{d} {c}" for d in ("i→t", "t→i") for c in ("exact", "seen", "held-out", "random", "AUC")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print(row("shipped (no finetuning)", shipped))
    for r in args.runs:
        p = Path(r) / "bundle" / "report.json"
        if p.is_file():
            print(row(Path(r).name, json.loads(p.read_text())))


if __name__ == "__main__":
    main()
