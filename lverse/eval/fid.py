"""FID, blurred FID and the Inception Score through ``torch-fidelity``'s Inception.

* **Inception**: torch-fidelity's ``FeatureExtractorInceptionV3`` (``inception-v3-compat``, the
  TF-FID Inception with its TF-compatible resize to 299), its weights read from a local file:
  ``weights-inception-2015-12-05-6726825d.pth`` (``--inception-weights`` / ``$LVERSE_INCEPTION``).
  Nothing is downloaded; a missing file is an error naming it. The file's SHA-256 is checked
  against the prefix in its name and recorded.
* **FID**: torch-fidelity's ``fid_features_to_statistics`` and ``fid_statistics_to_metric`` on the
  2048-d pool features; **IS**: its ``isc_features_to_metric`` on the unbiased logits (10 splits).
* **Blur** (L-Verse Table 3, after DALL-E): FID-k compares images blurred by a Gaussian of radius
  ``k``, the same filter applied to the real and the generated images before they are quantised to
  8 bits and fed to the Inception. The radius is the Gaussian's standard deviation in pixels (as
  PIL's ``GaussianBlur(radius)``), but the kernel is a true sampled Gaussian (PIL approximates it
  with box filters), truncated at 4 sigma, separable, with reflected borders.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lverse.eval.run import EvalError, file_sha256, package_version

INCEPTION_ENV = "LVERSE_INCEPTION"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA_PREFIX = "6726825d"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FEATURES = ("2048", "logits_unbiased")
RADII = (0, 1, 2, 4, 8)


# ------------------------------------------------------------------------------------------
# Blur
# ------------------------------------------------------------------------------------------


def gaussian_kernel(radius: float) -> torch.Tensor:
    """The 1-D Gaussian of standard deviation ``radius``, sampled at integer offsets within
    ``ceil(4 * radius)``, summing to 1."""
    half = max(1, math.ceil(4 * radius))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / radius) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Blur images ``(N, C, H, W)`` (any float range; uint8 is taken as 0..255 and returned as
    float) with a Gaussian of standard deviation ``radius`` pixels; radius 0 returns them as
    float unchanged. Borders are reflected (replicated where the image is smaller than the kernel)."""
    x = images.to(torch.float64) if images.dtype == torch.uint8 else images.double()
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    if radius == 0:
        return x.float()
    k = gaussian_kernel(radius).to(x.device)
    half = (k.numel() - 1) // 2
    n, c, h, w = x.shape
    mode = "reflect" if half < min(h, w) else "replicate"
    y = F.pad(x.reshape(n * c, 1, h, w), (half, half, half, half), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.view(n, c, h, w).float()


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 255.0)) -> torch.Tensor:
    """Float images in ``value_range`` -> uint8 0..255 (rounded, clamped)."""
    lo, hi = value_range
    return ((images.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def blur_uint8(images: torch.Tensor, radius: float) -> torch.Tensor:
    """uint8 images -> blurred -> uint8 (what the Inception of FID-``radius`` sees)."""
    return images if radius == 0 else to_uint8(gaussian_blur(images, radius))


# ------------------------------------------------------------------------------------------
# The Inception
# ------------------------------------------------------------------------------------------


def inception_path(path: str | Path | None = None) -> Path:
    """The Inception weights file from the flag or ``$LVERSE_INCEPTION``; an :class:`EvalError`
    naming the file when it is not there."""
    given = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if given is None:
        raise EvalError(f"FID/IS need torch-fidelity's Inception weights {INCEPTION_FILE} (never downloaded): "
                        f"pass --inception-weights FILE or set ${INCEPTION_ENV} (the file is at {INCEPTION_URL})")
    p = Path(given).expanduser()
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise EvalError(f"Inception weights not found: {p} (torch-fidelity's {INCEPTION_FILE}, from {INCEPTION_URL})")
    return p


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu",
                   features: Sequence[str] = FEATURES) -> tuple[torch.nn.Module, str, str]:
    """torch-fidelity's Inception with local weights, its description for the report and the
    weights' SHA-256 (cached features are kept per weights file). ``features``: the layers it
    returns (FID's is "2048"; a test may ask for "64", which stops the network early)."""
    weights = inception_path(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise EvalError("FID/IS need torch-fidelity: pip install 'lverse[eval]'") from None
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                            feature_extractor_weights_path=str(weights))
    except (RuntimeError, KeyError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(f"{weights}: not torch-fidelity's Inception weights ({first})") from None
    sha = file_sha256(weights)
    tag = ("pt_inception-2015-12-05" if sha.startswith(INCEPTION_SHA_PREFIX)
           else f"unrecognised weights (sha256 {sha[:12]}, expected {INCEPTION_SHA_PREFIX}...)")
    desc = f"{package_version('torch-fidelity')}, inception-v3-compat {tag} ({weights.name}, sha256 {sha[:16]})"
    return model.to(device).eval(), desc, sha


@torch.no_grad()
def inception_features(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    radius: float = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], object] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"2048": (N, 2048), "logits_unbiased": (N, 1008)}`` (the model's ``features_list``) of
    uint8 image batches ``(B, 3, H, W)``, each blurred by ``radius`` first."""
    names = list(getattr(model, "features_list", FEATURES))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for batch in batches:
        if batch.dtype != torch.uint8:
            raise ValueError(f"inception_features expects uint8 images, got {batch.dtype}")
        feats = model(blur_uint8(batch, radius).to(device))
        for k, f in zip(names, feats):
            out[k].append(f.double().cpu())
        if progress is not None:
            progress(batch.shape[0])
    if not out[names[0]]:
        raise EvalError("no images to compute features of")
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# The metrics (torch-fidelity's own functions)
# ------------------------------------------------------------------------------------------


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` of features ``(N, D)`` (torch-fidelity's ``fid_features_to_statistics``)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.shape[0] < 2:
        raise EvalError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    return fid_features_to_statistics(features.double().cpu())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The Fréchet distance of two Gaussians, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``
    (torch-fidelity's ``fid_statistics_to_metric``)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.atleast_1d(np.asarray(mu1, dtype=np.float64)), "sigma": np.atleast_2d(np.asarray(sigma1, dtype=np.float64))}
    s2 = {"mu": np.atleast_1d(np.asarray(mu2, dtype=np.float64)), "sigma": np.atleast_2d(np.asarray(sigma2, dtype=np.float64))}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = statistics(a), statistics(b)
    return frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> dict[str, float]:
    """``{"mean", "std"}`` over ``splits`` (torch-fidelity's ``isc_features_to_metric``, shuffled
    with its default seed)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = max(1, min(splits, logits.shape[0]))
    m = isc_features_to_metric(logits.double().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"mean": float(m[KEY_METRIC_ISC_MEAN]), "std": float(m[KEY_METRIC_ISC_STD]), "splits": splits}


# ------------------------------------------------------------------------------------------
# FID at several radii, features cached in the run directory
# ------------------------------------------------------------------------------------------


def cached_features(
    cache: Path | None,
    name: str,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Features from ``cache/name.pt`` when it was made for ``key`` (which images), else computed
    and saved there."""
    path = cache / f"{name}.pt" if cache is not None else None
    if path is not None and path.is_file():
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(feats, dict) and feats.get("key") == key:
            return {k: v for k, v in feats.items() if k != "key"}
    feats = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, **feats}, tmp)
        os.replace(tmp, path)
    return feats


def fid_at_radii(
    model: torch.nn.Module,
    real: Callable[[], Iterable[torch.Tensor]],
    fake: Callable[[], Iterable[torch.Tensor]],
    keys: tuple[str, str],
    radii: Sequence[float] = RADII,
    device: str | torch.device = "cpu",
    cache: Path | None = None,
    with_is: bool = True,
    bars: Callable[[str, int], Callable[[int], object]] | None = None,
    counts: tuple[int, int] = (0, 0),
    layer: str = "2048",
) -> dict[str, Any]:
    """FID-k for every radius ``k`` (both sets blurred alike) and, when ``with_is``, the IS of the
    unblurred ``fake`` set. ``real``/``fake`` make fresh iterables of uint8 batches; ``keys`` name
    their contents (cached features are reused only for the same key); ``counts`` size the bars;
    ``layer``: the features FID compares (the standard "2048")."""
    out: dict[str, Any] = {"fid": {}}

    def feats(which: str, make: Callable[[], Iterable[torch.Tensor]], key: str, count: int, r: float) -> dict[str, torch.Tensor]:
        def compute() -> dict[str, torch.Tensor]:
            bar = bars(f"Inception {which} r={r:g}", count) if bars is not None and count else None
            return inception_features(model, make(), r, device, bar)

        return cached_features(cache, f"{which}_r{r:g}", f"{key}/{layer}", compute)

    for r in radii:
        fr, ff = feats("real", real, keys[0], counts[0], r), feats("fake", fake, keys[1], counts[1], r)
        out["fid"][f"{r:g}"] = fid_from_features(fr[layer], ff[layer])
        out["n_real"], out["n_fake"] = int(fr[layer].shape[0]), int(ff[layer].shape[0])
        if with_is and r == 0:
            out["inception_score"] = inception_score(ff["logits_unbiased"])
    if with_is and "inception_score" not in out:
        out["inception_score"] = inception_score(feats("fake", fake, keys[1], counts[1], 0)["logits_unbiased"])
    return out


__all__ = ["INCEPTION_FILE", "RADII", "blur_uint8", "fid_at_radii", "fid_from_features", "frechet_distance",
           "gaussian_blur", "gaussian_kernel", "inception_features", "inception_path", "inception_score",
           "load_inception", "statistics", "to_uint8"]
