"""Autoregressive decoding for BiART, both directions from one checkpoint.

Text -> image: the prompt is ``[SOC] text [SOI]`` and ``image_len`` image codes follow.
Image -> text: the prompt is ``[SOI] image [SOC]`` and up to ``max_text_tokens`` caption
tokens follow (the paper samples 32 of the 64 text slots, L-Verse section 3.6).

How a batch is decoded (:func:`decode`):

1. Prompts are taken in groups; each group is run through the model **once** (prefill), which
   fills a preallocated :class:`~lverse.models.biart.KVCache` and gives the logits of the first
   target token.
2. The group's cache is :meth:`~lverse.models.biart.KVCache.repeat`-ed for a chunk of
   candidates (so 64 candidates of one prompt share one prefill), and every further step feeds
   one token per row with ``start_pos``: no recomputation of the prefix. Groups and chunks are
   sized so that no more than ``batch_size`` rows decode at once, which bounds memory.
3. At each step the logits are **masked to the part being written** before temperature,
   top-k and top-p (disallowed ids get ``-inf``), so an invalid id can never be drawn:
   image codes only in the image part; caption ids (``<end_of_text>`` included) and PAD only
   in the text part. Once a caption row has drawn its end token or PAD, PAD is forced for the
   rest of it, as in the training sequences (``text eot PAD PAD ...``).
4. Since the ids a part allows are one contiguous range, the cached decoder multiplies the
   last hidden state (:meth:`~lverse.models.biart.BiART.hidden`) by that range of the output
   head's rows only (:func:`~lverse.inference.step.span_logits`); everything outside it would be ``-inf`` after masking.
   For images that is 8,192 of 57,603 rows, most of a step's cost in a narrow model
   (``bench/sampling.py`` reports both).

``use_cache=False`` runs the same loop but recomputes the whole prefix at every step, with the
full output head: the reference decoder the tests and ``bench/sampling.py`` compare against.
Both draw their random numbers in the same order from logits of the same shape, so greedy
decoding agrees token for token, and so does sampling with a seed up to floating-point ties.

Randomness comes from one ``torch.Generator`` (``seed=`` builds one on the model's device):
the same seed, batch size and device give the same candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lverse.inference.step import GumbelNoise, default_generator, gumbel_noise, single_token_step, span_logits
from lverse.models.biart import GEN, BiART, KVCache
from lverse.vocab import VocabLayout

Progress = Callable[[int], object]  # e.g. tqdm.update: called with the number of tokens drawn
DRAWS = ("multinomial", "gumbel")


def _report(progress: Progress | None, rows: int, out: torch.Tensor, t: int) -> None:
    """Tell ``progress`` that one more token was drawn for each of ``rows`` rows. A progress
    object with a ``partial`` method also gets the ids drawn so far, ``out[:, :t + 1]`` (the
    web page's min-dalle-style previews, :mod:`lverse.serve`); an exception it raises (a
    cancelled request) ends the decoding."""
    if progress is None:
        return
    progress(rows)
    partial = getattr(progress, "partial", None)
    if partial is not None:
        partial(out[:, : t + 1])


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn from the (masked) logits.

    ``temperature == 0`` or ``greedy`` takes the argmax. ``top_k == 0`` and ``top_p == 1``
    switch those filters off. ``guidance != 1`` mixes in the unconditional logits first
    (:func:`guide`); :func:`decode` needs an ``uncond`` prompt for it. Order: mask,
    temperature, top-k, top-p (as in common practice; top-p then acts on the tempered,
    top-k-restricted distribution).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    guidance: float = 1.0  # classifier-free guidance scale for text -> image; 1 = off (the paper)
    # How a token is drawn: "multinomial" (torch.multinomial, the default) or "gumbel": the argmax
    # of the logits plus Gumbel noise drawn for many steps at once, the same distribution
    # (Gumbel-max) without a softmax or a generator call per step, but other draws for a seed.
    draw: str = "multinomial"

    def __post_init__(self) -> None:
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {self.draw!r}")
        if not self.guidance >= 0.0:
            raise ValueError(f"guidance must be >= 0 (1 = off), got {self.guidance}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


# ------------------------------------------------------------------------------------------
# One step: mask, filter, draw
# ------------------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor,
    allowed: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """fp32 logits ``(N, V)`` with every token that may not be drawn set to ``-inf``.

    ``allowed`` is a boolean mask ``(V,)`` or ``(N, V)``; it is applied *first*, so top-k and
    top-p choose among allowed tokens only (a filter applied before the mask could keep only
    invalid ids and leave nothing to draw).
    """
    x = logits.float()
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p; the most
        # likely token always stays (its preceding mass is 0).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_from_logits(
    logits: torch.Tensor,
    allowed: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids ``(N,)`` drawn from logits ``(N, V)`` under ``params``.

    ``draw="gumbel"``: ``argmax(x + g)`` with ``g`` standard Gumbel noise ``(N, V)`` (``noise``,
    or drawn here): the index of the largest is distributed as ``softmax(x)`` (Gumbel-max)."""
    if params.is_greedy:
        return filter_logits(logits, allowed).argmax(dim=-1)
    x = filter_logits(logits, allowed, params.temperature, params.top_k, params.top_p)
    if params.draw == "gumbel":
        g = noise if noise is not None else gumbel_noise(x.shape, generator, x.device)
        return (x + g).argmax(dim=-1)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)




