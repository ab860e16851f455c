"""Bundle trained runs into the checkpoint directory `sample.py` loads (``lverse bundle``).

The AugVAE-SL and BiART may be given as weights files or run directories (their exported
``model.safetensors``, else their latest checkpoint); the tokenizer is the one saved with the
BiART run. The bundle is checked for consistency (vocabulary sizes, token grid) on the way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lverse.files import resolve_weights
from lverse.inference.clip import load_clip
from lverse.inference.pipeline import LVersePipeline
from lverse.models.augvae import AugVAE
from lverse.models.biart import BiART
from lverse.tokenizer import TextTokenizer


def find_tokenizer(biart_path: str | Path) -> Path:
    p = Path(biart_path)
    weights = resolve_weights(p)
    for cand in (weights.parent / "tokenizer.json", p / "tokenizer.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no tokenizer.json next to {weights} or in {p}; pass --tokenizer")


def trained_text_dropout(biart_path: str | Path) -> float | None:
    """``text_dropout`` from the BiART run's resolved config, if the run directory has one."""
    p = Path(biart_path)
    cfg = p / "config.yaml" if p.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    import yaml

    data = yaml.safe_load(cfg.read_text()) or {}
    return float(data.get("text_dropout", 0.0)) if isinstance(data, dict) else None


def make_bundle(
    augvae: str | Path,
    biart: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    clip: str | Path | None = None,
    sampling: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint directory ``out`` from trained runs (weights files or run dirs).

    The parts are checked to fit together (:class:`LVersePipeline`); ``sampling`` becomes the
    bundle's ``sampling.json`` (:mod:`lverse.inference.defaults`)."""
    pipe = LVersePipeline(
        AugVAE.load(resolve_weights(augvae)),
        BiART.load(resolve_weights(biart)).float(),
        TextTokenizer.load(tokenizer or find_tokenizer(biart)),
        sampling=sampling,
    )
    if clip:
        model, meta = load_clip(clip)
        pipe.set_clip(model, meta["model_cfg"], meta.get("model_name", "custom"))
        pipe._clip_meta = meta  # keep preprocessing and training notes with the bundle
    return pipe.save(out)
