"""Benchmark: KV-cached vs. uncached BiART decoding of one image (a 32x32 token grid).

    python bench/sampling.py                    # tiny width on CPU: 4 layers, width 128
    python bench/sampling.py --paper            # the paper's BiART (32 layers, width 1024), fp16 on a GPU
    python bench/sampling.py --batch 8 --grid 16

Both decoders are greedy from the same random model and prompt, so they must write the same
tokens (reported as ``tokens_match``). Prints tokens/s and seconds per image for each, the
speed-up factor, and a JSON line at the end. The vocabulary is always the paper's (8192 image
codes + 49,408 text tokens + 3 specials), with 64 text tokens before the image.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lverse.models.biart import BiART, BiARTConfig
from lverse.pipeline import PRECISIONS, resolve_device
from lverse.sampling import SamplingParams, decode, image_part


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

    def run(n_new: int, use_cache: bool) -> torch.Tensor:
        return decode(model, prompt, seg, n_new, 1, part, params, batch_size=args.batch, use_cache=use_cache)

    n = cfg.image_len
    run(8, True)  # warm-up (allocator, kernels)
    run(8, False)
    t_cached, out_cached = _time(lambda: run(n, True), device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "params": model.num_parameters(),
        "batch": args.batch,
        "image_tokens": n,
        "cached": {"seconds": t_cached, "tokens_per_s": args.batch * n / t_cached, "s_per_image": t_cached / args.batch},
    }
    print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {result['params'] / 1e6:.1f}M params, {precision}, "
          f"{result['device']}; batch {args.batch}, {n} image tokens after a {prompt.shape[1]}-token prompt")
    print(f"cached:   {t_cached:8.2f} s  {args.batch * n / t_cached:10.1f} tokens/s  {t_cached / args.batch:8.3f} s/image")
    if not args.no_uncached:
        t_unc, out_unc = _time(lambda: run(n, False), device)
        result["uncached"] = {"seconds": t_unc, "tokens_per_s": args.batch * n / t_unc, "s_per_image": t_unc / args.batch}
        result["speedup"] = t_unc / t_cached
        result["tokens_match"] = float((out_unc == out_cached).float().mean())
        print(f"uncached: {t_unc:8.2f} s  {args.batch * n / t_unc:10.1f} tokens/s  {t_unc / args.batch:8.3f} s/image")
        print(f"speed-up: {result['speedup']:.1f}x   greedy tokens equal: {result['tokens_match'] * 100:.1f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
