"""Reconstruction-regularised finetuning of BiART (the reconstruction paper, section 4, appendix H,
Algorithm 1), with BiART in both roles: ``lverse train-biart`` with a ``cycle:`` section.

Each step trains one direction, as stage 2 does (``directions: alternate``, ``t2i_share``), and
the direction picks the paper's pipeline:

* **image→text step** (pipeline 1, image → text → image): the teacher-forced image→text pass
  gives **L_TG**, the caption NLL (stage 2's loss of that step). Its caption distribution at
  every caption position, over the text ids only, becomes *soft tokens* (distribution × BiART's
  token embedding: ``BiART.forward`` takes ``(B, T, V)`` distributions), and a text→image pass
  from the soft caption gives **L_IR**, the NLL of the *original* image codes.
* **text→image step** (pipeline 2, text → image → text): the text→image pass gives **L_IG**;
  its distribution over the image codes becomes soft image tokens, and an image→text pass from
  them gives **L_TR**, the NLL of the original caption.

``loss = w_tg·L_TG + w_ir·L_IR`` on image→text steps and ``w_ig·L_IG + w_tr·L_TR`` on
text→image steps. One model, one vocabulary: no tokenizer mapping (the paper's appendix G).
Departures, each for a reason (docs/reconstruction.md):

* The paper runs both pipelines in every iteration on two pairs; here each step runs one, so a
  cycle step costs two passes (the paper: about 1.4× a plain step) and, with ``w_ir = w_tr = 0``,
  is exactly stage 2's step.
* Soft tokens stand only where the original has a caption token (or an image code); PAD
  positions after the caption stay hard PAD: the first pass never learnt to predict PAD (it is
  not scored), so its distribution there means nothing.
* The reconstruction losses count the target part only (the second pass's GEN part): its REF
  part would be predicting tokens it is given softly.

Which parameters train (``trainable``): ``all``, or ``query``: the attention query projections
only (the rows of each fused ``qkv`` that make queries; the paper finetunes the query projections
of its cross-attention layers). ``freeze`` makes Table 9's frozen-model variants with one shared
model, by cutting a gradient path rather than freezing weights: ``second``: the reconstructing
pass is run with detached weights, so the reconstruction losses train the first pass through the
soft tokens only (Table 9, row 3); ``first``: the soft tokens are detached and the supervised
loss is not trained, so only the reconstructing pass learns (row 4, "augmentation").

``gumbel: true`` replaces the plain distribution by a straight-through Gumbel-softmax sample at
temperature ``tau`` (one-hot forward, softmax gradient): the discrete sampling the paper names as
future work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lverse.config import ConfigError
from lverse.models.biart import BiART
from lverse.models.loss import sequence_nll
from lverse.vocab import VocabLayout

TRAINABLE = ("all", "query")
FREEZE = ("none", "first", "second")


@dataclass
class CycleConfig:
    w_tg: float = 1.0   # image->text NLL of the caption (supervised; stage 2's i2t loss)
    w_ir: float = 1.0   # text->image NLL of the original image codes given the soft caption
    w_ig: float = 1.0   # text->image NLL of the image codes (supervised; stage 2's t2i loss)
    w_tr: float = 1.0   # image->text NLL of the original caption given the soft image tokens
    trainable: str = "all"   # all | query (attention query projections only, the paper's choice)
    freeze: str = "none"     # none | first | second: Table 9's frozen-model variants (module doc)
    gumbel: bool = False     # straight-through Gumbel-softmax instead of the plain distribution
    tau: float = 1.0         # Gumbel-softmax temperature

    def check(self, directions: str, strategy: str) -> None:
        for name in ("w_tg", "w_ir", "w_ig", "w_tr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cycle.{name}={getattr(self, name)} must be >= 0")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"cycle.trainable={self.trainable!r} is not one of {TRAINABLE}")
        if self.freeze not in FREEZE:
            raise ConfigError(f"cycle.freeze={self.freeze!r} is not one of {FREEZE}")
        if self.tau <= 0:
            raise ConfigError(f"cycle.tau={self.tau} must be > 0")
        if directions == "mixed":
            raise ConfigError("cycle needs directions alternate, t2i or i2t (one pipeline per step), not mixed")
        if strategy == "fsdp" and (self.trainable != "all" or self.freeze == "second"):
            raise ConfigError("cycle.trainable=query and cycle.freeze=second need whole parameters: use "
                              "train.strategy=ddp (FSDP shards them)")


# ------------------------------------------------------------------------------------------
# Soft tokens
# ------------------------------------------------------------------------------------------


def part_distribution(logits: torch.Tensor, lo: int, hi: int, size: int, gumbel: bool = False,
                      tau: float = 1.0) -> torch.Tensor:
    """A distribution over ids ``lo..hi-1`` only (zero elsewhere), ``(..., size)`` fp32, from
    ``logits (..., size)``: softmax, or a straight-through Gumbel-softmax sample."""
    sub = logits[..., lo:hi].float()
    p = F.gumbel_softmax(sub, tau=tau, hard=True) if gumbel else sub.softmax(-1)
    return F.pad(p, (lo, size - hi))


def soft_sequence(idx: torch.Tensor, start: int, probs: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """``idx (B, S)`` as one-hot rows ``(B, S, size)`` with positions ``start..start+n-1``
    replaced by ``probs (B, n, size)`` where ``keep (B, n)`` (elsewhere the hard token stays)."""
    hard = F.one_hot(idx, size).to(probs.dtype)
    n = probs.shape[1]
    part = torch.where(keep[..., None], probs, hard[:, start : start + n])
    return torch.cat([hard[:, :start], part, hard[:, start + n :]], 1)


# ------------------------------------------------------------------------------------------
# Which parameters train
# ------------------------------------------------------------------------------------------


def train_queries_only(model: BiART) -> list[nn.Parameter]:
    """Freeze every parameter but the attention ``qkv`` weights and biases, and mask their
    gradients to the query rows (the first third). Returns the trainable parameters.

    The key and value rows share the tensor: their gradient is zero, so Adam leaves them alone;
    weight decay would not (it shrinks the whole tensor), so these parameters train without it
    (:func:`param_groups`)."""
    C = model.cfg.n_embd
    keep: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), device=p.device)
            mask[:C] = 1
            p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
            keep.append(p)
        else:
            p.requires_grad_(False)
    return keep


def param_groups(model: BiART, cfg: CycleConfig, default: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The optimizer's groups: stage 2's (``default``), or the query projections without decay."""
    if cfg.trainable == "query":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    return default()


