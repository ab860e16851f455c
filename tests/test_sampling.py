"""Decoding (lverse.inference.sampling): cached == uncached, masks, filters, seeds, prefill/chunking,
caption post-processing. Tiny random BiARTs on CPU."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lverse.inference.sampling import (
    SamplingParams,
    TargetPart,
    caption_token_ids,
    decode,
    decode_captions,
    empty_caption,
    filter_logits,
    generate_captions,
    generate_images,
    image_part,
    make_generator,
    pad_captions,
    sample_from_logits,
    text_part,
    truncate_caption,
)
from lverse.models.biart import BiART, BiARTConfig

TINY = dict(num_image_codes=16, num_text_tokens=40, text_len=6, image_len=9, n_layer=2, n_head=4, n_embd=32)
EOT = 39  # a tokenizer id used as <end_of_text> in these tests


def tiny(seed: int = 0, scale: float = 1.0, **kw) -> BiART:
    """A random tiny BiART. ``scale`` multiplies every weight matrix: a freshly initialised
    model barely depends on its prompt (greedy decoding then writes the same tokens for every
    prompt, and a cached/uncached comparison would prove little); scaled weights make the
    output depend on the prompt and on every earlier token."""
    torch.manual_seed(seed)
    m = BiART(BiARTConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return m


def random_text(m: BiART, B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = m.vocab
    t = torch.randint(v.text_start, v.text_start + EOT, (B, m.cfg.text_len), generator=g)
    t[:, 3] = v.text_start + EOT
    t[:, 4:] = v.pad
    return t


def random_codes(m: BiART, B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.cfg.num_image_codes, (B, m.cfg.image_len), generator=g)


# ------------------------------------------------------------------------------------------
# cached vs. uncached


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_greedy_cached_equals_uncached_text_to_image(batch_size: int) -> None:
    m = tiny(scale=10)
    text = random_text(m, 3)
    a = generate_images(m, text, 2, greedy=True, batch_size=batch_size)
    b = generate_images(m, text, 2, greedy=True, batch_size=batch_size, use_cache=False)
    assert a.shape == (3, 2, m.cfg.image_len)
    assert torch.equal(a, b)
    # Greedy candidates of one prompt are all the same; the prompts' outputs differ.
    assert torch.equal(a[:, 0], a[:, 1])
    assert len({tuple(r.tolist()) for r in a[:, 0]}) == 3


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_greedy_cached_equals_uncached_image_to_text(batch_size: int) -> None:
    m = tiny(4, scale=10)
    codes = random_codes(m, 4)
    a = generate_captions(m, codes, 2, max_text_tokens=6, eot_id=EOT, greedy=True, batch_size=batch_size)
    b = generate_captions(m, codes, 2, max_text_tokens=6, eot_id=EOT, greedy=True, batch_size=batch_size,
                          use_cache=False)
    assert a.shape == (4, 2, 6)
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a[:, 0]}) >= 3
    # Some captions end early (eot then forced PAD) and some run to the end: both paths tested.
    ends = (a == m.vocab.text_start + EOT).any(-1)
    assert bool(ends.any()) and not bool(ends.all())


def test_sampled_cached_equals_uncached_with_same_seed() -> None:
    """Both decoders draw from logits of the same shape in the same order: same seed, same tokens."""
    m = tiny(3, scale=10)
    text, codes = random_text(m, 2), random_codes(m, 2)
    kw = dict(temperature=1.5, top_k=10, top_p=0.95, seed=123, batch_size=3)
    a = generate_images(m, text, 3, **kw)
    assert torch.equal(a, generate_images(m, text, 3, use_cache=False, **kw))
    assert len({tuple(r.tolist()) for r in a.flatten(0, 1)}) == 6
    c = generate_captions(m, codes, 3, max_text_tokens=6, eot_id=EOT, **kw)
    assert torch.equal(c, generate_captions(m, codes, 3, max_text_tokens=6, eot_id=EOT, use_cache=False, **kw))


def test_cached_decoder_computes_only_the_head_rows_of_the_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached decoder multiplies the hidden state by the allowed span's rows of the output
    head only (image codes: 16 of 59 rows here; caption ids and PAD: 41); with
    ``restrict_head=False`` by all of them. The tokens are the same."""
    m = tiny(1, scale=10)
    v = m.vocab
    head_rows: list[int] = []
    linear = F.linear

    def spy(x, w, b=None):
        if w.untyped_storage().data_ptr() == m.head.weight.untyped_storage().data_ptr():
            head_rows.append(w.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    text, codes = random_text(m, 2), random_codes(m, 2)
    for part, prompt, n_new in ((image_part(v), m.build_prompt(text, "t2i"), m.cfg.image_len),
                                (text_part(v, EOT), m.build_prompt(codes, "i2t"), 6)):
        lo, hi = part.span
        assert hi - lo < v.size
        runs = []
        for restrict in (True, False):
            head_rows.clear()
            runs.append(decode(m, *prompt, n_new, 3, part, SamplingParams(temperature=2.0),
                               make_generator(0, "cpu"), restrict_head=restrict))
            assert set(head_rows) == ({hi - lo} if restrict else {v.size}), (restrict, set(head_rows))
        assert torch.equal(runs[0], runs[1])


def test_greedy_matches_step_by_step_argmax_of_full_forward() -> None:
    """Independent reference: argmax of a plain full forward, one token at a time."""
    m = tiny(2, scale=10)
    text = random_text(m, 2, seed=3)
    got = generate_images(m, text, 1, greedy=True)[:, 0]
    prompt, seg = m.build_prompt(text, "t2i")
    idx, sg = prompt, seg
    with torch.no_grad():
        for _ in range(m.cfg.image_len):
            logits = m(idx, sg)[:, -1].clone()
            logits[:, ~m.vocab.image_mask()] = float("-inf")
            tok = logits.argmax(-1, keepdim=True)
            idx = torch.cat([idx, tok], 1)
            sg = torch.cat([sg, torch.ones_like(tok)], 1)
    assert torch.equal(got, idx[:, prompt.shape[1]:])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_guided_cached_equals_uncached_and_full_forward_reference(batch_size: int) -> None:
    """Classifier-free guidance: the cached decoder (unconditional twins in the KV cache)
    writes what the uncached one does, and both match an independent reference: two full
    forward passes per step, mixed as u + s * (c - u), argmax over image codes."""
    m = tiny(4, scale=10)
    text = random_text(m, 3, seed=1)
    s = 3.0
    a = generate_images(m, text, 2, greedy=True, guidance=s, batch_size=batch_size)
    b = generate_images(m, text, 2, greedy=True, guidance=s, batch_size=batch_size, use_cache=False)
    assert torch.equal(a, b)
    pc, sc = m.build_prompt(text, "t2i")
    pu, su = m.build_prompt(empty_caption(m.vocab, m.cfg.text_len).expand(3, -1), "t2i")
    drawn = torch.empty(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(m.cfg.image_len):
            gseg = torch.ones_like(drawn)
            c = m(torch.cat([pc, drawn], 1), torch.cat([sc, gseg], 1))[:, -1].float()
            u = m(torch.cat([pu, drawn], 1), torch.cat([su, gseg], 1))[:, -1].float()
            mixed = (u + s * (c - u)).masked_fill(~m.vocab.image_mask(), float("-inf"))
            drawn = torch.cat([drawn, mixed.argmax(-1, keepdim=True)], 1)
    assert torch.equal(a[:, 0], m.vocab.global_to_image(drawn))
    # Guidance changes the images (scale 3 is not the conditional model), and 1 is off.
    assert not torch.equal(a, generate_images(m, text, 2, greedy=True, batch_size=batch_size))
    assert torch.equal(generate_images(m, text, 2, greedy=True, guidance=1.0),
                       generate_images(m, text, 2, greedy=True))


def test_guided_sampling_is_seeded_and_needs_an_unconditional_prompt() -> None:
    m = tiny(5, scale=10)
    text = random_text(m, 2)
    a = generate_images(m, text, 3, guidance=2.0, seed=7, batch_size=4)
    assert torch.equal(a, generate_images(m, text, 3, guidance=2.0, seed=7, batch_size=4, use_cache=False))
    assert torch.equal(a, generate_images(m, text, 3, guidance=2.0, seed=7, batch_size=4))
    prompt, seg = m.build_prompt(text, "t2i")
    with pytest.raises(ValueError, match="uncond"):
        decode(m, prompt, seg, 2, 1, image_part(m.vocab), SamplingParams(guidance=2.0))
    with pytest.raises(ValueError, match="guidance"):
        SamplingParams(guidance=-1.0)


def test_temperature_zero_is_greedy() -> None:
    m = tiny()
    text = random_text(m, 2)
    assert torch.equal(generate_images(m, text, 2, temperature=0.0, seed=5), generate_images(m, text, 2, greedy=True))


def test_prefill_once_per_prompt_group_and_one_token_steps() -> None:
    m = tiny()
    text = random_text(m, 3)
    calls: list[int] = []
    # every forward pass embeds its tokens once: the embedding sees how many are fed
    h = m.tok_emb.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    try:
        # batch 12 >= 3 prompts x 4 candidates: one group, one prefill, one chunk.
        generate_images(m, text, 4, seed=0, batch_size=12)
        P, n = m.cfg.text_len + 2, m.cfg.image_len
        assert calls == [P] + [1] * (n - 1)
        calls.clear()
        # batch 4: one prompt per group (3 prefills), all 4 candidates in one chunk each.
        generate_images(m, text, 4, seed=0, batch_size=4)
        assert calls.count(P) == 3 and calls.count(1) == 3 * (n - 1) and len(calls) == 3 + 3 * (n - 1)
        calls.clear()
        # batch 2: one prompt per group, candidates in two chunks of 2 sharing that prefill.
        generate_images(m, text, 4, seed=0, batch_size=2)
        assert calls.count(P) == 3 and calls.count(1) == 6 * (n - 1)
    finally:
        h.remove()


# ------------------------------------------------------------------------------------------
# masks


def _hostile(m: BiART, bad: torch.Tensor) -> BiART:
    """Scale the head rows of the ``bad`` tokens so that unmasked sampling would draw them often."""
    with torch.no_grad():
        m.head.weight[bad] *= 40
    return m


def test_masks_image_part_only_image_codes() -> None:
    m = tiny(3)
    v = m.vocab
    _hostile(m, ~v.image_mask())  # text ids and specials (PAD/SOC/SOI) pushed up
    text = random_text(m, 4)
    prompt, seg = m.build_prompt(text, "t2i")
    args = (SamplingParams(temperature=3.0), torch.Generator().manual_seed(0), 64)
    ids = decode(m, prompt, seg, m.cfg.image_len, 50, image_part(v), *args)
    assert ids.shape == (4, 50, m.cfg.image_len)
    assert bool(v.is_image(ids).all())
    assert ids.unique().numel() > m.cfg.num_image_codes // 2  # not a degenerate draw
    # The same draw without the mask does produce invalid ids: the mask is what stops them.
    free = TargetPart(torch.ones(v.size, dtype=torch.bool))
    assert not bool(v.is_image(decode(m, prompt, seg, m.cfg.image_len, 50, free, *args)).all())


def test_masks_text_part_and_pad_after_end() -> None:
    m = tiny(4)
    v = m.vocab
    bad = ~v.text_mask(allow_pad=True)
    _hostile(m, bad)  # image codes and SOC/SOI pushed up (PAD left alone: it is valid here)
    codes = random_codes(m, 4)
    ids = generate_captions(m, codes, 60, max_text_tokens=6, eot_id=EOT, temperature=3.0, seed=0)
    assert bool((v.is_text(ids) | (ids == v.pad)).all())
    ended = (ids == v.pad) | (ids == v.text_start + EOT)
    seen_end = torch.cumsum(ended.long(), -1) > 0
    after_end = torch.zeros_like(seen_end)
    after_end[..., 1:] = seen_end[..., :-1]
    assert bool((ids[after_end] == v.pad).all())
    assert bool((ids == v.text_start + EOT).any()), "eot never drawn: the test would not exercise the rule"
    assert bool(after_end.any()) and bool((~after_end).any())
    # Without an eot id only PAD ends a row; eot is then an ordinary text id.
    ids2 = generate_captions(m, codes, 20, max_text_tokens=6, temperature=3.0, seed=0)
    assert bool((v.is_text(ids2) | (ids2 == v.pad)).all())
    # Unmasked, the same model draws invalid ids.
    prompt, seg = m.build_prompt(codes, "i2t")
    free = TargetPart(torch.ones(v.size, dtype=torch.bool))
    raw = decode(m, prompt, seg, 6, 20, free, SamplingParams(temperature=3.0), torch.Generator().manual_seed(0))
    assert bool(bad[raw].any())


def test_filter_logits_mask_before_topk_and_topp() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    allowed = torch.tensor([False, True, True, True, True, False])
    x = filter_logits(logits, allowed, top_k=2)
    assert torch.isinf(x).tolist() == [[True, False, False, True, True, True]]
    # top-p over the allowed tokens [4, 3, 2, 1]: probs ~ .644, .237, .087, .032
    p = torch.softmax(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0)
    x = filter_logits(logits, allowed, top_p=float(p[0]) + 1e-4)  # needs the 2nd token to reach p
    assert torch.isfinite(x).tolist() == [[False, True, True, False, False, False]]
    x = filter_logits(logits, allowed, top_p=float(p[0]) - 1e-4)  # the first token alone reaches p
    assert torch.isfinite(x).tolist() == [[False, True, False, False, False, False]]
    # temperature divides the surviving logits
    x = filter_logits(logits, allowed, temperature=2.0)
    assert torch.allclose(x[0, 1:5], torch.tensor([2.0, 1.5, 1.0, 0.5]))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)


def test_sample_from_logits_topk_support_and_frequencies() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, -1)
    s = sample_from_logits(logits, None, SamplingParams(top_k=2), g)
    assert set(s.unique().tolist()) == {0, 1}
    freq = torch.bincount(s, minlength=4).float() / s.numel()
    assert abs(float(freq[0]) - 0.5 / 0.8) < 0.02


