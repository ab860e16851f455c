"""The tiny Shapes CLIP, model side: its sizes, the open_clip model, the CLIP BPE tokenizer, the
compact vocabulary it trains on, the fast text path and its files.

Training (losses, the task the shared trainer runs, evaluation): :mod:`lverse.shapes.clip_train`;
why the choices: that module's docstring.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lverse.config import ConfigError
from lverse.inference import clip as clipio
from lverse.shapes.scenes import COLOURS, POS_WORDS, REL_WORDS, SHAPES, SIZES

MODEL_NAME = "shapes-tiny-clip"
CLIP_BPE_VOCAB = 49408  # ids of open_clip's CLIP BPE tokenizer (incl. start/end of text)
# [-1, 1] in, [-1, 1] to the model: ClipReranker does (x01 - mean) / std with these.
IDENTITY_PREPROCESS: dict[str, Any] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@dataclass
class ClipModelConfig:
    """Sizes of the open_clip ``CLIP``: a ViT image tower and a causal text transformer."""

    embed_dim: int = 64
    image_size: int = 64
    patch_size: int = 8           # 16-px patches on 64-px Shapes do not learn shapes (measured)
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32   # heads = width // head_width
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 3
    context_length: int = 32      # Shapes captions take <= 18 tokens (two objects), 30 (three)
    vocab_size: int = CLIP_BPE_VOCAB
    mlp_ratio: float = 4.0
    compact_vocab: bool = True    # train only the BPE rows Shapes uses (see CompactVocab); saved full

    def open_clip_cfg(self) -> dict[str, Any]:
        """open_clip's model config dict (``open_clip.CLIP(**cfg)``); JSON-able."""
        if self.vocab_size < CLIP_BPE_VOCAB:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size}: the CLIP BPE tokenizer this trainer (and "
                f"ClipReranker) uses needs {CLIP_BPE_VOCAB} token ids"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}")
        if self.vision_width % self.vision_head_width:
            raise ConfigError(
                f"model.vision_width={self.vision_width} is not a multiple of model.vision_head_width={self.vision_head_width}"
            )
        if self.text_width % self.text_heads:
            raise ConfigError(f"model.text_width={self.text_width} is not a multiple of model.text_heads={self.text_heads}")
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "mlp_ratio": self.mlp_ratio,
            },
        }


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """An untrained ``open_clip.CLIP`` from its config dict (nothing is downloaded); a config
    that does not build one is a :class:`ConfigError`."""
    try:
        return clipio.build_open_clip(model_cfg)
    except TypeError as e:
        raise ConfigError(f"model_cfg does not build an open_clip CLIP ({e}): {model_cfg}") from None


@functools.lru_cache(maxsize=4)  # reading the BPE merges takes about a second; the tokenizer is pure
def build_tokenizer(context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer (the one ClipReranker uses by default)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CachedTokenizer:
    """Memoises the BPE per caption: Shapes repeats its phrases over and over."""

    def __init__(self, tokenizer: Callable[[Sequence[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def shapes_words() -> list[str]:
    """Every word the Shapes caption grammar (:mod:`lverse.shapes.scenes`) can write."""
    phrases = [*COLOURS, *SHAPES, *SIZES, *(w for ws in REL_WORDS.values() for w in ws), *POS_WORDS.values(),
               "a", "there is", "and"]
    return sorted({w for p in phrases for w in p.split()})


class CompactVocab:
    """Train on the few dozen CLIP BPE ids Shapes captions use; save the full 49,408-row table.

    With the full table every step would zero, fill and Adam-update ~49k embedding rows of
    which Shapes touches 34: at the sizes here that is ~90% of the parameters and ~10% of the
    step time (measured, noisily). So training runs a model whose token embedding has one row
    per id in :attr:`ids` (sorted, so the end-of-text id is still the largest, which argmax
    pooling relies on), and :meth:`expand` writes those rows into a full-vocabulary model whose
    other rows keep their random init: exactly where training the full table would leave them
    (they get no gradient, and embeddings are not weight-decayed).
    """

    def __init__(self, ids: Sequence[int], full_size: int) -> None:
        self.ids = torch.tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)
        if int(self.ids.max()) >= full_size:
            raise ValueError(f"token id {int(self.ids.max())} does not fit a vocabulary of {full_size}")
        self.full_size = full_size
        self.lut = torch.full((full_size,), -1, dtype=torch.long)
        self.lut[self.ids] = torch.arange(len(self.ids))

    @classmethod
    def for_shapes(cls, tokenizer: Callable[[Sequence[str]], torch.Tensor], full_size: int) -> "CompactVocab":
        # The CLIP BPE splits on whitespace first, so a word's ids do not depend on its neighbours.
        ids = tokenizer(shapes_words()).flatten().tolist()  # one word per row: no truncation
        return cls([0, *ids], full_size)  # 0: the padding id

    def __len__(self) -> int:
        return len(self.ids)

    def compact(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.lut[tokens]
        if bool((out < 0).any()):
            bad = sorted(set(tokens[out < 0].tolist()))
            raise ValueError(f"token ids {bad[:10]} are not in the compact Shapes vocabulary (a caption outside the "
                             "Shapes grammar?); set model.compact_vocab=false to train the full table")
        return out

    def expand(self, compact_model: nn.Module, full_model: nn.Module) -> nn.Module:
        """Copy ``compact_model`` into ``full_model`` (same config but the vocabulary size)."""
        state = compact_model.state_dict()
        table = full_model.token_embedding.weight.detach().clone()
        table[self.ids] = state.pop("token_embedding.weight").to(table.dtype)
        state["token_embedding.weight"] = table
        full_model.load_state_dict(state, strict=True)
        return full_model


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, computed on the tokens up to the longest caption's end.

    The text tower is causal and (``pool_type='argmax'``) reads the end-of-text position, the
    largest id of each row: no position after it can change the result, so dropping the
    all-padding tail gives the same embedding for less work. Falls back to ``encode_text`` for
    any other pooling.
    """
    if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(model.text_projection, torch.Tensor):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :length]
    x = model.token_embedding(t) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    return x @ model.text_projection


def save_clip(path: str | Path, model: nn.Module, model_cfg: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``clip.safetensors`` + ``clip.json`` (``path``: the weights file or a directory) with
    what a reader needs to use a Shapes CLIP: its tokenizer and the image range it expects."""
    notes = {"tokenizer": "open_clip SimpleTokenizer (CLIP BPE)", "image_range": [-1, 1], **(extra or {})}
    return clipio.save_clip(path, model, model_cfg, MODEL_NAME, dict(IDENTITY_PREPROCESS), notes)



class TwoTowers(nn.Module):
    """The CLIP as the trainer calls it: ``forward(images, tokens)`` gives unit image features,
    unit text features (by :func:`encode_text`) and ``exp(logit_scale)``.

    Why a wrapper: DDP synchronises the gradients of what runs inside ``forward``, and CLIP's
    own ``forward`` has no trimmed text path and no separate image batch, so the training step
    goes through this one call.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        text_features = F.normalize(encode_text(self.clip, tokens), dim=-1)
        return image_features, text_features, self.clip.logit_scale.exp()
