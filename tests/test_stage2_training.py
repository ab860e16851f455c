"""Stage 2: encode Shapes to token shards, train a tiny BiART through the shared trainer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, rank_env

import lverse.shapes  # noqa: F401  (registers data.kind=shapes, also in spawned workers)
from lverse.cli.train import train_biart as stage2_main
from lverse.config import ConfigError, from_dict
from lverse.data.encode import build_corpus, encode_corpus
from lverse.data.tokens import TokenDataset, read_meta
from lverse.dist import cleanup
from lverse.files import load_weights
from lverse.models.augvae import AugVAE, AugVAEConfig
from lverse.models.biart import BiART
from lverse.tokenizer import TextTokenizer
from lverse.train.logger import read_metrics
from lverse.train.loop import Trainer
from lverse.train.stage2 import Stage2Config, Stage2Task


def tiny_sl() -> AugVAE:
    """A random-weight AugVAE-SL at 32 px: an 8x8 map of codes from a 32-code book."""
    torch.manual_seed(0)
    return AugVAE(AugVAEConfig(variant="sl", resolution=32, hidden_dim=32, ch_mult=(1, 1), num_res_blocks=1,
                               z_channels=8, codebook_size=32, codebook_dim=8, num_levels=3))


@pytest.fixture(scope="module")
def shapes_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("s2")
    sl = tiny_sl()
    corpus = build_corpus("shapes", "", "", "train", 32, 96, 0)
    meta = encode_corpus(sl, corpus, root / "tok", batch_size=32, num_workers=0, shard_size=40, progress=False)
    assert meta["num_items"] == 96 and meta["tokens_per_image"] == 64 and len(meta["shards"]) == 3
    texts = [c for i in range(96) for c in corpus[i]["captions"]]
    TextTokenizer.train(texts, vocab_size=600).save(root / "tok.json")
    return root / "tok", root / "tok.json"


def cfg_for(tokens: Path, tok: Path, run_dir: Path, **train: object) -> Stage2Config:
    t = dict(run_dir=str(run_dir), device="cpu", batch_size=8, lr=3e-3, max_steps=6, log_every=2, num_workers=0,
             progress=False, tensorboard=False, image_every=0, ckpt_every=100, plateau_patience=0, precision="fp32")
    t.update(train)
    vocab = TextTokenizer.load(tok).vocab_size
    return from_dict(Stage2Config, {
        "model": {"num_image_codes": 32, "num_text_tokens": vocab, "text_len": 24, "image_len": 64,
                  "n_layer": 2, "n_head": 2, "n_embd": 32, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0},
        "data": {"tokens": [str(tokens)], "tokenizer": str(tok), "bpe_dropout": False},
        "train": t})


def fit(cfg: Stage2Config, resume: str | None = None) -> tuple[Trainer, dict]:
    tr = Trainer(cfg.train, lambda: Stage2Task(cfg), full_config=cfg, resume=resume)
    return tr, tr.fit()


def test_token_shards_roundtrip(shapes_tokens: tuple[Path, Path]) -> None:
    tokens, _ = shapes_tokens
    ds = TokenDataset(tokens)
    assert len(ds) == read_meta(tokens)["num_items"] == 96
    item = ds[(5, 123)]
    assert item["codes"].shape == (64,) and item["codes"].max() < 32 and isinstance(item["caption"], str)
    # the caption choice follows the access seed; several phrasings exist per scene
    assert len({ds[(5, s)]["caption"] for s in range(20)}) > 1
    assert ds[(5, 7)]["caption"] == ds[(5, 7)]["caption"]


def test_tiny_biart_lowers_both_directions(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    _, res = fit(cfg_for(*shapes_tokens, tmp_path / "run", max_steps=60, log_every=10))
    m = read_metrics(res["run_dir"])
    for key in ("t2i/nll_image", "i2t/nll_text", "t2i/nll_text", "i2t/nll_image"):
        assert m[-1][key] < 0.8 * m[0][key], (key, m[0][key], m[-1][key])
    assert (Path(res["run_dir"]) / "model.safetensors").exists() is False  # only the CLI exports
    assert (Path(res["run_dir"]) / "checkpoints" / "step_0000060" / "tokenizer.json").is_file()


def test_direction_alternates_identically(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    task = Stage2Task(cfg_for(*shapes_tokens, tmp_path / "x"))
    assert [task.direction(s) for s in range(4)] == ["t2i", "i2t", "t2i", "i2t"]


def test_t2i_share_spreads_the_directions_evenly(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = cfg_for(*shapes_tokens, tmp_path / "x")
    cfg.t2i_share = 0.75
    task = Stage2Task(cfg)
    dirs = [task.direction(s) for s in range(400)]
    assert dirs[:8] == ["t2i", "t2i", "t2i", "i2t"] * 2 and dirs.count("t2i") == 300
    cfg.t2i_share = 1 / 3
    dirs = [Stage2Task(cfg).direction(s) for s in range(300)]
    assert dirs.count("t2i") == 100 and "t2i, t2i" not in ", ".join(dirs)
    cfg.t2i_share = 1.0
    with pytest.raises(ConfigError, match="t2i_share"):
        Stage2Task(cfg)


def test_text_dropout_empties_only_text_to_image_captions(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    """Classifier-free guidance's training half: about ``text_dropout`` of the text->image
    captions become all PAD, image->text rows never, the same rows again for the same step."""
    cfg = cfg_for(*shapes_tokens, tmp_path / "x")
    cfg.text_dropout = 0.25
    task = Stage2Task(cfg)
    text = torch.full((400, cfg.model.text_len), task.vocab.text_start)
    out = task.drop_captions(text, step=4, n_t2i=200)
    empty = (out == task.vocab.pad).all(1)
    assert 30 < int(empty[:200].sum()) < 70 and not bool(empty[200:].any())
    assert torch.equal(out[~empty], text[~empty])
    assert torch.equal(task.drop_captions(text, 4, 200), out)
    assert not torch.equal(task.drop_captions(text, 6, 200), out)
    # An empty caption contributes no text term to the loss: its rows train p(image) only.
    from lverse.models.biart import sequence_nll
    codes = torch.zeros(2, cfg.model.image_len, dtype=torch.long)
    idx, seg = task.model.build_sequence(torch.full((2, cfg.model.text_len), task.vocab.pad), codes, "t2i")
    _, st = sequence_nll(task.model(idx, seg), idx, seg, task.vocab)
    assert int(st["n_text"]) == 0 and int(st["n_image"]) == 2 * cfg.model.image_len
    with pytest.raises(Exception, match="text_dropout"):
        bad = cfg_for(*shapes_tokens, tmp_path / "y")
        bad.text_dropout = 1.0
        Stage2Task(bad)


def test_resume_matches_unbroken(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    full, _ = fit(cfg_for(*shapes_tokens, tmp_path / "a", max_steps=8))
    fit(cfg_for(*shapes_tokens, tmp_path / "b", max_steps=5))
    resumed, res = fit(cfg_for(*shapes_tokens, tmp_path / "b", max_steps=8), resume=str(tmp_path / "b"))
    for (k, a), (_, b) in zip(full.task.model.state_dict().items(), resumed.task.model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("precision", ["fp32", "fp16-o2"])
def test_weight_mean_is_the_mean_of_the_steps_weights(shapes_tokens: tuple[Path, Path], tmp_path: Path, precision: str) -> None:
    """train.average=mean exports the mean of the (master) weights after steps 3..6: the same as
    averaging the checkpoints written after each of those steps; the last step's own weights
    go to model_raw.safetensors."""
    tr, res = fit(cfg_for(*shapes_tokens, tmp_path / "avg", max_steps=6, ckpt_every=1, keep_last=10, average="mean",
                          average_start=3, precision=precision))
    tr.export()
    run = Path(res["run_dir"])
    steps = [load_weights(run / "checkpoints" / f"step_{s:07d}" / "model.safetensors")[0] for s in range(3, 7)]
    avg, raw = load_weights(run / "model.safetensors")[0], load_weights(run / "model_raw.safetensors")[0]
    for k in avg:
        assert avg[k].dtype == torch.float32
        assert torch.allclose(avg[k], torch.stack([s[k] for s in steps]).mean(0), atol=1e-6), k
        assert torch.equal(raw[k], steps[-1][k]), k
    assert any(not torch.equal(avg[k], raw[k]) for k in avg)


def test_weight_ema_resumes_exactly(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    over = dict(average="ema", average_decay=0.5, average_start=2)
    full, _ = fit(cfg_for(*shapes_tokens, tmp_path / "a", max_steps=8, **over))
    fit(cfg_for(*shapes_tokens, tmp_path / "b", max_steps=5, **over))
    resumed, _ = fit(cfg_for(*shapes_tokens, tmp_path / "b", max_steps=8, **over), resume=str(tmp_path / "b"))
    assert full.average.count == resumed.average.count == 7
    for a, b in zip(full.average.avg, resumed.average.avg):
        assert torch.equal(a, b)


def test_fp16_o2_training_keeps_fp32_masters(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    tr, res = fit(cfg_for(*shapes_tokens, tmp_path / "o2", max_steps=6, precision="fp16-o2"))
    model = tr.task.model
    assert model.tok_emb.weight.dtype == torch.float16
    assert all(m.weight.dtype == torch.float32 for _, m in model.keep_fp32_modules())
    saved = BiART.load(Path(res["run_dir"]) / "checkpoints" / "step_0000006" / "model.safetensors")
    assert saved.tok_emb.weight.dtype == torch.float32  # the checkpoint holds the fp32 masters
    assert not torch.equal(saved.tok_emb.weight, saved.tok_emb.weight.half().float())
    m = read_metrics(res["run_dir"])
    assert all(r["loss_scale"] >= 1 for r in m)


def test_cli_describe_and_vocab_mismatch(shapes_tokens: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from lverse.config import to_dict

    d = to_dict(cfg_for(*shapes_tokens, tmp_path / "c"))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    paper = tmp_path / "paper.yaml"
    paper.write_text("model: {}\n")
    assert stage2_main(["--config", str(paper), "--describe"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["params"] == 522_170_368
    d["model"]["num_text_tokens"] = 123
    d["auto_vocab"] = False
    p.write_text(yaml.safe_dump(d))
    assert stage2_main(["--config", str(p)]) == 2
    assert "num_text_tokens" in capsys.readouterr().err


def test_cli_tears_the_process_group_down_after_a_finished_run_only(
    shapes_tokens: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run leaves the process group through dist.cleanup() (barrier, then destroy);
    a failed one does not, since a peer rank may already be gone and the barrier would hang."""
    import yaml

    import lverse.cli.train as cli
    from lverse.config import to_dict

    calls: list[int] = []
    monkeypatch.setattr(cli, "cleanup", lambda: calls.append(1))
    d = to_dict(cfg_for(*shapes_tokens, tmp_path / "run", max_steps=2))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    assert stage2_main(["--config", str(p)]) == 0
    assert calls == [1]
    assert stage2_main(["--config", str(p), "train.max_steps=0"]) == 2
    assert calls == [1]


