"""Collect the JSON files bench/gpu.sh wrote into summary.json and a markdown summary.md.

    python bench/summarize.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def train_lines(r: dict[str, Any]) -> list[str]:
    out = [f"BiART {r['n_layer']}x{r['n_embd']}, sequence {r['sequence']}, vocabulary {r['vocab']}, batch {r['batch']}",
           "", "| precision | compile | variant | ms/step | tokens/s | MFU | vs GPT | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        for v in ("biart", "biart_logits", "gpt"):
            if v in row:
                x = row[v]
                mem = x.get("peak_mb", x.get("peak_rss_mb"))
                out.append(f"| {row['precision']} | {row['compile']} | {v} | {_f(x['ms'])} | {_f(x['tokens_per_s'], 0)} | "
                           f"{x['mfu'] * 100:.1f}% | {_f(x['vs_gpt'], 3) + 'x' if 'vs_gpt' in x else '-'} | "
                           f"{_f(mem, 0) if mem is not None else '-'} |")
    return out


def sampling_lines(r: dict[str, Any]) -> list[str]:
    out = [f"BiART {r['n_layer']}x{r['n_embd']} ({r['precision']}), {r['batch']} candidates of {r['image_tokens']} tokens",
           "", "| run | seconds | tokens/s |", "|---|---|---|"]
    for k, v in r.items():
        if isinstance(v, dict) and "seconds" in v:
            out.append(f"| {k} | {v['seconds']:.2f} | {_f(v['tokens_per_s'])} |")
    out += ["", "ratios (x faster): " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())]
    return out


def augvae_lines(r: dict[str, Any]) -> list[str]:
    out = [f"AugVAE-SL width {r['width']}, {r['resolution']} px, batch {r['batch']}", "",
           "| precision | op | contiguous img/s | channels-last img/s |", "|---|---|---|---|"]
    for row in r["rows"]:
        for op in ("encode", "decode", "train"):
            out.append(f"| {row['precision']} | {op} | {_f(row[op + '/contiguous']['images_per_s'])} | "
                       f"{_f(row[op + '/channels_last']['images_per_s'])} |")
    return out


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.stem != "summary"}
    if not results:
        raise SystemExit(f"error: {out_dir}: no benchmark JSON files")
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    first = next(iter(results.values()))
    md = [f"# lverse benchmarks: {first['device']}", "",
          f"torch {first['torch']}, Python {first['python']}, {first['date']}", ""]
    for name, r in results.items():
        md += [f"## {name}", ""]
        lines = {"train_throughput": train_lines, "sampling": sampling_lines, "augvae": augvae_lines}[r["bench"]](r)
        md += lines + [""]
    (out_dir / "summary.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
