"""The cached decoder's single step and its draws, made cheap (:mod:`lverse.inference.sampling`
runs the loop).

* :func:`span_logits`: the output head for the ids a part may write only.
* :func:`single_token_step`: one token per row through the cached model; optionally with fixed
  shapes through ``torch.compile`` (a CUDA graph on a GPU where torch can capture it).
* :class:`GumbelNoise`: Gumbel noise pre-drawn for many steps (``SamplingParams(draw="gumbel")``).
* :func:`default_generator`: the generator ``generator=None`` draws from, whose state a
  decoder that checks for ended captions only now and then winds back.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lverse.models.biart import BiART, KVCache


def span_logits(model: BiART, h: torch.Tensor, span: tuple[int, int], restrict: bool) -> torch.Tensor:
    """Logits ``(N, hi - lo)`` over the part's span of ids, from hidden states ``h`` ``(N, C)``.

    ``restrict``: only the span's rows of the output head are multiplied; otherwise the full
    head, then the span (what the reference decoder does)."""
    lo, hi = span
    # A strided h (the last position of a prompt) would take another matmul kernel, whose last
    # bits differ; contiguous, the logits equal those of the head applied to that position alone.
    h = h.contiguous()
    if restrict:
        return F.linear(h, model.head.weight[lo:hi])
    return model.head(h)[:, lo:hi]


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise, ``-log(E)`` with ``E ~ Exp(1)`` (fp32)."""
    return torch.empty(shape, device=device).exponential_(generator=generator).log_().neg_()


class GumbelNoise:
    """Gumbel noise for ``block`` steps at a time: one generator call per block, not per step."""

    def __init__(self, rows: int, width: int, generator: torch.Generator | None, device: torch.device, block: int = 32):
        self.shape, self.generator, self.device = (block, rows, width), generator, device
        self.buf: torch.Tensor | None = None
        self.i = block

    def next(self) -> torch.Tensor:
        if self.i == self.shape[0]:
            self.buf, self.i = gumbel_noise(self.shape, self.generator, self.device), 0
        assert self.buf is not None
        self.i += 1
        return self.buf[self.i - 1]


def default_generator(device: torch.device) -> torch.Generator:
    """torch's global generator of ``device`` (what ``generator=None`` draws from)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


# torch.compile'd steps by mode, made once per process: the cache and the model are arguments, so
# every chunk and every decode call reuses the compiled code (while their shapes stay the same).
_COMPILED: dict[str | None, Callable[..., torch.Tensor]] = {}


class _Layers:
    """Keys and values as one tensor per layer. Views of the one 5-D cache tensor would make a
    compiled step copy the whole cache twice per step (a write into a view of a graph input is
    made functional); separate tensors are written in place."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        self.ks, self.vs = ks, vs

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ks[i], self.vs[i]


def _static_step(model: BiART, ks: list[torch.Tensor], vs: list[torch.Tensor], seg: torch.Tensor, tok: torch.Tensor,
                 pos: torch.Tensor, span: tuple[int, int], restrict: bool) -> torch.Tensor:
    h = model.hidden(tok[:, None], seg, cache=_Layers(ks, vs), start_pos=pos)  # type: ignore[arg-type]
    return span_logits(model, h[:, -1], span, restrict)


def single_token_step(
    model: BiART, cache: KVCache, seg: torch.Tensor, span: tuple[int, int], restrict: bool, compile_step: bool
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``step(tokens (N,), position) -> logits``: one token per row through the cached model.

    ``compile_step``: the step keeps every shape fixed (the position a tensor, attention over
    the whole cache under a mask: :meth:`BiART.hidden`) and runs through ``torch.compile``; on
    a GPU in "reduce-overhead" mode, which replays it as a CUDA graph where torch can."""
    if not compile_step:
        return lambda tok, pos: span_logits(model, model.hidden(tok[:, None], seg, cache=cache, start_pos=pos)[:, -1], span, restrict)
    mode = "reduce-overhead" if cache.k.device.type == "cuda" else None
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_static_step, mode=mode, dynamic=False)
    compiled = _COMPILED[mode]
    pos_t = torch.zeros((), dtype=torch.long, device=cache.k.device)
    ks, vs = [k.clone() for k in cache.k.unbind(0)], [v.clone() for v in cache.v.unbind(0)]  # the prefill's
    if mode is not None:
        # The step writes into these buffers (index_copy_): a CUDA graph replays only if torch
        # knows their addresses stay put; otherwise it skips graphs for "mutated inputs". New
        # buffers (the next decode call) re-record the graph, they do not recompile.
        for t in ks + vs:
            torch._dynamo.mark_static_address(t)

    def step(tok: torch.Tensor, pos: int) -> torch.Tensor:
        pos_t.fill_(pos)  # a host value written into a device scalar: no sync
        # .clone(): a CUDA graph's output buffer is overwritten by the next replay
        return compiled(model, ks, vs, seg, tok, pos_t, span, restrict).clone()

    return step
