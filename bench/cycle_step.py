"""Cost of a reconstruction-finetuning step (lverse.train.cycle) against stage 2's plain step.

Same model, same batch, same process: the plain step is stage 2's (one teacher-forced pass, its
loss without full logits); the cycle step adds the soft-token pass (L_IR after an image→text pass,
L_TR after a text→image pass). Time: forward + backward, median of ``--repeat`` after a warm-up.
Memory: bytes of the tensors autograd saves for the backward (the activation memory a step holds
at its peak), counted with saved-tensor hooks, and the soft tokens' own size.

    python bench/cycle_step.py                       # the shipped Shapes BiART, batch 24, 1 thread
    python bench/cycle_step.py --checkpoint none --layers 32 --width 1024 --heads 16 --batch 1 --paper
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lverse.models.biart import BiART, BiARTConfig
from lverse.train.cycle import CycleConfig, reconstruction_loss
from lverse.models.loss import sequence_nll


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # views of one storage count once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/shapes/biart.safetensors", help="BiART weights, or 'none' (random)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--paper", action="store_true", help="the paper's vocabulary and lengths (with --checkpoint none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint != "none":
        m = BiART.load(args.checkpoint)
    else:
        sizes = {} if args.paper else dict(num_image_codes=512, num_text_tokens=599, text_len=32, image_len=64)
        m = BiART(BiARTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, embd_pdrop=0.0,
                              resid_pdrop=0.0, attn_pdrop=0.0, **sizes))
    m.train()
    v, c = m.vocab, m.cfg
    text = torch.randint(v.text_start, v.special_start, (args.batch, c.text_len))
    text[:, c.text_len // 2 :] = v.pad  # captions fill half the text slots, as Shapes' do
    codes = torch.randint(0, c.num_image_codes, (args.batch, c.image_len))
    plain_ctx = torch.autocast("cpu", enabled=False)
    rows = []
    for direction in ("i2t", "t2i"):
        idx, seg = m.build_sequence(text, codes, direction)

        def plain() -> torch.Tensor:
            return m(idx, seg, loss_weights=(0.5, 1.0))[0]

        def cycle() -> torch.Tensor:
            logits = m(idx, seg)
            sup, _ = sequence_nll(logits, idx, seg, v, 0.5, 1.0)
            return sup + reconstruction_loss(m, m, CycleConfig(), logits, text, codes, direction,
                                             lambda: plain_ctx)

        for name, fn in (("plain", plain), ("cycle", cycle)):
            for _ in range(2):  # warm-up
                m.zero_grad(set_to_none=True)
                fn().backward()
            times = []
            for _ in range(args.repeat):
                m.zero_grad(set_to_none=True)
                t = time.perf_counter()
                fn().backward()
                times.append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
            loss, nbytes = saved_bytes(fn)
            loss.backward()
            rows.append({"direction": direction, "step": name, "ms": 1000 * statistics.median(times),
                         "saved_MB": nbytes / 2**20})
    soft_mb = args.batch * c.block_size * v.size * 4 / 2**20
    print(json.dumps({"config": {"batch": args.batch, "layers": c.n_layer, "width": c.n_embd, "vocab": v.size,
                                 "block": c.block_size, "threads": args.threads}, "rows": rows,
                      "soft_tokens_MB_fp32": round(soft_mb, 1)}, indent=1))
    print("\n| direction | plain ms | cycle ms | ratio | plain saved MB | cycle saved MB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for d in ("i2t", "t2i"):
        p, q = (next(r for r in rows if r["direction"] == d and r["step"] == s) for s in ("plain", "cycle"))
        print(f"| {d} | {p['ms']:.1f} | {q['ms']:.1f} | {q['ms'] / p['ms']:.2f}x | {p['saved_MB']:.1f} | "
              f"{q['saved_MB']:.1f} | {q['saved_MB'] / p['saved_MB']:.2f}x |")


if __name__ == "__main__":
    main()