# ------------------------------------------------------------------------------------------
# seeds


def test_same_seed_same_output_different_seed_different() -> None:
    m = tiny(5)
    text = random_text(m, 2)
    a = generate_images(m, text, 8, temperature=2.0, seed=11, batch_size=4)
    b = generate_images(m, text, 8, temperature=2.0, seed=11, batch_size=4)
    c = generate_images(m, text, 8, temperature=2.0, seed=12, batch_size=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Candidates of one prompt differ from each other (they are independent draws).
    assert len({tuple(r.tolist()) for r in a[0]}) > 4
    codes = random_codes(m, 2)
    x = generate_captions(m, codes, 8, max_text_tokens=6, eot_id=EOT, temperature=2.0, seed=3)
    y = generate_captions(m, codes, 8, max_text_tokens=6, eot_id=EOT, temperature=2.0, seed=3)
    z = generate_captions(m, codes, 8, max_text_tokens=6, eot_id=EOT, temperature=2.0, seed=4)
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_decode_restores_training_mode_and_checks_args() -> None:
    m = tiny()
    m.train()
    generate_images(m, random_text(m, 1), 1, seed=0)
    assert m.training
    with pytest.raises(ValueError, match="max_text_tokens"):
        generate_captions(m, random_codes(m, 1), 1, max_text_tokens=m.cfg.text_len + 1)
    with pytest.raises(ValueError, match="candidates"):
        generate_images(m, random_text(m, 1), 0)
    with pytest.raises(ValueError, match="text ids"):
        generate_images(m, random_codes(m, 1)[:, : m.cfg.text_len], 1)  # image codes as text


# ------------------------------------------------------------------------------------------
# captions


def test_truncate_caption() -> None:
    assert truncate_caption("a red circle . a red circle .") == "a red circle"
    assert truncate_caption("no full stop here") == "no full stop here"
    assert truncate_caption(". starts with one") == ""


def test_decode_captions_and_pad() -> None:
    from lverse.tokenizer import TextTokenizer

    tok = TextTokenizer.train(["a red circle", "a blue square . a blue square"] * 3, vocab_size=560)
    m = tiny(num_text_tokens=tok.vocab_size)
    v = m.vocab
    rows = [tok.encode("a red circle . a red circle") + [tok.eot_id], tok.encode("a blue square")]
    L = 12
    ids = torch.full((2, L), v.pad)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r) + v.text_start
    assert decode_captions(tok, v, ids) == ["a red circle", "a blue square"]
    assert decode_captions(tok, v, ids, truncate=False)[0] == "a red circle . a red circle"
    nested = decode_captions(tok, v, ids.view(1, 2, L))
    assert nested == [["a red circle", "a blue square"]]
    tid = caption_token_ids(v, ids)
    assert tid[1, len(rows[1]):].eq(-1).all() and tid[0, 0].item() == rows[0][0]
    padded = pad_captions(v, ids[:, :5], 8)
    assert padded.shape == (2, 8) and bool((padded[:, 5:] == v.pad).all())
    assert math.isfinite(float(padded.float().sum()))


