"""The ``recon`` protocol: an AugVAE on an image folder (L-Verse Tables 1 and 4).

Images are resized (shorter side) and centre-cropped to the AugVAE's resolution with LANCZOS
(Table 4: "Images are resized to 256x256 with LANCZOS"), encoded, decoded and stored as 8-bit
PNGs (``recon/NNNNNN.png``; resumable like every protocol). Scores, the real 8-bit image against
the stored reconstruction:

* **rFID**: FID (torch-fidelity's Inception, :mod:`lverse.eval.fid`) of reconstructions vs inputs;
* **PSNR** and **SSIM** (torchmetrics' functional ones, data range 1, SSIM's Gaussian window
  11 / sigma 1.5), averaged over images;
* **LPIPS** (the ``lpips`` package, VGG, backbone weights from a local file: see
  :mod:`lverse.models.lpips`), averaged;
* **codebook usage** (share of the codebook's entries used over the whole set) and
  **perplexity** (exp of the entropy of the code histogram), from the stored codes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lverse.data.images import Skipped
from lverse.eval.data import ImageFolder
from lverse.eval.fid import fid_at_radii, load_inception, to_uint8
from lverse.eval.protocols import _key, _ordered
from lverse.eval.run import Bars, RunDir, iter_batches, package_version, run_stage
from lverse.models.augvae import AugVAE

RECON_METRICS = ("rfid", "psnr", "ssim", "lpips", "codebook")
PAPER_RFID = {"AugVAE-SL, ImageNet1K val (Table 1)": 3.28, "AugVAE-ML, ImageNet1K val (Table 1)": 1.04,
              "CelebA-HQ": 7.24, "FFHQ": 4.92, "AFHQ": 4.36, "MS-COCO": 4.77, "OpenImages V6": 3.15}


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """``{"usage", "perplexity", "used"}`` of code ids (any shape)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp(min=1)
    nz = p[p > 0]
    return {"used": int((counts > 0).sum()), "usage": float((counts > 0).sum()) / codebook_size,
            "perplexity": float(math.exp(float(-(nz * nz.log()).sum()))) if nz.numel() else 0.0}


def _pixel_metrics(real: torch.Tensor, recon: torch.Tensor, lpips_model: torch.nn.Module | None,
                   device: torch.device, metrics: Sequence[str]) -> dict[str, list[float]]:
    """Per image PSNR / SSIM (torchmetrics) and LPIPS of uint8 images ``(B, 3, H, W)``."""
    a, b = real.float().div(255).to(device), recon.float().div(255).to(device)
    out: dict[str, list[float]] = {}
    if "psnr" in metrics or "ssim" in metrics:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        if "psnr" in metrics:
            out["psnr"] = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)).tolist()
        if "ssim" in metrics:
            out["ssim"] = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none").tolist()
    if lpips_model is not None:
        with torch.no_grad():
            out["lpips"] = lpips_model(b * 2 - 1, a * 2 - 1).flatten().float().cpu().tolist()
    return out


