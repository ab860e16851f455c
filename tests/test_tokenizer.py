"""Tests for lverse.tokenizer: CLIP parity, dropout, batching/truncation, training, files.

The reference is open_clip's own ``SimpleTokenizer`` (pure Python, built from the same merges
file that ships inside the installed open_clip package), so nothing touches the network.
"""
from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from open_clip import tokenizer as oc_tok
from tokenizers import Tokenizer, pre_tokenizers

from lverse.tokenizer import TextTokenizer, bytes_to_unicode, find_clip_bpe_file

# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.clip()


@pytest.fixture(scope="module")
def ref() -> oc_tok.SimpleTokenizer:
    return oc_tok.SimpleTokenizer()


LONG_TEXT = " ".join(
    ["A very long caption about a dog, a cat & 3 birds (don't ask) near the café 東京."] * 60
)

CASES: dict[str, str] = {
    "plain": "A photo of a cat sitting on a red couch",
    "plain2": "two giraffes standing next to each other in a field",
    "punct": "Wait... what?! (yes) -- no; [ok] {fine} <tag> a/b \\ c @home #1 $5 %50 ^_^ ~ `x`",
    "digits": "1234567 and 3.14 and 1,000,000 and 2nd 3rd 10th",
    "contractions": "don't we'll it's they're I've I'm she'd can't WON'T",
    "curly_apostrophe": "don’t we’ll “quoted” ‘single’",
    "accents": "café naïve résumé Ångström jalapeño façade",
    "cjk": "東京タワーの写真 一只猫在沙发上 한국어 문장",
    "cyrillic": "Привет, мир! Кошка сидит на диване.",
    "arabic": "مرحبا بالعالم قطة على الأريكة",
    "hebrew_thai_devanagari": "שלום עולם สวัสดีครับ नमस्ते दुनिया",
    "mojibake": "cafÃ© â€™ Ã¼ber â€œquotedâ€\x9d",
    "emoji": "a dog 🐶 and a cat 🐱 🔥🔥🔥",
    "zwj": "family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 skin 👍🏽 keycap 1️⃣",
    "html": "Tom &amp;amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39; &nbsp;end &eacute;",
    "whitespace": "  lots   of\t\tspace \n\n and\r\nnewlines\u3000ideographic\u00a0nbsp  ",
    "empty": "",
    "only_space": " \t\n ",
    "case": "ÜBER StraSSe İstanbul ǅemal ΣΊΣΥΦΟΣ",
    "ligature_fold": "'ſ ﬁne ﬅ \u0345 K",
    "controls": "a\x00b\x07c\x1cd\u200be\ufefff\u202eg",
    "specials_literal": "x<end_of_text>y <start_of_text> (<end_of_text>) <END_OF_TEXT>",
    "eow_literal": "a</w>b </w>",
    "fullwidth": "ＡＢＣ１２３！",
    "math": "∑ x² ≤ ∞ ½ ① Ⅻ 𝔸𝕓𝒸",
    "lone_surrogate": "a\ud800b \udce9",
    "long": LONG_TEXT,
}


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing words, punctuation, digits, contractions, scripts and emoji."""
    rng = random.Random(seed)
    pieces = [
        "hello", "Photo", "of", "DON'T", "we'll", "it's", "1234567", "3.14", "cafÃ©", "â€™",
        "&amp;amp;", "&lt;", "👨‍👩‍👧", "🏳️‍🌈", "🐶", "日本語", "Привет", "مرحبا", "naïve",
        "  ", "\t", "\n", "...", "!?", "<end_of_text>", "ß", "ﬁ", "'ſ", "’s", "\u200d", "\ufe0f",
    ]
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x2100, 0x22FF), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x0, 0x1F),
              (0x300, 0x36F), (0x10000, 0x2FFFF)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 14)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(pieces))
            elif r < 0.8:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(" ,.'-"))
        out.append("".join(parts))
    return out


# ------------------------------------------------------------------------------------------
# CLIP vocabulary and parity with open_clip
# ------------------------------------------------------------------------------------------


def test_byte_table_is_clips_and_tokenizers(ref: oc_tok.SimpleTokenizer) -> None:
    table = bytes_to_unicode()
    assert list(table.items()) == list(oc_tok.bytes_to_unicode().items())  # same order too
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert len(set(table.values())) == 256


def test_merges_file_is_open_clips() -> None:
    p = find_clip_bpe_file()
    assert p.samefile(oc_tok.default_bpe())


def test_clip_vocabulary_equals_open_clip(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer) -> None:
    assert tok.vocab_size == len(tok) == 49408 == ref.vocab_size
    assert (tok.sot_id, tok.eot_id) == (ref.sot_token_id, ref.eot_token_id) == (49406, 49407)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == [ref.decoder[i] for i in range(49408)]
    assert tok.token_to_id("cat</w>") == ref.encoder["cat</w>"]
    assert tok.PAD == -1


@pytest.mark.parametrize("name", list(CASES))
def test_ids_equal_open_clip(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer, name: str) -> None:
    text = CASES[name]
    assert tok.clean(text) == oc_tok._clean_lower(text)
    assert tok.encode(text) == ref.encode(text)


def test_ids_equal_open_clip_random(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer) -> None:
    texts = _random_texts(400, seed=1234)
    want = [ref.encode(t) for t in texts]
    # The batch path (what training uses) and the single-text path must both agree.
    batch = tok.encode_batch(texts, length=256, add_eot=False)
    for i, (t, w) in enumerate(zip(texts, want)):
        got = [x for x in batch[i].tolist() if x != tok.PAD]
        assert got == w, f"text {t!r}"
    for t, w in zip(texts[:100], want[:100]):
        assert tok.encode(t) == w, f"text {t!r}"


def test_specials_in_text_behave_like_open_clip(tok: TextTokenizer) -> None:
    # open_clip matches its special names where a token may start, not after punctuation.
    assert tok.encode("a<end_of_text>b") == [320, tok.eot_id, 321]
    assert tok.eot_id not in tok.encode("(<end_of_text>")


def test_clean_text_examples(tok: TextTokenizer) -> None:
    assert tok.clean("  Tom &amp;amp; JERRY\n\n cafÃ©  ") == "tom & jerry café"
    assert tok.clean("") == ""


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CASES if n != "specials_literal"])
def test_decode_round_trip(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer, name: str) -> None:
    text = CASES[name]
    ids = tok.encode(text)
    # ids keep the pre-tokens, not whether a space stood between them: "cat." -> "cat ."
    assert tok.decode(ids) == " ".join(tok.pretokenize(text))
    assert tok.decode(ids) == ref.decode(ids).strip()


def test_decode_gives_clean_text_back_for_spaced_words(tok: TextTokenizer) -> None:
    for text in ["A  Photo of a CAT", "Ünïcödé wörds ĸ 東京", "Tom &amp;amp; Jerry", "emoji 🐶 here"]:
        assert tok.decode(tok.encode(text)) == tok.clean(text)


def test_decode_stops_at_eot_and_skips_pad_and_sot(tok: TextTokenizer) -> None:
    ids = tok.encode("a photo of a cat")
    other = tok.encode("never shown")
    seq = [tok.sot_id] + ids[:2] + [tok.PAD] + ids[2:] + [tok.eot_id] + other + [tok.PAD]
    assert tok.decode(seq) == "a photo of a cat"
    assert tok.decode(torch.tensor(seq)) == "a photo of a cat"
    batch = tok.encode_batch(["a photo of a cat", "", "two dogs"], length=12)
    assert tok.decode_batch(batch) == ["a photo of a cat", "", "two dogs"]


def test_decode_invalid_utf8_is_replaced(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer) -> None:
    ids = tok.encode("東")  # three bytes, several tokens; drop the last one to cut the character
    assert len(ids) > 1
    assert tok.decode(ids[:-1]) == ref.decode(ids[:-1]).strip()
    assert "\ufffd" in tok.decode(ids[:-1])


def test_decode_errors(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        tok.decode([5, 49408])
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# BPE dropout
# ------------------------------------------------------------------------------------------

DROP_TEXT = "unbelievably internationalization of photographers standing beneath skyscrapers"


def test_no_dropout_unless_asked(tok: TextTokenizer) -> None:
    base = tok.encode(DROP_TEXT)
    assert all(tok.encode(DROP_TEXT) == base for _ in range(50))
    assert all(tok.encode(DROP_TEXT, dropout=False) == base for _ in range(50))
    b = tok.encode_batch([DROP_TEXT] * 50, length=64)
    assert (b == b[0]).all()


def test_dropout_changes_segmentation_not_text(tok: TextTokenizer) -> None:
    # Without a seed every call draws afresh; with p=0.1 and ~40 merges in this text, 200 draws
    # all equal to the deterministic one has p < 1e-100.
    base = tok.encode(DROP_TEXT)
    draws = [tok.encode(DROP_TEXT, dropout=True) for _ in range(200)]
    assert sum(d != base for d in draws) > 100
    assert all(len(d) >= len(base) for d in draws)  # skipping merges only ever splits more
    clean = " ".join(tok.pretokenize(DROP_TEXT))
    assert all(tok.decode(d) == clean for d in draws)
    # The batch path uses dropout too, and switching it off again restores determinism.
    b = tok.encode_batch([DROP_TEXT] * 50, length=64, dropout=True)
    assert not (b == b[0]).all()
    assert tok.decode_batch(b) == [clean] * 50
    assert tok.encode(DROP_TEXT) == base


def test_dropout_follows_its_seed() -> None:
    """The trainer's resume is exact only if a caption's dropout follows a seed it controls:
    the same seed gives the same ids, in a batch or alone, and p = 0 is the library's BPE."""
    import random

    t = TextTokenizer.clip()
    texts = [DROP_TEXT, "A man riding a wave on top of a surfboard.", "naïve café — 東京 🚀 <end_of_text> it's"]
    a = t.encode_batch(texts, length=64, dropout=True, seeds=[1, 2, 3])
    assert torch.equal(a, t.encode_batch(texts, length=64, dropout=True, seeds=[1, 2, 3]))
    assert a[0].tolist()[: len(t.encode(DROP_TEXT, dropout=True, seed=1))] == t.encode(DROP_TEXT, dropout=True, seed=1)
    draws = {tuple(t.encode(DROP_TEXT, dropout=True, seed=s)) for s in range(30)}
    assert len(draws) > 10 and all(t.decode(list(d)) == " ".join(t.pretokenize(DROP_TEXT)) for d in draws)
    for text in texts:
        plain = [i for w in t.pretokenize(text) for i in t._bpe_dropout(w, 0.0, random.Random(0))]
        assert plain == t.encode(text)
    with pytest.raises(ValueError, match="seeds"):
        t.encode_batch(texts, dropout=True, seeds=[1])


