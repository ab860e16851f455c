"""Benchmark: one BiART training step (forward, loss, backward, AdamW) at a config's sizes.

    python bench/biart_step.py                                     # configs/shapes_biart.yaml, bf16, CPU
    python bench/biart_step.py --precision fp32 --threads 2
    python bench/biart_step.py --config configs/biart_coco_paper.yaml --device cuda --batch 8

Random tokens at the config's text and image lengths and batch size, so no data is read. It
times ``--rounds`` rounds of ``--steps`` steps after a warm-up and prints the fastest and the
median milliseconds per step (a shared VM's noise makes the minimum the steadier figure), the
samples per second, and a JSON line. Training alternates the two directions; their sequences
have the same length, so the step times here use text->image rows. For the comparison with a
plain GPT of the same size, see bench/train_throughput.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lverse.config import load_config
from lverse.inference.pipeline import resolve_device
from lverse.models.biart import BiART
from lverse.train.stage2 import Stage2Config

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shapes_biart.yaml")
    ap.add_argument("--precision", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (0: the config's train.batch_size)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(Stage2Config, args.config)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = BiART(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B = args.batch or cfg.train.batch_size
    v = cfg.model.vocab
    text = torch.randint(v.text_start, v.special_start, (B, cfg.model.text_len), device=device)
    codes = torch.randint(0, cfg.model.num_image_codes, (B, cfg.model.image_len), device=device)
    idx, seg = model.build_sequence(text, codes, "t2i")
    dtype = DTYPES[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # stage 2's loss path
            loss, _ = model(idx, seg, loss_weights=(cfg.ref_weight, cfg.gen_weight))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) / args.steps * 1000)
    fastest, median = min(times), statistics.median(times)
    print(f"{args.config}: batch {B}, sequence {idx.shape[1]}, {model.num_parameters() / 1e6:.2f}M params, "
          f"{args.precision} on {device} ({torch.get_num_threads()} threads)")
    print(f"  step: fastest {fastest:.1f} ms, median {median:.1f} ms -> {B / fastest * 1000:.0f} samples/s")
    print(json.dumps({"config": args.config, "precision": args.precision, "device": str(device),
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "batch": B, "ms_per_step_fastest": round(fastest, 2), "ms_per_step_median": round(median, 2),
                      "samples_per_s": round(B / fastest * 1000, 1)}))


if __name__ == "__main__":
    main()