# ------------------------------------------------------------------------------------------
# fast decoding: bf16 cache, fixed-shape (compiled) step, deferred end check, Gumbel-max draws


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_fast_decoder_options_give_the_reference_greedy_tokens(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 key/value cache for the fp32 model, and the fixed-shape step that torch.compile
    traces (run eagerly here: compiling takes ~30 s on a CPU), write the reference decoder's
    greedy tokens."""
    m = tiny(2, scale=10)
    if direction == "t2i":
        prompt, seg = m.build_prompt(random_text(m, 3), "t2i")
        n, part = m.cfg.image_len, image_part(m.vocab)
    else:
        prompt, seg = m.build_prompt(random_codes(m, 3), "i2t")
        n, part = 6, text_part(m.vocab, EOT)
    greedy = SamplingParams(greedy=True)
    ref = decode(m, prompt, seg, n, 2, part, greedy, use_cache=False)
    assert len({tuple(r.tolist()) for r in ref[:, 0]}) == 3
    compiled: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr("lverse.inference.step._COMPILED", {})
    for kw in (dict(cache_dtype=torch.bfloat16), dict(compile_step=True),
               dict(compile_step=True, cache_dtype=torch.bfloat16)):
        assert torch.equal(decode(m, prompt, seg, n, 2, part, greedy, batch_size=3, **kw), ref), kw
    assert compiled == [{"mode": None, "dynamic": False}]  # compiled once, reused by every chunk and call


@pytest.mark.skipif(not os.environ.get("LVERSE_TEST_COMPILE"), reason="set LVERSE_TEST_COMPILE=1 (compiles ~30 s)")
def test_compiled_step_gives_the_reference_greedy_tokens() -> None:
    m = tiny(2, scale=10)
    prompt, seg = m.build_prompt(random_text(m, 2), "t2i")
    greedy, part = SamplingParams(greedy=True), image_part(m.vocab)
    ref = decode(m, prompt, seg, m.cfg.image_len, 1, part, greedy, use_cache=False)
    assert torch.equal(decode(m, prompt, seg, m.cfg.image_len, 1, part, greedy, compile_step=True), ref)


def test_deferred_end_check_gives_the_same_captions_and_generator_state() -> None:
    """Checking for ended captions every few steps (what spares a GPU a host sync per step)
    gives the tokens, and leaves the generator in the state, of a check at every step, also
    for the chunks decoded after one that ended early."""
    m = tiny(4)
    v = m.vocab
    _hostile(m, torch.arange(v.size) == v.text_start + EOT)  # rows end after a token or two
    prompt, seg = m.build_prompt(random_codes(m, 3), "i2t")
    part, params = text_part(v, EOT), SamplingParams(temperature=1.5)
    runs = []
    for every in (1, 3, 50):
        g, calls = torch.Generator().manual_seed(7), []
        out = decode(m, prompt, seg, 6, 4, part, params, g, batch_size=6, sync_every=every, progress=calls.append)
        runs.append((out, torch.rand(4, generator=g), sum(calls)))
        if every == 1:  # some chunk really ended before its last step (its rest reported at once)
            assert any(c > 6 for c in calls)
    for out, after, total in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(after, runs[0][1]) and total == runs[0][2] == 3 * 4 * 6


def test_gumbel_draw_follows_the_distribution_chi_square() -> None:
    """Gumbel-max draws (pre-drawn noise, as the decoder uses it) against the filtered
    distribution: a chi-square test at the 0.1% level with a fixed seed. A draw from the wrong
    distribution (e.g. the unfiltered one, or uniform noise) fails it by far."""
    from lverse.inference.step import GumbelNoise

    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02])
    logits = torch.log(probs)[None].expand(20000, -1)
    allowed = torch.tensor([True, True, True, True, True, True, False])
    params = SamplingParams(temperature=1.3, top_k=5, draw="gumbel")
    expect = torch.softmax(filter_logits(logits[:1], allowed, 1.3, 5)[0], 0)
    assert expect[5:].sum() == 0  # top-k 5 of the 6 allowed: the last two never drawn
    g = torch.Generator().manual_seed(0)

    def chi2(s: torch.Tensor, p: torch.Tensor) -> float:
        n, k = torch.bincount(s, minlength=7).double(), p.double() * s.numel()
        assert float(n[k == 0].sum()) == 0
        return float(((n - k)[k > 0] ** 2 / k[k > 0]).sum())

    noise = GumbelNoise(20000, 7, g, torch.device("cpu"), block=2)
    for s in (sample_from_logits(logits, allowed, params, g),
              sample_from_logits(logits, allowed, params, noise=noise.next()),
              sample_from_logits(logits, allowed, params, noise=noise.next())):
        assert chi2(s, expect) < 18.47  # 4 degrees of freedom, p = 0.001
    uniform = (filter_logits(logits, allowed, 1.3, 5) + torch.rand(20000, 7, generator=g)).argmax(-1)
    assert chi2(uniform, expect) > 1000
    with pytest.raises(ValueError, match="draw"):
        SamplingParams(draw="fast")
