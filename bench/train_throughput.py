"""Benchmark: BiART training steps against a plain GPT of the same size, in the same process.

    python bench/train_throughput.py                        # CPU: 4x256, sequence 1090, vocabulary 57,603, batch 2
    python bench/train_throughput.py --threads 1,2 --precision fp32,bf16
    python bench/train_throughput.py --paper --precision bf16,fp16-o2 --compile off,on   # one GPU
    python bench/train_throughput.py --memory               # peak memory per variant, each in its own process

Three models take turns, round by round (medians; one warm-up step each), each a full training
step (forward, loss, backward, clipping, AdamW) through lverse's precision machinery
(``lverse.train.precision``: fp32, bf16 autocast, fp16 autocast + GradScaler, fp16-o2):

* ``biart``: BiART as stage 2 trains it (``model(idx, seg, loss_weights=...)``: the head only
  where a target counts, chunked, no full logits);
* ``biart_logits``: the same BiART with the loss taken from full logits
  (:func:`lverse.models.loss.sequence_nll`, the path training used before);
* ``gpt``: a nanoGPT-style GPT written here (token + position embeddings, the same blocks,
  ``F.cross_entropy`` over every position's logits), same depth, width, heads, vocabulary, sequence.

It prints ms per step, tokens/s, the ratio to the GPT (``< 1``: faster), MFU against a matmul
peak measured in the run (model FLOPs ``6 N + 12 L T C`` per token, as nanoGPT counts them, the
same figure for all three), and peak memory (CUDA: ``max_memory_allocated``; CPU with
``--memory``: the peak resident memory of a process that runs only that variant).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import benchlib
from lverse.models.biart import BiART, BiARTConfig, build_sequence
from lverse.models.loss import sequence_nll
from lverse.train.precision import build_precision

# ------------------------------------------------------------------------------------------
# The reference: a plain GPT (nanoGPT's layout), written for this benchmark
# ------------------------------------------------------------------------------------------


class RefBlock(nn.Module):
    def __init__(self, c: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, c: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.blocks = nn.ModuleList(RefBlock(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------
# One variant: its model, optimizer and step
# ------------------------------------------------------------------------------------------


def build(variant: str, cfg: BiARTConfig, precision: str, device: torch.device, batch: int, compile_: bool,
          optimizer: bool = True):
    """A training step (a closure) for ``variant``, with its own model and optimizer."""
    torch.manual_seed(0)
    v = cfg.vocab
    text = torch.randint(v.text_start, v.special_start, (batch, cfg.text_len), device=device)
    codes = torch.randint(0, cfg.num_image_codes, (batch, cfg.image_len), device=device)
    if variant == "gpt":
        model: nn.Module = RefGPT(v.size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    elif variant == "biart_modality":  # model.modality_softmax: each target's softmax over its own modality
        model = BiART(dataclasses.replace(cfg, modality_softmax=True))
    else:
        model = BiART(cfg)
    model.to(device).train()
    # GPT: the same tokens, the separators left out and two more at the end, so the same length
    idx, seg = build_sequence(cfg, text, codes, "t2i") if variant != "gpt" else (None, None)
    if variant == "gpt":
        idx = torch.cat([text, v.image_to_global(codes), text[:, :2]], 1)
    prec = build_precision(precision, device)
    prec.prepare_model(model)
    # fused AdamW on a GPU: lverse.train.precision's rule, the same for BiART and the GPT
    opt = prec.build_optimizer([{"params": list(model.parameters())}], lr=1e-4, betas=(0.9, 0.95))
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        with prec.autocast():
            if variant == "gpt":
                loss = fwd(idx[:, :-1], idx[:, 1:])
            elif variant in ("biart", "biart_modality"):
                loss, _ = fwd(idx, seg, loss_weights=(1.0, 1.0))
            else:
                loss, _ = sequence_nll(fwd(idx, seg), idx, seg, v)
        prec.backward(loss)
        if optimizer:
            prec.step(opt, 1.0)
        else:  # forward and backward only (--memory --no-optimizer: the loss's share stands out)
            model.zero_grad(set_to_none=False)

    return step, model


def flops_per_token(cfg: BiARTConfig) -> float:
    """nanoGPT's count: 6 per weight of every matmul (the blocks and the head) and 12 L T C for attention."""
    c, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    n = L * 12 * c * c + cfg.vocab.size * c
    return 6 * n + 12 * L * T * c


