"""Benchmark: KV-cached vs. uncached BiART decoding of one image (a 32x32 token grid).

    python bench/sampling.py                    # tiny width on CPU: 4 layers, width 128
    python bench/sampling.py --paper            # the paper's BiART (32 layers, width 1024), fp16 on a GPU
    python bench/sampling.py --batch 8 --grid 16

Three runs, all greedy from the same random model and prompt, so they must write the same
tokens (reported as ``tokens_match``):

* ``cached``: the sampler as used (KV cache, output head computed for the image codes only);
* ``cached_full_head``: KV cache, but the head over the whole vocabulary;
* ``uncached``: the reference decoder, the whole prefix recomputed at every step (full head,
  at the last position only).

``speedup_cache`` = uncached / cached_full_head is what the cache alone buys; ``speedup`` =
uncached / cached is what the sampler delivers. Prints tokens/s and seconds per image for each
and a JSON line at the end. The vocabulary is always the paper's (8192 image
codes + 49,408 text tokens + 3 specials), with 64 text tokens before the image.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lverse.inference.pipeline import PRECISIONS, resolve_device
from lverse.inference.sampling import SamplingParams, decode, image_part
from lverse.models.biart import BiART, BiARTConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="paper size: 32 layers, width 1024, 16 heads (use a GPU)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, default=32, help="image token grid side (32 -> 1024 tokens)")
    p.add_argument("--batch", type=int, default=1, help="images decoded at once")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="default: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-uncached", action="store_true", help="time the cached decoder only")
    args = p.parse_args(argv)
    if args.paper:
        args.layers, args.width, args.heads = 32, 1024, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    dtype = PRECISIONS[precision]

    cfg = BiARTConfig(text_len=64, image_len=args.grid * args.grid, n_layer=args.layers, n_head=args.heads,
                      n_embd=args.width, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = BiART(cfg).to(device).eval()
    if dtype != torch.float32:
        model.to_o2(dtype)
    v = cfg.vocab
    text = torch.randint(v.text_start, v.special_start, (args.batch, cfg.text_len), device=device)
    prompt, seg = model.build_prompt(text, "t2i")
    part, params = image_part(v), SamplingParams(greedy=True)

    def run(n_new: int, use_cache: bool, restrict_head: bool = True) -> torch.Tensor:
        return decode(model, prompt, seg, n_new, 1, part, params, batch_size=args.batch, use_cache=use_cache,
                      restrict_head=restrict_head)

    def stats(t: float) -> dict:
        return {"seconds": t, "tokens_per_s": args.batch * n / t, "s_per_image": t / args.batch}

    def line(name: str, t: float) -> None:
        print(f"{name:<17}{t:8.2f} s  {args.batch * n / t:10.1f} tokens/s  {t / args.batch:8.3f} s/image")

    n = cfg.image_len
    run(8, True)  # warm-up (allocator, kernels)
    run(8, True, False)
    run(8, False)
    t_cached, out_cached = _time(lambda: run(n, True), device)
    t_full, out_full = _time(lambda: run(n, True, False), device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "params": model.num_parameters(),
        "batch": args.batch,
        "image_tokens": n,
        "cached": stats(t_cached),
        "cached_full_head": stats(t_full),
    }
    print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {result['params'] / 1e6:.1f}M params, {precision}, "
          f"{result['device']}; batch {args.batch}, {n} image tokens after a {prompt.shape[1]}-token prompt")
    line("cached:", t_cached)
    line("cached, full head:", t_full)
    match = [out_full]
    if not args.no_uncached:
        t_unc, out_unc = _time(lambda: run(n, False), device)
        match.append(out_unc)
        result["uncached"] = stats(t_unc)
        result["speedup_cache"] = t_unc / t_full
        result["speedup"] = t_unc / t_cached
        line("uncached:", t_unc)
        print(f"speed-up from the cache: {result['speedup_cache']:.1f}x; sampler vs. recomputation: "
              f"{result['speedup']:.1f}x")
    result["tokens_match"] = min(float((o == out_cached).float().mean()) for o in match)
    print(f"greedy tokens equal across runs: {result['tokens_match'] * 100:.1f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
