"""BiART: the bidirectional auto-regressive transformer of L-Verse (stage 2).

One GPT-style decoder (minGPT layout) models both directions over a single vocabulary of
image codes, text BPE ids and three special tokens (see :mod:`lverse.vocab`)::

    text -> image:  [SOC] text(text_len)   [SOI] image(image_len)
    image -> text:  [SOI] image(image_len) [SOC] text(text_len)
    segment:        REF ................   GEN ...................

The only addition to GPT is a learned *segment embedding* (REF = conditional reference,
GEN = generation target) added to token + position embeddings, so the same text token means
"given caption" in one direction and "caption to write" in the other (paper, section 3.4).
Training optimises the next-token NLL of both parts (:meth:`BiART.loss`).

Precision: the paper trains in FP16 "O2" (fp16 weights, fp32 master weights in the
optimizer). LayerNorm and the loss must still compute in fp32, so :class:`LayerNorm` upcasts
internally and carries ``keep_fp32 = True``, the flag ``lverse.train.precision`` and
:meth:`BiART.keep_fp32_modules` use to find the modules that stay fp32 after ``.half()``.

Decoding uses a preallocated :class:`KVCache`: prefill the prompt once, then feed one token
at a time with ``start_pos``; the logits equal those of a full forward pass. :meth:`BiART.hidden`
stops before the output head, so a decoder computes the head only for the positions and
vocabulary rows it draws from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lverse.config import from_dict, to_dict
from lverse.files import load_weights, save_weights
from lverse.models.loss import head_nll, sequence_nll  # noqa: F401 (sequence_nll: re-exported)
from lverse.vocab import GEN, REF, VocabLayout  # noqa: F401 (segment ids, re-exported)

Direction = Literal["t2i", "i2t"]


@dataclass
class BiARTConfig:
    num_image_codes: int = 8192
    num_text_tokens: int = 49408
    text_len: int = 64
    image_len: int = 1024  # 32x32 AugVAE-SL grid
    n_layer: int = 32
    n_head: int = 16
    n_embd: int = 1024
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    tie_head: bool = False  # paper: untied output head (~522M parameters)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them)
    # Training loss only (not the paper, default off): each target's softmax over its own kind of
    # ids, image codes over the codebook and caption ids over the text vocabulary, which is what
    # the sampler draws from anyway; image targets then cost 8,192 head rows instead of 57,603.
    # Teacher-forced scores (rerank, evaluation) still use the full softmax.
    modality_softmax: bool = False

    @property
    def vocab(self) -> VocabLayout:
        return VocabLayout(self.num_image_codes, self.num_text_tokens)

    @property
    def block_size(self) -> int:
        # Both directions have the same length: one separator before each part.
        return self.text_len + self.image_len + 2

    def prompt_len(self, direction: Direction) -> int:
        """Length of the conditioning prefix, up to and including the second separator."""
        _check_direction(direction)
        return (self.text_len if direction == "t2i" else self.image_len) + 2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"BiARTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        for name in ("num_image_codes", "num_text_tokens", "text_len", "image_len", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BiARTConfig: {name} must be positive, got {getattr(self, name)}")


def _check_direction(direction: str) -> None:
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in fp32 and returns the input's dtype.

    Under FP16 O2 the residual stream is fp16; the mean/variance of 1024 fp16 values loses
    too much precision (and can overflow), so normalisation runs in fp32 whatever the
    dtype of the input or of this module's own parameters.
    """

    # Read by lverse.train.precision (fp16-o2): modules flagged so keep fp32 parameters.
    keep_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, computed in fp32 for bf16 inputs on the CPU in training."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        # The CPU's bf16 SDPA kernel is slow at short sequences (its backward took 16 ms per layer
        # at the Shapes BiART's (24, 4, 98, 32), fp32 5-7 ms); autocast, which would cast the fp32
        # inputs straight back to bf16, is off for this one call. Decoding (no grad) stays in bf16:
        # upcasting would copy the whole key/value cache at every step.
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: BiARTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

        mask: torch.Tensor | None = None
        is_causal = True
        dtype = q.dtype
        if kv is not None and isinstance(start_pos, torch.Tensor):
            # Static shapes (a compiled or graph-captured step): the position is a tensor, the
            # write an index_copy_, and the query attends to the whole buffer under a mask.
            k_buf, v_buf = kv
            pos = start_pos + torch.arange(T, device=x.device)
            k_buf.index_copy_(2, pos, k.to(k_buf.dtype))
            v_buf.index_copy_(2, pos, v.to(v_buf.dtype))
            mask = pos[:, None] >= torch.arange(k_buf.shape[2], device=x.device)[None, :]
            q, k, v, is_causal = q.to(k_buf.dtype), k_buf, v_buf, False
        elif kv is not None:
            # Write this chunk's keys/values at their absolute positions, then attend to the
            # whole cached prefix. Buffers are views into the KVCache, so writes persist.
            k_buf, v_buf = kv
            end = start_pos + T
            k_buf[:, :, start_pos:end] = k
            v_buf[:, :, start_pos:end] = v
            # A cache in another dtype than the model's (a bf16 cache for an fp32 model): attention
            # runs in the cache's dtype, which halves the bytes a step reads; no copy of the cache.
            q, k, v = q.to(k_buf.dtype), k_buf[:, :, :end], v_buf[:, :, :end]
            if T == 1:
                is_causal = False  # a single new query may see every cached key
            elif start_pos > 0:
                # Non-square causal mask: query i (absolute start_pos+i) sees keys <= itself.
                # (SDPA's is_causal aligns top-left, which is wrong for a chunk after a prefix.)
                qpos = torch.arange(start_pos, end, device=x.device)[:, None]
                mask = qpos >= torch.arange(end, device=x.device)[None, :]
                is_causal = False
        y = _attention(q, k, v, mask, is_causal, self.attn_pdrop if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: BiARTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2 / minGPT's GELU
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: BiARTConfig) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, start_pos: int | torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv, start_pos)
        return x + self.mlp(self.ln2(x))


