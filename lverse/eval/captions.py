"""Caption metrics as the field computes them: ``pycocoevalcap`` after its PTB tokenizer.

L-Verse Table 2 (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE on the COCO Karpathy test split) and the
reconstruction paper's caption scores are the coco-caption scorers: every candidate caption and
*all* its reference captions go through Stanford's PTB tokenizer (lower-cased, punctuation
dropped), then

* BLEU-1..4: ``pycocoevalcap.bleu`` (corpus BLEU, ``closest`` reference length);
* METEOR: ``meteor-1.5.jar`` (``-l en -norm``, with its paraphrase table);
* ROUGE-L: ``pycocoevalcap.rouge`` (beta 1.2);
* CIDEr: ``pycocoevalcap.cider`` (CIDEr-D: 1-4-grams, IDF over the evaluated references, sigma 6);
* SPICE: ``spice-1.0.jar``, which needs Stanford CoreNLP 3.6.0's two jars
  (``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar``). pycocoevalcap
  downloads them on first use; lverse never downloads: it uses them when they are in
  ``--corenlp DIR`` / ``$LVERSE_CORENLP`` or already in pycocoevalcap's ``spice/lib``, and
  otherwise reports SPICE as skipped with the reason.

The tokenizer, METEOR and SPICE are Java programs: without ``java`` on the PATH the metrics stop
with one line saying so. One METEOR process (it loads a 60 MB paraphrase table, seconds) serves
every call in a process.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from lverse.eval.run import EvalError, java_version, package_version

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
CORENLP_ENV = "LVERSE_CORENLP"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_HINT = ("the caption metrics need Java: pycocoevalcap runs its PTB tokenizer, METEOR and SPICE as Java "
             "programs; install a Java runtime (e.g. `apt-get install default-jre-headless`) so that `java` is "
             "on the PATH")
_METEOR: dict[str, Any] = {}
_LOCK = threading.Lock()


def require_java() -> None:
    if shutil.which("java") is None:
        raise EvalError(JAVA_HINT)


def _coco_dir() -> Path:
    """pycocoevalcap's folder (a namespace package: no ``__file__``)."""
    try:
        import pycocoevalcap
    except ImportError:
        raise EvalError("the caption metrics need pycocoevalcap: pip install 'lverse[eval]'") from None
    return Path(list(pycocoevalcap.__path__)[0])


def find_corenlp(path: str | Path | None = None) -> tuple[Path | None, str]:
    """Where SPICE's CoreNLP jars are: ``(folder, "")``, or ``(None, why SPICE is skipped)``.

    Looks in ``path`` (a flag), ``$LVERSE_CORENLP``, then pycocoevalcap's own ``spice/lib``.
    An explicit folder without the jars is an error, not a skip."""
    explicit = path if path is not None else os.environ.get(CORENLP_ENV) or None
    if explicit is not None:
        folder = Path(explicit).expanduser()
        missing = [j for j in CORENLP_JARS if not (folder / j).is_file()]
        if missing:
            raise EvalError(f"SPICE: {folder} lacks {', '.join(missing)} (Stanford CoreNLP 3.6.0, from "
                            f"stanford-corenlp-full-2015-12-09.zip)")
        return folder, ""
    lib = _coco_dir() / "spice" / "lib"
    if all((lib / j).is_file() for j in CORENLP_JARS):
        return lib, ""
    return None, (f"Stanford CoreNLP 3.6.0 not found: put {' and '.join(CORENLP_JARS)} in a folder and pass "
                  f"--corenlp FOLDER (or set ${CORENLP_ENV}); lverse never downloads them")


