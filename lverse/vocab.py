"""The one vocabulary layout shared by BiART, the tokenizer, data and sampling.

BiART has a single embedding matrix for image codes and text BPE ids; the paper indexes them
as image codes ``0..8191``, text ``8192..57599`` (CLIP's 49,408 BPE tokens), then
``PAD=57600, SOC=57601, SOI=57602``: 57,603 ids in all. Nothing else in lverse hard-codes an
offset: it asks a :class:`VocabLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Segment ids of a BiART sequence (lverse.models.biart): REF = the conditional reference (the given
# text or image), GEN = the generation target. The loss (lverse.models.loss) weighs the parts by them.
REF = 0
GEN = 1


@dataclass(frozen=True)
class VocabLayout:
    num_image_codes: int = 8192
    num_text_tokens: int = 49408

    # --- ranges ---------------------------------------------------------------------------
    @property
    def image_start(self) -> int:
        return 0

    @property
    def text_start(self) -> int:
        return self.num_image_codes

    @property
    def special_start(self) -> int:
        return self.num_image_codes + self.num_text_tokens

    @property
    def pad(self) -> int:
        return self.special_start

    @property
    def soc(self) -> int:
        """Start of caption."""
        return self.special_start + 1

    @property
    def soi(self) -> int:
        """Start of image."""
        return self.special_start + 2

    @property
    def size(self) -> int:
        return self.special_start + 3

    # --- conversions ----------------------------------------------------------------------
    def image_to_global(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_start

    def global_to_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.image_start

    def text_to_global(self, text_ids: torch.Tensor, text_pad: int | None = None) -> torch.Tensor:
        """Tokenizer ids → BiART ids; positions equal to ``text_pad`` become PAD."""
        out = text_ids + self.text_start
        if text_pad is not None:
            out = torch.where(text_ids == text_pad, torch.full_like(out, self.pad), out)
        return out

    def global_to_text(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.text_start

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_start) & (ids < self.text_start)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.text_start) & (ids < self.special_start)

    def image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean mask over the vocabulary: True where an image code may be sampled."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.image_start : self.text_start] = True
        return m

    def text_mask(self, device: torch.device | str | None = None, allow_pad: bool = True) -> torch.Tensor:
        """Boolean mask over the vocabulary: True where a caption token (or PAD/end) may be sampled."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.text_start : self.special_start] = True
        if allow_pad:
            m[self.pad] = True
        return m

    def to_dict(self) -> dict[str, int]:
        return {"num_image_codes": self.num_image_codes, "num_text_tokens": self.num_text_tokens}


PAPER_VOCAB = VocabLayout(8192, 49408)
assert PAPER_VOCAB.size == 57603
