"""Cross-entropy through the output head without the logits of the whole batch.

A BiART step at the paper's size ends in logits ``(8, 1090, 57603)``: 1 GB in bf16, 2 GB once
upcast to fp32 for the softmax, and as much again for their gradient. :func:`linear_cross_entropy`
computes the same loss from the final hidden states and the head's weight, a chunk of rows at a
time: only one chunk's logits ever exist. It returns what ``F.cross_entropy(h @ W.T, targets)``
would, weighted per row, and the gradients autograd would give.

How: the loss is a weighted sum of per-row NLLs whose weights are known before the backward
pass, so the gradient with respect to the logits, ``w * (softmax - onehot)``, is already known
while a chunk's logits are at hand. The forward pass turns it into the gradients of ``h`` and of
``W`` right away (the two matmuls the backward pass would run anyway) and the backward pass
only scales them by the incoming gradient (1, a loss scale, an accumulation factor). No
recomputation, no copies; the price is holding those two gradients from forward to backward
(``h``'s size and the head's size, both far below the logits').

Numerics follow autocast's: the matmuls run in the compute dtype (the autocast dtype if autocast
is on, else the weight's), the softmax and the NLL in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lverse.vocab import GEN, REF, VocabLayout

# Rows per chunk: the chunk's fp32 logits stay near 256 MiB (1,165 rows at the paper's 57,603 ids,
# a seventh of a batch of 8 sequences): big enough that the (V, rows) x (rows, C) product of the
# head's gradient runs at full speed (at 291 rows a CPU step was 13% slower), small next to a step.
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a Linear with this weight computes in here: autocast's if it is on."""
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, dtype, chunk):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            top = row_weights.max().clamp(min=1e-30) if n else row_weights.new_ones(())
            for s in range(0, n, chunk):
                hc, tc = h[s : s + chunk].to(dtype), targets[s : s + chunk, None]
                rw = row_weights[s : s + chunk, None]
                logits = (hc @ w.t()).float()  # the only (rows, V) tensor, one chunk at a time
                # One exponential pass serves the loss and its gradient: exp(logits - max), written
                # over the logits, gives the log-sum-exp (max + log of its sum) and, divided by
                # that sum, the softmax (torch.logsumexp and then a softmax would take two).
                top_logit = logits.amax(dim=-1, keepdim=True)
                target_logit = logits.gather(1, tc)
                e = logits.sub_(top_logit).exp_()
                z = e.sum(dim=-1, keepdim=True)
                nll[s : s + chunk] = (top_logit - target_logit + z.log()).squeeze(1)
                if need_h or need_w:
                    # d nll / d logits = softmax - onehot, in place; the row weights scale the
                    # (rows, C) products below rather than this (rows, V) one.
                    g = e.div_(z).scatter_add_(1, tc, torch.full_like(tc, -1, dtype=e.dtype)).to(dtype)
                    if need_h:
                        grad_h[s : s + chunk] = (g @ w).float().mul_(rw)
                    if need_w:
                        # rows weighted relative to the largest weight (1/16..1 between the parts), so
                        # that in fp16 the products stay far from underflow; the scale comes back below
                        hw = (hc.float() * (rw / top)).to(dtype)
                        if dtype == torch.float32:
                            grad_w.addmm_(g.t(), hw)  # in place: no (V, C) temporary per chunk
                        else:
                            grad_w += (g.t() @ hw).float()
            if grad_w is not None:
                grad_w.mul_(top)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.mark_non_differentiable(nll)
        return (nll * row_weights).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_loss).to(ctx.h_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i row_weights[i] * nll_i, nll)`` where ``nll_i = cross_entropy(h[i] @ weight.T, targets[i])``.

    ``h`` ``(N, C)``, ``weight`` ``(V, C)`` (a head's weight or a slice of its rows),
    ``targets`` ``(N,)`` in ``0..V-1``, ``row_weights`` ``(N,)`` (fp32, no gradient). The
    per-row ``nll`` (fp32) carries no gradient: it is for logging. ``chunk``: rows per chunk
    (0: :data:`CHUNK_ELEMENTS` logits per chunk).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} must be (N, C) and (V, C)")
    if targets.shape != h.shape[:1] or row_weights.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} and row_weights "
                         f"{tuple(row_weights.shape)} must be ({h.shape[0]},)")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets, row_weights.detach().float(), compute_dtype(weight), chunk)


# ------------------------------------------------------------------------------------------
# BiART's loss: the next-token NLL of both parts of a sequence
# ------------------------------------------------------------------------------------------


def _targets(idx: torch.Tensor, segments: torch.Tensor, vocab: VocabLayout) -> tuple[torch.Tensor, ...]:
    """Targets ``idx[:, 1:]``, their segments, and which are image codes / caption ids."""
    targets = idx[:, 1:]
    return targets, segments[:, 1:], vocab.is_image(targets), vocab.is_text(targets)