def recon_protocol(
    augvae: AugVAE,
    images: ImageFolder,
    run: RunDir,
    metrics: Sequence[str] = RECON_METRICS,
    inception: str | None = None,
    lpips_model: torch.nn.Module | None = None,
    lpips_desc: str = "",
    batch_size: int = 16,
    bars: Bars = Bars(False),
    inception_layer: str = "2048",
) -> dict[str, Any] | None:
    """Reconstruct ``images`` with ``augvae`` and score; the report on rank 0. ``inception_layer``:
    the features rFID compares (the standard "2048"; tests use "64")."""
    device = next(augvae.parameters()).device
    augvae = augvae.eval()
    n = len(images)

    def draw(items: range, seed: int) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = []
        xs, ok = [], []
        for i in items:
            x = images.image(i)
            if isinstance(x, Skipped):
                recs.append({"index": i, "name": images.files[i].as_posix(), "skipped": x.reason})
            else:
                ok.append(i)
                xs.append(x)
        if not ok:
            return recs
        x = torch.stack(xs).to(device)
        with torch.no_grad():
            codes = augvae.encode(x)
            y = augvae.decode(codes).float().clamp(-1, 1)
        real_u8, recon_u8 = to_uint8(x.cpu(), (-1.0, 1.0)), to_uint8(y.cpu(), (-1.0, 1.0))
        pix = _pixel_metrics(real_u8, recon_u8, lpips_model, device, metrics)
        codes_dir = run.root / "codes"
        codes_dir.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(ok):
            rel = run.image_path("recon", i)
            run.save_image(rel, y[j])
            np.save(codes_dir / f"{i:06d}.npy", codes[j].cpu().numpy().astype(np.int32))
            recs.append({"index": i, "name": images.files[i].as_posix(), "file": rel, "codes": f"codes/{i:06d}.npy",
                         **{k: v[j] for k, v in pix.items()}})
        return recs

    recs = _ordered(run_stage(run, "recon", n, batch_size, draw, 0, bars), n)
    if not run.shard.is_main:
        return None
    good = [r for r in recs if "file" in r]
    cfg = augvae.cfg
    report: dict[str, Any] = {"protocol": "recon", "n": len(good), "skipped_items": n - len(good),
                              "images": str(images.root), "resolution": images.resolution, "resample": images.resample,
                              "augvae": {"variant": cfg.variant, "codebook_size": cfg.codebook_size,
                                         "tokens_per_image": augvae.tokens_per_image},
                              "metrics": {}, "implementations": {}}
    m, impl = report["metrics"], report["implementations"]
    tm = package_version("torchmetrics")
    for k, desc in (("psnr", f"{tm} peak_signal_noise_ratio (data range 1, per image, averaged)"),
                    ("ssim", f"{tm} structural_similarity_index_measure (Gaussian 11, sigma 1.5, per image, averaged)"),
                    ("lpips", lpips_desc)):
        if k in metrics and good and k in good[0]:
            m[k] = float(np.mean([r[k] for r in good]))
            impl[k] = desc
    if "codebook" in metrics and good:
        codes = torch.from_numpy(np.concatenate([np.load(run.root / r["codes"]) for r in good]))
        m["codebook"] = codebook_usage(codes, cfg.codebook_size)
        impl["codebook"] = "lverse: share of codebook entries used over the set; exp(entropy) of the code histogram"
    if "rfid" in metrics:
        model, desc, sha = load_inception(inception, device, (inception_layer,))
        loader = lambda rel: run.load_image(rel)  # noqa: E731
        real_idx = [r["index"] for r in good]

        def real() -> Any:
            for chunk in iter_batches(real_idx, 32):
                yield to_uint8(torch.stack([images.image(i) for i in chunk]), (-1.0, 1.0))  # type: ignore[misc]

        def fake() -> Any:
            for chunk in iter_batches(good, 32):
                yield torch.stack([loader(r["file"]) for r in chunk])

        out = fid_at_radii(model, real, fake, (_key([images.root, images.resample, *real_idx]), _key([r["file"] for r in good])),
                           (0,), device, run.root / "features" / sha[:12], with_is=False, bars=bars,
                           counts=(len(good), len(good)), layer=inception_layer)
        m["rfid"] = out["fid"]["0"]
        impl["rfid"] = f"{desc}; reconstructions vs inputs, both 8-bit at {images.resolution} px ({images.resample})"
    return report


def recon_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [f"# Reconstruction ({report['n']} images of {report['images']}, {report['resolution']} px, "
             f"{report['resample']})", "", "| metric | this run |", "|---|---|"]
    if "rfid" in m:
        lines.append(f"| rFID | {m['rfid']:.2f} |")
    for k, label, fmt in (("psnr", "PSNR (dB)", ".2f"), ("ssim", "SSIM", ".4f"), ("lpips", "LPIPS (VGG)", ".4f")):
        if k in m:
            lines.append(f"| {label} | {m[k]:{fmt}} |")
    if "codebook" in m:
        c = m["codebook"]
        lines += [f"| codebook usage | {100 * c['usage']:.1f}% ({c['used']} of {report['augvae']['codebook_size']}) |",
                  f"| codebook perplexity | {c['perplexity']:.1f} |"]
    lines += ["", "The paper's rFID (ImageNet1K-trained AugVAE, 256 px, LANCZOS):", "", "| set | rFID |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in PAPER_RFID.items()]
    lines += ["", "Implementations:", ""] + [f"- {k}: {v}" for k, v in report["implementations"].items()]
    return "\n".join(lines) + "\n"


def load_augvae(path: str | Path, official: bool = False, device: str | torch.device = "cpu") -> AugVAE:
    """An lverse AugVAE (``.safetensors`` or a bundle directory) or, with ``official``, a
    converted official ``.ckpt``."""
    p = Path(path)
    if official:
        from lverse.convert import convert_official

        return convert_official(p).to(device).float().eval()
    if p.is_dir():
        p = p / "augvae.safetensors"
    return AugVAE.load(p, device=device).float().eval()


__all__ = ["RECON_METRICS", "codebook_usage", "load_augvae", "recon_markdown", "recon_protocol"]
