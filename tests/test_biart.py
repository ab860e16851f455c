"""BiART: vocabulary/sequence layout, parameter count, causality, segments, KV cache, loss,
fp32 LayerNorm under fp16, optimiser groups and save/load. Tiny configs on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lverse.config import ConfigError
from lverse.models.biart import (
    GEN,
    REF,
    BiART,
    BiARTConfig,
    LayerNorm,
    build_prompt,
    build_sequence,
    describe,
    sequence_nll,
)
from lverse.train.optim import weight_decay_groups

TINY = dict(
    num_image_codes=16,
    num_text_tokens=40,
    text_len=6,
    image_len=9,
    n_layer=2,
    n_head=4,
    n_embd=32,
)


def tiny(**kw) -> BiART:
    torch.manual_seed(0)
    return BiART(BiARTConfig(**{**TINY, **kw}))


def random_pair(cfg: BiARTConfig, B: int, gen: torch.Generator, pad_from: list[int] | None = None):
    """Random BiART text ids (PAD after ``pad_from[b]``) and image codes."""
    v = cfg.vocab
    text = torch.randint(v.text_start, v.special_start, (B, cfg.text_len), generator=gen)
    if pad_from is not None:
        for b, n in enumerate(pad_from):
            text[b, n:] = v.pad
    image = torch.randint(0, cfg.num_image_codes, (B, cfg.image_len), generator=gen)
    return text, image


# ------------------------------------------------------------------------------------------
# layout


def test_paper_vocab_and_sequences():
    cfg = BiARTConfig()
    v = cfg.vocab
    assert (v.size, v.pad, v.soc, v.soi) == (57603, 57600, 57601, 57602)
    assert cfg.block_size == 64 + 1024 + 2
    g = torch.Generator().manual_seed(0)
    text, image = random_pair(cfg, 2, g, pad_from=[10, 64])

    idx, seg = build_sequence(cfg, text, image, "t2i")
    assert idx.shape == seg.shape == (2, 1090)
    assert (idx[:, 0] == v.soc).all() and (idx[:, 65] == v.soi).all()
    assert torch.equal(idx[:, 1:65], text) and torch.equal(idx[:, 66:], image)  # codes map to 0..8191
    assert (seg[:, :65] == REF).all() and (seg[:, 65:] == GEN).all()
    assert (idx[0, 11:65] == v.pad).all()

    idx, seg = build_sequence(cfg, text, image, "i2t")
    assert (idx[:, 0] == v.soi).all() and (idx[:, 1025] == v.soc).all()
    assert torch.equal(idx[:, 1:1025], image) and torch.equal(idx[:, 1026:], text)
    assert (seg[:, :1025] == REF).all() and (seg[:, 1025:] == GEN).all()

    # the prompt is the sequence's prefix, up to and including the second separator
    p, ps = build_prompt(cfg, image, "i2t")
    assert p.shape[1] == cfg.prompt_len("i2t") == 1026
    assert torch.equal(p, idx[:, :1026]) and torch.equal(ps, seg[:, :1026])


def test_sequence_errors():
    cfg = BiARTConfig(**TINY)
    g = torch.Generator().manual_seed(0)
    text, image = random_pair(cfg, 2, g)
    with pytest.raises(ValueError, match="text_to_global"):
        build_sequence(cfg, text - cfg.vocab.text_start, image, "t2i")  # raw tokenizer ids
    with pytest.raises(ValueError, match="image codes must lie"):
        build_sequence(cfg, text, image + cfg.num_image_codes, "t2i")
    with pytest.raises(ValueError, match="image_len=9"):
        build_sequence(cfg, text, image[:, :5], "i2t")
    with pytest.raises(ValueError, match="direction"):
        build_sequence(cfg, text, image, "x2y")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        BiARTConfig(n_embd=30, n_head=4)


def expected_params(cfg: BiARTConfig) -> int:
    """Closed form for a minGPT decoder with segment embedding and (un)tied head."""
    V, C, L, T = cfg.vocab.size, cfg.n_embd, cfg.n_layer, cfg.block_size
    b = 1 if cfg.bias else 0
    ln = C + b * C
    attn = (C * 3 * C + b * 3 * C) + (C * C + b * C)
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)
    emb = V * C + T * C + 2 * C
    head = 0 if cfg.tie_head else V * C
    return emb + L * (2 * ln + attn + mlp) + ln + head


def test_paper_parameter_count_on_meta():
    d = describe(BiARTConfig())
    assert d["params"] == expected_params(BiARTConfig()) == 522_170_368
    assert 515e6 < d["params"] < 530e6
    assert d["vocab_size"] == 57603 and d["block_size"] == 1090
    assert d["params"] == d["params_embeddings"] + d["params_blocks"] + d["params_head"] + 2 * 1024
    tied = describe({"tie_head": True})
    assert tied["params"] == d["params"] - 57603 * 1024 == expected_params(BiARTConfig(tie_head=True))
    # tiny configs, real allocation, both bias settings
    for kw in ({}, {"bias": False}, {"tie_head": True}):
        m = tiny(**kw)
        assert m.num_parameters() == expected_params(m.cfg)


# ------------------------------------------------------------------------------------------
# forward


@pytest.fixture(scope="module")
def model() -> BiART:
    return tiny().eval()


def batch(cfg: BiARTConfig, direction: str, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text, image = random_pair(cfg, B, g, pad_from=[2, 6, 4][:B])
    return build_sequence(cfg, text, image, direction)


def test_causality(model):
    cfg = model.cfg
    idx, seg = batch(cfg, "t2i")
    with torch.no_grad():
        base = model(idx, seg)
        for k in (3, 8, cfg.block_size - 1):
            idx2 = idx.clone()
            idx2[:, k] = (idx2[:, k] + 1) % cfg.num_image_codes
            seg2 = seg.clone()
            seg2[:, k:] = 1 - seg2[:, k:]
            out = model(idx2, seg2)
            torch.testing.assert_close(out[:, :k], base[:, :k], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, k], base[:, k], atol=1e-4)  # the change does register


def test_segments_matter(model):
    idx, seg = batch(model.cfg, "i2t")
    with torch.no_grad():
        a = model(idx, seg)
        b = model(idx, 1 - seg)
    assert (a - b).abs().amax(-1).min() > 1e-4  # every position sees its segment


def test_soft_tokens_equal_hard_tokens(model):
    idx, seg = batch(model.cfg, "t2i", B=2)
    onehot = F.one_hot(idx, model.vocab.size).float()
    with torch.no_grad():
        torch.testing.assert_close(model(onehot, seg), model(idx, seg), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_kv_cache_matches_full_forward(model, direction):
    cfg = model.cfg
    idx, seg = batch(cfg, direction)
    P = cfg.prompt_len(direction)
    with torch.no_grad():
        full = model(idx, seg)
        cache = model.new_cache(idx.shape[0])
        steps = [model(idx[:, :P], seg[:, :P], cache=cache, start_pos=0)]
        for t in range(P, cfg.block_size):
            steps.append(model(idx[:, t : t + 1], seg[:, t : t + 1], cache=cache, start_pos=t))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)

        # chunked prefill: a multi-token chunk after a cached prefix (non-square causal mask)
        cache = model.new_cache(idx.shape[0])
        a = model(idx[:, :5], seg[:, :5], cache=cache)
        b = model(idx[:, 5:12], seg[:, 5:12], cache=cache, start_pos=5)
        torch.testing.assert_close(torch.cat([a, b], 1), full[:, :12], atol=1e-5, rtol=0)
        # hidden states are the head's input: the head on the last one gives its logits
        h = model.hidden(idx[:, :P], seg[:, :P], cache=model.new_cache(idx.shape[0]))
        assert h.shape == (idx.shape[0], P, cfg.n_embd)
        torch.testing.assert_close(model.head(h[:, -1:]), full[:, P - 1 : P], atol=1e-5, rtol=0)


def test_cache_repeat_and_select(model):
    cfg = model.cfg
    idx, seg = batch(cfg, "t2i", B=2)
    P, n = cfg.prompt_len("t2i"), 3
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(idx[:, :P], seg[:, :P], cache=cache)
        cand = cache.repeat(n)
        assert cand.batch_size == 6
        # candidates continue with different image tokens: compare with full forwards
        cont = torch.randint(0, cfg.num_image_codes, (2 * n, cfg.block_size - P), generator=g)
        seqs = torch.cat([idx[:, :P].repeat_interleave(n, 0), cont], 1)
        segs = seg.repeat_interleave(n, 0)
        full = model(seqs, segs)
        outs = [model(seqs[:, t : t + 1], segs[:, t : t + 1], cache=cand, start_pos=t) for t in range(P, 12)]
        torch.testing.assert_close(torch.cat(outs, 1), full[:, P:12], atol=1e-5, rtol=0)
        # select: reorder rows, continue, and still match
        order = [5, 0, 3]
        sub = cand.select(order)
        out = model(seqs[order, 12:13], segs[order, 12:13], cache=sub, start_pos=12)
        torch.testing.assert_close(out, full[order, 12:13], atol=1e-5, rtol=0)
        # the original cache is untouched by the candidates' writes
        assert torch.equal(cache.k[:, :, :, :P], cand.k[:, ::n, :, :P])
        with pytest.raises(ValueError, match="batch"):
            model(seqs[:2, 12:13], segs[:2, 12:13], cache=cand, start_pos=12)
        with pytest.raises(ValueError, match="block_size"):
            model(idx[:, :2], seg[:, :2], cache=cache, start_pos=cfg.block_size - 1)
        with pytest.raises(ValueError, match="needs a cache"):
            model(idx[:, :2], seg[:, :2], start_pos=3)


# ------------------------------------------------------------------------------------------
# loss


def test_loss_masks_and_parts(model):
    cfg, v = model.cfg, model.vocab
    for direction in ("t2i", "i2t"):
        idx, seg = batch(cfg, direction)
        with torch.no_grad():
            logits = model(idx, seg)
        loss, st = sequence_nll(logits, idx, seg, v)
        # reference: per-position CE, averaged per part by hand
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, v.size), idx[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(idx.shape[0], -1)
        tgt, tseg = idx[:, 1:], seg[:, 1:]
        counted = tgt < v.special_start
        is_img = tgt < v.text_start
        ref, gen = counted & (tseg == REF), counted & (tseg == GEN)
        torch.testing.assert_close(st["nll_ref"], ce[ref].mean())
        torch.testing.assert_close(st["nll_gen"], ce[gen].mean())
        torch.testing.assert_close(st["nll_image"], ce[is_img].mean())
        torch.testing.assert_close(st["nll_text"], ce[counted & ~is_img].mean())
        torch.testing.assert_close(loss, ce[ref].mean() + ce[gen].mean())
        # text lengths 2, 6, 4 -> 12 text targets; every image token is a target
        assert int(st["n_text"]) == 12 and int(st["n_image"]) == 3 * cfg.image_len
        ref_is_text = direction == "t2i"
        assert int(st["n_ref"]) == (12 if ref_is_text else 3 * cfg.image_len)
        torch.testing.assert_close(st["nll_ref"], st["nll_text"] if ref_is_text else st["nll_image"])

        # logits at positions whose target is PAD or a separator do not matter, even inf/nan
        junk = logits.clone()
        excluded = torch.zeros_like(idx, dtype=torch.bool)
        excluded[:, :-1] = ~counted
        assert excluded.sum() > 3  # PADs and the separator
        junk[excluded] = torch.randn_like(junk[excluded]) * 50
        junk[:, -1] = float("nan")  # the last position predicts nothing
        b0, t0 = excluded.nonzero()[0].tolist()
        junk[b0, t0, 0] = float("inf")
        loss2, _ = sequence_nll(junk, idx, seg, v)
        torch.testing.assert_close(loss2, loss)
        # ...while a counted position does
        b1, t1 = counted.nonzero()[0].tolist()
        junk[b1, t1] += torch.randn(v.size)
        assert not torch.allclose(sequence_nll(junk, idx, seg, v)[0], loss)

    # weights and the model method agree with the pure function
    loss_w, st = model.loss(idx, seg, ref_weight=0.5, gen_weight=2.0)
    torch.testing.assert_close(loss_w, 0.5 * st["nll_ref"] + 2.0 * st["nll_gen"])
    # fp16 logits are upcast: same loss as from their fp32 copy
    h = logits.half()
    torch.testing.assert_close(sequence_nll(h, idx, seg, v)[0], sequence_nll(h.float(), idx, seg, v)[0])


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("modality", [False, True])
def test_head_nll_equals_reference_values_and_gradients(modality):
    """The chunked loss through the head (BiART.loss, head_nll) against sequence_nll on full
    logits: same loss, stats and gradients of every parameter, whatever the chunk size."""
    from lverse.models.loss import head_nll

    m = tiny(modality_softmax=modality).train()
    m.drop.p = 0.0  # no dropout, so both passes see the same network
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    m.blocks[0].attn.attn_pdrop = m.blocks[1].attn.attn_pdrop = 0.0
    v, params = m.vocab, list(m.parameters())
    for direction in ("t2i", "i2t"):
        idx, seg = batch(m.cfg, direction)
        ref_loss, ref_st = sequence_nll(m(idx, seg), idx, seg, v, 0.5, 2.0, modality_softmax=modality)
        ref_g = _grads(ref_loss, params)
        for chunk in (1, 7, 0):
            h = m.hidden(idx, seg)
            loss, st = head_nll(h, m.head.weight, idx, seg, v, 0.5, 2.0, modality, chunk)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
            for k in ref_st:
                torch.testing.assert_close(st[k], ref_st[k], rtol=1e-6, atol=1e-6)
            for a, b in zip(_grads(loss, params), ref_g):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # the model's method and its forward(loss_weights=) are this path; a scaled backward
        # (loss scaling, accumulation) scales the gradients
        loss, _ = m(idx, seg, loss_weights=(0.5, 2.0))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(_grads(3.0 * loss, params), ref_g):
            torch.testing.assert_close(a, 3.0 * b, rtol=1e-5, atol=1e-6)
    if modality:  # a restricted softmax gives each target more mass than the full one
        assert loss < sequence_nll(m(idx, seg), idx, seg, v, 0.5, 2.0)[0]


def test_head_nll_under_bf16_autocast():
    """Under autocast the head runs in bf16 like autocast's Linear, the softmax in fp32."""
    m = tiny(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    idx, seg = batch(m.cfg, "t2i")
    params = list(m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _ = sequence_nll(m(idx, seg), idx, seg, m.vocab)
        loss, _ = m.loss(idx, seg)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=2e-3)
    grads = _grads(loss, params)
    exact = _grads(sequence_nll(m(idx, seg), idx, seg, m.vocab)[0], params)  # fp32 throughout
    # bf16 rounds at other places than autocast's path does: each gradient is as close to the
    # fp32 one as the autocast reference's is (within bf16's own precision)
    for a, b, e in zip(grads, _grads(ref_loss, params), exact):
        scale = float(e.abs().max())
        assert float((a - e).abs().max()) <= 2 * float((b - e).abs().max()) + 4e-3 * scale
    head_grad = grads[[p is m.head.weight for p in params].index(True)]
    assert head_grad.dtype == torch.float32 and head_grad.abs().sum() > 0


def test_linear_cross_entropy_fp16_small_row_weights():
    """fp16 (the paper's O2), per-target weights of a big batch (1 / 69632: 64 sequences) and a
    loss scale applied after the forward pass: the fp16 gradients equal the fp32 computation's."""
    from lverse.models.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(40, 16, generator=g)
    w32 = torch.randn(50, 16, generator=g) * 0.3
    t = torch.randint(0, 50, (40,), generator=g)
    rw = torch.where(torch.arange(40) < 10, 1 / 69632, 0.5 / 69632)
    ref = [x.requires_grad_() for x in (h32.clone(), w32.clone())]
    (F.cross_entropy(ref[0] @ ref[1].t(), t, reduction="none") * rw).sum().backward()
    h16, w16 = (x.half().requires_grad_() for x in (h32, w32))
    loss, nll = linear_cross_entropy(h16, w16, t, rw, chunk=16)
    (loss * 1024).backward()  # a loss scale, as fp16-o2 applies it
    for got, want in ((h16.grad, ref[0].grad), (w16.grad, ref[1].grad)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float() / 1024, want, rtol=0.02, atol=0.01 * float(want.abs().max()))


def test_tiny_model_overfits_fixed_batch():
    m = tiny(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    text, image = random_pair(cfg, 4, g, pad_from=[3, 6, 5, 4])
    data = [build_sequence(cfg, text, image, d) for d in ("t2i", "i2t")]
    opt = torch.optim.AdamW(weight_decay_groups(m, 0.01), lr=3e-3, betas=(0.9, 0.95))
    m.train()
    first = None
    for step in range(100):
        idx, seg = data[step % 2]  # alternate directions as in the paper
        loss, st = m.loss(idx, seg)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        final = [m.loss(idx, seg)[0].item() for idx, seg in data]
    assert first > 6.0  # ~ 2 * ln(59) at init
    assert max(final) < 0.25 * first, (first, final)


# ------------------------------------------------------------------------------------------
# precision, optimiser groups, files


def test_layernorm_fp32_math_under_half():
    torch.manual_seed(0)
    ln = LayerNorm(32)
    nn.init.normal_(ln.weight, 1.0, 0.3)
    nn.init.normal_(ln.bias, 0.0, 0.3)
    ln = ln.half()
    x = (torch.randn(4, 7, 32) * 40 + 300).half()  # large offset: fp16 variance math would suffer
    ref = F.layer_norm(x.float(), (32,), ln.weight.float(), ln.bias.float(), ln.eps).half()
    out = ln(x)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref)


def test_cpu_bf16_attention_runs_in_fp32(monkeypatch):
    """On the CPU, bf16 autocast would send attention to a bf16 flash kernel whose backward is
    slow at short sequences; the model upcasts q/k/v and keeps autocast off for that call."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = tiny().eval()  # no dropout: the two forward passes below must be comparable
    text, image = random_pair(m.cfg, 2, torch.Generator().manual_seed(0))
    idx, seg = build_sequence(m.cfg, text, image, "t2i")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx, seg)
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16
    assert seen == [(torch.float32, torch.float32, torch.float32, False)] * m.cfg.n_layer
    ref = m(idx, seg)  # fp32 throughout
    assert (logits.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_half_and_o2_models():
    m32 = tiny().eval()
    idx, seg = batch(m32.cfg, "t2i")
    with torch.no_grad():
        ref = m32(idx, seg)

    o2 = tiny().eval().to_o2(torch.float16)
    fp32_names = {n for n, _ in o2.keep_fp32_modules()}
    assert fp32_names == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_f"}
    for name, p in o2.named_parameters():
        want = torch.float32 if name.rsplit(".", 1)[0] in fp32_names else torch.float16
        assert p.dtype == want, name
    assert o2.dtype == torch.float16 and o2.new_cache(2).k.dtype == torch.float16

    # Plain .half() (LayerNorm weights fp16 too) must still compute LayerNorm in fp32.
    half = tiny().eval().half()
    seen = []
    hooks = [
        mod.register_forward_hook(lambda mod, i, o: seen.append((mod, i[0], o)))
        for _, mod in half.keep_fp32_modules()
    ]
    try:
        with torch.no_grad():
            for model in (o2, half):  # fp16 matmul/SDPA on CPU: supported by torch >= 2.1
                out = model(idx, seg)
                assert out.dtype == torch.float16
                torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
                loss, _ = model.loss(idx, seg)
                assert loss.dtype == torch.float32
                torch.testing.assert_close(loss, m32.loss(idx, seg)[0], atol=5e-3, rtol=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) >= 5
    for mod, x, y in seen:
        assert x.dtype == y.dtype == torch.float16
        expect = F.layer_norm(x.float(), mod.normalized_shape, mod.weight.float(), mod.bias.float(), mod.eps)
        assert torch.equal(y, expect.half())


def test_param_groups():
    """Stage 2's groups (lverse.train.optim): decay the Linear weights only."""
    for tie in (False, True):
        m = tiny(tie_head=tie)
        decay, no_decay = weight_decay_groups(m, 0.01)
        assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
        ids = [id(p) for p in decay["params"] + no_decay["params"]]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))
        linear_w = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Linear)}
        emb_w = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Embedding)}
        assert {id(p) for p in decay["params"]} == linear_w - emb_w  # tied head: no decay
        assert all(p.dim() == 2 for p in decay["params"])
        assert emb_w <= {id(p) for p in no_decay["params"]}
        assert len(emb_w) == 3


