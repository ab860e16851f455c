"""sample.py (lverse.cli.sample) and the inference bundle (lverse.inference.pipeline), on a tiny random
pipeline written to a temporary directory: outputs, JSON content, reproducibility, image
preprocessing, and one-line errors for bad input."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lverse.cli.sample import main
from lverse.data.images import read_image as load_image
from lverse.inference.clip import save_clip
from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import combine_scores
from lverse.models.augvae import AugVAE, AugVAEConfig
from lverse.models.biart import BiART, BiARTConfig
from lverse.tokenizer import TextTokenizer

CAPTIONS = [
    "a red circle", "a blue square", "a green triangle", "a small red square left of a big blue circle",
    "two circles", "a big green circle above a small red triangle", "a blue triangle", "a red square",
]
CLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)




def _build(root: Path, text_len: int = 8, with_clip: bool = False) -> Path:
    torch.manual_seed(0)
    vae = AugVAE(AugVAEConfig(variant="sl", resolution=16, hidden_dim=32, ch_mult=(1, 2), num_res_blocks=1,
                              z_channels=8, num_levels=2, codebook_size=16, codebook_dim=8))
    tok = TextTokenizer.train(CAPTIONS * 3, vocab_size=600)
    biart = BiART(BiARTConfig(num_image_codes=16, num_text_tokens=tok.vocab_size, text_len=text_len,
                              image_len=vae.tokens_per_image, n_layer=1, n_head=2, n_embd=32))
    pipe = LVersePipeline(vae, biart, tok)
    if with_clip:
        from lverse.inference.clip import build_open_clip

        pipe.set_clip(build_open_clip(CLIP_CFG), CLIP_CFG, "tiny")
    pipe.save(root)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ckpt_clip(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("ckpt_clip"), with_clip=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(d / "rgba.png")
    Image.new("L", (64, 64), 100).save(d / "gray.png")
    Image.new("RGB", (300, 200), (0, 0, 255)).save(d / "large.jpg")
    (d / "notes.txt").write_text("not an image, and not picked up from the folder")
    return d


BASE = ["--device", "cpu", "--no-progress", "--batch-size", "4"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------
# pipeline


def test_pipeline_roundtrip_and_mismatch(ckpt: Path, tmp_path: Path) -> None:
    pipe = LVersePipeline.load(ckpt, device="cpu")
    assert pipe.image_len == 16 and pipe.text_len == 8 and pipe.resolution == 16 and not pipe.has_clip
    ids, counts = pipe.encode_prompts(["a red circle"])
    v = pipe.vocab
    assert ids.shape == (1, 8) and counts == [len(pipe.tokenizer.encode("a red circle"))]
    n = counts[0]
    assert ids[0, n].item() == v.text_start + pipe.tokenizer.eot_id and bool((ids[0, n + 1:] == v.pad).all())
    with pytest.warns(UserWarning, match="truncated"):
        long_ids, _ = pipe.encode_prompts([" ".join(CAPTIONS)])
    assert bool(v.is_text(long_ids).all())  # cut to text_len, no room for eot/PAD
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        pipe.encode_prompts(["a", "  "])
    # precision: BiART in bf16 with fp32 LayerNorms, AugVAE stays fp32
    half = LVersePipeline.load(ckpt, device="cpu", precision="bf16")
    assert half.biart.dtype == torch.bfloat16 and half.biart.ln_f.weight.dtype == torch.float32
    assert next(half.augvae.parameters()).dtype == torch.float32
    # a BiART whose text vocabulary does not match the tokenizer
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "biart.json").read_text())
    cfg["config"]["num_text_tokens"] += 1
    (bad / "biart.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"biart\.json: num_text_tokens=\d+ does not match .*tokenizer\.json vocab_size=\d+"):
        LVersePipeline.load(bad, device="cpu")
    with pytest.raises(FileNotFoundError, match="lacks augvae.safetensors"):
        (bad / "augvae.safetensors").unlink()
        LVersePipeline.load(bad, device="cpu")


def test_load_image_modes_and_sizes(images: Path) -> None:
    rgba = load_image(images / "rgba.png", 16)
    assert rgba.shape == (3, 16, 16)
    # half-transparent red over white: (255, 127.5, 127.5) -> (1, ~0, ~0) in [-1, 1]
    assert torch.allclose(rgba[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    gray = load_image(images / "gray.png", 16)
    assert torch.equal(gray[0], gray[1]) and torch.allclose(gray[0], torch.full((16, 16), 100 / 127.5 - 1))
    large = load_image(images / "large.jpg", 16)
    assert large.shape == (3, 16, 16) and float(large[2].mean()) > 0.9 and float(large[0].mean()) < -0.9
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(images / "notes.txt", 16)


def test_load_image_16_bit_gray(tmp_path: Path) -> None:
    import numpy as np

    Image.fromarray(np.full((20, 20), 65535 // 4, dtype=np.uint16)).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png", 8)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, round(255 / 4) / 127.5 - 1), atol=1e-6)  # rescaled, not clipped


# ------------------------------------------------------------------------------------------
# text -> image


def test_text_to_image_cycle(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--text", "a red circle", "--text", "a blue square",
            "--candidates", "3", "--keep", "2", "--out", str(out), "--seed", "7", *BASE]
    assert main(args) == 0
    rep = json.loads((out / "samples.json").read_text())
    assert rep["mode"] == "text-to-image" and rep["rerank"] == "cycle" and rep["candidates"] == 3
    assert [p["prompt"] for p in rep["prompts"]] == ["a red circle", "a blue square"]
    for p in rep["prompts"]:
        assert [im["seed"] for im in p["images"]] == [7, 8]
        for im in p["images"]:
            assert len(im["scores"]["cycle"]) == 3
            assert im["candidate"] == max(range(3), key=lambda j: im["scores"]["score"][j])
            assert im["score"] == pytest.approx(max(im["scores"]["cycle"]), abs=1e-5)
            with Image.open(out / im["file"]) as png:
                assert png.size == (16, 16) and png.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 2x2 images of 16 px, 2 px padding
    # same seed -> same result
    out2 = tmp_path / "out2"
    assert main([*args[:-len(BASE) - 4], "--out", str(out2), "--seed", "7", *BASE]) == 0
    rep2 = json.loads((out2 / "samples.json").read_text())
    assert rep2["prompts"] == rep["prompts"]
    assert (out / rep["prompts"][0]["images"][0]["file"]).read_bytes() == (out2 / rep["prompts"][0]["images"][0]["file"]).read_bytes()


def test_text_to_image_clip_default_and_fusion(ckpt_clip: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green triangle\n\ntwo circles\n")
    assert main(["--checkpoint", str(ckpt_clip), "--prompts", str(prompts), "--candidates", "3",
                 "--rerank", "clip", "--out", str(tmp_path / "a"), *BASE]) == 0
    rep = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rep["rerank"] == "clip" and len(rep["prompts"]) == 2
    assert set(rep["prompts"][0]["images"][0]["scores"]) == {"clip", "score"}
    # with a CLIP at hand the default reranker is clip+cycle: the two z-scored and summed
    assert main(["--checkpoint", str(ckpt_clip), "--text", "a red square", "--candidates", "4",
                 "--out", str(tmp_path / "b"), *BASE]) == 0
    rep = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert rep["rerank"] == "clip+cycle" and rep["top_k"] == 0 and rep["top_p"] == 1.0
    im = rep["prompts"][0]["images"][0]
    fused = combine_scores([torch.tensor(im["scores"]["clip"]), torch.tensor(im["scores"]["cycle"])])
    assert torch.allclose(fused, torch.tensor(im["scores"]["score"]), atol=1e-4)
    assert im["candidate"] == int(fused.argmax())


def test_long_prompt_is_truncated_with_warning(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(ckpt), "--text", " ".join(CAPTIONS), "--rerank", "none",
                 "--out", str(tmp_path), *BASE]) == 0
    err = capsys.readouterr().err
    assert "warning: prompt 1" in err and "truncated" in err
    rep = json.loads((tmp_path / "samples.json").read_text())
    assert rep["prompts"][0]["truncated"] is True and rep["candidates"] == 1


# ------------------------------------------------------------------------------------------
# image -> text


def test_image_to_text(ckpt: Path, images: Path, tmp_path: Path, capsys) -> None:
    args = ["--checkpoint", str(ckpt), "--image", str(images), "--image", str(images / "gray.*"),
            "--candidates", "5", "--max-text-tokens", "6", "--rerank", "cycle", "--out", str(tmp_path), *BASE]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    rep = json.loads((tmp_path / "captions.json").read_text())
    files = [Path(e["file"]).name for e in rep["images"]]
    assert files == ["gray.png", "large.jpg", "rgba.png", "gray.png"]  # folder (sorted), then the glob
    for e, line in zip(rep["images"], out):
        assert line == f"{e['file']}: {e['caption']}"
        assert len(e["candidates"]) == 5
        scores = [c["score"] for c in e["candidates"]]
        assert scores == sorted(scores, reverse=True) and e["caption"] == e["candidates"][0]["caption"]
        for c in e["candidates"]:
            assert "." not in c["caption"] and c["raw"].startswith(c["caption"])
    # the same image with the same seed gets the same candidates
    assert rep["images"][0]["candidates"] == rep["images"][3]["candidates"]


def test_image_to_text_clip(ckpt_clip: Path, images: Path, tmp_path: Path) -> None:
    assert main(["--checkpoint", str(ckpt_clip), "--image", str(images / "large.jpg"), "--candidates", "3",
                 "--out", str(tmp_path), *BASE]) == 0
    e = json.loads((tmp_path / "captions.json").read_text())["images"][0]
    assert {"clip", "score"} <= set(e["candidates"][0])


# ------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback


def test_error_missing_image(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(ckpt), "--image", str(tmp_path / "missing.png"), *BASE]) != 0
    assert "missing.png" in _err_line(capsys)


def test_error_corrupt_image(ckpt: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["--checkpoint", str(ckpt), "--image", str(bad), "--out", str(tmp_path), *BASE]) != 0
    assert "corrupt.png" in _err_line(capsys)
    trunc = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "ok.jpg")
    trunc.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    assert main(["--checkpoint", str(ckpt), "--image", str(trunc), "--out", str(tmp_path), *BASE]) != 0
    assert "truncated.jpg" in _err_line(capsys)


def test_error_empty_prompt(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(ckpt), "--text", "a red circle", "--text", "  ", *BASE]) != 0
    assert "empty prompt" in _err_line(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["--checkpoint", str(ckpt), "--prompts", str(empty), *BASE]) != 0
    assert "empty.txt" in _err_line(capsys)


def test_error_mismatched_checkpoint(ckpt: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    torch.manual_seed(0)
    BiART(BiARTConfig(num_image_codes=32, num_text_tokens=600, text_len=8, image_len=16, n_layer=1, n_head=2,
                      n_embd=32)).save(bad / "biart.safetensors")
    assert main(["--checkpoint", str(bad), "--text", "a red circle", *BASE]) != 0
    line = _err_line(capsys)
    assert "biart.json" in line and "num_image_codes=32" in line and "codebook_size=16" in line
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--text", "a", *BASE]) != 0
    assert "nowhere" in _err_line(capsys)


def test_error_clip_missing(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(ckpt), "--text", "a", "--rerank", "clip", *BASE]) != 0
    assert "--rerank cycle" in _err_line(capsys)
    w = tmp_path / "clip-weights.bin"
    assert main(["--checkpoint", str(ckpt), "--text", "a", "--clip-model", "ViT-B-32", "--clip-weights", str(w),
                 *BASE]) != 0
    line = _err_line(capsys)
    assert "clip-weights.bin" in line and "--rerank cycle" in line


def test_clip_weights_file_from_cli(ckpt: Path, tmp_path: Path) -> None:
    """--clip-weights may name a clip.safetensors (with clip.json) for a checkpoint without CLIP."""
    from lverse.inference.clip import build_open_clip

    torch.manual_seed(0)
    path = save_clip(tmp_path / "clipdir", build_open_clip(CLIP_CFG), CLIP_CFG)
    assert main(["--checkpoint", str(ckpt), "--text", "a red circle", "--candidates", "2",
                 "--clip-weights", str(path), "--out", str(tmp_path / "o"), *BASE]) == 0
    rep = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert rep["rerank"] == "clip+cycle" and len(rep["prompts"][0]["images"][0]["scores"]["clip"]) == 2


def test_default_checkpoint_from_environment(ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from lverse.inference.pipeline import default_checkpoint_dir

    monkeypatch.delenv("LVERSE_CHECKPOINT", raising=False)
    assert default_checkpoint_dir().parts[-2:] == ("checkpoints", "shapes")
    monkeypatch.setenv("LVERSE_CHECKPOINT", str(ckpt))
    assert default_checkpoint_dir() == ckpt
    assert main(["--text", "a red circle", "--candidates", "2", "--out", str(tmp_path), *BASE]) == 0
    assert json.loads((tmp_path / "samples.json").read_text())["checkpoint"] == str(ckpt)


def test_guidance_from_sampling_json_and_flag(ckpt: Path, tmp_path: Path, capsys) -> None:
    """A bundle's sampling.json sets the default guidance; --guidance overrides it; a bad
    file is a one-line error naming it."""
    g = tmp_path / "guided"
    shutil.copytree(ckpt, g)
    pipe = LVersePipeline.load(g, device="cpu")
    assert pipe.sampling == {}
    pipe.sampling = {"guidance": 2.5}  # the older flat form is read, and written per direction
    pipe.save(g)
    assert json.loads((g / "sampling.json").read_text()) == {"text_to_image": {"guidance": 2.5}}
    assert LVersePipeline.load(g, device="cpu").sampling == {"text_to_image": {"guidance": 2.5}}

    def draw(root: Path, *extra: str) -> dict:
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        assert main(["--checkpoint", str(root), "--text", "a red circle", "--candidates", "2", "--out", str(out),
                     "--rerank", "none", *extra, *BASE]) == 0
        return json.loads((out / "samples.json").read_text())

    rep = draw(g)
    assert rep["guidance"] == 2.5
    assert draw(g, "--guidance", "1")["guidance"] == 1.0
    assert draw(ckpt)["guidance"] == 1.0
    (g / "sampling.json").write_text('{"guidance": "lots"}')
    assert main(["--checkpoint", str(g), "--text", "a red circle", *BASE]) != 0
    line = _err_line(capsys)
    assert "sampling.json" in line and "guidance" in line
    (g / "sampling.json").write_text('{"temperature": 0.5}')
    assert main(["--checkpoint", str(g), "--text", "a red circle", *BASE]) != 0
    assert "unknown key" in _err_line(capsys)
    (g / "sampling.json").write_text('{"image_temperature": -1}')
    assert main(["--checkpoint", str(g), "--text", "a red circle", *BASE]) != 0
    assert "sampling.json" in (line := _err_line(capsys)) and "temperature" in line
    (g / "sampling.json").write_text('{"image_to_text": {"rerank": "dino"}}')
    assert main(["--checkpoint", str(g), "--text", "a red circle", *BASE]) != 0
    assert "image_to_text" in (line := _err_line(capsys)) and "dino" in line
    assert main(["--checkpoint", str(ckpt), "--text", "a", "--guidance", "-1", *BASE]) != 0
    assert "--guidance" in _err_line(capsys)
    # Saving without a recommendation removes a stale file.
    pipe.sampling = {}
    pipe.save(g)
    assert not (g / "sampling.json").exists()


def test_image_temperature_from_sampling_json_and_flag(ckpt: Path, images: Path, tmp_path: Path) -> None:
    """sampling.json's image_temperature is the default for images only: captions keep 1,
    --temperature overrides both, and the draws follow it."""
    g = tmp_path / "sharp"
    shutil.copytree(ckpt, g)
    (g / "sampling.json").write_text('{"image_temperature": 0.5}')
    assert LVersePipeline.load(g, device="cpu").defaults("text_to_image").temperature == 0.5
    assert LVersePipeline.load(g, device="cpu").defaults("image_to_text").temperature == 1.0
    assert LVersePipeline.load(ckpt, device="cpu").defaults("text_to_image").temperature == 1.0

    def draw(root: Path, *extra: str) -> tuple[dict, Path]:
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        assert main(["--checkpoint", str(root), "--candidates", "2", "--out", str(out), "--rerank", "none",
                     *extra, *BASE]) == 0
        name = "captions.json" if "--image" in extra else "samples.json"
        return json.loads((out / name).read_text()), out

    (sharp, d_sharp), (plain, d_plain) = draw(g, "--text", "a red circle"), draw(ckpt, "--text", "a red circle")
    assert sharp["temperature"] == 0.5 and plain["temperature"] == 1.0
    pngs = lambda d: [p.read_bytes() for p in sorted(d.glob("*.png"))]  # noqa: E731
    assert pngs(d_sharp) and pngs(d_sharp) != pngs(d_plain)  # same seed, another temperature: other images
    assert draw(g, "--text", "a red circle", "--temperature", "0.9")[0]["temperature"] == 0.9
    assert draw(g, "--image", str(images / "gray.png"))[0]["temperature"] == 1.0


def test_bundle_cli_writes_sampling_json_and_warns_without_caption_dropout(ckpt: Path, tmp_path: Path, capsys) -> None:
    from lverse.cli.bundle import main as bundle_main

    run = tmp_path / "biart_run"
    run.mkdir()
    shutil.copy(ckpt / "biart.safetensors", run / "model.safetensors")
    shutil.copy(ckpt / "biart.json", run / "model.json")
    shutil.copy(ckpt / "tokenizer.json", run / "tokenizer.json")
    (run / "config.yaml").write_text("text_dropout: 0.0\n")
    out = tmp_path / "bundle"
    assert bundle_main(["--augvae", str(ckpt / "augvae.safetensors"), "--biart", str(run), "--out", str(out),
                        "--guidance", "2"]) == 0
    assert "text_dropout 0" in capsys.readouterr().err
    assert json.loads((out / "sampling.json").read_text()) == {"text_to_image": {"guidance": 2.0}}
    assert LVersePipeline.load(out, device="cpu").defaults("text_to_image").guidance == 2.0
    (run / "config.yaml").write_text("text_dropout: 0.1\n")
    assert bundle_main(["--augvae", str(ckpt / "augvae.safetensors"), "--biart", str(run), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert not (out / "sampling.json").exists()  # no recommendation: the stale file is gone


def test_cli_demo_and_benchmark_read_the_same_defaults(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """sample.py with no flags, the Python API, the demo and the benchmark's headline all sample
    with DEFAULTS, then with the bundle's sampling.json when it has one."""
    from lverse.inference import DEFAULTS, image_to_text, text_to_image
    from lverse.shapes import benchmark, demo

    def settings_of_cli(root: Path) -> dict:
        out = tmp_path / f"cli{len(list(tmp_path.iterdir()))}"
        assert main(["--checkpoint", str(root), "--text", "a red circle", "--image", str(tmp_path / "x.png"),
                     "--out", str(out), *BASE]) == 0
        keys = ("candidates", "temperature", "top_k", "top_p", "rerank")
        return {d: {k: json.loads((out / f).read_text())[k] for k in keys}
                for d, f in (("text_to_image", "samples.json"), ("image_to_text", "captions.json"))}

    seen: list[dict] = []
    real = benchmark.run_benchmark

    def spy(pipe, **kw):  # the demo's call, then the real benchmark on 2 scenes
        report = real(pipe, **{**kw, "n": 2})
        seen.append(report["settings"])
        return report

    monkeypatch.setattr(benchmark, "run_benchmark", spy)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "x.png")
    tuned = tmp_path / "tuned"
    shutil.copytree(ckpt, tuned)
    (tuned / "sampling.json").write_text(json.dumps({"text_to_image": {"candidates": 3, "temperature": 0.7},
                                                     "image_to_text": {"candidates": 3, "top_p": 0.5}}))
    for root in (ckpt, tuned):
        pipe = LVersePipeline.load(root, device="cpu")
        expected = {d: pipe.defaults(d) for d in DEFAULTS}
        if root == ckpt:  # no sampling.json: the library's defaults (no CLIP here: cycle)
            assert expected == {d: s.with_clip(False) for d, s in DEFAULTS.items()}
        else:
            assert expected["text_to_image"].temperature == 0.7 and expected["image_to_text"].top_p == 0.5
        cli = settings_of_cli(root)
        for d, s in expected.items():
            assert cli[d] == {"candidates": s.candidates, "temperature": s.temperature, "top_k": s.top_k,
                              "top_p": s.top_p, "rerank": s.rerank}
        if root == tuned:  # the API draws what it is told: 3 candidates each
            assert len(text_to_image(pipe, ["a red circle"])[0]["images"][0]["scores"]["score"]) == 3
            assert len(image_to_text(pipe, pipe.load_image(tmp_path / "x.png")[None])[0]["candidates"]) == 3
        seen.clear()
        assert demo.sample_both_directions(str(root), tmp_path / "demo", n=2) == 0
        report = real(pipe, n=2, candidates=pipe.defaults("text_to_image").candidates, log=lambda s: None)
        for got in (seen[0], report["settings"]):
            assert got == {d: dataclasses.asdict(s) for d, s in expected.items()}


def test_a_bad_augvae_config_in_a_bundle_names_the_file(ckpt: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / "augvae.json").read_text())
    for key, value in (("hidden_dimm", 3), ("norm", "channel")):
        (bad / "augvae.json").write_text(json.dumps({**meta, "config": {**meta["config"], key: value}}))
        assert main(["--checkpoint", str(bad), "--text", "a red circle", *BASE]) != 0
        line = _err_line(capsys)
        assert str(bad / "augvae.json") in line and key in line
