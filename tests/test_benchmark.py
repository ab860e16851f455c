"""The Shapes benchmark report: target verdicts and the model card's benchmark section."""
from __future__ import annotations

from pathlib import Path

from lverse.eval.benchmark import CARD_BEGIN, CARD_END, markdown_table, target_results, update_model_card


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
