"""EMAVectorQuantizer: EMA arithmetic, fp32 under reduced precision, eval, dead codes, DDP."""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lverse.models.quantizer import EMAVectorQuantizer


def _small_quantizer(**kw: float) -> EMAVectorQuantizer:
    q = EMAVectorQuantizer(num_codes=3, dim=2, decay=0.5, eps=0.1, beta=0.25, **kw)
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.embed_avg.copy_(torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 10.0]]))
    q.cluster_size.copy_(torch.tensor([1.0, 2.0, 1.0]))
    return q


# four vectors (B=1, C=2, H=1, W=4): [1,1] -> code 0, [9,1] -> 1, [11,-1] -> 1, [-1,1] -> 0;
# code 2 is unused
Z = torch.tensor([[1.0, 9.0, 11.0, -1.0], [1.0, 1.0, -1.0, 1.0]]).view(1, 2, 1, 4)


def test_ema_update_matches_hand_computation() -> None:
    q = _small_quantizer().train()
    z_q, loss, idx = q(Z)
    assert idx.tolist() == [[[0, 1, 1, 0]]]
    # straight-through output equals the (old) codebook vectors
    assert torch.allclose(z_q, torch.tensor([[0.0, 10.0, 10.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4))
    # commitment: beta * mean((z - e)^2) over 8 numbers: (1+1 + 1+1 + 1+1 + 1+1)/8 = 1
    assert loss.item() == pytest.approx(0.25 * 1.0)
    # by hand, decay 0.5: counts [2, 2, 0], sums [[0, 2], [20, 0], [0, 0]]
    cs = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 2 + 0.5 * 2, 0.5 * 1 + 0.5 * 0])  # [1.5, 2, 0.5]
    ea = torch.tensor([[0.0, 0.5 * 0 + 0.5 * 2], [0.5 * 20 + 0.5 * 20, 0.0], [0.0, 0.5 * 10]])
    n = 1.5 + 2.0 + 0.5
    smoothed = torch.tensor([(1.5 + 0.1) / (n + 0.3) * n, (2 + 0.1) / (n + 0.3) * n, (0.5 + 0.1) / (n + 0.3) * n])
    emb = ea / smoothed[:, None]
    assert torch.allclose(q.cluster_size, cs)
    assert torch.allclose(q.embed_avg, ea)
    assert torch.allclose(q.embedding, emb)
    # e.g. code 1: 20 / (2.1 / 4.3 * 4) = 10.238...
    assert q.embedding[1, 0].item() == pytest.approx(20 / (2.1 / 4.3 * 4))


