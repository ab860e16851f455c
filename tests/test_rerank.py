"""Rerankers (lverse.inference.rerank, lverse.inference.reconstruct): likelihood (cycle) scores against a plain
full-forward reference, a tiny trained BiART ranking true pairs first by likelihood and by reconstruction
(Insights I and II), the CLIP reranker on a tiny random open_clip, z-score fusion, the family names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from types import SimpleNamespace

from lverse.inference.reconstruct import GREEDY, ReconstructReranker, code_agreement, latent_similarity, token_f1
from lverse.inference.rerank import (
    ClipReranker,
    CycleReranker,
    LikelihoodReranker,
    check_reranker,
    combine_scores,
    conditional_logprob,
    parse_reranker,
    uses_clip,
    without_clip,
    zscore,
)
from lverse.models.biart import BiART, BiARTConfig

TINY = dict(num_image_codes=16, num_text_tokens=40, text_len=6, image_len=9, n_layer=2, n_head=4, n_embd=32)


def _random_model() -> BiART:
    torch.manual_seed(0)
    m = BiART(BiARTConfig(**TINY)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5)  # make the log-probabilities depend on the inputs
    return m


def _reference_scores(m: BiART, text: torch.Tensor, codes: torch.Tensor, direction: str) -> torch.Tensor:
    """Mean log p(GEN target tokens) from one plain forward pass over the whole sequence."""
    v = m.vocab
    idx, seg = m.build_sequence(text, codes, direction)
    with torch.no_grad():
        logp = F.log_softmax(m(idx, seg).float(), -1)
    lp = logp[:, :-1].gather(-1, idx[:, 1:, None]).squeeze(-1)
    tgt, tseg = idx[:, 1:], seg[:, 1:]
    counted = (tseg == 1) & (v.is_image(tgt) if direction == "t2i" else v.is_text(tgt))
    return (lp * counted).sum(1) / counted.sum(1)


def test_conditional_logprob_equals_full_forward_reference() -> None:
    m = _random_model()
    v = m.vocab
    g = torch.Generator().manual_seed(0)
    text = torch.randint(v.text_start, v.special_start, (5, m.cfg.text_len), generator=g)
    text[0, 2:] = v.pad  # short captions: PAD is not counted
    text[1, 4:] = v.pad
    codes = torch.randint(0, m.cfg.num_image_codes, (5, m.cfg.image_len), generator=g)
    for direction, cond, target in (("t2i", text, codes), ("i2t", codes, text)):
        ref = _reference_scores(m, text, codes, direction)
        got = conditional_logprob(m, cond, target, direction, batch_size=2)
        assert got.shape == (5,)
        assert torch.allclose(got, ref, atol=1e-5), (direction, got, ref)
        # chunks of target positions (here one position at a time) change nothing
        assert torch.allclose(conditional_logprob(m, cond, target, direction, batch_size=2, max_logits=1), ref,
                              atol=1e-5)
        # batched == unbatched
        one = torch.cat([conditional_logprob(m, cond[i : i + 1], target[i : i + 1], direction) for i in range(5)])
        assert torch.allclose(got, one, atol=1e-5)
    r = CycleReranker(m, batch_size=3)
    assert torch.allclose(r.score_images(text[2], codes), _reference_scores(m, text[2:3].expand(5, -1), codes, "i2t"),
                          atol=1e-5)
    assert torch.allclose(r.score_captions(codes[1], text), _reference_scores(m, text, codes[1:2].expand(5, -1), "t2i"),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------
# a tiny trained model: image tokens are a deterministic function of the caption


NT, NI = 12, 12
EOT = NT - 1


def _pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of 3 tokens + eot; image codes 5*t_j + j (a bijection mod 12) and the sum."""
    t = torch.randint(0, EOT, (n, 3), generator=g)
    img = torch.cat([(5 * t + torch.arange(3)) % NI, t.sum(1, keepdim=True) % NI], 1)
    text = torch.cat([t, torch.full((n, 1), EOT)], 1) + NI  # BiART ids: text starts at NI
    return text, img


