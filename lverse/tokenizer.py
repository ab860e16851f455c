"""Text tokenizer: CLIP's byte-level BPE, with the BPE itself run by HuggingFace ``tokenizers``.

L-Verse's BiART reads and writes captions in CLIP's 49,408-token BPE vocabulary (docs/design.md §3.4).
:meth:`TextTokenizer.clip` rebuilds that vocabulary from the merges file the installed
``open_clip`` package ships, and its ids equal ``open_clip``'s own ``SimpleTokenizer`` on any
text. Small domains (the Shapes dataset) train their own BPE with :meth:`TextTokenizer.train`,
through the same clean-up, pre-tokenisation and special tokens.

The pipeline, step by step (CLIP's, in this order):

1. **Clean** (Python): ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse every run of
   whitespace to one space, lowercase. ftfy has no Rust equivalent, so this step stays in Python.
2. **Pre-tokenise** (Python): CLIP's regex — the special-token names, the English contractions
   (``'s 't 're 've 'm 'll 'd``), runs of letters, single digits, runs of anything else but
   whitespace — with the ``regex`` module and ``IGNORECASE``, as CLIP does. ``tokenizers`` could
   run a similar regex (its ``Split`` pre-tokenizer, on Oniguruma), but Oniguruma's Unicode
   tables and case folding differ from the ``regex`` module's on ~17k code points (newer scripts,
   combining marks that case-fold to letters such as U+0345), so the ids would drift from CLIP's
   on such text. The words are handed to ``tokenizers`` joined by single spaces, and its
   pre-tokenizer splits on that literal space only.
3. **Bytes → symbols** (``tokenizers``): each word's UTF-8 bytes are mapped to printable
   characters by the GPT-2/CLIP byte table (``pre_tokenizers.ByteLevel``, no prefix space, no
   regex): every byte is a symbol, so no text is ever out of vocabulary.
4. **BPE** (``tokenizers``): ``models.BPE`` with ``end_of_word_suffix="</w>"``: the last symbol
   of each word carries ``</w>``, then merges apply in rank order — exactly CLIP's ``bpe()``.
   BPE-dropout (0.1, docs/design.md §3.4), only when asked, runs in Python instead
   (:meth:`TextTokenizer._bpe_dropout`): ``tokenizers`` draws its dropout from a thread RNG that
   cannot be seeded, and training needs each caption's draw to follow a seed it controls (the
   sampler's, per item and epoch) so that a run is reproducible and a resumed run exact.

Vocabulary layout (CLIP's, reused for trained vocabularies): the 256 byte symbols, the same 256
with ``</w>``, one token per merge in merge order, then ``<start_of_text>`` and
``<end_of_text>``. ``open_clip`` names its specials so (OpenAI's CLIP wrote ``<|startoftext|>``;
the ids, 49406 and 49407, are the same). As in ``open_clip``, a caption that literally contains
``<end_of_text>`` encodes it as the special id: CLIP parity is kept on any text.

Decoding is CLIP's: ``</w>`` becomes a space, the bytes are decoded with ``errors="replace"``.
Pre-tokens are space-separated on the way back ("a cat." decodes to "a cat ."), because the
ids do not record whether a space stood between two pre-tokens.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import random
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import ftfy
import regex
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from lverse.files import atomic_write_text

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
EOW = "</w>"  # end-of-word suffix on the last symbol of every pre-token
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP reads merge lines 1..48894 of its file
CLIP_VOCAB_SIZE = 49408

FORMAT = "lverse.TextTokenizer"
FORMAT_VERSION = 1
HF_FILE = "tokenizer.json"  # the tokenizers library's own serialization
META_FILE = "text_tokenizer.json"  # what lverse adds: clean-up scheme, specials, dropout

# CLIP's pre-tokenisation regex. The special names are alternatives *first*, so they match
# wherever a token may start (not after punctuation, which the last branch swallows greedily).
_WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@lru_cache(maxsize=None)
def _pretokenize_regex(specials: tuple[str, ...]) -> "regex.Pattern[str]":
    alts = "|".join(regex.escape(s) for s in specials)
    return regex.compile(alts + "|" + _WORD_PATTERN, regex.IGNORECASE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte → printable-character table.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP,
    soft hyphen) are moved to U+0100.. in byte order, so that no BPE symbol is whitespace or a
    control character. ``tokenizers``' ``ByteLevel`` uses the same table.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table  # insertion order (printable bytes first) is CLIP's vocabulary order


def clean_text(text: str) -> str:
    """CLIP's 'lower' clean-up: fix mojibake, unescape HTML twice, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    # Twice, because scraped captions are often escaped twice ("&amp;amp;" -> "&").
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip()
    return text.lower()


