"""LPIPS (VGG) for the AugVAE loss, with the backbone read from local files.

The `lpips` package ships its small linear heads but fetches the VGG-16 backbone through
torchvision at run time. Machines without internet cannot do that, so the backbone weights are
looked up in this order:

1. an explicit path (``loss.vgg_weights`` in the config, or ``$LVERSE_VGG16``);
2. torchvision's cache, ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``;
3. torchvision's own download, where the network allows it.

If all fail, the error says which file to put where. ``random_backbone=True`` builds LPIPS on a
randomly initialised VGG (smoke runs and tests; the loss is then only a rough image prior).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def torch_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _load_vgg_state(explicit: str | None) -> dict[str, torch.Tensor]:
    candidates = [p for p in (explicit, os.environ.get("LVERSE_VGG16")) if p]
    for p in candidates:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VGG-16 weights not found at {path} (set by loss.vgg_weights or $LVERSE_VGG16)")
        return torch.load(path, map_location="cpu", weights_only=True)
    cached = torch_cache_path()
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False)
    except Exception as e:  # no network, proxy refusal, ...
        raise FileNotFoundError(
            f"LPIPS needs the VGG-16 backbone weights and could not download them ({type(e).__name__}).\n"
            f"Put {VGG16_FILE} (torchvision's VGG16_Weights.IMAGENET1K_V1, from {VGG16_URL}) at\n"
            f"  {cached}\n"
            f"or pass its path with loss.vgg_weights=/path/{VGG16_FILE} (or $LVERSE_VGG16).\n"
            f"For a smoke run without it, set loss.lpips_random_backbone=true."
        ) from None


def build_lpips(vgg_weights: str | None = None, random_backbone: bool = False) -> nn.Module:
    """An eval-mode, frozen ``lpips.LPIPS(net='vgg')`` whose backbone came from local files."""
    import warnings

    import lpips

    # pnet_rand=True: lpips must not try to fetch the backbone itself; we fill it in below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation notes
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        vgg = _load_vgg_state(vgg_weights)
        # lpips slices VGG's `features` keeping torchvision's indices as module names,
        # so "features.{i}.weight" lives at "net.slice{k}.{i}.weight".
        target = model.state_dict()
        by_index = {}
        for key in target:
            if key.startswith("net.slice"):
                _, _, rest = key.split(".", 2)
                by_index[rest] = key
        loaded = 0
        for key, value in vgg.items():
            if key.startswith("features."):
                rest = key[len("features.") :]
                if rest in by_index:
                    target[by_index[rest]] = value
                    loaded += 1
        if loaded != sum(1 for k in target if k.startswith("net.slice")):
            raise ValueError("VGG-16 weights file does not match torchvision's vgg16 layout")
        model.load_state_dict(target)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
