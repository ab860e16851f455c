"""The Shapes benchmark report: target verdicts and the model card's benchmark section."""
from __future__ import annotations

from pathlib import Path

import pytest

from lverse.cli.shapes import benchmark as main
from lverse.shapes.benchmark import (
    CARD_BEGIN,
    CARD_END,
    _Tally,
    markdown_table,
    run_benchmark,
    target_results,
    update_model_card,
)


def _section(none: float, clip: float, cycle: float) -> dict:
    row = lambda x: {"exact": x, "exact_seen": x, "exact_heldout": x}  # noqa: E731
    return {"none": row(none), "clip": row(clip), "cycle": row(cycle), "oracle_any_correct": 0.9,
            "pairwise_auc_cycle": 0.8, "pairwise_auc_clip": 0.9}


def _report(rec: float, i2t: tuple, t2i: tuple) -> dict:
    return {"n": 10, "heldout_items": 2, "candidates": 4, "seed": 0, "rerankers": ["none", "clip", "cycle"],
            "judge_on_ground_truth": 1.0, "reconstruction": {"exact": rec, "exact_seen": rec, "exact_heldout": rec},
            "image_to_text": _section(*i2t), "text_to_image": _section(*t2i)}


def test_targets_name_the_best_reranker_and_the_gap() -> None:
    res = target_results(_report(0.99, (0.5, 0.95, 0.7), (0.4, 0.6, 0.75)))
    assert [(m, met) for _, m, _, met in res] == [(0.99, True), (0.95, True), (0.75, False), (None, True)]
    assert "cycle" in res[2][0]
    table = markdown_table(_report(0.99, (0.5, 0.95, 0.7), (0.4, 0.6, 0.75)))
    assert "| text→image ≥ 80% (best reranker: cycle) | 75.0% | missed by 5.0 points |" in table
    # a reranker that loses to a random candidate in one direction fails the last target
    assert target_results(_report(0.99, (0.5, 0.4, 0.45), (0.4, 0.6, 0.75)))[-1][3] is False


def test_update_model_card_rewrites_only_its_section(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(f"# card\nbefore\n{CARD_BEGIN}\nold table\n{CARD_END}\nafter\n")
    assert update_model_card(card, "new table\n")
    assert card.read_text() == f"# card\nbefore\n{CARD_BEGIN}\nnew table\n{CARD_END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not update_model_card(plain, "x") and plain.read_text() == "no markers\n"


def test_tally_splits_hits_by_object_count() -> None:
    tally = _Tally(heldout=[False, True, False, False], objects=[1, 2, 2, 1])
    for i, ok in enumerate([True, False, True, True]):
        tally.add("clip", i, ok)
    tally.oracle = [True, True, True, True]
    s = tally.summary()
    assert s["clip"]["exact"] == 0.75 and s["clip"]["exact_heldout"] == 0.0
    assert s["clip"]["exact_by_objects"] == {"1": 1.0, "2": 0.5}
    assert s["oracle_by_objects"] == {"1": 1.0, "2": 1.0}
    with pytest.raises(ValueError, match="object counts"):
        _Tally(heldout=[False], objects=[1, 2])


def test_table_shows_the_object_count_split_only_when_reported() -> None:
    report = _report(0.99, (0.5, 0.95, 0.7), (0.4, 0.6, 0.75))
    assert "By the number of objects" not in markdown_table(report)  # reports from before the split
    for name in ("none", "clip", "cycle"):
        report["text_to_image"][name]["exact_by_objects"] = {"1": 0.9, "2": 0.125}
    report["text_to_image"]["oracle_by_objects"] = {"1": 1.0, "2": 0.5}
    table = markdown_table(report)
    assert "| task | reranker | one object | two objects |" in table
    assert "| text→image | clip | 90.0% | 12.5% |" in table
    assert "| text→image | any candidate (oracle) | 100.0% | 50.0% |" in table
    assert "| image→text | clip | – | – |" in table  # a direction without the split shows dashes


def test_one_direction_report_says_what_was_not_measured(capsys: pytest.CaptureFixture[str]) -> None:
    report = _report(0.99, (0.5, 0.95, 0.7), (0.4, 0.6, 0.75))
    del report["image_to_text"]
    res = target_results(report)
    assert [(m, met) for _, m, _, met in res] == [(0.99, True), (None, False), (0.75, False)]  # no "both directions" verdict
    table = markdown_table(report)
    assert "| image→text ≥ 90% (not measured) | – | not measured |" in table
    assert "| text→image | clip | 60.0% |" in table and "| image→text | clip |" not in table
    with pytest.raises(ValueError, match="directions"):
        run_benchmark(None, directions=["image_to_caption"])  # type: ignore[arg-type]
    # the CLI refuses a bad choice before loading any checkpoint
    assert main(["--checkpoint", "/nonexistent", "--directions", "text_to_image,sideways"]) == 2
    assert "--directions" in capsys.readouterr().err