def test_straight_through_gradient() -> None:
    q = _small_quantizer().eval()
    z = Z.clone().requires_grad_(True)
    z_q, loss, _ = q(z)
    (z_q.sum() + 0 * loss).backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_pooled_levels_one_update() -> None:
    """quantize_levels = one EMA update with the counts of all levels summed."""
    a, b = _small_quantizer().train(), _small_quantizer().train()
    z1, z2 = Z[..., :2], Z[..., 2:]
    a.quantize_levels([z1, z2])
    b(Z)
    for name in ("cluster_size", "embed_avg", "embedding"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_eval_and_update_flag_do_not_update() -> None:
    q = _small_quantizer()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(Z)
    q.train()
    q.update = False
    q(Z)
    q.update = True
    q(Z, update=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    q(Z)
    assert not torch.equal(q.embedding, before["embedding"])


def test_fp32_under_autocast_and_half() -> None:
    q = _small_quantizer().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, loss, idx = q(Z.bfloat16())
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32
    assert idx.tolist() == [[[0, 1, 1, 0]]]
    z_q, loss, _ = q(Z.half())
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32
    # casting the module (or a model holding it) leaves the codebook fp32 and unrounded
    value = 1.0 + 2.0**-20  # exact in fp32, rounds to 1.0 in fp16/bf16
    q.embedding[0, 0] = value
    holder = nn.Sequential(nn.Conv2d(2, 2, 1), q)
    holder.half()
    assert holder[0].weight.dtype == torch.float16
    for name in ("embedding", "cluster_size", "embed_avg"):
        assert getattr(q, name).dtype == torch.float32, name
    assert q.embedding[0, 0].item() == value
    holder.to(torch.bfloat16)
    assert q.embedding.dtype == torch.float32


def test_dead_code_restart() -> None:
    torch.manual_seed(0)
    # code 2 is never used; its cluster size 1 -> 0.5 after one step (decay 0.5)
    off = _small_quantizer().train()
    off(Z)
    assert torch.allclose(off.embedding[2], torch.tensor([0.0, 5.0 / ((0.5 + 0.1) / 4.3 * 4)]))
    assert off.stats()["restarted_codes"] == 0

    on = _small_quantizer(dead_code_threshold=0.75).train()
    on(Z)
    flat = Z.permute(0, 2, 3, 1).reshape(-1, 2)
    # restarted to one of this step's inputs, with cluster size max(1, 2 * 0.75)
    assert any(torch.equal(on.embedding[2], row) for row in flat)
    assert on.cluster_size[2].item() == 1.5
    assert torch.equal(on.embed_avg[2], on.embedding[2] * 1.5)
    # live codes are untouched by the restart
    assert torch.equal(on.embedding[:2], off.embedding[:2])
    assert on.stats()["restarted_codes"] == 1


def test_error_weighted_restart_lands_where_quantization_is_worst() -> None:
    # 2 live codes at the origin and (10, 0), code 2 dead. 60 vectors sit exactly on code 0 and
    # two far away at (0, -50): a uniform restart almost surely copies the origin again, an
    # error-weighted one can only pick a far vector (the others have zero error).
    z = torch.zeros(1, 2, 1, 62)
    z[0, 1, 0, 60:] = -50.0
    far = torch.tensor([0.0, -50.0])
    for seed in range(5):
        torch.manual_seed(seed)
        q = _small_quantizer(dead_code_threshold=0.75, restart_from="error").train()
        q(z)
        assert torch.equal(q.embedding[2], far)
    torch.manual_seed(0)
    uniform = _small_quantizer(dead_code_threshold=0.75).train()
    uniform(z)
    assert not torch.equal(uniform.embedding[2], far)
    with pytest.raises(ValueError, match="restart_from"):
        EMAVectorQuantizer(4, 2, restart_from="nearest")


def test_stats() -> None:
    q = _small_quantizer().eval()
    q(Z)  # codes [0, 1, 1, 0]
    s = q.stats(reset=False)
    assert s["used_codes"] == 2 and s["dead_codes"] == 1 and s["tokens"] == 4
    assert s["usage"] == pytest.approx(2 / 3)
    assert s["perplexity"] == pytest.approx(2.0)
    q.stats(reset=True)
    assert q.stats()["tokens"] == 0


# ------------------------------------------------------------------------------------------ DDP
class _Tiny(nn.Module):
    def __init__(self, sync: bool, threshold: float) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 1)
        self.q = EMAVectorQuantizer(8, 4, decay=0.9, dead_code_threshold=threshold, sync_distributed=sync)
        self.dec = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_q, commit, _ = self.q(self.enc(x))
        return ((self.dec(z_q) - x) ** 2).mean() + commit


_DDP_ARGS = inspect.signature(nn.parallel.DistributedDataParallel).parameters
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        runs = (("sync", True, 0.0, False), ("restart", True, 0.8, False),
                ("nosync", False, 0.0, False), ("default_ddp", True, 0.0, True))
        for name, sync, threshold, default_ddp in runs:
            torch.manual_seed(0)  # identical initial model on both ranks
            # without per-forward buffer broadcast only the quantizer's all-reduce keeps the
            # codebooks equal; "default_ddp" checks the stats survive DDP's default broadcast
            kwargs = {} if default_ddp else _NO_BUFFER_SYNC
            model = nn.parallel.DistributedDataParallel(_Tiny(sync, threshold), **kwargs)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
            for _ in range(4):
                x = torch.randn(2, 3, 4, 4, generator=gen) + rank
                opt.zero_grad()
                model(x).backward()
                opt.step()
            q = model.module.q
            stats = q.stats()
            results[name] = {
                "embedding": q.embedding.clone(),
                "cluster_size": q.cluster_size.clone(),
                "embed_avg": q.embed_avg.clone(),
                "tokens": torch.tensor(stats["tokens"]),
                "restarted": torch.tensor(stats["restarted_codes"]),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear gloo down together (see lverse.dist.cleanup)
    finally:
        dist.destroy_process_group()


def test_ddp_codebooks_stay_identical(tmp_path: Path) -> None:
    # fork: the workers inherit the imported torch (a spawned worker spends seconds importing it)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("sync", "restart", "default_ddp"):
        for k in ("embedding", "cluster_size", "embed_avg"):
            assert torch.equal(r0[name][k], r1[name][k]), (name, k)
        # stats are pooled over ranks: 2 ranks x 4 steps x 2 x 4 x 4 vectors
        assert r0[name]["tokens"].item() == r1[name]["tokens"].item() == 2 * 4 * 32
    assert r0["restart"]["restarted"].item() > 0  # the broadcast path really ran
    # control: without the all-reduce the replicas drift apart
    assert not torch.equal(r0["nosync"]["embedding"], r1["nosync"]["embedding"])
    assert r0["nosync"]["tokens"].item() == 4 * 32
    assert math.isfinite(float(r0["sync"]["embedding"].sum()))