def memory_of(args: argparse.Namespace, variant: str, precision: str, threads: int) -> dict[str, float]:
    """Peak resident memory of a fresh process that runs two steps of one variant (CPU)."""
    cmd = [sys.executable, __file__, "--one", variant, "--precision", precision, "--threads", str(threads),
           "--layers", str(args.layers),
           "--width", str(args.width), "--heads", str(args.heads), "--batch", str(args.batch),
           "--image-len", str(args.image_len), "--text-len", str(args.text_len), "--device", args.device,
           "--image-codes", str(args.image_codes), "--text-tokens", str(args.text_tokens)]
    cmd += ["--no-optimizer"] if args.no_optimizer else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="the paper's BiART: 32 layers, width 1024, 16 heads, batch 8")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--image-len", type=int, default=1024)
    p.add_argument("--image-codes", type=int, default=8192, help="image vocabulary (the Shapes BiART: 512)")
    p.add_argument("--text-tokens", type=int, default=49408, help="text vocabulary (the Shapes BiART: 600)")
    p.add_argument("--precision", default="", help="comma list of fp32,bf16,fp16,fp16-o2 (default: fp32,bf16 on "
                   "a CPU, bf16,fp16-o2 on a GPU)")
    p.add_argument("--compile", default="off", help="comma list of off,on: torch.compile every model")
    p.add_argument("--threads", default="", help="comma list of CPU thread counts (default: torch's)")
    p.add_argument("--variants", default="biart,biart_logits,gpt",
                   help="comma list of biart, biart_logits (full logits), biart_modality (modality_softmax), gpt")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--memory", action="store_true", help="CPU: also peak memory per variant (a process each); "
                   "with --rounds 0 only that")
    p.add_argument("--no-optimizer", action="store_true", help="--memory: forward and backward only, no AdamW state")
    p.add_argument("--json", default="", help="also write the JSON result to this file")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one variant, print its memory
    args = p.parse_args(argv)
    if args.paper:
        args.layers, args.width, args.heads, args.batch = 32, 1024, 16, 8
    device = benchlib.device_of(args.device)
    cfg = BiARTConfig(num_image_codes=args.image_codes, num_text_tokens=args.text_tokens,
                      text_len=args.text_len, image_len=args.image_len, n_layer=args.layers, n_head=args.heads,
                      n_embd=args.width, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    precisions = (args.precision or ("bf16,fp16-o2" if device.type == "cuda" else "fp32,bf16")).split(",")

    if args.one:  # a child process of --memory
        if args.threads:
            torch.set_num_threads(int(args.threads))
        step, _ = build(args.one, cfg, precisions[0], device, args.batch, False, not args.no_optimizer)
        before = benchlib.rss_bytes()
        step()
        step()
        print(json.dumps({"peak_rss_mb": benchlib.peak_rss_bytes() / 2**20,
                          "step_peak_mb": (benchlib.peak_rss_bytes() - before) / 2**20}))
        return {}

    variants = args.variants.split(",")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    tokens = args.batch * cfg.block_size
    fpt = flops_per_token(cfg)
    rows = []
    print(f"BiART {cfg.n_layer}x{cfg.n_embd} ({cfg.n_head} heads), sequence {cfg.block_size}, vocabulary "
          f"{cfg.vocab.size}, batch {args.batch}, on {benchlib.machine(device)['device']}")
    print(f"{'precision':<9} {'compile':<7} {'thr':>3}  " + "  ".join(f"{v + ' ms':>16}" for v in variants)
          + "  tok/s(biart)  MFU   vs gpt")
    for n_threads in threads:
        if device.type == "cpu":
            torch.set_num_threads(n_threads)
        for precision in precisions:
            peak = 0.0 if args.rounds == 0 else benchlib.matmul_peak(benchlib.DTYPES["fp16" if precision.startswith("fp16") else precision], device)
            if args.rounds == 0:  # memory only
                rows.append({"precision": precision, "threads": n_threads,
                             **{v: memory_of(args, v, precision, n_threads) for v in variants}})
                print(f"{precision:<9} peak memory (MiB): " + ", ".join(
                    f"{v} {rows[-1][v]['peak_rss_mb']:.0f} (step {rows[-1][v]['step_peak_mb']:.0f})" for v in variants))
                continue
            for comp in args.compile.split(","):
                steps, peak_mem = {}, {}
                for v in variants:
                    base = 0
                    if device.type == "cuda":  # the variant's own peak: the others' models stay allocated
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    steps[v] = build(v, cfg, precision, device, args.batch, comp == "on")[0]  # the step holds its model
                    steps[v]()
                    if device.type == "cuda":
                        peak_mem[v] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                times = benchlib.interleaved(steps, device, args.rounds)
                steps.clear()
                row: dict[str, Any] = {"precision": precision, "compile": comp, "threads": n_threads,
                                       "peak_flops": peak}
                for v in variants:
                    row[v] = {"ms": times[v] * 1000, "tokens_per_s": tokens / times[v],
                              "mfu": fpt * tokens / times[v] / peak}
                    if v in peak_mem:
                        row[v]["peak_mb"] = peak_mem[v]
                    if args.memory and device.type == "cpu":
                        row[v].update(memory_of(args, v, precision, n_threads))
                if "gpt" in variants:
                    for v in variants:
                        row[v]["vs_gpt"] = times[v] / times["gpt"]
                rows.append(row)
                main_v = variants[0]
                print(f"{precision:<9} {comp:<7} {n_threads:>3}  " + "  ".join(f"{times[v] * 1000:16.1f}" for v in variants)
                      + f"  {tokens / times[main_v]:12.0f}  {row[main_v]['mfu'] * 100:4.1f}%"
                      + (f"  {row[main_v]['vs_gpt']:.3f}x" if "gpt" in variants else ""))
                if any("peak_mb" in row[v] or "peak_rss_mb" in row[v] for v in variants):
                    print("    peak memory (MiB): " + ", ".join(
                        f"{v} {row[v].get('peak_mb', row[v].get('peak_rss_mb', math.nan)):.0f}" for v in variants))
    result = {"bench": "train_throughput", **benchlib.machine(device), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
              "n_head": cfg.n_head, "sequence": cfg.block_size, "vocab": cfg.vocab.size, "batch": args.batch,
              "flops_per_token": fpt, "rows": rows}
    benchlib.write(result, args.json or None)
    return result


if __name__ == "__main__":
    main()
