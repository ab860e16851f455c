"""EMA vector quantizer (VQ-VAE-2 style), always computed in fp32, DDP-consistent.

The codebook is *not* trained by gradient descent: each code is the exponential moving average
of the encoder outputs assigned to it (``embed_avg``) divided by an EMA of how many outputs were
assigned to it (``cluster_size``), with Laplace smoothing of the counts so a rarely used code
never divides by zero. The encoder only receives the commitment loss ``beta * MSE(z, sg(z_q))``
and straight-through gradients; there is no codebook loss term.

Three departures from the official L-Verse quantizer, each for a reason:

* **Pooled levels.** AugVAE shares one codebook across all of its levels. The official code
  applies one EMA update per level per step, each level seeing the codebook the previous level
  left. Here :meth:`EMAVectorQuantizer.quantize_levels` assigns every level against the *same*
  codebook and then applies **one pooled EMA update per step** (counts and sums of all levels
  added). The result does not depend on level order, and under DDP it costs one all-reduce per
  step instead of one per level. A plain ``forward(z)`` is the single-level case of the same.
* **DDP.** Before the EMA update the per-step code counts and embedding sums are all-reduced
  (summed) over ranks, so every replica applies the identical update and holds the identical
  codebook (the official code does not, and replicas drift apart).
* **Initial statistics.** ``cluster_size`` starts at 1 and ``embed_avg`` at the initial codebook
  (a consistent state: the smoothed code weights are then exactly the codebook). The official
  code starts ``cluster_size`` at 0, which sends every code unused in the first step to
  ``embed_avg / eps`` (a 10^5 blow-up). Checkpoints loaded from elsewhere overwrite all three.

The quantizer keeps its buffers in fp32 whatever ``.half()`` / ``.to(torch.bfloat16)`` is
applied to the surrounding model (see :meth:`EMAVectorQuantizer._apply`), and its forward casts
the input to fp32 and disables autocast: fp16 distances underflow (the L-Verse paper's reason
for running the AugVAE in fp32).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

RESTART_FROM = ("random", "error")  # how dead codes are re-initialised (see EMAVectorQuantizer)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer whose codebook is learned by EMA.

    Args:
        num_codes: codebook size N.
        dim: code dimension D (channels of the input map).
        decay: EMA decay of ``cluster_size`` and ``embed_avg``.
        eps: Laplace smoothing constant for the cluster sizes.
        beta: commitment loss weight.
        dead_code_threshold: when > 0, after each EMA update every code whose EMA cluster size is
            below this value is *restarted*: it is re-initialised to a randomly chosen encoder
            output from the current step (chosen on rank 0 and broadcast, so every replica
            restarts the same codes to the same vectors). A restarted code gets a cluster size of
            ``max(1, 2 * dead_code_threshold)`` so it has about ``ln 2 / (1 - decay)`` steps to
            attract vectors before it can be declared dead again. ``0`` (default) turns restarts
            off, which is the official behaviour.
        restart_from: how a restarted code's vector is drawn from the step's encoder outputs.
            ``"random"`` (default): uniformly. ``"error"``: with probability proportional to each
            output's squared distance to its nearest code (k-means++ seeding), so restarts land
            where the codebook quantizes worst. Ours: when most outputs sit on one code (a plain
            background), uniform restarts copy that code again and die again.
        sync_distributed: all-reduce the EMA statistics (and usage counts in :meth:`stats`) when
            ``torch.distributed`` is initialised. Leave on; ``False`` exists to show what goes
            wrong without it.

    Buffers (all fp32): ``embedding`` (N, D), ``cluster_size`` (N,), ``embed_avg`` (N, D). The
    usage counts behind :meth:`stats` are a plain tensor attribute, not a buffer: they are
    per-rank until :meth:`stats` sums them, and DDP's default per-forward buffer broadcast
    would otherwise overwrite them with rank 0's.

    Attribute ``update`` (default True): EMA updates happen only when ``self.training and
    self.update``; eval mode never updates.
    """

    embedding: Tensor
    cluster_size: Tensor
    embed_avg: Tensor

    # Rows of the (rows x N) distance matrix computed at once: bounds peak memory to ~256 MB of
    # fp32 distances (AugVAE-ML's 64x64 level at batch 8 would otherwise need 1 GB).
    max_distance_elements: int = 1 << 26

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        dead_code_threshold: float = 0.0,
        restart_from: str = "random",
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"EMAVectorQuantizer: num_codes={num_codes} and dim={dim} must be >= 1")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMAVectorQuantizer: decay={decay} must be in [0, 1)")
        if dead_code_threshold < 0:
            raise ValueError(f"EMAVectorQuantizer: dead_code_threshold={dead_code_threshold} must be >= 0")
        if restart_from not in RESTART_FROM:
            raise ValueError(f"EMAVectorQuantizer: restart_from must be one of {RESTART_FROM}, got {restart_from!r}")
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.beta = beta
        self.dead_code_threshold = dead_code_threshold
        self.restart_from = restart_from
        self.sync_distributed = sync_distributed
        self.update = True
        self.restarted_codes = 0  # codes restarted since the last stats(reset=True)

        embed = torch.randn(num_codes, dim, dtype=torch.float32)
        self.register_buffer("embedding", embed)
        self.register_buffer("cluster_size", torch.ones(num_codes, dtype=torch.float32))
        self.register_buffer("embed_avg", embed.clone())
        self.usage_counts = torch.zeros(num_codes, dtype=torch.long)  # since the last reset

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, eps={self.eps}, "
            f"beta={self.beta}, dead_code_threshold={self.dead_code_threshold}, "
            f"restart_from={self.restart_from!r}"
        )

    # ----------------------------------------------------------------------------------------
    # precision: buffers stay fp32 whatever the rest of the model is cast to
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "EMAVectorQuantizer":
        """Apply ``fn`` (device moves, dtype casts) but keep the codebook statistics fp32.

        ``module.half()`` / ``.to(torch.bfloat16)`` would otherwise round the codebook; instead
        a buffer whose dtype ``fn`` would change is moved to ``fn``'s device from its *original*
        fp32 value (no fp16 round trip)."""
        before = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``flat`` (M, D), fp32, via
        ‖z‖² + ‖e‖² − 2 z·e and argmin, in row chunks to bound memory."""
        e = self.embedding
        e2 = e.pow(2).sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        step = max(1, self.max_distance_elements // self.num_codes)
        for s in range(0, flat.shape[0], step):
            z = flat[s : s + step]
            d = z.pow(2).sum(1, keepdim=True) + e2 - 2 * (z @ e.t())
            out[s : s + step] = d.argmin(1)
        return out

    def embed(self, indices: Tensor) -> Tensor:
        """Codebook vectors for ``indices`` (any shape) → ``indices.shape + (D,)``, fp32."""
        return F.embedding(indices, self.embedding)

    def forward(self, z: Tensor, update: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``z`` (B, D, H, W).

        Returns ``(z_q, commit_loss, indices)``: ``z_q`` (B, D, H, W, fp32) with straight-through
        gradients to ``z``; ``commit_loss = beta * MSE(z, sg(z_q))`` (fp32 scalar); ``indices``
        (B, H, W) long. ``update=False`` suppresses the EMA update for this call even in
        training mode; ``None`` means "if training and ``self.update``"."""
        return self.quantize_levels([z], update=update)[0]

    def quantize_levels(
        self, zs: list[Tensor], update: bool | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Quantize several maps against the same codebook, then apply ONE pooled EMA update.

        Each element of ``zs`` is (B, D, H_l, W_l); the result is one ``(z_q, loss, indices)`` per
        map, as :meth:`forward` returns. All ranks must call this the same number of times when
        ``torch.distributed`` is initialised and the update is on (it all-reduces)."""
        do_update = self.training and self.update and (update is None or update)
        results: list[tuple[Tensor, Tensor, Tensor]] = []
        flats: list[Tensor] = []
        idxs: list[Tensor] = []
        for z in zs:
            if z.dim() != 4 or z.shape[1] != self.dim:
                raise ValueError(
                    f"EMAVectorQuantizer: expected input (B, {self.dim}, H, W), got {tuple(z.shape)}"
                )
            with torch.autocast(device_type=z.device.type, enabled=False):
                z = z.float()
                b, _, h, w = z.shape
                flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
                idx = self.nearest(flat.detach())
                q = self.embed(idx).view(b, h, w, self.dim).permute(0, 3, 1, 2)
                loss = self.beta * F.mse_loss(z, q.detach())
                # straight-through: forward value q, gradient of identity to z
                z_q = z + (q - z).detach()
            results.append((z_q, loss, idx.view(b, h, w)))
            flats.append(flat.detach())
            idxs.append(idx)
        with torch.no_grad():
            all_idx = torch.cat(idxs) if len(idxs) > 1 else idxs[0]
            counts = torch.bincount(all_idx, minlength=self.num_codes)
            if self.usage_counts.device != counts.device:
                self.usage_counts = self.usage_counts.to(counts.device)
            self.usage_counts += counts
            if do_update:
                all_flat = torch.cat(flats) if len(flats) > 1 else flats[0]
                self._ema_update(all_flat, all_idx)
        return results

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor) -> None:
        """EMA update from this step's vectors ``flat`` (M, D) and their codes ``idx`` (M,)."""
        counts = torch.bincount(idx, minlength=self.num_codes).to(torch.float32)
        sums = torch.zeros(self.num_codes, self.dim, dtype=torch.float32, device=flat.device)
        sums.index_add_(0, idx, flat)
        sync = self.sync_distributed and _dist_active()
        if sync:
            # one collective for both statistics; summing makes every rank's update identical
            packed = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            counts, sums = packed[:, 0], packed[:, 1:]
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_avg.mul_(d).add_(sums, alpha=1 - d)
        # Laplace smoothing: (c_k + eps) / (n + N eps) * n keeps the total n but no code at zero
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.copy_(self.embed_avg / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat, sync)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, sync: bool) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        k = int(dead.sum().item())  # identical on every rank: cluster_size is all-reduced
        if k == 0:
            return
        if not sync or dist.get_rank() == 0:
            if self.restart_from == "error":
                # squared distance of each output to its nearest live code; dead codes would
                # claim outputs they are about to lose, so they are left out of the search
                live = self.embedding[~dead]
                err = torch.cdist(flat, live).min(1).values.pow(2) if live.shape[0] else torch.ones(flat.shape[0], device=flat.device)
                total = err.sum()
                rows = (torch.multinomial(err / total, k, replacement=True) if total > 0
                        else torch.randint(flat.shape[0], (k,), device=flat.device))
            else:
                rows = torch.randint(flat.shape[0], (k,), device=flat.device)
            pick = flat[rows].contiguous()
        else:
            pick = torch.empty(k, self.dim, dtype=torch.float32, device=flat.device)
        if sync:
            dist.broadcast(pick, src=0)
        new_size = max(1.0, 2.0 * self.dead_code_threshold)
        self.embedding[dead] = pick
        self.embed_avg[dead] = pick * new_size
        self.cluster_size[dead] = new_size
        self.restarted_codes += k

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self, reset: bool = True) -> dict[str, Any]:
        """Codebook health since the last reset, pooled over ranks.

        Returns ``usage`` (fraction of codes used at least once), ``perplexity`` (exp of the
        entropy of the code distribution; N means perfectly uniform use), ``dead_codes``
        (codes never used), ``used_codes``, ``tokens`` (vectors quantized) and
        ``restarted_codes``. Under DDP this is a collective: every rank must call it."""
        counts = self.usage_counts.to(self.embedding.device, copy=True)
        restarted = self.restarted_codes
        if self.sync_distributed and _dist_active():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        total = int(counts.sum().item())
        used = int((counts > 0).sum().item())
        if total > 0:
            p = counts[counts > 0].double() / total
            perplexity = math.exp(float(-(p * p.log()).sum()))
        else:
            perplexity = 0.0
        if reset:
            self.usage_counts = torch.zeros_like(counts)
            self.restarted_codes = 0
        return {
            "usage": used / self.num_codes,
            "perplexity": perplexity,
            "dead_codes": self.num_codes - used,
            "used_codes": used,
            "tokens": total,
            "restarted_codes": restarted,
        }
