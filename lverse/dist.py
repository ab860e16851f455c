"""Processes and devices: one process per GPU (or CPU process) via torchrun, and the device rule.

`torchrun` exports RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train_x.py` run has none of
them and is a world of one. NCCL on GPUs, gloo on CPU.

Restarts (``torchrun --max-restarts N``): the workers of a new attempt meet in the same key-value
store as those of the failed one (torchrun's agent keeps it, with static and with ``c10d``
rendezvous alike), where the dead workers' addresses are still written. Joining it as
``init_method="env://"`` does, a new worker could read a dead peer's address and fail with
gloo's "connectFullMesh failed ... Connection refused" (NCCL likewise reads a stale unique id).
So under torchrun each attempt joins under its own key prefix (``TORCHELASTIC_RESTART_COUNT``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


_joined = False  # this process joined a process group (see leave)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The one device rule of lverse: ``auto``/``None`` is this process's GPU (``cuda:LOCAL_RANK``)
    when CUDA is available, else the CPU; ``cuda`` is this process's GPU; anything else is taken
    as written (``cpu``, ``cuda:1``, ``mps``). A device that cannot be used is a ``ValueError``."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available (use --device cpu)")
    return dev


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process world."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:  # not torchrun (e.g. test workers): the environment's rendezvous
            dist.init_process_group(backend=backend, init_method="env://")
        else:
            dist.init_process_group(backend=backend, store=_attempt_store(rank, world, restart), rank=rank,
                                    world_size=world)
        _joined = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _attempt_store(rank: int, world: int, restart: str) -> dist.Store:
    """torchrun's store at MASTER_ADDR:MASTER_PORT, under a prefix of its own for this attempt
    (see the module doc). The agent serves it when it says so (TORCHELASTIC_USE_AGENT_STORE);
    otherwise rank 0 does, as ``env://`` would."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(minutes=30)  # torch's default for process groups
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=not agent and rank == 0, timeout=timeout, multi_tenant=not agent)
    return dist.PrefixStore(f"lverse/attempt_{restart}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars over ranks (one collective for the whole dict)."""
    if not is_dist() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if the flag is set on any rank: every rank then takes the same branch (no deadlock)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    """Tear the process group down on every rank together. A rank that destroyed a gloo group
    while its peer was still finishing the last collective aborted now and then ("terminate
    called without an active exception")."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> int:
    """End a command that joined a process group: flush, then exit with ``code`` at once, without
    the interpreter's teardown; a process that joined none gets ``code`` back.

    DDP keeps its gloo/NCCL group alive after ``destroy_process_group`` (measured on torch 2.14: the
    group's threads, pt_gloo_runloop and gloo_tcp_loop, outlive it and ``gc``), and the C++
    teardown at exit races them: now and then a rank aborted ("terminate called without an active
    exception", SIGABRT) after its work was saved, and torchrun reported the run as failed (and
    would restart it). Everything a command writes is closed before it returns here."""
    if not _joined:
        return code
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
