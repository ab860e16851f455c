"""How the processes of a run share the model: one process, DDP replicas, or FSDP shards.

The :class:`~lverse.train.loop.Trainer` asks its strategy, never ``if fsdp``, whenever the
answer depends on it: how to wrap the model, whether a micro-step all-reduces its gradients,
how to gather the full weights and optimizer state for a checkpoint, and whether a crash
checkpoint can be written at all (a single process only). The same pattern as :mod:`lverse.train.precision`.

* :class:`SingleProcess`: a world of one (also what ``strategy: ddp`` or ``fsdp`` means there).
* :class:`DDP`: every rank holds the whole model; gradients are all-reduced on the last
  micro-step of an accumulated step.
* :class:`FSDP`: weights, gradients and optimizer state sharded over the ranks (FSDP2).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lverse.dist import DistInfo
from lverse.train.precision import Precision

STRATEGIES = ("ddp", "fsdp")


class SingleProcess:
    name = "single"
    # A crash checkpoint is written by the process that crashed, alone: only a world of one
    # knows the whole state (several ranks have their own data positions and RNG streams, and
    # the peers may be gone), so with DDP or FSDP the last periodic checkpoint stands.
    can_crash_save = True

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def precision(self, name: str) -> str:
        """The :mod:`~lverse.train.precision` mode the trainer should build for ``train.precision``."""
        return name

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (``model`` itself is kept for state dicts)."""
        return model

    def sync_gradients(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; ``last``: the optimizer steps after it."""
        return contextlib.nullcontext()

    def model_state_dict(self, model: nn.Module, precision: Precision) -> dict[str, torch.Tensor]:
        """Full fp32 weights (collective under FSDP: every rank must call it)."""
        return precision.model_state_dict(model)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (collective when distributed)."""
        if not self.info.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


_FORWARD_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers")


class DDP(SingleProcess):
    name = "ddp"
    can_crash_save = False  # see SingleProcess

    def wrap(self, model: nn.Module) -> nn.Module:
        # Start every replica from rank 0's state, buffers included (DDP would only sync the
        # parameters, and with broadcast_buffers=False not the buffers, e.g. the codebook).
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        device = self.info.device
        # No buffer broadcast in forward: the quantizer keeps its EMA codebook in sync by
        # all-reducing its statistics; a broadcast from rank 0 would hide a missing all-reduce.
        # (torch 2.14 renamed broadcast_buffers to forward_sync_buffers, which still syncs at
        # init: harmless, the buffers were just broadcast above.)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **{_FORWARD_SYNC: False}
        )

    def sync_gradients(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        # no all-reduce on the non-final micro-steps: the gradients just accumulate locally
        return contextlib.nullcontext() if last else wrapped.no_sync()  # type: ignore[operator]


class FSDP(SingleProcess):
    """FSDP2: shard each transformer block (if the model has ``blocks``) and the root.

    The sharded parameters stay fp32 and are the optimizer's master weights; with
    ``precision=bf16`` they are gathered in bf16 for compute and gradients reduced in fp32
    (FSDP's own mixed precision, so the trainer runs no autocast). fp16 modes need a loss
    scaler FSDP does not share with lverse's: use DDP for fp16/fp16-o2 (BiART at paper size
    fits one GPU under O2).
    """

    name = "fsdp"
    can_crash_save = False  # see SingleProcess; gathering the shards is a collective besides

    def __init__(self, info: DistInfo, precision: str) -> None:
        super().__init__(info)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"train.strategy=fsdp supports precision fp32 or bf16, not {precision} (use strategy=ddp)")
        self.bf16 = precision == "bf16"
        self.root: nn.Module | None = None

    def precision(self, name: str) -> str:
        return "fp32"  # FSDP casts (see the class doc); no autocast needed

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if self.bf16:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in getattr(model, "blocks", []):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # in place: ``model`` is now the sharded root
        self.root = model
        return model

    def sync_gradients(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        # reduce-scatter the gradients on the last micro-step only
        self.root.set_requires_gradient_sync(last)  # type: ignore[union-attr, operator]
        return contextlib.nullcontext()

    def model_state_dict(self, model: nn.Module, precision: Precision) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: (v.float() if v.is_floating_point() else v) for k, v in full.items()}

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def build_strategy(name: str, info: DistInfo, precision: str) -> SingleProcess:
    """``train.strategy`` for this world: a world of one is :class:`SingleProcess` whatever it says."""
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy={name!r} is not one of {STRATEGIES}")
    if not info.distributed:
        return SingleProcess(info)
    return FSDP(info, precision) if name == "fsdp" else DDP(info)