def base_vocabulary() -> list[str]:
    """The 512 symbols every vocabulary starts with, in CLIP's order: the byte symbols in
    :func:`bytes_to_unicode`'s order (printable bytes first), then the same with ``</w>``."""
    syms = list(bytes_to_unicode().values())
    return syms + [s + EOW for s in syms]


def find_clip_bpe_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package."""
    # find_spec locates the package without importing it (open_clip's import pulls in timm etc.).
    spec = importlib.util.find_spec("open_clip")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in where:
        p = Path(d) / CLIP_BPE_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"CLIP's BPE merges file {CLIP_BPE_FILE} was not found "
        + (f"in open_clip's package directory {where}" if where else "(open_clip is not installed)")
        + "; install open_clip (pip install open_clip_torch) or pass its path: "
        "TextTokenizer.clip(bpe_path=...)"
    )


def read_clip_merges(path: str | Path) -> list[tuple[str, str]]:
    """CLIP's merges: lines 1..48894 of the gzipped file (line 0 is a version header)."""
    path = Path(path)
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as e:
        raise ValueError(f"{path}: not a readable gzipped BPE merges file ({e})") from None
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines[1 : CLIP_NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: expected a merge 'A B', got {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != CLIP_NUM_MERGES:
        raise ValueError(f"{path}: holds {len(merges)} merges, CLIP's vocabulary needs {CLIP_NUM_MERGES}")
    return merges


class TextTokenizer:
    """CLIP-style byte-level BPE text tokenizer (see the module docstring for the pipeline).

    ``encode`` gives ids without special tokens; ``encode_batch`` gives a ``(B, length)`` tensor of
    ids, then ``eot_id``, then ``PAD`` (-1, which BiART maps to its own PAD id through
    :meth:`lverse.vocab.VocabLayout.text_to_global`).
    """

    PAD: int = -1

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], dropout: float = 0.1) -> None:
        """Build from a BPE vocabulary (token → id, ids ``0..V-1``) and its ranked merges.

        ``dropout`` is the BPE-dropout probability used by ``encode(..., dropout=True)``.
        """
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE dropout must be in [0, 1), got {dropout}")
        ids = sorted(vocab.values())
        if ids != list(range(len(vocab))):
            raise ValueError(f"vocabulary ids must be 0..{len(vocab) - 1} without gaps or repeats")
        for name in (SOT_TOKEN, EOT_TOKEN):
            if name not in vocab:
                raise ValueError(f"vocabulary lacks the special token {name!r}")
        missing = [s for s in base_vocabulary() if s not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} of the 512 byte symbols, e.g. {missing[:3]}")

        self.vocab_size: int = len(vocab)
        self.sot_id: int = vocab[SOT_TOKEN]
        self.eot_id: int = vocab[EOT_TOKEN]
        self.dropout_p: float = float(dropout)
        self._vocab = dict(vocab)
        self._merges = [(str(a), str(b)) for a, b in merges]
        self._id_to_token: list[str] = [""] * self.vocab_size
        for tok, i in vocab.items():
            self._id_to_token[i] = tok
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._specials = (SOT_TOKEN, EOT_TOKEN)
        self._pattern = _pretokenize_regex(self._specials)
        self._tok = self._build()
        self._ranks: dict[tuple[str, str], int] | None = None  # merge -> rank, for dropout; built on first use

    def _build(self) -> Tokenizer:
        try:
            model = models.BPE(vocab=self._vocab, merges=self._merges, end_of_word_suffix=EOW, fuse_unk=False)
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"invalid BPE vocabulary/merges: {e}") from None
        tok = Tokenizer(model)
        # Input is the Python pre-tokens joined by single spaces (a pre-token never contains
        # U+0020): splitting on that literal space gives the words back, which is faster than
        # passing lists with is_pretokenized=True (one call per text, not per word).
        tok.pre_tokenizer = _split_then_bytes()
        # Registered as special added tokens so that a word equal to one of them maps to its id
        # instead of being byte-encoded (CLIP's SimpleTokenizer does this through its cache).
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in self._specials])
        return tok

    # --- constructors ---------------------------------------------------------------------
    @classmethod
    def clip(cls, bpe_path: str | Path | None = None, dropout: float = 0.1) -> "TextTokenizer":
        """CLIP's 49,408-token vocabulary, from the merges file shipped inside ``open_clip``."""
        path = Path(bpe_path) if bpe_path is not None else find_clip_bpe_file()
        merges = read_clip_merges(path)
        tokens = base_vocabulary() + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != CLIP_VOCAB_SIZE:
            raise ValueError(f"{path}: built {len(vocab)} distinct tokens, CLIP has {CLIP_VOCAB_SIZE}")
        return cls(vocab, merges, dropout=dropout)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, dropout: float = 0.1
    ) -> "TextTokenizer":
        """Learn a BPE on ``texts`` with CLIP's clean-up, pre-tokenisation and special tokens.

        The result has at most ``vocab_size`` tokens: the 512 byte symbols (so any text still
        encodes), up to ``vocab_size - 514`` merges, and the two specials. It has fewer when the
        corpus runs out of pairs seen ``min_frequency`` times.
        """
        n_base = len(base_vocabulary()) + 2
        if vocab_size < n_base:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level vocabulary needs {n_base} tokens "
                "(512 byte symbols with and without </w>, plus <start_of_text> and <end_of_text>)"
            )
        max_merges = vocab_size - n_base
        pattern = _pretokenize_regex((SOT_TOKEN, EOT_TOKEN))

        def words() -> Iterator[str]:
            # Joined on " " and split again on " " by tokenizers, as in encoding.
            for t in texts:
                if not isinstance(t, str):
                    raise TypeError(f"TextTokenizer.train expects strings, got {type(t).__name__}: {t!r}")
                ws = [w for w in pattern.findall(clean_text(t)) if w not in (SOT_TOKEN, EOT_TOKEN)]
                if ws:
                    yield " ".join(ws)

        trainer_tok = Tokenizer(models.BPE(end_of_word_suffix=EOW))
        trainer_tok.pre_tokenizer = _split_then_bytes()
        # The trainer counts the 256 bytes plus the "x</w>" symbols it has seen towards its
        # vocab_size; asking for 256 more than we keep guarantees at least max_merges merges,
        # and the first k merges of a BPE run are exactly what a k-merge run would learn.
        trainer = trainers.BpeTrainer(
            vocab_size=max_merges + 512,
            min_frequency=min_frequency,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=EOW,
            show_progress=False,
        )
        trainer_tok.train_from_iterator(words(), trainer=trainer)
        learned = _merges_from_hf_json(json.loads(trainer_tok.to_str()))[:max_merges]

        tokens = base_vocabulary()
        vocab = {t: i for i, t in enumerate(tokens)}
        for a, b in learned:
            vocab.setdefault(a + b, len(vocab))  # two merge paths may build the same string
        for s in (SOT_TOKEN, EOT_TOKEN):
            vocab[s] = len(vocab)
        return cls(vocab, learned, dropout=dropout)

    # --- text → ids -----------------------------------------------------------------------
    @staticmethod
    def clean(text: str) -> str:
        """The cleaned text the ids stand for (CLIP's clean-up)."""
        return clean_text(text)

    def pretokenize(self, text: str) -> list[str]:
        """Clean ``text`` and split it into CLIP's pre-tokens (each ends with ``</w>`` in BPE)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}: {text!r}")
        return self._pattern.findall(clean_text(text))

    def _dropout_p(self, dropout: bool | float) -> float:
        """``True`` means ``dropout_p``; a float is taken as the probability itself (0 = none)."""
        if isinstance(dropout, bool) or dropout in (0, 1) and isinstance(dropout, int):
            return self.dropout_p if dropout else 0.0
        p = float(dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BPE dropout must be a bool or a probability in [0, 1), got {dropout}")
        return p

    def _bpe_dropout(self, word: str, p: float, rng: random.Random) -> list[int]:
        """BPE-dropout (Provilkov et al., 2020) of one pre-token, every draw from ``rng``: start
        from the word's byte symbols (the last one with ``</w>``); then, again and again, keep each
        adjacent pair that has a merge with probability ``1 - p`` and apply the best-ranked kept one
        (its leftmost occurrence), until no pair is kept. With ``p = 0`` this is plain BPE, the same
        ids as ``tokenizers`` (a merge always ranks after the merges that built its parts)."""
        if word in self._specials:
            return [self._vocab[word]]
        if self._ranks is None:
            self._ranks = {}
            for r, pair in enumerate(self._merges):
                self._ranks.setdefault(pair, r)  # the first rank, as the BPE applies it
        ranks = self._ranks
        syms = [self._byte_encoder[b] for b in word.encode("utf-8")]
        syms[-1] += EOW
        while len(syms) > 1:
            best, best_rank = -1, len(ranks)
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                # a worse pair than the best kept one needs no draw: it would not be chosen anyway
                if r is not None and r < best_rank and rng.random() >= p:
                    best, best_rank = i, r
            if best < 0:
                break
            syms[best : best + 2] = [syms[best] + syms[best + 1]]
        return [self._vocab[s] for s in syms]

    def _encode_many(self, texts: Sequence[str], dropout: bool | float,
                     seeds: Sequence[int] | None = None) -> list[list[int]]:
        words = [self.pretokenize(t) for t in texts]
        p = self._dropout_p(dropout)
        if p > 0.0:
            if seeds is not None and len(seeds) != len(texts):
                raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
            # one generator per text: its draw depends on its seed alone, not on its batch
            rngs = [random.Random(s) for s in seeds] if seeds is not None else [random.Random() for _ in texts]
            return [[i for w in ws for i in self._bpe_dropout(w, p, rng)] for ws, rng in zip(words, rngs)]
        # The batch API runs the BPE for all texts at once (in parallel threads); the _fast
        # variant (tokenizers >= 0.21) skips the character offsets, which nothing here needs.
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [enc.ids for enc in batch([" ".join(ws) for ws in words], add_special_tokens=False)]

    def encode(self, text: str, dropout: bool | float = False, seed: int | None = None) -> list[int]:
        """Ids of ``text`` without special tokens; BPE-dropout only when asked (``dropout=True``
        uses ``dropout_p``, 0.1 by default; a float sets the probability), drawn from ``seed``
        (None: a fresh draw each call)."""
        return self._encode_many([text], dropout, None if seed is None else [seed])[0]

    def encode_batch(
        self, texts: Sequence[str], length: int = 64, dropout: bool | float = False, add_eot: bool = True,
        seeds: Sequence[int] | None = None,
    ) -> torch.LongTensor:
        """``(B, length)`` ids: each text's ids, then ``eot_id`` (if ``add_eot``), then ``PAD`` (-1).
        ``seeds``: one per text, for its BPE-dropout draw (see :meth:`encode`).

        A text that does not fit is cut to ``length`` tokens and loses its end token; one warning
        per call says how many texts and tokens were dropped.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, got one string; use encode() or [text]")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        rows: list[list[int]] = []
        n_cut = dropped = longest = 0
        for seq in self._encode_many(texts, dropout, seeds):
            if add_eot:
                seq.append(self.eot_id)
            if len(seq) > length:
                n_cut += 1
                dropped += len(seq) - length
                longest = max(longest, len(seq))
                del seq[length:]
            rows.append(seq + [self.PAD] * (length - len(seq)))
        if n_cut:
            warnings.warn(
                f"TextTokenizer.encode_batch: {n_cut} of {len(rows)} text(s) did not fit in length={length} "
                f"tokens{' (counting the end token)' if add_eot else ''} and were truncated: {dropped} token(s) "
                f"dropped in all (the longest needed {longest})"
                + ("; truncated texts keep no end token" if add_eot else ""),
                stacklevel=2,
            )
        out = torch.tensor(rows, dtype=torch.long) if rows else torch.empty(0, length, dtype=torch.long)
        return out  # type: ignore[return-value]

    # --- ids → text -----------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """CLIP's decode: stops at ``eot_id``, skips ``PAD``/-1 and ``sot_id``, ``</w>`` → space."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i == self.PAD or i == self.sot_id:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the text vocabulary 0..{self.vocab_size - 1}")
            tok = self._id_to_token[i]
            word_end = tok.endswith(EOW)
            if word_end:
                tok = tok[: -len(EOW)]
            # Per token, so that a literal "</w>" typed in a caption is not mistaken for a suffix.
            data.extend(self._byte_decoder[c] for c in tok)
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each row of a ``(B, L)`` tensor or list of id lists."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"decode_batch expects a 2-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return [self.decode(row) for row in ids]

    def id_to_token(self, i: int) -> str:
        return self._id_to_token[i]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, dropout={self.dropout_p})"

    # --- files ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "clean": "clip-lower",  # ftfy + html.unescape x2 + whitespace collapse + lowercase
            "pretokenize": "clip",  # CLIP's regex, run by the `regex` module
            "end_of_word_suffix": EOW,
            "sot_token": SOT_TOKEN,
            "eot_token": EOT_TOKEN,
            "dropout": self.dropout_p,
            "vocab_size": self.vocab_size,
        }

    def to_str(self) -> str:
        """The whole tokenizer as one JSON string (lverse metadata + the tokenizers JSON)."""
        meta = self._meta()
        meta["tokenizer"] = json.loads(self._tok.to_str())
        return json.dumps(meta, ensure_ascii=False)

    @classmethod
    def from_str(cls, text: str, source: str = "<string>") -> "TextTokenizer":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid JSON ({e})") from None
        if not isinstance(d, dict) or "tokenizer" not in d:
            raise ValueError(f"{source}: not a {FORMAT} file (no 'tokenizer' entry)")
        return cls._from_parts(d, d["tokenizer"], source)

    def save(self, path: str | Path) -> Path:
        """Save to ``path``: a ``*.json`` path gets one self-contained file; any other path is a
        directory that gets ``tokenizer.json`` (the tokenizers library's own file, loadable by
        ``tokenizers.Tokenizer.from_file``) and ``text_tokenizer.json`` (lverse's settings).
        Returns what :meth:`load` should be given."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_text(path, self.to_str())
            return path
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory; give a directory or a *.json file path")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / HF_FILE, self._tok.to_str(pretty=True))
        atomic_write_text(path / META_FILE, json.dumps(self._meta(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Load what :meth:`save` wrote (a directory or a single ``*.json`` file)."""
        path = Path(path)
        if path.is_dir():
            meta_p, hf_p = path / META_FILE, path / HF_FILE
            for p in (meta_p, hf_p):
                if not p.is_file():
                    raise FileNotFoundError(f"tokenizer directory {path} lacks {p.name}")
            try:
                meta, hf = json.loads(meta_p.read_text("utf-8")), json.loads(hf_p.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON in a tokenizer file ({e})") from None
            return cls._from_parts(meta, hf, str(path))
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return cls.from_str(path.read_text("utf-8"), source=str(path))

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], hf: dict[str, Any], source: str) -> "TextTokenizer":
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: {FORMAT} version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        expect = {"clean": "clip-lower", "pretokenize": "clip", "end_of_word_suffix": EOW,
                  "sot_token": SOT_TOKEN, "eot_token": EOT_TOKEN}
        for k, v in expect.items():
            if meta.get(k) != v:
                raise ValueError(f"{source}: {k}={meta.get(k)!r} is not supported (this version knows {v!r})")
        model = hf.get("model", {}) if isinstance(hf, dict) else {}
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != EOW:
            raise ValueError(f"{source}: expected a BPE model with end_of_word_suffix {EOW!r}")
        tok = cls(model["vocab"], _merges_from_hf_json(hf), dropout=float(meta.get("dropout", 0.1)))
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise ValueError(f"{source}: says vocab_size={meta['vocab_size']}, its vocabulary has {tok.vocab_size}")
        return tok


def _split_then_bytes() -> pre_tokenizers.PreTokenizer:
    """Split on the literal space that joins the Python pre-tokens, then map bytes to symbols."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _merges_from_hf_json(hf: dict[str, Any]) -> list[tuple[str, str]]:
    """Merges from a tokenizers JSON: ``[a, b]`` pairs (tokenizers >= 0.20) or ``"a b"`` strings."""
    out: list[tuple[str, str]] = []
    for m in hf["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        out.append((a, b))
    return out