def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022; not in L-Verse): ``logits`` stacks the
    conditional rows over the unconditional ones ``(2N, V)``; returns ``u + scale * (c - u)``
    ``(N, V)`` in fp32. ``scale = 1`` is the conditional model alone, larger values push each
    draw towards what the caption makes more likely than no caption does.
    """
    c, u = logits.float().chunk(2, dim=0)
    return u + scale * (c - u)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (``None``: use torch's global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# ------------------------------------------------------------------------------------------
# The decoding loop
# ------------------------------------------------------------------------------------------


@dataclass
class TargetPart:
    """What may be written in the target part, and how a row ends.

    ``allowed`` is a boolean mask over the whole vocabulary; the ids it allows span the rows
    ``lo..hi-1`` (:attr:`span`). Only those rows of the output head are computed by the cached
    decoder (:func:`~lverse.inference.step.span_logits`): logits outside the span would be ``-inf`` after masking
    anyway, and in a narrow model the head is most of a step's cost (image codes are 8,192 of
    the paper's 57,603 ids).
    """

    allowed: torch.Tensor  # (V,) bool
    end_ids: torch.Tensor | None = None  # ids after which only PAD follows (captions)
    pad_id: int = -1

    def __post_init__(self) -> None:
        ids = self.allowed.nonzero()
        if ids.numel() == 0:
            raise ValueError("TargetPart: no token is allowed")
        # Computed once here: reading it at every step would sync a GPU each time.
        self.span: tuple[int, int] = (int(ids.min()), int(ids.max()) + 1)

    def to(self, device: torch.device | str) -> "TargetPart":
        ends = None if self.end_ids is None else self.end_ids.to(device)
        return TargetPart(self.allowed.to(device), ends, self.pad_id)


def _decode_rows_cached(
    model: BiART,
    cache: KVCache,
    first_logits: torch.Tensor,
    prompt_len: int,
    n_new: int,
    part: TargetPart,
    params: SamplingParams,
    generator: torch.Generator | None,
    progress: Progress | None,
    guided: bool = False,
    restrict: bool = True,
    sync_every: int = 1,
    compile_step: bool = False,
) -> torch.Tensor:
    """``guided``: the cache and ``first_logits`` hold the unconditional rows below the
    conditional ones; both halves are fed the token drawn from the guided logits. ``restrict``:
    see :func:`~lverse.inference.step.span_logits`. ``sync_every``, ``compile_step``: see :func:`decode`."""
    fed = first_logits.shape[0]
    device = first_logits.device
    rows = fed // 2 if guided else fed
    out = torch.full((rows, n_new), part.pad_id, dtype=torch.long, device=device)
    seg = torch.full((fed, 1), GEN, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device) if part.end_ids is not None else None
    noise = None
    if params.draw == "gumbel" and not params.is_greedy:
        noise = GumbelNoise(rows, part.span[1] - part.span[0], generator, device)
    # Captions end when every row has: asking a GPU that at each step would stall the host.
    # ``sync_every`` steps apart instead, with the step where all rows had ended kept on the
    # device and the generator wound back to its state after that step, so the tokens, and the
    # draws of any later chunk, are those of a check at every step.
    deferred = done is not None and sync_every > 1
    gen = generator if generator is not None else default_generator(device)
    states: list[torch.Tensor] = []
    all_done_at = torch.full((), -1, dtype=torch.long, device=device)
    step = single_token_step(model, cache, seg, part.span, restrict, compile_step)
    logits = first_logits
    for t in range(n_new):
        tok = _next(guide(logits, params.guidance) if guided else logits, part, params, generator, done,
                    noise.next() if noise is not None else None)
        out[:, t] = tok
        _report(progress, rows, out, t)
        ended = -1
        if done is not None and not deferred and bool(done.all()):
            ended = t
        elif deferred:
            assert done is not None
            states.append(gen.get_state())
            all_done_at = torch.where((all_done_at < 0) & done.all(), t, all_done_at)
            if (t + 1) % sync_every == 0 or t == n_new - 1:
                ended = int(all_done_at)  # the one host sync of these steps
                if ended >= 0:
                    gen.set_state(states[ended - (t + 1 - len(states))])
                states.clear()
        if t == n_new - 1 or ended >= 0:
            if progress is not None and t < n_new - 1:
                progress(rows * (n_new - 1 - t))  # the rest is PAD: account for it at once
            break
        feed = torch.cat([tok, tok]) if guided else tok
        logits = step(feed, prompt_len + t)
    return out


def _decode_rows_uncached(
    model: BiART,
    prompt: torch.Tensor,
    segments: torch.Tensor,
    n_new: int,
    part: TargetPart,
    params: SamplingParams,
    generator: torch.Generator | None,
    progress: Progress | None,
    guided: bool = False,
) -> torch.Tensor:
    """Reference decoder: the whole sequence so far goes through the model at every step.
    ``guided``: ``prompt`` stacks the unconditional prompts below the conditional ones."""
    fed = prompt.shape[0]
    rows = fed // 2 if guided else fed
    out = torch.full((rows, n_new), part.pad_id, dtype=torch.long, device=prompt.device)
    gen_seg = torch.full((fed, n_new), GEN, dtype=torch.long, device=prompt.device)
    done = torch.zeros(rows, dtype=torch.bool, device=prompt.device) if part.end_ids is not None else None
    noise = None
    if params.draw == "gumbel" and not params.is_greedy:
        noise = GumbelNoise(rows, part.span[1] - part.span[0], generator, prompt.device)
    for t in range(n_new):
        drawn = torch.cat([out, out]) if guided else out
        idx = torch.cat([prompt, drawn[:, :t]], dim=1)
        seg = torch.cat([segments, gen_seg[:, :t]], dim=1)
        logits = span_logits(model, model.hidden(idx, seg)[:, -1], part.span, restrict=False)
        tok = _next(guide(logits, params.guidance) if guided else logits, part, params, generator, done,
                    noise.next() if noise is not None else None)
        out[:, t] = tok
        _report(progress, rows, out, t)
        if done is not None and bool(done.all()) and t < n_new - 1:
            if progress is not None:
                progress(rows * (n_new - 1 - t))
            break
    return out


def _next(
    logits: torch.Tensor,
    part: TargetPart,
    params: SamplingParams,
    generator: torch.Generator | None,
    done: torch.Tensor | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw from span logits ``(N, hi - lo)``; returns vocabulary ids."""
    lo, hi = part.span
    tok = sample_from_logits(logits, part.allowed[lo:hi], params, generator, noise) + lo
    if done is not None:
        # Rows that already ended still draw (so every row consumes the generator the same
        # way whatever happened before), but their draw is replaced by PAD.
        tok = torch.where(done, torch.full_like(tok, part.pad_id), tok)
        assert part.end_ids is not None
        done |= torch.isin(tok, part.end_ids)
    return tok


