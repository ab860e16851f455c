"""The shipped Shapes checkpoints (checkpoints/shapes/): the README's main command runs on them,
and the models in them really learnt both directions (greedy decoding on test scenes, judged)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lverse.inference.pipeline import LVersePipeline
from lverse.inference.sampling import generate_captions, generate_images
from lverse.shapes.judge import read_images
from lverse.shapes.parse import match, try_parse_caption
from lverse.shapes.scenes import ShapesDataset

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"
pytestmark = pytest.mark.skipif(not (CKPT / "biart.safetensors").is_file(), reason="no shipped checkpoints")

N = 32
# Floors with a margin below what the shipped files give (measured: 32/32 reconstructions,
# greedy 19/32 captions and 23/32 images exact; on 128 scenes 128, 86 and 92). The set before this
# one (its AugVAE trained on another CPU, 2026-11-22) gave 32, 19 and 20 (on 128: 125, 86, 64), and
# the BiART before that, on 20,000 scenes, 23/32 and 12/32. The benchmark, not this test, reports
# accuracy. The BiART shipped before 041d234 (6000 steps at t2i_share 0.5) captioned 30/32
# greedily (100/128) but reranked worse: the model card compares them.
RECON_MIN, I2T_MIN, T2I_MIN = 28, 16, 16


@pytest.fixture(scope="module")
def shipped() -> tuple[LVersePipeline, list[dict]]:
    pipe = LVersePipeline.load(CKPT, device="cpu")
    ds = ShapesDataset("test", size=N, seed=0, resolution=pipe.resolution)
    return pipe, [ds[(i, 0)] for i in range(N)]


def test_demo_runs_on_shipped_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lverse.cli.shapes import demo as main

    assert main(["--checkpoint", str(CKPT), "--out", str(tmp_path), "--n", "3", "--candidates", "2"]) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "text_to_image.png").is_file() and len(summary["captions"]) == 3
    assert "judged accuracy" in capsys.readouterr().out


def test_shipped_autoencoder_reconstructs_test_scenes(shipped: tuple[LVersePipeline, list[dict]]) -> None:
    pipe, items = shipped
    images = torch.stack([it["image"] for it in items])
    recon = pipe.decode_images(pipe.encode_images(images))
    ok = [match(s, it["scene"]) for s, it in zip(read_images(recon), items)]
    assert sum(ok) >= RECON_MIN, f"{sum(ok)}/{N} reconstructions read back as their scene"


def test_shipped_biart_captions_and_draws_test_scenes(shipped: tuple[LVersePipeline, list[dict]]) -> None:
    """Greedy decoding, no reranking: far above chance in both directions (a scene has 4 shapes
    x 6 colours x 2 sizes per object and a relation or position, so chance is well below 1%)."""
    pipe, items = shipped
    codes = pipe.encode_images(torch.stack([it["image"] for it in items]))
    caps = pipe.captions_to_text(generate_captions(pipe.biart, codes, 1, pipe.text_len,
                                                   eot_id=pipe.tokenizer.eot_id, greedy=True))
    caps = [c[0] if isinstance(c, list) else c for c in caps]
    i2t = sum(match(try_parse_caption(c), it["scene"]) for c, it in zip(caps, items))
    assert i2t >= I2T_MIN, f"image->text: {i2t}/{N} greedy captions describe their scene: {caps[:4]}"

    text_ids, _ = pipe.encode_prompts([it["caption"] for it in items], warn=False)
    drawn = pipe.decode_images(generate_images(pipe.biart, text_ids, 1, greedy=True).reshape(N, -1))
    t2i = sum(match(s, it["scene"]) for s, it in zip(read_images(drawn), items))
    assert t2i >= T2I_MIN, f"text->image: {t2i}/{N} greedy images show their caption's scene"


def test_rescoring_kept_candidates_gives_the_benchmarks_figures(shipped: tuple[LVersePipeline, list[dict]]) -> None:
    """bench/rerank_compare.py's premise: candidates kept by the benchmark, re-scored with the
    bundle's own CLIP, give the report's figures back (every reranker, the oracle, the AUCs)."""
    from lverse.inference.rerank import ClipReranker
    from lverse.shapes.benchmark import DIRECTIONS, RERANKERS, rescore_candidates, run_benchmark

    pipe, _ = shipped
    cands: dict = {}
    report = run_benchmark(pipe, n=6, candidates=4, seed=0, candidates_out=cands, log=lambda s: None)
    assert len(cands["text_to_image"]) == 6 and cands["text_to_image"][0]["candidates"].shape[0] == 4
    again = rescore_candidates(cands, ClipReranker(pipe.clip()[0], "cpu"))
    for d in DIRECTIONS:
        for r in RERANKERS:
            assert again[d][r]["exact"] == report[d][r]["exact"], (d, r)
        for k in ("oracle_any_correct", "pairwise_auc_clip", "pairwise_auc_cycle", "pairwise_auc_clip+cycle"):
            assert again[d][k] == report[d][k], (d, k)
    # Without a CLIP only the CLIP-free rerankers are scored, from the kept cycle scores.
    bare = rescore_candidates(cands, None)
    assert "clip" not in bare["text_to_image"] and bare["text_to_image"]["cycle"] == report["text_to_image"]["cycle"]