def implementations(corenlp: Path | None = None) -> dict[str, str]:
    """Each metric's implementation and version, for the report."""
    coco = package_version("pycocoevalcap")
    java = java_version() or "no java"
    out = {f"BLEU-{n}": f"{coco} bleu (corpus, closest ref length)" for n in range(1, 5)}
    out.update({
        "tokenizer": f"{coco} PTBTokenizer (stanford-corenlp-3.4.1.jar, -lowerCase, punctuation removed); {java}",
        "METEOR": f"{coco} meteor-1.5.jar (-l en -norm); {java}",
        "ROUGE-L": f"{coco} rouge (beta 1.2)",
        "CIDEr": f"{coco} cider (CIDEr-D, n=4, sigma=6, IDF over the evaluated references)",
        "SPICE": f"{coco} spice-1.0.jar + Stanford CoreNLP 3.6.0 from {corenlp}; {java}" if corenlp
        else f"{coco} spice-1.0.jar (skipped: no CoreNLP 3.6.0)",
    })
    return out


def tokenize(texts: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize ``{key: [caption, ...]}`` with pycocoevalcap's tokenizer (keys kept)."""
    require_java()
    _coco_dir()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(texts)
    # pycocoevalcap keys its output by the dict's keys; ours may be anything hashable, its
    # need to be stable: use positions.
    data = {i: [{"caption": " ".join(str(c).split())} for c in texts[k]] for i, k in enumerate(keys)}
    try:
        out = PTBTokenizer().tokenize(data)
    except OSError as e:
        raise EvalError(f"the PTB tokenizer failed to run ({e}); {JAVA_HINT}") from None
    result = {k: out.get(i, []) for i, k in enumerate(keys)}
    for k in keys:
        if len(result[k]) != len(texts[k]):
            raise EvalError(f"the PTB tokenizer returned {len(result[k])} lines for {len(texts[k])} captions of {k!r}")
    return result


def _meteor() -> Any:
    """The one METEOR process of this Python process (started on first use)."""
    with _LOCK:
        if "scorer" not in _METEOR:
            require_java()
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR["scorer"] = Meteor()
            atexit.register(_close_meteor)
        return _METEOR["scorer"]


def _close_meteor() -> None:
    """End the METEOR process and close its pipes (pycocoevalcap's ``__del__`` leaves them open)."""
    scorer = _METEOR.pop("scorer", None)
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    proc.kill()
    proc.wait()
    scorer.meteor_p = _Gone()  # pycocoevalcap's __del__ runs later and must find nothing to do


class _Gone:
    """Stands in for a closed METEOR process in pycocoevalcap's ``__del__``."""

    def __init__(self) -> None:
        self.stdin = io.BytesIO()

    def kill(self) -> None: ...

    def wait(self) -> None: ...


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]], corenlp: Path, workdir: Path) -> tuple[float, list[float]]:
    """SPICE with spice-1.0.jar, CoreNLP's jars from ``corenlp`` on the class path (the jar's
    manifest brings its own ``lib/``); the same command pycocoevalcap runs, without its download
    and its cache."""
    spice_dir = _coco_dir() / "spice"
    data = [{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in sorted(gts)]
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(data))
        cp = os.pathsep.join([str(spice_dir / "spice-1.0.jar")] + [str(corenlp / j) for j in CORENLP_JARS])
        cmd = ["java", "-Xmx8G", "-cp", cp, "edu.anu.spice.SpiceScorer", str(inp), "-out", str(out), "-subset", "-silent"]
        proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise EvalError(f"SPICE failed (exit {proc.returncode}): {tail}")
        results = json.loads(out.read_text())
    by_id = {r["image_id"]: r["scores"]["All"]["f"] for r in results}
    scores = [float(by_id[k]) if by_id.get(k) is not None else float("nan") for k in sorted(gts)]
    finite = [s for s in scores if s == s]
    return (sum(finite) / len(finite) if finite else float("nan")), scores