# ------------------------------------------------------------------------------------------
# Key/value cache
# ------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values, shape ``(n_layer, B, n_head, max_len, head_dim)``.

    The cache does not track a length: the caller passes ``start_pos`` to
    :meth:`BiART.hidden`, which writes positions ``start_pos..start_pos+T-1`` and attends to
    everything before them. Positions past the current one may hold stale values from an
    earlier use; they are never read.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape != v.shape or k.dim() != 5:
            raise ValueError(f"KVCache: keys {tuple(k.shape)} and values {tuple(v.shape)} must be 5-D and equal")
        self.k = k
        self.v = v

    @classmethod
    def allocate(
        cls,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "KVCache":
        shape = (n_layer, batch, n_head, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def repeat(self, n: int) -> "KVCache":
        """Each row becomes ``n`` consecutive rows (row b -> rows b*n .. b*n+n-1).

        Prefill one prompt, then ``repeat(64)`` to draw 64 candidates without recomputing it.
        Returns a new cache (real copies: the candidates' later writes diverge).
        """
        if n < 1:
            raise ValueError(f"KVCache.repeat: n must be >= 1, got {n}")
        return KVCache(self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1))

    def select(self, index: torch.Tensor | list[int]) -> "KVCache":
        """A new cache holding rows ``index`` (reorder, subset or duplicate rows)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.k.device)
        return KVCache(self.k.index_select(1, index), self.v.index_select(1, index))


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


class BiART(nn.Module):

    def __init__(self, cfg: BiARTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V = cfg.vocab.size
        self.tok_emb = nn.Embedding(V, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.seg_emb = nn.Embedding(2, cfg.n_embd)  # REF=0, GEN=1
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, V, bias=False)  # minGPT: no bias on the output head
        if cfg.tie_head:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2L),
        # so the stream's variance does not grow with depth (two such writes per block).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        # nn.LayerNorm already initialises to weight=1, bias=0.

    # --- properties -----------------------------------------------------------------------
    @property
    def vocab(self) -> VocabLayout:
        return self.cfg.vocab

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the model (that of its Linear weights; LayerNorms may differ)."""
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # --- forward --------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        segments: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        loss_weights: tuple[float, float] | None = None,
    ) -> Any:
        """Logits ``(B, T, V)``: the output head over :meth:`hidden`.

        With ``loss_weights=(ref_weight, gen_weight)``: :meth:`loss` instead, ``(loss, stats)``,
        so a model wrapped by DDP or ``torch.compile`` can be called for its loss."""
        if loss_weights is not None:
            return self.loss(idx, segments, *loss_weights)
        return self.head(self.hidden(idx, segments, cache, start_pos))

    def hidden(
        self, idx: torch.Tensor, segments: torch.Tensor, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, n_embd)`` (after ``ln_f``, before the output head) for
        tokens at absolute positions ``start_pos..start_pos+T-1``.

        A decoder applies the head to the positions and vocabulary rows it needs only
        (``F.linear(h[:, -1], head.weight[lo:hi])``); :meth:`forward` applies all of it.

        ``idx`` is either token ids ``(B, T)`` or *soft tokens* ``(B, T, V)``: a distribution
        over the vocabulary per position, embedded as ``probs @ tok_emb.weight`` (the
        differentiable link of reconstruction finetuning). ``segments`` is ``(B, T)`` of
        REF/GEN. With ``cache``, keys/values are written at those positions and each token
        attends to everything cached before it. A 0-d tensor ``start_pos`` (with a cache) keeps
        every shape fixed from step to step, for ``torch.compile``/CUDA graphs; nothing is checked.
        """
        B, T = idx.shape[:2]
        if segments.shape != (B, T):
            raise ValueError(f"BiART: segments {tuple(segments.shape)} must be (B, T) = {(B, T)}")
        if isinstance(start_pos, torch.Tensor):  # a compiled step: no checks (they would sync a GPU)
            return self._run(idx, segments, cache, start_pos, start_pos + torch.arange(T, device=idx.device))
        end = start_pos + T
        if start_pos < 0 or end > self.cfg.block_size:
            raise ValueError(
                f"BiART: positions {start_pos}..{end - 1} fall outside block_size {self.cfg.block_size}"
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"BiART: cache has batch {cache.batch_size}, input has {B}")
            if end > cache.max_len:
                raise ValueError(f"BiART: position {end - 1} past the cache's max_len {cache.max_len}")
        elif start_pos != 0:
            raise ValueError("BiART: start_pos > 0 needs a cache holding the earlier positions")

        if idx.is_floating_point() and (idx.dim() != 3 or idx.shape[-1] != self.tok_emb.num_embeddings):
            raise ValueError(
                f"BiART: soft tokens must be (B, T, {self.tok_emb.num_embeddings}), got {tuple(idx.shape)}"
            )
        return self._run(idx, segments, cache, start_pos, torch.arange(start_pos, end, device=idx.device))

    def _run(
        self, idx: torch.Tensor, segments: torch.Tensor, cache: KVCache | None, start_pos: Any, positions: torch.Tensor
    ) -> torch.Tensor:
        if idx.is_floating_point():
            tok = idx.to(self.tok_emb.weight.dtype) @ self.tok_emb.weight
        else:
            tok = self.tok_emb(idx)
        pos = self.pos_emb(positions)
        # Cast to the compute dtype: under O2 everything is fp16 already, but soft tokens or an
        # embedding kept in another precision must not change the residual stream's dtype.
        x = self.drop((tok + pos + self.seg_emb(segments)).to(self.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i) if cache is not None else None, start_pos)
        return self.ln_f(x)

    # --- loss -----------------------------------------------------------------------------
    def loss(
        self,
        idx: torch.Tensor,
        segments: torch.Tensor,
        ref_weight: float = 1.0,
        gen_weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token NLL of both parts of full sequences (:func:`~lverse.models.loss.sequence_nll`'s
        values and gradients), with the head run only where a target counts and never over the
        whole batch at once (:func:`~lverse.models.loss.head_nll`)."""
        # The last position predicts nothing: causal attention lets the others run without it.
        h = self.hidden(idx[:, :-1], segments[:, :-1])
        return head_nll(h, self.head.weight, idx, segments, self.vocab, ref_weight, gen_weight, self.cfg.modality_softmax)

    # --- sequences ------------------------------------------------------------------------
    def build_prompt(self, cond: torch.Tensor, direction: Direction) -> tuple[torch.Tensor, torch.Tensor]:
        return build_prompt(self.cfg, cond, direction)

    def build_sequence(
        self, text_ids_global: torch.Tensor, image_codes: torch.Tensor, direction: Direction
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return build_sequence(self.cfg, text_ids_global, image_codes, direction)

    # --- decoding -------------------------------------------------------------------------
    def new_cache(
        self,
        batch: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        max_len = self.cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= self.cfg.block_size:
            raise ValueError(f"new_cache: max_len {max_len} must be in 1..{self.cfg.block_size}")
        return KVCache.allocate(
            self.cfg.n_layer,
            batch,
            self.cfg.n_head,
            max_len,
            self.cfg.n_embd // self.cfg.n_head,
            dtype or self.dtype,
            device or self.device,
        )

    # --- precision ------------------------------------------------------------------------
    def keep_fp32_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for every module flagged ``keep_fp32`` (the LayerNorms)."""
        for name, m in self.named_modules():
            if getattr(m, "keep_fp32", False):
                yield name, m

    def to_o2(self, dtype: torch.dtype = torch.float16) -> "BiART":
        """Cast weights to ``dtype`` but keep :meth:`keep_fp32_modules` in fp32 (in place).

        Only the weight casting; fp32 master weights and loss scaling live in
        ``lverse.train.precision``.
        """
        self.to(dtype)
        for _, m in self.keep_fp32_modules():
            m.float()
        return self

    # --- optimisation ---------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for m in (self.tok_emb, self.pos_emb, self.seg_emb) for p in m.parameters())
        return n

    # --- files ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any] | BiARTConfig) -> "BiART":
        cfg = config if isinstance(config, BiARTConfig) else from_dict(BiARTConfig, config, "biart")
        return cls(cfg)

    def save(self, path: str | Path) -> Path:
        return save_weights(path, self.state_dict(), {"kind": "biart", "config": to_dict(self.cfg)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "BiART":
        """Load weights saved by :meth:`save`; parameters keep the dtype they were saved in."""
        state, meta = load_weights(path, device=device)
        if meta.get("kind") != "biart" or "config" not in meta:
            raise ValueError(
                f"{path}: the JSON beside the weights must hold kind='biart' and a config; "
                f"got kind={meta.get('kind')!r}"
            )
        with torch.device("meta"):
            model = cls.from_config(meta["config"])
        # assign=True adopts the stored tensors (and their dtype) instead of copying into
        # freshly initialised fp32 ones: no wasted init of 500M parameters, fp16 stays fp16.
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
        if model.cfg.tie_head:
            model.head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
        return model.to(device)


# ------------------------------------------------------------------------------------------
# Sequences (pure functions; the model methods above call these)
# ------------------------------------------------------------------------------------------


def build_prompt(cfg: BiARTConfig, cond: torch.Tensor, direction: Direction) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning prefix and its segments.

    ``t2i``: ``cond`` are text ids already in BiART id space ``(B, text_len)`` (PAD where
    padded) -> ``[SOC] text [SOI]``. ``i2t``: ``cond`` are image codes ``0..N-1``
    ``(B, image_len)`` -> ``[SOI] image [SOC]``. The last token (the separator that opens the
    target) is GEN; everything before it REF.
    """
    _check_direction(direction)
    vocab = cfg.vocab
    if direction == "t2i":
        body = _check_text(cfg, cond)
        first, second = vocab.soc, vocab.soi
    else:
        body = _check_image(cfg, cond)
        first, second = vocab.soi, vocab.soc
    B, n = body.shape
    col = lambda v: torch.full((B, 1), v, dtype=torch.long, device=body.device)  # noqa: E731
    idx = torch.cat([col(first), body, col(second)], dim=1)
    seg = torch.full_like(idx, REF)
    seg[:, n + 1] = GEN
    return idx, seg


def build_sequence(
    cfg: BiARTConfig, text_ids_global: torch.Tensor, image_codes: torch.Tensor, direction: Direction
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full training sequence ``(idx, segments)``, each ``(B, block_size)``.

    ``t2i``: ``[SOC] text [SOI] image`` with REF on ``[SOC] text``, GEN on ``[SOI] image``.
    ``i2t``: ``[SOI] image [SOC] text`` with REF on ``[SOI] image``, GEN on ``[SOC] text``.
    """
    _check_direction(direction)
    text = _check_text(cfg, text_ids_global)
    image = _check_image(cfg, image_codes)
    if text.shape[0] != image.shape[0]:
        raise ValueError(f"build_sequence: text batch {text.shape[0]} != image batch {image.shape[0]}")
    cond, target = (text, image) if direction == "t2i" else (image_codes, text)
    idx, seg = build_prompt(cfg, cond, direction)
    target = target.to(idx.device)
    return torch.cat([idx, target], 1), torch.cat([seg, torch.full_like(target, GEN)], 1)


def _check_text(cfg: BiARTConfig, text: torch.Tensor) -> torch.Tensor:
    if text.dim() != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"text ids must be (B, text_len={cfg.text_len}), got {tuple(text.shape)}")
    v = cfg.vocab
    ok = v.is_text(text) | (text == v.pad)
    if not bool(ok.all()):
        bad = text[~ok][0].item()
        raise ValueError(
            f"text ids must be BiART ids in [{v.text_start}, {v.special_start}) or PAD={v.pad}; "
            f"got {bad} (convert tokenizer ids with VocabLayout.text_to_global)"
        )
    return text.long()


def _check_image(cfg: BiARTConfig, codes: torch.Tensor) -> torch.Tensor:
    if codes.dim() != 2 or codes.shape[1] != cfg.image_len:
        raise ValueError(f"image codes must be (B, image_len={cfg.image_len}), got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.num_image_codes):
        raise ValueError(
            f"image codes must lie in [0, {cfg.num_image_codes}); got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    return cfg.vocab.image_to_global(codes.long())


def describe(cfg: BiARTConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameter counts of a config without allocating memory (built on the meta device)."""
    if cfg is None:
        cfg = BiARTConfig()
    elif isinstance(cfg, dict):
        cfg = from_dict(BiARTConfig, cfg, "biart")
    with torch.device("meta"):
        model = BiART(cfg)
    n_emb = sum(p.numel() for m in (model.tok_emb, model.pos_emb, model.seg_emb) for p in m.parameters())
    return {
        "params": model.num_parameters(),
        "params_embeddings": n_emb,
        "params_blocks": sum(p.numel() for p in model.blocks.parameters()),
        "params_head": 0 if cfg.tie_head else model.head.weight.numel(),
        "vocab_size": cfg.vocab.size,
        "block_size": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
    }
