"""Benchmark: text->image decoding of a 32x32 token grid, lverse's cached decoder against references.

    python bench/sampling.py                         # CPU: 4 layers, width 256, 8 candidates of 1024 tokens
    python bench/sampling.py --threads 1 --grid 16
    python bench/sampling.py --paper --batch 64      # the paper's BiART on a GPU (fp16), 64 candidates

All greedy runs start from the same random model and prompt and must write the same tokens
(``tokens_match``; a bf16 cache may differ at near-ties). What is timed, in the same process:

* ``cached``: lverse's decoder (``lverse.inference.sampling.decode``) as shipped: a
  preallocated key/value cache, the head for the image codes only;
* ``cached_full_head``: the same with the head over the whole vocabulary;
* ``cat_cache``: a minDALL-E-style reference written here: each layer's past keys/values grow
  by ``torch.cat`` at every step (same model, same restricted head, so only the cache differs);
* ``uncached``: the whole prefix recomputed at every step (lverse's reference decoder), timed
  on ``--uncached-batch`` rows (1: it is slow) against ``cached`` on as many rows;
* per ``--cache-dtypes``: the cached decoder with a key/value cache in that dtype
  (``decode(cache_dtype=)``) for the fp32 model, and the model itself in bf16 (``bf16_model``);
* ``multinomial`` vs ``gumbel``: sampling at temperature 1 with ``torch.multinomial`` and with
  Gumbel-max draws from pre-drawn noise (``SamplingParams(draw="gumbel")``).

Prints tokens/s and the ratios, and a JSON line (``--json FILE`` also writes it).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.nn.functional as F

import benchlib
from lverse.inference.sampling import SamplingParams, decode, image_part
from lverse.models.biart import GEN, BiART, BiARTConfig


@torch.no_grad()
def cat_cache_decode(model: BiART, prompt: torch.Tensor, seg: torch.Tensor, n_new: int, rows: int) -> torch.Tensor:
    """Greedy image tokens ``(rows, n_new)`` with a minDALL-E-style cache: per layer, the past
    keys and values are concatenated with the new ones at every step (a new tensor each time)."""
    cfg, (lo, hi) = model.cfg, image_part(model.vocab).span
    H, C = cfg.n_head, cfg.n_embd
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.n_layer

    def run(idx: torch.Tensor, sg: torch.Tensor, start: int) -> torch.Tensor:
        B, T = idx.shape
        pos = torch.arange(start, start + T, device=idx.device)
        x = (model.tok_emb(idx) + model.pos_emb(pos) + model.seg_emb(sg)).to(model.dtype)
        for i, blk in enumerate(model.blocks):
            q, k, v = blk.attn.qkv(blk.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            if past[i] is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            past[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)
            x = x + blk.attn.proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + blk.mlp(blk.ln2(x))
        return model.ln_f(x)[:, -1]

    h = run(prompt.expand(rows, -1), seg.expand(rows, -1), 0)
    out = torch.empty(rows, n_new, dtype=torch.long, device=prompt.device)
    gen = torch.full((rows, 1), GEN, dtype=torch.long, device=prompt.device)
    for t in range(n_new):
        out[:, t] = F.linear(h.contiguous(), model.head.weight[lo:hi]).float().argmax(-1) + lo
        if t < n_new - 1:
            h = run(out[:, t : t + 1], gen, prompt.shape[1] + t)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="the paper's BiART: 32 layers, width 1024, 16 heads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, default=32, help="image token grid side (32 -> 1024 tokens)")
    p.add_argument("--batch", type=int, default=8, help="candidates decoded at once (one prompt)")
    p.add_argument("--uncached-batch", type=int, default=1, help="rows of the uncached comparison (0: skip it)")
    p.add_argument("--cache-dtypes", default=None, help="comma list of other cache dtypes to time (bf16, fp16; "
                   "'' none; default: bf16 for an fp32 model, none otherwise)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="the model's dtype (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile-step", action="store_true", help="also time decode(compile_step=True)")
    p.add_argument("--runs", default="", help="comma list: time only these runs (default: all; 'cached' always)")
    p.add_argument("--json", default="", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.paper:
        args.layers, args.width, args.heads = 32, 1024, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = benchlib.device_of(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    dtype = benchlib.DTYPES[precision]
    if args.cache_dtypes is None:
        args.cache_dtypes = "bf16" if dtype == torch.float32 else ""

    cfg = BiARTConfig(text_len=64, image_len=args.grid * args.grid, n_layer=args.layers, n_head=args.heads,
                      n_embd=args.width, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = BiART(cfg).to(device).eval()
    if dtype != torch.float32:
        model.to_o2(dtype)
    v, n = cfg.vocab, cfg.image_len
    prompt, seg = model.build_prompt(torch.randint(v.text_start, v.special_start, (1, cfg.text_len), device=device), "t2i")
    part, greedy = image_part(v), SamplingParams(greedy=True)

    def dec(rows: int, params: SamplingParams = greedy, **kw: Any) -> Callable[[int], torch.Tensor]:
        g = torch.Generator(device).manual_seed(0) if not params.is_greedy else None
        return lambda k=n: decode(model, prompt, seg, k, rows, part, params, g, batch_size=rows, **kw)[0]

    B = args.batch
    runs: dict[str, Callable[..., torch.Tensor]] = {
        "cached": dec(B),
        "cached_full_head": dec(B, restrict_head=False),
        "cat_cache": lambda k=n: cat_cache_decode(model, prompt, seg, k, B),
        "multinomial": dec(B, SamplingParams()),
        "gumbel": dec(B, SamplingParams(draw="gumbel")),
    }
    for name in filter(None, args.cache_dtypes.split(",")):
        if benchlib.DTYPES[name] != dtype:
            runs[f"cache_{name}"] = dec(B, cache_dtype=benchlib.DTYPES[name])
    if dtype == torch.float32 and "bf16" in args.cache_dtypes:
        bf16_model = BiART(cfg).to(device).eval()
        bf16_model.load_state_dict(model.state_dict())
        bf16_model.to_o2(torch.bfloat16)
        runs["bf16_model"] = lambda k=n: decode(bf16_model, prompt, seg, k, B, part, greedy, batch_size=B)[0]
    if args.compile_step:
        runs["compiled_step"] = dec(B, compile_step=True)
    if args.uncached_batch:
        runs["cached_small"] = dec(args.uncached_batch)
        runs["uncached"] = dec(args.uncached_batch, use_cache=False)

    if args.runs:
        keep = set(args.runs.split(",")) | {"cached"}
        runs = {k: f for k, f in runs.items() if k in keep}
    result: dict[str, Any] = {"bench": "sampling", **benchlib.machine(device), "precision": precision,
                              "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                              "params": model.num_parameters(), "batch": B, "uncached_batch": args.uncached_batch,
                              "image_tokens": n}
    print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {result['params'] / 1e6:.1f}M params, {precision}, "
          f"{result['device']} ({torch.get_num_threads()} threads); {n} image tokens after a {prompt.shape[1]}-token prompt")
    outs: dict[str, torch.Tensor] = {}
    for name, fn in runs.items():
        fn(n if name == "compiled_step" else 8)  # warm-up (allocator, kernels); compiling needs the real shapes
        t = benchlib.timed(lambda: outs.__setitem__(name, fn()), device)
        rows = args.uncached_batch if name in ("uncached", "cached_small") else B
        result[name] = {"seconds": t, "tokens_per_s": rows * n / t}
        print(f"{name:<17}{t:8.2f} s  {rows * n / t:10.1f} tokens/s  ({rows} rows)")
    ref = outs["cached"]
    result["tokens_match"] = {k: float((o == ref[: o.shape[0]]).float().mean())
                              for k, o in outs.items() if k not in ("multinomial", "gumbel")}

    def ratio(fast: str, slow: str) -> float:  # how many times faster ``fast`` is (same rows)
        return result[slow]["seconds"] / result[fast]["seconds"]

    pairs = {"cached_vs_cat_cache": ("cached", "cat_cache"), "cached_vs_full_head": ("cached", "cached_full_head"),
             "gumbel_vs_multinomial": ("gumbel", "multinomial")}
    result["ratios"] = {k: ratio(a, b) for k, (a, b) in pairs.items() if a in runs and b in runs}
    if "uncached" in runs:
        result["ratios"]["cached_vs_uncached"] = ratio("cached_small", "uncached")
    for k in runs:
        if k.startswith("cache_") or k in ("bf16_model", "compiled_step"):
            result["ratios"][f"{k}_vs_cached"] = ratio(k, "cached")
    print("ratios (x faster): " + ", ".join(f"{k} {r:.2f}" for k, r in result["ratios"].items()))
    print("greedy tokens equal to cached: " + ", ".join(f"{k} {m * 100:.1f}%" for k, m in result["tokens_match"].items()))
    benchlib.write(result, args.json or None)
    return result


if __name__ == "__main__":
    main()
