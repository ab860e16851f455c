"""Stage 2: train BiART on pre-encoded (image codes, caption) pairs.

The paper's scheme: one direction per iteration, alternating text→image and image→text, the
same direction on every rank (it depends on the step number only), and the NLL of *both* the
REF part and the GEN part is optimised. ``directions: mixed`` instead puts both directions in
every batch (half each).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from lverse.config import ConfigError, to_dict
from lverse.data.images import derive_seed
from lverse.data.tokens import TokenDataset
from lverse.files import resolve_weights
from lverse.models.biart import BiART, BiARTConfig
from lverse.models.loss import sequence_nll
from lverse.tokenizer import TextTokenizer
from lverse.train import cycle
from lverse.train.cycle import CycleConfig
from lverse.train.loop import Task, TrainConfig
from lverse.train.optim import weight_decay_groups

DIRECTIONS = ("alternate", "mixed", "t2i", "i2t")


@dataclass
class Stage2DataConfig:
    tokens: list[str] = field(default_factory=list)  # token directories written by `lverse encode`
    tokenizer: str = "clip"        # "clip" (the paper's 49,408-token BPE) or a tokenizer.json path
    bpe_dropout: bool = True       # BPE dropout (p = 0.1) on training captions


@dataclass
class Stage2Config:
    model: BiARTConfig = field(default_factory=BiARTConfig)
    data: Stage2DataConfig = field(default_factory=Stage2DataConfig)
    # true: the model's text vocabulary, codebook size and image length follow the tokenizer and
    # the token data (the resolved config in the run directory shows the values used)
    auto_vocab: bool = True
    directions: str = "alternate"  # alternate | mixed | t2i | i2t
    # With directions=alternate: the share of steps that are text->image (the paper: 0.5, strict
    # alternation). Ours: the steps stay evenly spread, e.g. 0.75 gives t2i, t2i, t2i, i2t, ...
    t2i_share: float = 0.5
    ref_weight: float = 1.0        # weight of the REF-part NLL
    gen_weight: float = 1.0        # weight of the GEN-part NLL
    # Probability that a text->image sample's caption is replaced by the empty caption (all PAD),
    # so the model also learns p(image) and sampling can use classifier-free guidance
    # (`sample.py --guidance`). Not in the paper: 0 there.
    text_dropout: float = 0.0
    init_from: str = ""            # warm start from BiART weights (file or run dir)
    # Reconstruction-regularised finetuning (lverse.train.cycle; docs/reconstruction.md): absent = stage 2
    cycle: CycleConfig | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            name="biart", precision="fp16-o2", betas=(0.9, 0.95), weight_decay=0.01, base_lr=4.5e-7
        )
    )


def load_tokenizer(spec: str) -> TextTokenizer:
    if spec == "clip":
        return TextTokenizer.clip()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p} (use data.tokenizer=clip or a tokenizer.json from `lverse train-tokenizer`)")
    return TextTokenizer.load(p)


def build_stage2_model(cfg: Stage2Config, tokenizer: TextTokenizer, dataset: TokenDataset) -> BiART:
    if cfg.auto_vocab:
        cfg.model = dataclasses.replace(cfg.model, num_text_tokens=tokenizer.vocab_size, image_len=dataset.tokens_per_image,
                                        num_image_codes=dataset.codebook_size)
    if cfg.model.num_text_tokens != tokenizer.vocab_size:
        raise ConfigError(f"model.num_text_tokens={cfg.model.num_text_tokens} but the tokenizer has {tokenizer.vocab_size} tokens")
    if cfg.model.image_len != dataset.tokens_per_image:
        raise ConfigError(f"model.image_len={cfg.model.image_len} but the token data has {dataset.tokens_per_image} codes per image")
    # Equal, not merely enough: a BiART whose image vocabulary is larger than the AugVAE's
    # codebook can sample codes the AugVAE cannot decode, and `lverse bundle` refuses it.
    if cfg.model.num_image_codes != dataset.codebook_size:
        raise ConfigError(f"model.num_image_codes={cfg.model.num_image_codes} but the token data comes from an AugVAE "
                          f"codebook of {dataset.codebook_size} codes: they must be equal (set model.num_image_codes="
                          f"{dataset.codebook_size}, or auto_vocab: true)")
    if cfg.init_from:
        model = BiART.load(resolve_weights(cfg.init_from))
        if model.cfg != cfg.model:
            raise ConfigError(f"init_from {cfg.init_from}: its config differs from model: {to_dict(model.cfg)}")
        return model.float()
    return BiART(cfg.model)


class SeededItems(Dataset):
    """The token data with each item's sampler seed kept in the item (``"seed"``), so the
    collate can draw its BPE dropout from it: a resumed run then tokenises every caption as an
    unbroken one would, whichever loader worker reads it."""

    def __init__(self, tokens: TokenDataset, source: str) -> None:
        self.tokens, self.source = tokens, source

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item = self.tokens[key]
        item["seed"] = key[1] if isinstance(key, tuple) else None
        return item


class Stage2Task(Task):
    def __init__(self, cfg: Stage2Config) -> None:
        if cfg.directions not in DIRECTIONS:
            raise ConfigError(f"directions={cfg.directions!r} is not one of {DIRECTIONS}")
        if not 0.0 < cfg.t2i_share < 1.0:
            raise ConfigError(f"t2i_share={cfg.t2i_share} must be in (0, 1) (directions=t2i or i2t train one direction)")
        if not 0.0 <= cfg.text_dropout < 1.0:
            raise ConfigError(f"text_dropout={cfg.text_dropout} must be in [0, 1)")
        if cfg.cycle is not None:
            cfg.cycle.check(cfg.directions, cfg.train.strategy)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.dataset = TokenDataset(cfg.data.tokens)
        self.model = build_stage2_model(cfg, self.tokenizer, self.dataset)
        self.vocab = self.model.vocab
        if cfg.cycle is not None and cfg.cycle.trainable == "query":
            cycle.train_queries_only(self.model)

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "biart", "config": to_dict(self.model.cfg)}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        if self.cfg.cycle is not None:
            return cycle.param_groups(self.model, self.cfg.cycle, lambda: weight_decay_groups(self.model, weight_decay))
        return weight_decay_groups(self.model, weight_decay)

    def prepare(self, device: torch.device) -> None:
        self.device = device

    def train_dataset(self) -> SeededItems:
        return SeededItems(self.dataset, ", ".join(self.cfg.data.tokens))

    def collate(self, items: list[Any]) -> dict[str, Any]:
        # Tokenising here (batched, in the loader workers) keeps BPE dropout fresh every epoch;
        # each caption's dropout follows its item's seed (a new one every epoch).
        seeds = [it.get("seed") for it in items]
        text = self.tokenizer.encode_batch(
            [it["caption"] for it in items], length=self.cfg.model.text_len, dropout=self.cfg.data.bpe_dropout,
            seeds=None if None in seeds else [derive_seed("lverse-bpe-dropout", s) for s in seeds],
        )
        return {
            "codes": torch.stack([it["codes"] for it in items]),
            "text": self.vocab.text_to_global(text.clamp(min=0), None).masked_fill(text < 0, self.vocab.pad),
        }

    def direction(self, step: int) -> str:
        if self.cfg.directions == "alternate":
            # step s is text->image when the running count ceil(s * share) steps up at s, so
            # share 0.5 gives the paper's t2i, i2t, t2i, ... from step 0
            s = self.cfg.t2i_share
            return "t2i" if math.ceil((step + 1) * s) > math.ceil(step * s) else "i2t"
        return self.cfg.directions

    def training_step(self, model: nn.Module, batch: dict[str, Any], step: int, autocast: Callable) -> tuple[torch.Tensor, dict[str, float]]:
        text = batch["text"].to(self.device, non_blocking=True)
        codes = batch["codes"].to(self.device, non_blocking=True)
        direction = self.direction(step)
        if direction in ("t2i", "mixed") and self.cfg.text_dropout > 0:
            text = self.drop_captions(text, step, text.shape[0] // 2 if direction == "mixed" else text.shape[0])
        if direction == "mixed":
            h = text.shape[0] // 2
            a = self.model.build_sequence(text[:h], codes[:h], "t2i")
            b = self.model.build_sequence(text[h:], codes[h:], "i2t")
            parts = [("t2i", a), ("i2t", b)]
            idx, seg = torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
        else:
            idx, seg = self.model.build_sequence(text, codes, direction)  # type: ignore[arg-type]
            parts = [(direction, (idx, seg))]
        from lverse.models.loss import nll_stats

        logits = None
        if self.cfg.cycle is not None and cycle.reconstructs(self.cfg.cycle, direction):
            with autocast():  # the cycle step reads the first pass's distributions: full logits
                logits = model(idx, seg)
            loss, stats = sequence_nll(logits, idx, seg, self.vocab, self.cfg.ref_weight, self.cfg.gen_weight,
                                             self.model.cfg.modality_softmax)
        else:
            with autocast():  # the loss without full logits (BiART.loss), through DDP/compile's wrapper
                loss, stats = model(idx, seg, loss_weights=(self.cfg.ref_weight, self.cfg.gen_weight))
        if self.cfg.cycle is not None:  # direction is t2i or i2t (CycleConfig.check)
            loss, extra = cycle.cycle_step(model, self.model, self.cfg.cycle, loss, logits, text, codes, direction,
                                           autocast)
        logs = {"loss": loss.detach().item()}
        if self.cfg.cycle is not None:
            logs.update(extra)
        if len(parts) == 1:
            d = parts[0][0]
            logs[f"{d}/nll_text"] = float(stats["nll_text"])
            logs[f"{d}/nll_image"] = float(stats["nll_image"])
        else:
            off = 0
            for d, (pi, ps) in parts:
                n = pi.shape[0]
                _, st = nll_stats(stats["token_nll"][off : off + n], pi, ps, self.vocab)
                logs[f"{d}/nll_text"] = float(st["nll_text"])
                logs[f"{d}/nll_image"] = float(st["nll_image"])
                off += n
        return loss, logs

    def drop_captions(self, text: torch.Tensor, step: int, n_t2i: int) -> torch.Tensor:
        """The first ``n_t2i`` rows (the text->image ones) become the empty caption with
        probability ``text_dropout``. All-PAD text adds nothing to the loss (PAD targets are
        not scored), so such a row trains the image part only, as p(image | no caption).
        The draw depends on the step alone: a resumed run drops the same rows."""
        g = torch.Generator().manual_seed(0x5EED + step)
        drop = torch.rand(text.shape[0], generator=g) < self.cfg.text_dropout
        drop[n_t2i:] = False
        return text.masked_fill(drop.to(text.device)[:, None], self.vocab.pad)

    def extra_files(self) -> dict[str, str]:
        return {"tokenizer.json": self.tokenizer.to_str()}