def test_encode_cli_writes_tokens_and_leaves_the_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import lverse.cli.encode as enc

    calls: list[int] = []
    monkeypatch.setattr(enc, "cleanup", lambda: calls.append(1))
    sl = tiny_sl()
    weights = sl.save(tmp_path / "sl.safetensors")
    args = ["--augvae", str(weights), "--size", "12", "--out", str(tmp_path / "tok"), "--num-workers", "0", "--device", "cpu"]
    assert enc.main(args) == 0
    assert json.loads(capsys.readouterr().out)["num_items"] == 12 and read_meta(tmp_path / "tok")["num_items"] == 12
    assert calls == [1]
    # The Shapes seed is recorded, so a tool can tell which scenes the tokens hold (and which are fresh).
    assert read_meta(tmp_path / "tok")["seed"] == 0
    assert enc.main(args[:4] + ["--seed", "3", "--out", str(tmp_path / "tok3"), "--num-workers", "0", "--device", "cpu"]) == 0
    assert read_meta(tmp_path / "tok3")["seed"] == 3
    capsys.readouterr()
    assert enc.main(["--augvae", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "t2")]) == 2
    assert calls == [1, 1]


def _worker(rank: int, port: int, tokens: str, tok: str, run_dir: str, out: str, strategy: str = "ddp") -> None:
    os.environ.update(rank_env(rank, port))
    torch.set_num_threads(1)
    cfg = cfg_for(Path(tokens), Path(tok), Path(run_dir), max_steps=4, grad_accum=2, batch_size=4, strategy=strategy,
                  grad_clip=1.0, average="mean", average_start=2)
    tr = Trainer(cfg.train, lambda: Stage2Task(cfg), full_config=cfg)
    tr.fit()
    state = tr.export_state()  # collective under FSDP
    with tr.average.swapped():
        avg = {k: v.clone() for k, v in tr.export_state().items()}
    if strategy == "ddp":
        state = tr.task.model.state_dict()  # this rank's own replica
        avg = dict(zip(tr.average.names, tr.average.avg))  # and its own average
    torch.save(state, f"{out}/{strategy}_r{rank}.pt")
    torch.save(avg, f"{out}/{strategy}_avg_r{rank}.pt")
    cleanup()  # barrier, then destroy: an unsynchronised teardown aborted about 1 run in 4 under FSDP
    # Leave without the interpreter's teardown: the work is saved, and a gloo thread destroyed at
    # exit can still abort the process (SIGABRT; seen once in a full-suite run on 2026-11-23, not
    # in 18 runs of this test alone), which mp.spawn reports as a failure of the training.
    os._exit(0)