def test_init_statistics():
    m = BiART(BiARTConfig(**{**TINY, "n_embd": 128, "n_layer": 8, "n_head": 4}))
    assert abs(m.tok_emb.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.fc.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2*8)
    assert abs(m.blocks[0].attn.proj.weight.std().item() - 0.02 / 4) < 5e-4
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.ln_f.weight == 1)


def test_save_load_roundtrip(tmp_path):
    for tie in (False, True):
        m = tiny(tie_head=tie).eval()
        path = m.save(tmp_path / f"biart_{tie}.safetensors")
        assert path.with_suffix(".json").is_file()
        m2 = BiART.load(path).eval()
        assert m2.cfg == m.cfg
        assert (m2.head.weight is m2.tok_emb.weight) == tie
        idx, seg = batch(m.cfg, "i2t")
        with torch.no_grad():
            assert torch.equal(m(idx, seg), m2(idx, seg))
    # O2 weights keep their dtypes through a round trip
    o2 = tiny().to_o2()
    m3 = BiART.load(o2.save(tmp_path / "o2.safetensors"))
    assert m3.dtype == torch.float16 and m3.ln_f.weight.dtype == torch.float32

    assert BiART.from_config({**TINY}).cfg == BiARTConfig(**TINY)
    with pytest.raises(ConfigError, match="n_layers"):
        BiART.from_config({"n_layers": 2})
    m.save(tmp_path / "bad.safetensors")
    (tmp_path / "bad.json").write_text('{"kind": "augvae", "config": {}}')
    with pytest.raises(ValueError, match="kind='biart'"):
        BiART.load(tmp_path / "bad.safetensors")