def _detached_call(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``model``'s forward with its parameters detached: gradients reach the inputs, not the weights."""
    base = getattr(model, "module", model)  # a DDP wrapper's module (its reducer never sees these)
    base = getattr(base, "_orig_mod", base)  # torch.compile's
    params = {k: v.detach() for k, v in base.named_parameters()}
    return lambda *args: torch.func.functional_call(base, params, args)


# ------------------------------------------------------------------------------------------
# The losses
# ------------------------------------------------------------------------------------------


def reconstruction_loss(
    model: nn.Module, biart: BiART, cfg: CycleConfig, logits: torch.Tensor, text: torch.Tensor, codes: torch.Tensor,
    direction: str, autocast: Callable,
) -> torch.Tensor:
    """L_IR (``direction`` i2t: the first pass was image→text) or L_TR (t2i), from the first
    pass's ``logits`` over its sequence ``build_sequence(text, codes, direction)``."""
    v: VocabLayout = biart.vocab
    c = biart.cfg
    if direction == "i2t":  # [SOI] image [SOC] caption: caption token j is predicted at P-1+j
        P, n, lo, hi, second = c.image_len + 2, c.text_len, v.text_start, v.special_start, "t2i"
        keep = v.is_text(text)
    else:  # [SOC] caption [SOI] image
        P, n, lo, hi, second = c.text_len + 2, c.image_len, v.image_start, v.text_start, "i2t"
        keep = torch.ones_like(codes, dtype=torch.bool)
    probs = part_distribution(logits[:, P - 1 : P - 1 + n], lo, hi, v.size, cfg.gumbel, cfg.tau)
    if cfg.freeze == "first":
        probs = probs.detach()
    idx2, seg2 = biart.build_sequence(text, codes, second)  # type: ignore[arg-type]
    soft = soft_sequence(idx2, 1, probs, keep, v.size)  # the reference starts after the separator
    forward = _detached_call(model) if cfg.freeze == "second" else model
    with autocast():
        logits2 = forward(soft, seg2)
    loss, _ = sequence_nll(logits2, idx2, seg2, v, ref_weight=0.0, gen_weight=1.0)
    return loss


def _weights(cfg: CycleConfig, direction: str) -> tuple[float, float, str, str]:
    """(supervised weight, reconstruction weight, their log names) of a step in ``direction``."""
    return (cfg.w_tg, cfg.w_ir, "l_tg", "l_ir") if direction == "i2t" else (cfg.w_ig, cfg.w_tr, "l_ig", "l_tr")


def reconstructs(cfg: CycleConfig, direction: str) -> bool:
    """Whether a step in ``direction`` has a reconstruction loss, and so needs the first pass's
    full logits (stage 2's loss runs the head only where targets count, without them)."""
    return _weights(cfg, direction)[1] > 0


def cycle_step(
    model: nn.Module, biart: BiART, cfg: CycleConfig, supervised: torch.Tensor, logits: torch.Tensor | None,
    text: torch.Tensor, codes: torch.Tensor, direction: str, autocast: Callable,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss from stage 2's ``supervised`` loss and the first pass's ``logits``: the
    supervised weight times it (not trained with ``freeze: first``), plus the reconstruction
    weight times L_IR or L_TR. At reconstruction weight 0 (``logits`` None) the step is stage 2's
    exactly (times the supervised weight)."""
    w_sup, w_rec, sup_name, rec_name = _weights(cfg, direction)
    # freeze first: the supervised loss is shown, not trained (times 0 keeps the graph, so a step
    # whose reconstruction weight is 0 still has a loss to backpropagate)
    loss = w_sup * supervised.detach() + 0.0 * supervised if cfg.freeze == "first" else w_sup * supervised
    logs = {f"cycle/{sup_name}": float(supervised.detach())}
    if w_rec > 0:
        assert logits is not None, "a reconstruction step needs the first pass's logits (reconstructs())"
        rec = reconstruction_loss(model, biart, cfg, logits, text, codes, direction, autocast)
        loss = loss + w_rec * rec
        logs[f"cycle/{rec_name}"] = float(rec.detach())
    return loss, logs


__all__ = ["CycleConfig", "cycle_step", "param_groups", "part_distribution", "reconstructs", "reconstruction_loss",
           "soft_sequence", "train_queries_only"]