def test_two_gloo_processes_hold_identical_weights(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    tokens, tok = shapes_tokens
    mp.spawn(_worker, args=(free_port(), str(tokens), str(tok), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "ddp_r0.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp_r1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a_avg = torch.load(tmp_path / "ddp_avg_r0.pt", weights_only=True)
    b_avg = torch.load(tmp_path / "ddp_avg_r1.pt", weights_only=True)
    assert all(torch.equal(a_avg[k], b_avg[k]) for k in a_avg)  # replicas keep the same weight average
    assert any(not torch.equal(a_avg[k], a[k]) for k in a_avg)
    # FSDP (sharded weights, grads and optimizer state) trains the same model as DDP
    mp.spawn(_worker, args=(free_port(), str(tokens), str(tok), str(tmp_path / "fsdp"), str(tmp_path), "fsdp"),
             nprocs=2, join=True)
    f = torch.load(tmp_path / "fsdp_r0.pt", weights_only=True)
    assert f.keys() == a.keys()
    for k in a:
        assert torch.allclose(f[k], a[k], atol=1e-5, rtol=1e-4), k
    f_avg = torch.load(tmp_path / "fsdp_avg_r0.pt", weights_only=True)
    for k in a_avg:  # FSDP averages its shards into the same mean
        assert torch.allclose(f_avg[k], a_avg[k], atol=1e-5, rtol=1e-4), k
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_0000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "state.pt").is_file()


def test_ckpt_every_zero_writes_only_the_final_checkpoint(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    _, res = fit(cfg_for(*shapes_tokens, tmp_path / "run", max_steps=4, ckpt_every=0))
    steps = sorted(p.name for p in (Path(res["run_dir"]) / "checkpoints").glob("step_*"))
    assert steps == ["step_0000004"]


def test_num_image_codes_must_equal_the_codebook(shapes_tokens: tuple[Path, Path], tmp_path: Path) -> None:
    """Training accepts only what `lverse bundle` accepts: BiART's image vocabulary is the
    AugVAE's codebook (32 codes here), neither larger nor smaller."""
    cfg = cfg_for(*shapes_tokens, tmp_path / "x")
    cfg.auto_vocab, cfg.model.num_image_codes = False, 64
    with pytest.raises(ConfigError, match="model.num_image_codes=64 but the token data comes from an AugVAE codebook of 32"):
        Stage2Task(cfg)
    cfg.auto_vocab = True  # follows the data, as text tokens and image length do (it used to keep the larger 64)
    assert Stage2Task(cfg).model.cfg.num_image_codes == 32