def score_captions(
    references: Mapping[Any, Sequence[str]],
    candidates: Mapping[Any, str],
    metrics: Sequence[str] = METRICS,
    corenlp: str | Path | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``candidates[key]`` against all ``references[key]`` (same keys) after PTB tokenization.

    Returns ``{"metrics": {name: corpus score in [0, 1] (CIDEr in [0, 10])}, "per_item": {name:
    [score per key, in the order of candidates]}, "skipped": {name: reason}, "implementations",
    "n"}``. Multiply by 100 for the papers' tables (:func:`as_table_units`)."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise EvalError(f"unknown caption metric(s) {unknown}; known: {list(METRICS)}")
    keys = list(candidates)
    if set(keys) != set(references):
        raise EvalError(f"candidates and references differ in keys ({len(set(keys) ^ set(references))} unmatched)")
    empty = [k for k in keys if not references[k]]
    if empty:
        raise EvalError(f"{len(empty)} item(s) have no reference caption, e.g. {empty[0]!r}")
    skipped: dict[str, str] = {}
    corenlp_dir: Path | None = None
    if "SPICE" in metrics:
        corenlp_dir, why = find_corenlp(corenlp)
        if corenlp_dir is None:
            skipped["SPICE"] = why
    out: dict[str, Any] = {"n": len(keys), "metrics": {}, "per_item": {}, "skipped": skipped,
                           "implementations": {m: v for m, v in implementations(corenlp_dir).items()
                                               if m in metrics or m == "tokenizer"}}
    if not keys:
        return out
    tok = tokenize({**{("ref", i): references[k] for i, k in enumerate(keys)},
                    **{("hyp", i): [candidates[k]] for i, k in enumerate(keys)}})
    gts = {i: tok[("ref", i)] for i in range(len(keys))}
    res = {i: tok[("hyp", i)] for i in range(len(keys))}
    wanted_bleu = [m for m in metrics if m.startswith("BLEU-")]
    if wanted_bleu:
        from pycocoevalcap.bleu.bleu import Bleu

        score, per = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(1, 5):
            if f"BLEU-{n}" in metrics:
                out["metrics"][f"BLEU-{n}"] = float(score[n - 1])
                out["per_item"][f"BLEU-{n}"] = [float(x) for x in per[n - 1]]
    if "METEOR" in metrics:
        score, per = _meteor().compute_score(gts, res)
        out["metrics"]["METEOR"], out["per_item"]["METEOR"] = float(score), [float(x) for x in per]
    if "ROUGE-L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        score, per = Rouge().compute_score(gts, res)
        out["metrics"]["ROUGE-L"], out["per_item"]["ROUGE-L"] = float(score), [float(x) for x in per]
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        score, per = Cider().compute_score(gts, res)
        out["metrics"]["CIDEr"], out["per_item"]["CIDEr"] = float(score), [float(x) for x in per]
    if "SPICE" in metrics and corenlp_dir is not None:
        work = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        score, per = _spice(gts, res, corenlp_dir, work)
        out["metrics"]["SPICE"], out["per_item"]["SPICE"] = score, per
    return out


def as_table_units(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores as the papers print them: x100 (CIDEr 1.022 -> 102.2)."""
    return {k: 100.0 * v for k, v in scores.items()}


def coco_results(ids: Sequence[Any], captions: Sequence[str]) -> list[dict[str, Any]]:
    """COCO's caption results format ``[{"image_id", "caption"}]``; an id of digits becomes an int
    (COCO's ``cocoid``), any other id is kept as a string."""
    def _id(x: Any) -> Any:
        return int(x) if isinstance(x, str) and x.isdigit() else x

    return [{"image_id": _id(i), "caption": c} for i, c in zip(ids, captions)]


def markdown_rows(scores: Mapping[str, float], skipped: Mapping[str, str], paper: Mapping[str, float] | None = None,
                  metrics: Sequence[str] = METRICS) -> list[str]:
    """Table rows ``| metric | ours | paper |`` in the papers' units (x100)."""
    rows = []
    for m in metrics:
        if m in scores:
            ours = f"{100 * scores[m]:.1f}"
        elif m in skipped:
            ours = "skipped"
        else:
            continue
        ref = f"{paper[m]:.1f}" if paper and m in paper else "–"
        rows.append(f"| {m} | {ours} | {ref} |")
    return rows


__all__ = ["METRICS", "as_table_units", "coco_results", "find_corenlp", "implementations", "markdown_rows",
           "require_java", "score_captions", "tokenize"]
