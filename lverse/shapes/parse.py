"""The Shapes caption side of the judge: parse a caption into a :class:`Scene`, compare scenes.

>>> scene = parse_caption("A small red circle to the left of a large blue square.")
>>> match(scene, parse_caption("a large blue square right of a small red circle"))
True

:func:`parse_caption` is a small recursive-descent parser for exactly the grammar of
:mod:`lverse.shapes.scenes`' docstring. Its words come from the dataset's own tables (``SHAPES``,
``COLOURS``, ``SIZES``, ``REL_WORDS``, ``POS_WORDS``), so the two cannot drift apart; only the
glue words ``a``, ``there is`` and ``and`` are the grammar's own. Anything outside the grammar
raises :class:`ParseError` naming the offending word — the parser never guesses.
:func:`match` is exact scene equality up to the direction a chain is read in (:func:`scene_key`).
"""
from __future__ import annotations

from typing import Sequence

from lverse.shapes.scenes import COLOURS, INVERSE, POS_WORDS, REL_WORDS, SHAPES, SIZES, Scene, ShapeObject

__all__ = ["ParseError", "parse_caption", "try_parse_caption", "canonical_layout", "scene_key", "match"]

# =============================================================================================
# Caption parser
# =============================================================================================
# Glue words of the grammar (see the docstring of lverse.shapes.scenes); every other word comes
# from the dataset's tables.
_ARTICLE = "a"
_THERE_IS = ("there", "is")
_AND = "and"

# Multi-word phrases as token tuples. Longest match wins where one phrase prefixes another.
_REL_PHRASES: dict[tuple[str, ...], str] = {
    tuple(p.split()): rel for rel, phrases in REL_WORDS.items() for p in phrases
}
_POS_PHRASES: dict[tuple[str, ...], str] = {tuple(p.split()): pos for pos, p in POS_WORDS.items()}
_VOCAB: frozenset[str] = frozenset(
    {_ARTICLE, _AND, *_THERE_IS, *SIZES, *COLOURS, *SHAPES}
    | {w for phrase in _REL_PHRASES for w in phrase}
    | {w for phrase in _POS_PHRASES for w in phrase}
)

_Attrs = tuple[str, str, str]  # (shape, colour, size): what a caption says about one object


class ParseError(ValueError):
    """A caption outside the Shapes grammar. ``word`` is the offending word ('' at the end of
    the caption), ``position`` its index among the caption's words, ``reason`` what was wrong."""

    def __init__(self, text: str, reason: str, word: str = "", position: int = -1) -> None:
        self.text, self.reason, self.word, self.position = text, reason, word, position
        where = f" at word {position} {word!r}" if word else (" at the end" if position >= 0 else "")
        super().__init__(f"cannot parse Shapes caption {text!r}: {reason}{where}")


def _tokenise(text: str) -> list[str]:
    """Lower case, whitespace-split, one trailing full stop dropped."""
    t = text.strip().lower()
    if t.endswith("."):
        t = t[:-1]
    return t.split()