def nll_stats(
    nll: torch.Tensor, idx: torch.Tensor, segments: torch.Tensor, vocab: VocabLayout,
    ref_weight: float = 1.0, gen_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the stats of :func:`sequence_nll` from per-target NLLs ``(B, T-1)`` (exactly
    0 where the target is not counted)."""
    _, tseg, is_img, is_txt = _targets(idx, segments, vocab)
    valid = is_img | is_txt

    def mean(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = mask.sum()
        return (nll * mask).sum() / n.clamp(min=1), n

    nll_ref, n_ref = mean(valid & (tseg == REF))
    nll_gen, n_gen = mean(valid & (tseg == GEN))
    nll_text, n_text = mean(is_txt)
    nll_image, n_image = mean(is_img)
    loss = ref_weight * nll_ref + gen_weight * nll_gen
    stats = {
        "nll_text": nll_text,
        "nll_image": nll_image,
        "nll_ref": nll_ref,
        "nll_gen": nll_gen,
        "n_text": n_text,
        "n_image": n_image,
        "n_ref": n_ref,
        "n_gen": n_gen,
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def sequence_nll(
    logits: torch.Tensor,
    idx: torch.Tensor,
    segments: torch.Tensor,
    vocab: VocabLayout,
    ref_weight: float = 1.0,
    gen_weight: float = 1.0,
    modality_softmax: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token NLL over both parts of a sequence, from full logits ``(B, T, V)``.

    Position ``t`` predicts ``idx[t+1]``; a target belongs to the part (REF/GEN) of its own
    segment. Only image-code and text targets count: PAD targets (padding after a caption)
    and the separators [SOC]/[SOI] (always at the same place, so trivially predictable) are
    left out. ``loss = ref_weight * mean NLL(REF) + gen_weight * mean NLL(GEN)``: the paper's
    two NLL losses, each a mean so the short caption is not drowned by 1024 image tokens.
    Cross-entropy runs in fp32 whatever the logits' dtype. ``modality_softmax``: each target's
    softmax runs over its own kind of ids only (:attr:`BiARTConfig.modality_softmax`).

    The dict (detached tensors) holds ``nll_text``, ``nll_image`` (by the kind of the target
    token, whichever part it is in), ``nll_ref``, ``nll_gen`` and the token counts
    ``n_text``, ``n_image``, ``n_ref``, ``n_gen``.

    This is the reference; training calls :func:`head_nll` (the same values and gradients
    without an fp32 copy of the logits).
    """
    targets, _, is_img, is_txt = _targets(idx, segments, vocab)
    valid = is_img | is_txt
    x = logits[:, :-1].float()
    if modality_softmax:
        allowed = torch.where(is_img[..., None], vocab.image_mask(x.device), vocab.text_mask(x.device, allow_pad=False))
        x = x.masked_fill(~allowed, float("-inf"))
    # ignore_index rather than multiplying by a mask: excluded positions then contribute an
    # exact 0 even if their logits are inf/nan.
    nll = F.cross_entropy(
        x.reshape(-1, logits.shape[-1]),
        torch.where(valid, targets, torch.full_like(targets, -100)).reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view_as(targets)
    return nll_stats(nll, idx, segments, vocab, ref_weight, gen_weight)


def head_nll(
    h: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    segments: torch.Tensor,
    vocab: VocabLayout,
    ref_weight: float = 1.0,
    gen_weight: float = 1.0,
    modality_softmax: bool = False,
    chunk: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`sequence_nll` from the final hidden states ``h`` ``(B, T, C)`` or ``(B, T-1, C)`` and the head's
    ``weight`` ``(V, C)``: the head runs only at positions whose target counts, a chunk of rows at
    a time (:func:`lverse.models.loss.linear_cross_entropy`), so no full logits exist. The stats
    add ``token_nll`` ``(B, T-1)`` (0 where not counted), for splitting them by rows."""
    targets, tseg, is_img, is_txt = _targets(idx, segments, vocab)
    valid = is_img | is_txt
    n_ref, n_gen = (valid & (tseg == REF)).sum(), (valid & (tseg == GEN)).sum()
    # Each target's share of the loss: the part's weight over the part's count (a mean per part).
    w = torch.where(tseg == REF, ref_weight / n_ref.clamp(min=1), gen_weight / n_gen.clamp(min=1)).float()
    hs = h[:, : idx.shape[1] - 1]  # h may stop there already (BiART.loss): the last position predicts nothing
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    if modality_softmax:
        spans = [(is_img, vocab.image_start, vocab.text_start), (is_txt, vocab.text_start, vocab.special_start)]
    else:
        spans = [(valid, 0, weight.shape[0])]
    loss = h.new_zeros((), dtype=torch.float32)
    for rows, lo, hi in spans:
        part, part_nll = linear_cross_entropy(hs[rows], weight[lo:hi], targets[rows] - lo, w[rows], chunk)
        loss = loss + part
        nll[rows] = part_nll
    _, stats = nll_stats(nll, idx, segments, vocab, ref_weight, gen_weight)
    stats["token_nll"] = nll
    return loss, stats