def test_zero_dropout_is_deterministic() -> None:
    t = TextTokenizer.clip(dropout=0.0)
    base = t.encode(DROP_TEXT)
    assert all(t.encode(DROP_TEXT, dropout=True) == base for _ in range(20))
    assert all(t.encode(DROP_TEXT, dropout=0.0) == base for _ in range(20))
    # A float is the probability itself: p=0.5 splits far more than the default 0.1.
    assert sum(len(t.encode(DROP_TEXT, dropout=0.5)) for _ in range(20)) > 20 * len(base) + 40
    with pytest.raises(ValueError, match="dropout"):
        TextTokenizer.clip(dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        t.encode(DROP_TEXT, dropout=1.5)


# ------------------------------------------------------------------------------------------
# encode_batch: shape, end token, padding, truncation
# ------------------------------------------------------------------------------------------


def test_encode_batch_layout(tok: TextTokenizer) -> None:
    texts = ["a photo of a cat", "", "Two dogs, playing!"]
    out = tok.encode_batch(texts, length=10)
    assert out.shape == (3, 10) and out.dtype == torch.long
    for row, text in zip(out.tolist(), texts):
        ids = tok.encode(text)
        assert row == ids + [tok.eot_id] + [-1] * (10 - len(ids) - 1)
    no_eot = tok.encode_batch(texts, length=10, add_eot=False)
    for row, text in zip(no_eot.tolist(), texts):
        ids = tok.encode(text)
        assert row == ids + [-1] * (10 - len(ids))
    assert tok.encode_batch([], length=7).shape == (0, 7)


def test_encode_batch_truncation_warns_once(tok: TextTokenizer) -> None:
    ids = tok.encode("a photo of a cat")  # 5 tokens
    assert len(ids) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact fit (5 ids + end token) must not warn
        assert tok.encode_batch(["a photo of a cat"], length=6)[0].tolist() == ids + [tok.eot_id]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = tok.encode_batch(["a photo of a cat", "a photo of a cat", "a cat"], length=4)
    assert len(rec) == 1 and issubclass(rec[0].category, UserWarning)
    msg = str(rec[0].message)
    assert "2 of 3" in msg and "4 token(s) dropped" in msg  # (5+1-4) per long text
    assert out[0].tolist() == ids[:4] and out[1].tolist() == ids[:4]  # no end token kept
    assert out[2].tolist() == tok.encode("a cat") + [tok.eot_id, -1]
    with pytest.warns(UserWarning, match=r"1 of 1 .* 1 token\(s\) dropped"):
        assert tok.encode_batch(["a photo of a cat"], length=4, add_eot=False)[0].tolist() == ids[:4]


def test_encode_batch_long_text(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer) -> None:
    ids = ref.encode(LONG_TEXT)
    with pytest.warns(UserWarning, match=f"{len(ids) + 1 - 64} token"):
        out = tok.encode_batch([LONG_TEXT], length=64)
    assert out[0].tolist() == ids[:64]


def test_encode_batch_bad_arguments(tok: TextTokenizer) -> None:
    with pytest.raises(TypeError, match="one string"):
        tok.encode_batch("a photo")
    with pytest.raises(ValueError, match="length"):
        tok.encode_batch(["a photo"], length=0)
    with pytest.raises(TypeError, match="string"):
        tok.encode(123)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Trained (small-domain) vocabularies and files
# ------------------------------------------------------------------------------------------


def _shapes_captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star", "hexagon"]
    rels = ["left of", "right of", "above", "below", "next to"]
    sizes = ["small", "large", "tiny", "big"]
    return [
        f"A {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(rels)} "
        f"a {rng.choice(colors)} {rng.choice(shapes)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def shapes_tok() -> TextTokenizer:
    return TextTokenizer.train(_shapes_captions(), vocab_size=600)


def test_trained_vocab_size_and_round_trip(shapes_tok: TextTokenizer) -> None:
    t = shapes_tok
    assert 514 < t.vocab_size <= 600
    assert (t.sot_id, t.eot_id) == (t.vocab_size - 2, t.vocab_size - 1)
    caption = _shapes_captions(1, seed=99)[0]
    ids = t.encode(caption)
    assert len(ids) == len(t.pretokenize(caption))  # every word of the domain is one token
    assert t.decode(ids) == " ".join(t.pretokenize(caption))
    assert t.decode(t.encode("a red circle above a blue star")) == "a red circle above a blue star"
    # Bytes are all in the vocabulary, so text from outside the domain still round trips.
    odd = "Zebra 東京 🐶 naïve"
    assert t.decode(t.encode(odd)) == t.clean(odd)
    assert all(0 <= i < t.vocab_size for i in t.encode(odd))


def test_trained_vocab_size_is_exact_when_merges_suffice() -> None:
    caps = _shapes_captions()
    assert TextTokenizer.train(caps, vocab_size=520).vocab_size == 520
    assert TextTokenizer.train(caps, vocab_size=5000).vocab_size <= 5000
    with pytest.raises(ValueError, match="too small"):
        TextTokenizer.train(caps, vocab_size=300)
    with pytest.raises(TypeError, match="strings"):
        TextTokenizer.train(["ok", 3], vocab_size=600)  # type: ignore[list-item]


def test_trained_dropout(shapes_tok: TextTokenizer) -> None:
    text = "a large purple hexagon right of a small orange triangle"
    base = shapes_tok.encode(text)
    draws = [shapes_tok.encode(text, dropout=True) for _ in range(100)]
    assert any(d != base for d in draws)
    assert all(shapes_tok.decode(d) == text for d in draws)


@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_trained(shapes_tok: TextTokenizer, tmp_path, as_file: bool) -> None:
    target = tmp_path / ("tok.json" if as_file else "tokdir")
    where = shapes_tok.save(target)
    loaded = TextTokenizer.load(where)
    assert loaded.vocab_size == shapes_tok.vocab_size
    assert (loaded.sot_id, loaded.eot_id, loaded.dropout_p) == (shapes_tok.sot_id, shapes_tok.eot_id, 0.1)
    texts = _shapes_captions(20, seed=5) + list(CASES.values())
    assert [loaded.encode(t) for t in texts] == [shapes_tok.encode(t) for t in texts]
    assert torch.equal(loaded.encode_batch(texts[:20]), shapes_tok.encode_batch(texts[:20]))
    assert [loaded.id_to_token(i) for i in range(loaded.vocab_size)] == [
        shapes_tok.id_to_token(i) for i in range(shapes_tok.vocab_size)
    ]


def test_saved_tokenizer_json_is_usable_by_tokenizers(shapes_tok: TextTokenizer, tmp_path) -> None:
    d = shapes_tok.save(tmp_path / "tok")
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = "A tiny Green star below a big square."
    assert hf.encode(" ".join(shapes_tok.pretokenize(text))).ids == shapes_tok.encode(text)


def test_save_load_clip(tok: TextTokenizer, ref: oc_tok.SimpleTokenizer, tmp_path) -> None:
    loaded = TextTokenizer.load(tok.save(tmp_path / "clip"))
    assert loaded.vocab_size == 49408
    for text in (CASES["plain"], CASES["zwj"], CASES["contractions"]):
        assert loaded.encode(text) == ref.encode(text)
    again = TextTokenizer.from_str(tok.to_str())
    assert again.encode(CASES["punct"]) == ref.encode(CASES["punct"])


def test_load_errors(shapes_tok: TextTokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks text_tokenizer.json"):
        TextTokenizer.load(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        TextTokenizer.load(bad)
    d = json.loads(shapes_tok.to_str())
    d["clean"] = "something-else"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="clean"):
        TextTokenizer.load(bad)