class _Parser:
    """Recursive descent over the token list; every failure names the word it stopped at."""

    def __init__(self, text: str, tokens: list[str]) -> None:
        self.text, self.toks, self.i = text, tokens, 0

    # --- primitives ---------------------------------------------------------------------------
    def error(self, reason: str, at: int | None = None) -> ParseError:
        at = self.i if at is None else at
        word = self.toks[at] if at < len(self.toks) else ""
        return ParseError(self.text, reason, word, at)

    def at_end(self) -> bool:
        return self.i >= len(self.toks)

    def peek_phrase(self, table: dict[tuple[str, ...], str]) -> tuple[str, int] | None:
        """(value, length) of the longest phrase of ``table`` starting here, or None."""
        best: tuple[str, int] | None = None
        for phrase, value in table.items():
            n = len(phrase)
            if tuple(self.toks[self.i : self.i + n]) == phrase and (best is None or n > best[1]):
                best = (value, n)
        return best

    def take_phrase(self, table: dict[tuple[str, ...], str]) -> str | None:
        hit = self.peek_phrase(table)
        if hit is None:
            return None
        self.i += hit[1]
        return hit[0]

    def take_words(self, words: Sequence[str]) -> bool:
        if tuple(self.toks[self.i : self.i + len(words)]) == tuple(words):
            self.i += len(words)
            return True
        return False

    def expect_words(self, words: Sequence[str], what: str) -> None:
        for w in words:
            if self.at_end() or self.toks[self.i] != w:
                raise self.error(f"expected {what!r}")
            self.i += 1

    def take_one(self, options: Sequence[str], what: str) -> str:
        if self.at_end() or self.toks[self.i] not in options:
            raise self.error(f"expected {what} (one of {', '.join(options)})")
        self.i += 1
        return self.toks[self.i - 1]

    # --- grammar ------------------------------------------------------------------------------
    def noun_phrase(self) -> _Attrs:
        """NP := "a" SIZE COLOUR SHAPE"""
        self.expect_words([_ARTICLE], f"{_ARTICLE} (start of an object)")
        size = self.take_one(tuple(SIZES), "a size")
        colour = self.take_one(tuple(COLOURS), "a colour")
        shape = self.take_one(SHAPES, "a shape")
        return (shape, colour, size)

    def relation(self) -> str:
        rel = self.take_phrase(_REL_PHRASES)
        if rel is None:
            raise self.error("expected a relation (" + ", ".join(" ".join(p) for p in _REL_PHRASES) + ")")
        return rel

    def end(self) -> None:
        if not self.at_end():
            raise self.error("expected the end of the caption")


def _chain(
    parser: _Parser, clauses: list[tuple[_Attrs, str, _Attrs, int, int]]
) -> tuple[list[_Attrs], str]:
    """Objects and relation of a chain from its clauses ``(x, relation, y, start, rel_at)``
    (``start``/``rel_at``: word index of the clause and of its relation, for errors).

    Clause ``k`` relates objects ``k`` and ``k+1`` in either order ("A left of B" or
    "B right of A"), with one relation for the whole chain. Reading clause 0 either way fixes
    the relation and the first two objects; every later clause must then continue from the
    last object. Both readings are tried; they must agree on one scene (up to reading the
    chain backwards), otherwise the caption is contradictory or ambiguous.
    """
    found: list[tuple[list[_Attrs], str]] = []
    failure: tuple[str, int] | None = None
    for flip in (False, True):
        x, w, y, _, _ = clauses[0]
        objs, rel = ([y, x], INVERSE[w]) if flip else ([x, y], w)
        for x, w, y, start, rel_at in clauses[1:]:
            if w == rel:
                first, second = x, y
            elif w == INVERSE[rel]:
                first, second = y, x
            else:
                failure = failure or (f"relation {w!r} mixes axes with {rel!r} in one chain", rel_at)
                break
            if first != objs[-1]:
                failure = failure or ("clause does not continue the chain from its last object", start)
                break
            objs.append(second)
        else:
            found.append((objs, rel))
    keys = {_chain_key(o, r) for o, r in found}
    if not found:
        assert failure is not None
        raise parser.error(failure[0], failure[1])
    if len(keys) > 1:
        raise parser.error("ambiguous chain (the clauses fit two different scenes)", clauses[1][3])
    return found[0]


def canonical_layout(objects: Sequence[_Attrs], relation: str | None = None, position: str | None = None) -> Scene:
    """A :class:`Scene` with ``objects`` placed at the centres of the dataset's layout cells.

    Text does not fix coordinates; this is *a* layout the caption is true of (the middle of
    each cell of a chain, or the middle of the stated region), so ``render`` can draw a parsed
    caption. Comparisons (:func:`match`) ignore coordinates.
    """
    objs = list(objects)
    if len(objs) == 1:
        if position not in _NOMINAL_POSITION:
            raise ValueError(f"one-object scene needs a position in {tuple(_NOMINAL_POSITION)}, got {position!r}")
        x, y = _NOMINAL_POSITION[position]
        shape, colour, size = objs[0]
        return Scene([ShapeObject(shape, colour, size, x, y)], position=position)
    if relation not in INVERSE:
        raise ValueError(f"multi-object scene needs a relation in {tuple(INVERSE)}, got {relation!r}")
    n, placed = len(objs), []
    for i, (shape, colour, size) in enumerate(objs):
        cell = i if relation in ("left", "above") else n - 1 - i  # as in sample_scene
        along = round((cell + 0.5) / n, 4)
        x, y = (along, 0.5) if relation in ("left", "right") else (0.5, along)
        placed.append(ShapeObject(shape, colour, size, x, y))
    return Scene(placed, relation=relation)


