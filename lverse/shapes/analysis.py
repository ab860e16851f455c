"""Measurements on Shapes images and codes: how local an AugVAE's codes are (``bench/shapes_codes.py``).

Each function takes images ``(N, 3, 64, 64)`` in [0, 1] or [-1, 1] and the codes of a square grid.
"""
from __future__ import annotations

import collections
import math

import torch

from lverse.shapes.scenes import COLOURS

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255


def unit_range(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2 if images.min() < 0 else images


def cell_colours(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, grid*grid)``: the palette index most of a cell's object pixels have, or -1 where
    objects cover less than a quarter of the cell. Object pixel: darker than 0.8 in some channel."""
    x = unit_range(images).clamp(0, 1).permute(0, 2, 3, 1)  # N, H, W, 3
    label = ((x[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # N, H, W
    obj = x.min(-1).values < 0.8
    onehot = torch.nn.functional.one_hot(label, len(PALETTE)) * obj[..., None]
    N, H, W, K = onehot.shape
    c = H // grid
    counts = onehot.reshape(N, grid, c, grid, c, K).sum((2, 4)).reshape(N, grid * grid, K)
    best = counts.argmax(-1)
    return torch.where(counts.sum(-1) >= c * c // 4, best, torch.full_like(best, -1))


def empty_cells(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, grid*grid)`` bool: cells without a single object pixel."""
    x = unit_range(images).clamp(0, 1)
    N, _, H, _ = x.shape
    c = H // grid
    obj = (x.min(1).values < 0.8).reshape(N, grid, c, grid, c).any(4).any(2)
    return ~obj.reshape(N, grid * grid)


def colour_given_code(codes: torch.Tensor, colours: torch.Tensor) -> dict[str, float]:
    """H(colour | code), H(colour) and the accuracy of naming each code's most common colour."""
    keep = colours >= 0
    table: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for code, col in zip(codes[keep].tolist(), colours[keep].tolist()):
        table[code][col] += 1
    n = int(keep.sum())
    h_cond = -sum(k * math.log(k / sum(c.values())) for c in table.values() for k in c.values()) / n
    marginal = collections.Counter(colours[keep].tolist())
    h = -sum(k / n * math.log(k / n) for k in marginal.values())
    majority = sum(max(c.values()) for c in table.values()) / n
    return {"cells": n, "codes": len(table), "H_colour": h, "H_colour_given_code": h_cond, "majority": majority}


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a one-hidden-layer MLP (128 units) trained on the first 80% of rows."""
    g = torch.Generator().manual_seed(seed)
    n = int(0.8 * len(labels))
    mu, sd = features[:n].mean(0), features[:n].std(0) + 1e-6
    f = (features - mu) / sd
    k = int(labels.max()) + 1
    w1 = (torch.randn(f.shape[1], 128, generator=g) / f.shape[1] ** 0.5).requires_grad_()
    w2 = (torch.randn(128, k, generator=g) / 128**0.5).requires_grad_()
    b1, b2 = torch.zeros(128, requires_grad=True), torch.zeros(k, requires_grad=True)
    net = lambda x: torch.relu(x @ w1 + b1) @ w2 + b2  # noqa: E731
    opt = torch.optim.Adam([w1, w2, b1, b2], 1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(f[:n]), labels[:n])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((net(f[n:]).argmax(-1) == labels[n:]).float().mean())