@pytest.fixture(scope="module")
def trained() -> BiART:
    cfg = BiARTConfig(num_image_codes=NI, num_text_tokens=NT, text_len=4, image_len=4, n_layer=2, n_head=2,
                      n_embd=64, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = BiART(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    # 200 steps: true pairs win 47-50 of 50 in either direction (model/data seeds 0-2; 150: 24-49)
    for step in range(200):  # both directions, alternately, as in stage 2
        text, img = _pairs(64, g)
        loss, _ = m.loss(*m.build_sequence(text, img, "t2i" if step % 2 == 0 else "i2t"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_cycle_ranks_true_pairs_first(trained: BiART) -> None:
    r = CycleReranker(trained, batch_size=16)
    g = torch.Generator().manual_seed(1)
    text, img = _pairs(50, g)
    wrong_text, wrong_img = _pairs(50, g)
    same = (wrong_text == text).all(1)
    cap_wins = img_wins = 0
    for i in range(50):
        s = r.score_captions(img[i], torch.stack([text[i], wrong_text[i]]))  # log p(image | caption)
        cap_wins += int(s[0] > s[1])
        s = r.score_images(text[i], torch.stack([img[i], wrong_img[i]]))  # log p(caption | image)
        img_wins += int(s[0] > s[1])
    n = 50 - int(same.sum())
    assert cap_wins >= 0.8 * n, cap_wins
    assert img_wins >= 0.8 * n, img_wins


class _TinyPipe:
    """What ReconstructReranker asks of a pipeline, for the tiny model (no AugVAE, no BPE): a
    caption's text is its tokenizer ids, space-separated; a random 8-d codebook."""

    def __init__(self, model: BiART) -> None:
        self.biart, self.vocab, self.text_len, self.device = model, model.vocab, model.cfg.text_len, model.device
        self.tokenizer = SimpleNamespace(eot_id=EOT)
        codebook = torch.randn(NI, 8, generator=torch.Generator().manual_seed(3))
        self.augvae = SimpleNamespace(quantizer=SimpleNamespace(embedding=codebook))

    def captions_to_text(self, ids: torch.Tensor) -> list:
        if ids.dim() > 1:
            return [self.captions_to_text(r) for r in ids]
        words = []
        for t in (ids - NI).tolist():
            if not 0 <= t < EOT:
                break
            words.append(str(t))
        return " ".join(words)

    def captions_to_ids(self, texts: list[str]) -> torch.Tensor:
        rows = [[int(w) for w in t.split()][: self.text_len - 1] + [EOT] for t in texts]
        return torch.tensor([[NI + t for t in r] + [self.vocab.pad] * (self.text_len - len(r)) for r in rows])


def test_reconstruction_ranks_true_pairs_first(trained: BiART) -> None:
    """Insight I: a caption is scored by the image drawn back from it (code agreement or codebook
    distance to the input image); Insight II: an image by the caption drawn back from it (token F1
    or embedding cosine to the prompt). The true pair wins in at least 80% of items."""
    pipe = _TinyPipe(trained)
    g = torch.Generator().manual_seed(1)
    text, img = _pairs(50, g)
    wrong_text, wrong_img = _pairs(50, g)
    n = 50 - int((wrong_text == text).all(1).sum())
    for option in ("tokens", "latent"):
        # greedy both ways: the tiny model's sampled images carry enough noise to tie a wrong caption's
        r = ReconstructReranker(pipe, image_params=GREEDY, seed=0, batch_size=16)
        cap_wins = sum(int((s := r.score_captions(option, img[i], torch.stack([text[i], wrong_text[i]])))[0] > s[1])
                       for i in range(50))
        img_wins = sum(int((s := r.score_images(option, text[i], torch.stack([img[i], wrong_img[i]])))[0] > s[1])
                       for i in range(50))
        assert cap_wins >= 0.8 * n and img_wins >= 0.8 * n, (option, cap_wins, img_wins, n)
    # k reconstructions per candidate: the mean of their similarities
    r3 = ReconstructReranker(pipe, samples=3, seed=0)
    got = r3.score_captions("tokens", img[0], text[:2])
    want = torch.stack([code_agreement(x["codes"], img[0].expand(3, -1)).mean() for x in r3.images_from_captions(text[:2])])
    assert r3.generated == 2 and torch.allclose(got, want)
    # the cache: a candidate met again is not generated again, and scores the same
    before = r.generated
    again = r.score_captions("tokens", img[0], torch.stack([text[0], text[0], wrong_text[0]]))
    assert r.generated == before and again[0] == again[1]


def test_reconstruction_similarities_by_hand() -> None:
    a = torch.tensor([[1, 2, 3, 4], [1, 1, 1, 1]])
    b = torch.tensor([[1, 2, 0, 4], [2, 2, 2, 2]])
    assert code_agreement(a, b).tolist() == [0.75, 0.0]
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    # row 0 differs at position 2 only: codes 3 vs 0 -> (3, 0) vs (0, 0): squared distance 9, mean 9/4
    assert latent_similarity(e, a, b)[0] == pytest.approx(-9 / 4)
    # F1 of multisets {5, 6, 6} and {6, 6, 7, 8}: overlap 2, sizes 3 + 4 -> 4/7; two empty rows: 1
    x = torch.tensor([[5, 6, 6, 0, 0], [0, 0, 0, 0, 0]])
    y = torch.tensor([[6, 7, 6, 8, 0], [0, 0, 0, 0, 0]])
    f1 = token_f1(x, y, x > 0, y > 0, 10)
    assert f1[0] == pytest.approx(4 / 7) and f1[1] == 1.0


def test_reranker_families_and_the_old_name() -> None:
    assert parse_reranker("none") == []
    assert parse_reranker("clip+cycle") == [("clip", "clip", None), ("cycle", "likelihood", None)]
    assert parse_reranker("likelihood+reconstruct:tokens") == [("likelihood", "likelihood", None),
                                                               ("reconstruct:tokens", "reconstruct", "tokens")]
    for bad, match in (("dino", "unknown reranker"), ("clip:x", "only reconstruct"), ("clip+clip", "twice"),
                       ("", "non-empty")):
        with pytest.raises(ValueError, match=match):
            parse_reranker(bad)
    assert uses_clip("clip+cycle") and uses_clip("reconstruct:clip") and not uses_clip("cycle+reconstruct")
    assert without_clip("clip+cycle") == "cycle" and without_clip("clip") == "cycle"
    assert without_clip("clip+reconstruct:clip") == "reconstruct" and without_clip("none") == "none"
    from lverse.inference.defaults import DEFAULTS, Sampling

    assert DEFAULTS["text_to_image"].rerank == DEFAULTS["image_to_text"].rerank == "clip+cycle"  # unchanged
    assert Sampling(rerank="clip+likelihood").with_clip(False).rerank == "likelihood"
    with pytest.raises(ValueError, match="rerank: unknown reranker"):
        Sampling(rerank="bogus")
    assert CycleReranker is LikelihoodReranker


def test_likelihood_is_cycle_under_its_new_name(trained: BiART) -> None:
    from lverse.inference.generate import Reranker

    pipe = _TinyPipe(trained)
    g = torch.Generator().manual_seed(2)
    text, img = _pairs(6, g)
    old = Reranker("cycle", pipe).images("", text[0], img, None)  # type: ignore[arg-type]
    new = Reranker("likelihood", pipe).images("", text[0], img, None)  # type: ignore[arg-type]
    assert set(old) == {"cycle", "score"} and set(new) == {"likelihood", "score"}
    assert torch.equal(old["cycle"], new["likelihood"]) and torch.equal(old["score"], new["score"])
    both = Reranker("cycle+reconstruct:tokens", pipe).images("", text[0], img, None)  # type: ignore[arg-type]
    assert torch.allclose(both["score"], combine_scores([both["cycle"], both["reconstruct:tokens"]]))


# ------------------------------------------------------------------------------------------
# CLIP


CLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def tiny_clip() -> torch.nn.Module:
    from lverse.inference.clip import build_open_clip

    torch.manual_seed(0)
    return build_open_clip(CLIP_CFG).eval()


def test_clip_scores_shapes_batching_and_cosine(tiny_clip: torch.nn.Module) -> None:
    images = torch.rand(5, 3, 24, 24) * 2 - 1  # not the model's size: resized to 32
    texts = ["a red circle", "a blue square", "two green triangles", "", "a circle left of a square"]
    r1 = ClipReranker(tiny_clip, "cpu", batch_size=2)
    r_all = ClipReranker(tiny_clip, "cpu", batch_size=64)
    s = r1.score(images, texts)
    assert s.shape == (5,)
    assert torch.allclose(s, r_all.score(images, texts), atol=1e-5)
    assert bool((s.abs() <= 1 + 1e-5).all())
    # score_images / score_texts are rows / columns of the same similarity matrix
    sim = r_all.embed_images(images) @ r_all.embed_texts(texts).T
    assert torch.allclose(r1.score_images(images, texts[1]), sim[:, 1], atol=1e-5)
    assert torch.allclose(r1.score_texts(images[2], texts), sim[2], atol=1e-5)
    assert torch.allclose(s, sim.diagonal(), atol=1e-5)
    # unit-norm embeddings of the model's own encoders
    with torch.no_grad():
        tok = r1.tokenizer(texts[:1])
        assert tok.shape == (1, 16)
        ref = F.normalize(tiny_clip.encode_text(tok), dim=-1)
    assert torch.allclose(r1.embed_texts(texts[:1]), ref, atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        r1.score(images, texts[:2])


def test_clip_file_roundtrip_and_missing_weights(tmp_path, tiny_clip: torch.nn.Module) -> None:
    from lverse.inference.clip import load_clip, save_clip

    path = save_clip(tmp_path, tiny_clip, CLIP_CFG, model_name="tiny")
    assert path.name == "clip.safetensors" and path.with_suffix(".json").is_file()
    model, meta = load_clip(tmp_path)
    assert meta["kind"] == "clip" and meta["model_name"] == "tiny"
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a", "b c", "d"]
    a = ClipReranker(tiny_clip).score(images, texts)
    b = ClipReranker(tmp_path / "clip.safetensors").score(images, texts)
    c = ClipReranker(model).score(images, texts)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*--rerank cycle"):
        ClipReranker.from_open_clip("ViT-B-32", tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------
# fusion


def test_zscore_and_combine() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([-10.0, -30.0, -20.0])
    za = (a - 2) / a.std(unbiased=False)
    assert torch.allclose(zscore(a), za)
    assert torch.equal(zscore(torch.tensor([4.0, 4.0])), torch.zeros(2))
    assert torch.equal(zscore(torch.tensor([4.0])), torch.zeros(1))
    comb = combine_scores([a, b])
    assert torch.allclose(comb, za + zscore(b))
    # scaling one score set does not change the fused result (units do not matter)
    assert torch.allclose(combine_scores([a * 100, b]), comb, atol=1e-5)
    with pytest.raises(ValueError, match="unknown reranker"):
        check_reranker("dino")
