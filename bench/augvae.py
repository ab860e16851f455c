"""Benchmark: AugVAE-SL encode, decode and training-step throughput, per precision and memory format.

    python bench/augvae.py                       # CPU: a narrow AugVAE-SL (width 32) at 64 px, batch 4
    python bench/augvae.py --paper --batch 64    # the paper's AugVAE-SL (112M parameters, 256 px) on a GPU

Random weights and images (the speed does not depend on them). For each precision (fp32 and
bf16 autocast by default; fp16 on a GPU) it times, in turns (medians of ``--rounds``):

* ``encode``: images -> 1024 token ids (``AugVAE.encode``), images/s;
* ``decode``: token ids -> images (``AugVAE.decode``), images/s;
* ``train``: a stage-1 step without LPIPS (forward, MSE + commitment, backward, AdamW), images/s;

each with the model and images in the default (contiguous) layout and in channels-last, and
prints the channels-last / contiguous ratio (``> 1``: channels-last is faster). Peak memory is
CUDA's ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

import benchlib
from lverse.models.augvae import AugVAE, AugVAEConfig, ml_to_sl


def build(cfg: AugVAEConfig, device: torch.device, channels_last: bool) -> AugVAE:
    torch.manual_seed(0)
    model = ml_to_sl(AugVAE(cfg)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="the paper's AugVAE-SL: width 128, 256 px")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="images per encode/decode call")
    p.add_argument("--train-batch", type=int, default=0,
                   help="images per training step (default: --batch; --paper: 8, since a 256-px AugVAE-SL step "
                        "saves ~2 GiB of activations per image and 64 would not fit an 80 GB GPU)")
    p.add_argument("--precision", default="", help="comma list of fp32,bf16,fp16 (default: fp32,bf16; GPU fp32,bf16,fp16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.paper:
        args.width, args.resolution = 128, 256
    TB = args.train_batch or (min(8, args.batch) if args.paper else args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = benchlib.device_of(args.device)
    precisions = (args.precision or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")).split(",")
    cfg = AugVAEConfig(resolution=args.resolution, hidden_dim=args.width, norm_groups=min(32, args.width // 4))
    B = args.batch
    x = torch.rand(B, 3, args.resolution, args.resolution, device=device) * 2 - 1
    result: dict[str, Any] = {"bench": "augvae", **benchlib.machine(device), "width": args.width,
                              "resolution": args.resolution, "batch": B, "train_batch": TB, "rows": []}
    print(f"AugVAE-SL width {args.width}, {args.resolution} px, batch {B} (training {TB}), on {result['device']} "
          f"({torch.get_num_threads()} threads)")
    for precision in precisions:
        dtype = benchlib.DTYPES[precision]

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

        fns: dict[str, Callable[[], Any]] = {}
        peak: dict[str, float] = {}
        for layout in ("contiguous", "channels_last"):
            cl = layout == "channels_last"
            model = build(cfg, device, cl)
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            with torch.no_grad(), autocast():
                tokens = model.encode(xi)

            def encode(m: AugVAE = model, xi: torch.Tensor = xi) -> None:
                with torch.no_grad(), autocast():
                    m.encode(xi)

            def decode(m: AugVAE = model, t: torch.Tensor = tokens) -> None:
                with torch.no_grad(), autocast():
                    m.decode(t)

            def train(m: AugVAE = model, xi: torch.Tensor = xi[:TB], opt: torch.optim.Optimizer = opt) -> None:
                with autocast():
                    out = m(xi)
                loss = F.mse_loss(out.recon.float(), xi) + out.commit_loss.float()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for name, fn in (("encode", encode), ("decode", decode), ("train", train)):
                fns[f"{name}/{layout}"] = fn
                if device.type == "cuda":  # the rise over what is allocated already (the other models)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    fn()
                    peak[f"{name}/{layout}"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        times = benchlib.interleaved(fns, device, args.rounds)
        row: dict[str, Any] = {"precision": precision}
        for k, t in times.items():
            n = TB if k.startswith("train/") else B
            row[k] = {"images_per_s": n / t, "ms": t * 1000, **({"peak_mb": peak[k]} if k in peak else {})}
        for name in ("encode", "decode", "train"):
            row[f"{name}/channels_last_speedup"] = times[f"{name}/contiguous"] / times[f"{name}/channels_last"]
            n = TB if name == "train" else B
            print(f"{precision:<5} {name:<7} contiguous {n / times[f'{name}/contiguous']:8.1f} img/s   channels-last "
                  f"{n / times[f'{name}/channels_last']:8.1f} img/s   ({row[f'{name}/channels_last_speedup']:.2f}x)")
        result["rows"].append(row)
    benchlib.write(result, args.json or None)
    return result


if __name__ == "__main__":
    main()