@torch.no_grad()
def decode(
    model: BiART,
    prompt: torch.Tensor,
    segments: torch.Tensor,
    n_new: int,
    candidates: int,
    part: TargetPart,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: Progress | None = None,
    restrict_head: bool = True,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache_dtype: torch.dtype | None = None,
    sync_every: int = 0,
    compile_step: bool = False,
) -> torch.Tensor:
    """Draw ``candidates`` continuations of ``n_new`` tokens for each prompt row.

    ``prompt``/``segments``: ``(B, P)``. Returns BiART ids ``(B, candidates, n_new)``. Rows
    decode ``batch_size`` at a time: ``g`` prompts per prefill, each repeated for a chunk of
    ``c`` candidates with ``g * c <= batch_size`` (at least one row).

    ``restrict_head`` (cached decoder only): compute the output head for the allowed span of
    ids only. The uncached reference always computes the full head and then takes the span.

    ``uncond``: the unconditional prompt and segments ``(1, P)`` that classifier-free guidance
    (``params.guidance != 1``) contrasts every row with. It is prefilled once; each decoding
    row then gets an unconditional twin, so a step runs twice the rows (``batch_size`` counts
    both).

    Speed options of the cached decoder (the defaults change nothing):

    * ``cache_dtype``: keys/values in this dtype (default: the model's), e.g. bf16 for an fp32
      model: attention then runs in bf16 and reads half the bytes; tokens may differ in the
      last bits of near-ties.
    * ``sync_every``: captions check whether every row has ended only every this many steps
      (0: 8 on a GPU, 1 elsewhere), which is what stalls a GPU's queue; the tokens and the
      generator's state are those of a check at every step.
    * ``compile_step``: the single-token step through ``torch.compile`` with fixed shapes (a
      CUDA graph on a GPU where torch can capture it); for GPUs: on a CPU it compiles slowly.
    """
    if n_new < 1:
        raise ValueError(f"decode: n_new must be >= 1, got {n_new}")
    if candidates < 1:
        raise ValueError(f"decode: candidates must be >= 1, got {candidates}")
    if batch_size < 1:
        raise ValueError(f"decode: batch_size must be >= 1, got {batch_size}")
    B, P = prompt.shape
    guided = params.guidance != 1.0
    if guided:
        if uncond is None:
            raise ValueError("decode: guidance != 1 needs an unconditional prompt (uncond=)")
        if uncond[0].shape != (1, P) or uncond[1].shape != (1, P):
            raise ValueError(f"decode: uncond must be (1, {P}) prompt and segments, got {tuple(uncond[0].shape)}")
        batch_size = max(1, batch_size // 2)
    if P + n_new - 1 > model.cfg.block_size:
        raise ValueError(f"decode: prompt {P} + {n_new} new tokens exceed block_size {model.cfg.block_size}")
    device = model.device
    sync_every = sync_every or (8 if device.type == "cuda" else 1)
    prompt, segments = prompt.to(device), segments.to(device)
    if uncond is not None:
        uncond = (uncond[0].to(device), uncond[1].to(device))
    part = part.to(device)
    out = torch.empty((B, candidates, n_new), dtype=torch.long, device=device)
    group = max(1, min(B, batch_size // candidates))
    chunk = max(1, min(candidates, batch_size // group))

    was_training = model.training
    model.eval()  # no dropout while sampling
    restrict = use_cache and restrict_head

    def prefill(pr: torch.Tensor, sg: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        # The last drawn token is never fed back, hence P + n_new - 1 positions.
        cache = model.new_cache(pr.shape[0], max_len=P + n_new - 1, dtype=cache_dtype)
        return cache, span_logits(model, model.hidden(pr, sg, cache=cache)[:, -1], part.span, restrict)

    try:
        if use_cache and guided:  # the one unconditional prompt, prefilled once for all rows
            assert uncond is not None
            ucache, ufirst = prefill(*uncond)
        for b0 in range(0, B, group):
            pr, sg = prompt[b0 : b0 + group], segments[b0 : b0 + group]
            nb = pr.shape[0]
            if use_cache:
                cache, first = prefill(pr, sg)
            for c0 in range(0, candidates, chunk):
                n = min(chunk, candidates - c0)
                if use_cache:
                    # A single chunk of one candidate may write into the prefill cache itself;
                    # otherwise each chunk needs its own copy (rows diverge from here on).
                    c = cache if (n == 1 and candidates == 1) else cache.repeat(n)
                    f = first.repeat_interleave(n, 0)
                    if guided:  # unconditional twins below the conditional rows
                        r = nb * n
                        c = KVCache(torch.cat([c.k, ucache.k.expand(-1, r, -1, -1, -1)], 1),
                                    torch.cat([c.v, ucache.v.expand(-1, r, -1, -1, -1)], 1))
                        f = torch.cat([f, ufirst.expand(r, -1)])
                    rows = _decode_rows_cached(model, c, f, P, n_new, part, params, generator, progress, guided,
                                               restrict, sync_every, compile_step)
                else:
                    p_, s_ = pr.repeat_interleave(n, 0), sg.repeat_interleave(n, 0)
                    if guided:
                        assert uncond is not None
                        r = nb * n
                        p_, s_ = torch.cat([p_, uncond[0].expand(r, -1)]), torch.cat([s_, uncond[1].expand(r, -1)])
                    rows = _decode_rows_uncached(model, p_, s_, n_new, part, params, generator, progress, guided)
                out[b0 : b0 + nb, c0 : c0 + n] = rows.view(nb, n, n_new)
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------
# The two directions
# ------------------------------------------------------------------------------------------


def _params(
    params: SamplingParams | None, temperature: float, top_k: int, top_p: float, greedy: bool, guidance: float = 1.0
) -> SamplingParams:
    return params if params is not None else SamplingParams(temperature, top_k, top_p, greedy, guidance)


def empty_caption(vocab: VocabLayout, text_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unconditional caption ``(1, text_len)``: all PAD. No prompt encodes to it (every
    encoded prompt holds at least ``<end_of_text>``), so it is free to mean "no caption"."""
    return torch.full((1, text_len), vocab.pad, dtype=torch.long, device=device)


def image_part(vocab: VocabLayout) -> TargetPart:
    return TargetPart(vocab.image_mask())


def text_part(vocab: VocabLayout, eot_id: int | None) -> TargetPart:
    """Caption ids and PAD; a row ends at PAD or at ``eot_id`` (a *tokenizer* id)."""
    ends = [vocab.pad] + ([vocab.text_start + int(eot_id)] if eot_id is not None else [])
    if eot_id is not None and not 0 <= int(eot_id) < vocab.num_text_tokens:
        raise ValueError(f"eot_id {eot_id} is outside the text vocabulary 0..{vocab.num_text_tokens - 1}")
    return TargetPart(vocab.text_mask(allow_pad=True), torch.tensor(ends, dtype=torch.long), vocab.pad)


def generate_images(
    model: BiART,
    text_ids_global: torch.Tensor,
    candidates: int = 1,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    guidance: float = 1.0,
    params: SamplingParams | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Image codes ``(B, candidates, image_len)`` in ``0..num_image_codes-1``.

    ``text_ids_global``: ``(B, text_len)`` BiART ids (caption ids, eot, PAD), e.g. from
    :meth:`lverse.inference.pipeline.LVersePipeline.encode_prompts`.

    ``guidance != 1``: classifier-free guidance against the empty caption (all PAD), which a
    BiART trained with ``text_dropout > 0`` has learnt to model; with a BiART that never saw
    an empty caption it only adds noise.
    """
    prompt, seg = model.build_prompt(text_ids_global.to(model.device), "t2i")
    gen = generator if generator is not None else make_generator(seed, model.device)
    params = _params(params, temperature, top_k, top_p, greedy, guidance)
    uncond = model.build_prompt(empty_caption(model.vocab, model.cfg.text_len, model.device), "t2i") if params.guidance != 1.0 else None
    ids = decode(
        model, prompt, seg, model.cfg.image_len, candidates, image_part(model.vocab),
        params, gen, batch_size, use_cache, progress, uncond=uncond,
    )
    return model.vocab.global_to_image(ids)


def generate_captions(
    model: BiART,
    image_codes: torch.Tensor,
    candidates: int = 1,
    max_text_tokens: int = 32,
    *,
    eot_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    params: SamplingParams | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Caption ids ``(B, candidates, max_text_tokens)`` as BiART ids (text range or PAD).

    ``eot_id`` is the tokenizer's ``<end_of_text>`` id; after it (or after a PAD) a row holds
    only PAD. Convert with :func:`caption_token_ids` / :func:`decode_captions`.
    """
    if not 1 <= max_text_tokens <= model.cfg.text_len:
        raise ValueError(f"max_text_tokens must be in 1..text_len={model.cfg.text_len}, got {max_text_tokens}")
    prompt, seg = model.build_prompt(image_codes.to(model.device), "i2t")
    gen = generator if generator is not None else make_generator(seed, model.device)
    return decode(
        model, prompt, seg, max_text_tokens, candidates, text_part(model.vocab, eot_id),
        _params(params, temperature, top_k, top_p, greedy), gen, batch_size, use_cache, progress,
    )


# ------------------------------------------------------------------------------------------
# Captions: ids -> text
# ------------------------------------------------------------------------------------------


def caption_token_ids(vocab: VocabLayout, ids: torch.Tensor, text_pad: int = -1) -> torch.Tensor:
    """BiART caption ids -> tokenizer ids, PAD -> ``text_pad`` (the tokenizer's -1)."""
    txt = vocab.global_to_text(ids)
    return torch.where(ids == vocab.pad, torch.full_like(txt, text_pad), txt)


def truncate_caption(text: str) -> str:
    """The paper's truncation: keep what comes before the first full stop.

    Sampling 32 tokens often runs past the first sentence into a repeat of it; L-Verse
    (section 3.6) keeps only the first split on '.'.
    """
    return text.split(".", 1)[0].strip()


def decode_captions(tokenizer: "object", vocab: VocabLayout, ids: torch.Tensor, truncate: bool = True) -> list:
    """Caption strings for BiART ids ``(..., L)``: nested lists following the leading dims.

    ``tokenizer`` needs ``decode(list[int]) -> str`` that stops at its end token and skips -1
    (:class:`lverse.tokenizer.TextTokenizer`).
    """
    tok_ids = caption_token_ids(vocab, ids.cpu())

    def rec(x: torch.Tensor) -> list | str:
        if x.dim() == 1:
            s = tokenizer.decode(x.tolist())  # type: ignore[attr-defined]
            return truncate_caption(s) if truncate else s
        return [rec(r) for r in x]

    out = rec(tok_ids)
    return out if isinstance(out, list) else [out]


def pad_captions(vocab: VocabLayout, ids: torch.Tensor, text_len: int) -> torch.Tensor:
    """Right-pad caption ids ``(N, L)`` (BiART ids) with PAD to ``(N, text_len)``."""
    if ids.shape[-1] > text_len:
        raise ValueError(f"captions of {ids.shape[-1]} tokens do not fit text_len={text_len}")
    fill = torch.full((*ids.shape[:-1], text_len - ids.shape[-1]), vocab.pad, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, fill], dim=-1)


__all__: Sequence[str] = (
    "SamplingParams",
    "filter_logits",
    "sample_from_logits",
    "make_generator",
    "decode",
    "TargetPart",
    "empty_caption",
    "guide",
    "image_part",
    "text_part",
    "generate_images",
    "generate_captions",
    "caption_token_ids",
    "truncate_caption",
    "decode_captions",
    "pad_captions",
)
