"""Which parameters get weight decay: the one rule for transformers (BiART, the Shapes CLIP).

AdamW's decay shrinks every decayed weight a little at every step, gradient or not. That is a
useful prior for the weight *matrices* that mix features (linear layers, attention projections,
convolutions) and a harm for parameters whose scale is meaningful by itself: embeddings (a
rarely-seen token's vector would fade between its updates), norm gains, biases, and scalars
such as CLIP's temperature. minGPT splits its parameters the same way; the L-Verse paper
applies no decay to embeddings.

Stage 1 (AugVAE) does not use it: it decays every parameter (:meth:`lverse.train.loop.Task.param_groups`),
which is what its recipes were measured with.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, ``[decay, no_decay]``, over the trainable parameters in
    ``model.named_parameters()`` order.

    Decayed: tensors of 2 or more dimensions that are not embeddings. An embedding is the
    weight of an ``nn.Embedding`` (also when a linear head shares it: a tied head is not
    decayed) or a parameter whose name says ``embedding`` (e.g. CLIP's bare
    ``positional_embedding`` and ``class_embedding``). So norms, biases and 0-d scalars never are.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # each shared tensor once, under its first name
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embeddings or "embedding" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
