"""Training precision: fp32, bf16, fp16 (autocast + GradScaler), and fp16-o2 done natively.

``fp16-o2`` is what the L-Verse paper trained BiART with (NVIDIA apex "O2"), rebuilt on plain
PyTorch because apex is not on the package registry:

* the model's weights and activations are fp16, except modules that declare ``keep_fp32 = True``
  (LayerNorm, the vector quantizer): their parameters stay fp32 and they compute in fp32;
* the optimizer never sees the fp16 weights: it steps fp32 *master* copies, and after each step
  the masters are copied back into the fp16 model;
* the loss is multiplied by a dynamic scale before backward so small fp16 gradients do not
  underflow; if any gradient overflowed (inf/nan) the step is skipped and the scale halved; after
  ``growth_interval`` clean steps the scale doubles again;
* checkpoints hold the fp32 master weights, never the rounded fp16 ones.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "fp16-o2")


def _keep_fp32(m: nn.Module) -> bool:
    return bool(getattr(m, "keep_fp32", False))


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(type(g).__name__ == "DTensor" for g in grads):  # FSDP shards: torch computes the global norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return float(norm)


class Precision:
    """Base: fp32. Subclasses change the autocast context, backward and step."""

    name = "fp32"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.skipped_steps = 0

    # --- model / optimizer ------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def build_optimizer(self, param_groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        # fused AdamW (one kernel for all tensors) on a GPU unless the caller says otherwise
        if self.device.type == "cuda":
            kwargs.setdefault("fused", True)
        return torch.optim.AdamW(param_groups, **kwargs)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weights to save: fp32 values (the master weights in fp16-o2)."""
        return {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}

    def named_weights(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The trainable tensors the optimizer steps, by parameter name (fp16-o2: the masters)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def load_master_from_model_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """On resume, after :meth:`prepare_model`: nothing to do here, the optimizer steps the
        model's own weights, which the trainer loaded already (fp16-o2 resets its masters)."""

    # --- per step ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float) -> tuple[bool, float]:
        """Clip, step, zero grads. Returns (stepped, grad_norm). Gradients with a NaN or an
        infinity are not applied (the step is skipped and counted, as the fp16 scalers do):
        one such update would make every weight it touches non-finite."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = _clip(params, grad_clip)
        if not math.isfinite(norm):  # the global norm: every rank takes the same decision
            self.discard(optimizer)
            self.skipped_steps += 1
            return False, norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True, norm

    def discard(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without applying them (a step with a non-finite loss)."""
        optimizer.zero_grad(set_to_none=True)

    @property
    def scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


class BF16(Precision):
    name = "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


class FP16Autocast(Precision):
    """fp32 weights, fp16 autocast regions, torch's GradScaler."""

    name = "fp16"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float) -> tuple[bool, float]:
        self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = _clip(params, grad_clip)
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        stepped = self.scaler.get_scale() >= before  # the scaler halves exactly when it skipped
        if not stepped:
            self.skipped_steps += 1
        return stepped, norm

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale())

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class FP16O2(Precision):
    """fp16 model, fp32 master weights in the optimizer, dynamic loss scaling (see module doc)."""

    name = "fp16-o2"

    def __init__(
        self,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        backoff: float = 0.5,
        growth: float = 2.0,
        min_scale: float = 1.0,
    ) -> None:
        super().__init__(device)
        self._scale = float(init_scale)
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.growth = growth
        self.min_scale = min_scale
        self.good_steps = 0
        # model parameter -> its fp32 master copy (identity-keyed)
        self._master: dict[int, nn.Parameter] = {}
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # Master copies are taken from the fp32 weights *before* rounding to fp16, so a run resumed
        # from a checkpoint continues from exactly the fp32 values it saved.
        for p in model.parameters():
            if id(p) not in self._master:
                m = nn.Parameter(p.detach().clone().float(), requires_grad=p.requires_grad)
                self._master[id(p)] = m
                self._pairs.append((p, m))
        model.half()
        for mod in model.modules():
            if _keep_fp32(mod):
                mod.float()
        return model

    def build_optimizer(self, param_groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        if not self._pairs:
            raise RuntimeError("fp16-o2: prepare_model() must run before build_optimizer()")
        groups = []
        for g in param_groups:
            g = dict(g)
            g["params"] = [self._master[id(p)] for p in g["params"]]
            groups.append(g)
        return super().build_optimizer(groups, **kwargs)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().model_state_dict(model)
        for name, p in model.named_parameters():
            m = self._master.get(id(p))
            if m is not None and name in state:
                state[name] = m.detach().clone()
        return state

    def named_weights(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(n, self._master[id(p)]) for n, p in model.named_parameters() if p.requires_grad and id(p) in self._master]

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self._scale).backward()

    def discard(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for p, _ in self._pairs:  # the fp16 model's own gradients, not yet moved to the masters
            p.grad = None

    def _gather_grads(self) -> bool:
        """Move model grads onto the masters (fp32, unscaled); True if any is inf/nan."""
        inv = 1.0 / self._scale
        found = torch.zeros((), device=self.device)
        for p, m in self._pairs:
            if p.grad is None:
                m.grad = None
                continue
            g = p.grad.detach().float().mul_(inv)
            found = torch.maximum(found, (~torch.isfinite(g)).any().float())
            m.grad = g
            p.grad = None
        from lverse.dist import any_rank  # FSDP/sharded grads may overflow on one rank only

        return any_rank(bool(found.item()), self.device)

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float) -> tuple[bool, float]:
        overflow = self._gather_grads()
        if overflow:
            self._scale = max(self._scale * self.backoff, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            return False, float("inf")
        norm = _clip([m for _, m in self._pairs], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in self._pairs:
                p.copy_(m)  # fp32 master -> fp16 (or fp32 for keep_fp32 modules) model weight
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self._scale *= self.growth
            self.good_steps = 0
        return True, norm

    def load_master_from_model_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Reset masters from fp32 values (used on resume, after the model was prepared)."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state and id(p) in self._master:
                    self._master[id(p)].copy_(state[name].float())
                    p.copy_(self._master[id(p)])

    @property
    def scale(self) -> float:
        return self._scale

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "scale": self._scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._scale = float(state.get("scale", self._scale))
        self.good_steps = int(state.get("good_steps", 0))


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """On a CUDA device, let fp32 matmuls and convolutions run in TF32 (``enabled``) or in full
    IEEE fp32. TF32 keeps fp32's range with a 10-bit mantissa in the products, several times
    faster on tensor cores (Ampere and later); PyTorch leaves it off for matmuls by default.
    Process-wide, as torch's flags are; returns whether anything was set (not on a CPU)."""
    if device.type != "cuda":
        return False
    # The legacy setters: they keep torch's legacy and new TF32 states consistent. Setting only
    # the new ``fp32_precision`` makes every later read of the legacy flags raise, and Inductor
    # (torch.compile) still reads them on some versions (pytorch/pytorch#166387).
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return True


def build_precision(name: str, device: torch.device, tf32: bool = True) -> Precision:
    """``tf32``: see :func:`set_tf32` (what fp32 means on a CUDA device; CPUs are untouched)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {PRECISIONS}")
    set_tf32(device, tf32)
    # fp16 on a CPU works but is slow: allowed, for tests and smoke runs.
    return {"fp32": Precision, "bf16": BF16, "fp16": FP16Autocast, "fp16-o2": FP16O2}[name](device)