# Middle of the region each one-object position allows (x ≤ 0.3 for left, etc.).
_NOMINAL_POSITION: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}


def parse_caption(text: str) -> Scene:
    """Parse a caption of the Shapes grammar into a :class:`Scene`.

    Case, surrounding/repeated whitespace and one trailing full stop are tolerated; anything
    else outside the grammar raises :class:`ParseError`. Object attributes, the relation (or
    one-object position) come from the text; coordinates are :func:`canonical_layout`'s.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_caption expects a str, got {type(text).__name__}")
    toks = _tokenise(text)
    p = _Parser(text, toks)
    if not toks:
        raise ParseError(text, "empty caption")
    for i, w in enumerate(toks):
        if w not in _VOCAB:
            raise ParseError(text, "unknown word", w, i)

    # one_obj := POS "there is" NP
    pos = p.take_phrase(_POS_PHRASES)
    if pos is not None:
        p.expect_words(_THERE_IS, " ".join(_THERE_IS))
        obj = p.noun_phrase()
        p.end()
        return canonical_layout([obj], position=pos)

    # one_obj := ["there is"] NP POS  |  chain := ["there is"] CLAUSE {"and" CLAUSE}
    p.take_words(_THERE_IS)
    start = p.i
    first = p.noun_phrase()
    pos = p.take_phrase(_POS_PHRASES)
    if pos is not None:
        p.end()
        return canonical_layout([first], position=pos)
    if p.at_end():
        raise p.error("expected a relation or a position after the first object")
    if p.peek_phrase(_REL_PHRASES) is None:
        raise p.error("expected a relation or a position")
    rel_at = p.i
    clauses = [(first, p.relation(), p.noun_phrase(), start, rel_at)]
    while not p.at_end():
        p.expect_words([_AND], f"{_AND} (or the end of the caption)")
        start = p.i
        x = p.noun_phrase()
        rel_at = p.i
        clauses.append((x, p.relation(), p.noun_phrase(), start, rel_at))
    objs, rel = _chain(p, clauses)
    return canonical_layout(objs, relation=rel)


def try_parse_caption(text: str) -> Scene | None:
    """:func:`parse_caption`, or None for a caption outside the grammar (scored as a failure)."""
    try:
        return parse_caption(text)
    except ParseError:
        return None


# =============================================================================================
# Scene comparison
# =============================================================================================
def _attrs(o: ShapeObject) -> _Attrs:
    return (o.shape, o.colour, o.size)


def _chain_key(objs: Sequence[_Attrs], relation: str) -> tuple:
    """Chains read backwards are the same scene: normalise to ``left`` / ``above``."""
    if relation in ("right", "below"):
        return ("relation", INVERSE[relation], tuple(reversed(objs)))
    return ("relation", relation, tuple(objs))


def scene_key(scene: Scene) -> tuple:
    """Hashable description of what a caption can say about ``scene`` (no coordinates).

    Two scenes with equal keys are the same scene: same objects by shape/colour/size, same
    one-object position, or the same chain up to direction ("A left of B" = "B right of A").
    """
    objs = [_attrs(o) for o in scene.objects]
    if len(objs) == 1:
        return ("position", scene.position, tuple(objs))
    assert scene.relation is not None
    return _chain_key(objs, scene.relation)


def _as_scene(s: Scene | dict | None) -> Scene | None:
    if s is None or isinstance(s, Scene):
        return s
    if isinstance(s, dict):
        return Scene.from_dict(s)
    raise TypeError(f"expected a Scene, a scene dict or None, got {type(s).__name__}")


def match(a: Scene | dict | None, b: Scene | dict | None) -> bool:
    """Exact scene match (see :func:`scene_key`); None (an unreadable side) never matches."""
    a, b = _as_scene(a), _as_scene(b)
    if a is None or b is None:
        return False
    return scene_key(a) == scene_key(b)
