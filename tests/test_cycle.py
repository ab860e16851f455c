"""Reconstruction-regularised finetuning (lverse.train.cycle): soft tokens, the gradient paths of
L_IR and L_TR, the frozen-pass variants, query-only training, a step with the reconstruction
weights at 0 equal to stage 2's, and an exact resume."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import free_port, rank_env
from test_stage2_training import cfg_for, tiny_sl

from lverse.config import ConfigError
from lverse.data.encode import build_corpus, encode_corpus
from lverse.dist import cleanup
from lverse.models.biart import BiART, BiARTConfig, sequence_nll
from lverse.tokenizer import TextTokenizer
from lverse.train.cycle import CycleConfig, part_distribution, reconstruction_loss, soft_sequence
from lverse.train.loop import Trainer
from lverse.train.stage2 import Stage2Task

TINY = dict(num_image_codes=16, num_text_tokens=40, text_len=6, image_len=9, n_layer=2, n_head=2, n_embd=32,
            embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def _model_and_pair(seed: int = 0) -> tuple[BiART, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = BiART(BiARTConfig(**TINY))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)  # distributions that depend on the inputs
    v = m.vocab
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(v.text_start, v.special_start, (3, m.cfg.text_len), generator=g)
    text[0, 4:] = v.pad  # a short caption: its PAD positions stay hard
    codes = torch.randint(0, m.cfg.num_image_codes, (3, m.cfg.image_len), generator=g)
    return m, text, codes


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_soft_tokens_of_one_hot_distributions_equal_hard_tokens() -> None:
    m, text, codes = _model_and_pair()
    idx, seg = m.build_sequence(text, codes, "t2i")
    V = m.vocab.size
    assert torch.allclose(m(F.one_hot(idx, V).float(), seg), m(idx, seg), atol=1e-5)
    # soft_sequence: one-hot "distributions" in the caption slots give the one-hot sequence back,
    # and where keep is False the hard token stays whatever the distribution says
    probs = F.one_hot(idx[:, 1 : 1 + m.cfg.text_len], V).float()
    assert torch.equal(soft_sequence(idx, 1, probs, torch.ones_like(text, dtype=torch.bool), V), F.one_hot(idx, V).float())
    noise = torch.rand_like(probs)
    soft = soft_sequence(idx, 1, noise, m.vocab.is_text(text), V)
    assert torch.equal(soft[0, 5:], F.one_hot(idx[0, 5:], V).float())  # PAD slots and everything after
    assert torch.equal(soft[0, 1:5], noise[0, :4])


def test_part_distribution_covers_its_id_range_only() -> None:
    logits = torch.randn(2, 3, 10)
    p = part_distribution(logits, 4, 7, 10)
    assert torch.allclose(p.sum(-1), torch.ones(2, 3)) and bool((p[..., :4] == 0).all() and (p[..., 7:] == 0).all())
    assert torch.allclose(p[..., 4:7], logits[..., 4:7].softmax(-1))
    torch.manual_seed(0)
    g = part_distribution(logits.requires_grad_(), 4, 7, 10, gumbel=True, tau=0.5)
    assert torch.equal(g.sum(-1), torch.ones(2, 3)) and set(g.unique().tolist()) == {0.0, 1.0}  # one-hot forward
    g[..., 5].sum().backward()  # straight-through: the softmax's gradient flows
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def _first_pass(m: BiART, text: torch.Tensor, codes: torch.Tensor, direction: str) -> torch.Tensor:
    idx, seg = m.build_sequence(text, codes, direction)
    return m(idx, seg)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])  # i2t: L_IR through the soft caption; t2i: L_TR
def test_reconstruction_gradient_paths(direction: str) -> None:
    """grad(L) = grad through the soft tokens (freeze: second) + grad through the second pass's
    weights (freeze: first); the first part is nonzero, and it is d L / d logits chained by hand."""
    m, text, codes = _model_and_pair(1)

    def grads(freeze: str) -> list[torch.Tensor]:
        m.zero_grad()
        logits = _first_pass(m, text, codes, direction)
        reconstruction_loss(m, m, CycleConfig(freeze=freeze), logits, text, codes, direction, _no_autocast).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]

    full, through_soft, through_second = grads("none"), grads("second"), grads("first")
    for a, b, c in zip(full, through_soft, through_second):
        assert torch.allclose(a, b + c, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in through_soft) > 0
    # The soft path by hand: d L / d (first-pass logits), then back through the first pass.
    m.zero_grad()
    logits = _first_pass(m, text, codes, direction)
    leaf = logits.detach().requires_grad_()
    reconstruction_loss(m, m, CycleConfig(freeze="second"), leaf, text, codes, direction, _no_autocast).backward()
    assert float(leaf.grad.abs().sum()) > 0
    m.zero_grad()
    (logits * leaf.grad).sum().backward()
    for p, g in zip(m.parameters(), through_soft):
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), g, atol=1e-6, rtol=1e-4)
    # and d L / d logits agrees with a finite difference along a random direction
    d = torch.randn_like(leaf)
    with torch.no_grad():
        lo = reconstruction_loss(m, m, CycleConfig(), leaf - 1e-2 * d, text, codes, direction, _no_autocast)
        hi = reconstruction_loss(m, m, CycleConfig(), leaf + 1e-2 * d, text, codes, direction, _no_autocast)
    assert float((hi - lo) / 2e-2) == pytest.approx(float((leaf.grad * d).sum()), rel=2e-2, abs=1e-4)


def test_reconstruction_loss_is_the_nll_of_the_original_target_given_the_soft_reference() -> None:
    """L_IR by hand: the caption distribution of the i2t pass, soft in the t2i sequence, and the
    mean NLL of the original image codes."""
    m, text, codes = _model_and_pair(2)
    v, c = m.vocab, m.cfg
    logits = _first_pass(m, text, codes, "i2t")
    P = c.image_len + 2
    probs = logits[:, P - 1 : P - 1 + c.text_len, v.text_start : v.special_start].softmax(-1)
    idx, seg = m.build_sequence(text, codes, "t2i")
    x = F.one_hot(idx, v.size).float()
    keep = v.is_text(text)
    x[:, 1 : 1 + c.text_len, v.text_start : v.special_start] = torch.where(
        keep[..., None], probs, x[:, 1 : 1 + c.text_len, v.text_start : v.special_start])
    out = F.log_softmax(m(x, seg), -1)[:, c.text_len + 1 : -1]  # positions predicting the image codes
    want = -out.gather(-1, idx[:, c.text_len + 2 :, None]).mean().detach()
    got = reconstruction_loss(m, m, CycleConfig(), logits, text, codes, "i2t", _no_autocast).detach()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    _, st = sequence_nll(m(x, seg), idx, seg, v)
    assert float(got) == pytest.approx(float(st["nll_gen"]), rel=1e-5)


# ------------------------------------------------------------------------------------------
# Through the trainer


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cyc")
    corpus = build_corpus("shapes", "", "", "train", 32, 32, 0)
    encode_corpus(tiny_sl(), corpus, root / "tok", batch_size=32, num_workers=0, shard_size=40, progress=False)
    TextTokenizer.train([c for i in range(32) for c in corpus[i]["captions"]], vocab_size=600).save(root / "tok.json")
    return root / "tok", root / "tok.json"


def _fit(tokens: tuple[Path, Path], run: Path, cycle: dict | None, resume: str | None = None,
         start: dict | None = None, **train: object) -> Trainer:
    """A tiny cycle run; ``start`` (if given) receives the weights it started from."""
    over = dict(max_steps=4, batch_size=4)
    over.update(train)
    cfg = cfg_for(*tokens, run, **over)
    cfg.model.n_layer = 1
    cfg.cycle = CycleConfig(**cycle) if cycle is not None else None

    def task() -> Stage2Task:
        t = Stage2Task(cfg)
        if start is not None:
            start.update({k: v.clone() for k, v in t.model.state_dict().items()})
        return t

    tr = Trainer(cfg.train, task, full_config=cfg, resume=resume)
    tr.fit()
    return tr


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.task.model.state_dict().items()}


def test_zero_reconstruction_weights_give_the_plain_step(tokens: tuple[Path, Path], tmp_path: Path) -> None:
    plain = _state(_fit(tokens, tmp_path / "plain", None))
    zero = _state(_fit(tokens, tmp_path / "zero", {"w_ir": 0.0, "w_tr": 0.0}))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    full = _state(_fit(tokens, tmp_path / "full", {}))
    assert any(not torch.equal(plain[k], full[k]) for k in plain)


def test_query_only_training_moves_the_query_rows_only(tokens: tuple[Path, Path], tmp_path: Path) -> None:
    start: dict[str, torch.Tensor] = {}
    tr = _fit(tokens, tmp_path / "q", {"trainable": "query"}, start=start, max_steps=2, weight_decay=0.1)
    end = tr.task.model.state_dict()
    C = tr.task.model.cfg.n_embd
    for k in start:
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            assert not torch.equal(start[k][:C], end[k][:C]), k
            assert torch.equal(start[k][C:], end[k][C:]), k
        else:
            assert torch.equal(start[k], end[k]), k


def test_cycle_resume_is_exact(tokens: tuple[Path, Path], tmp_path: Path) -> None:
    cyc = {"gumbel": True, "tau": 0.7}  # the Gumbel draws come from the saved RNG state
    full = _state(_fit(tokens, tmp_path / "a", cyc, max_steps=6))
    _fit(tokens, tmp_path / "b", cyc, max_steps=3, ckpt_every=3)
    resumed = _state(_fit(tokens, tmp_path / "b", cyc, resume=str(tmp_path / "b"), max_steps=6, ckpt_every=3))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("precision", ["bf16", "fp16-o2"])
def test_cycle_trains_in_reduced_precision(tokens: tuple[Path, Path], tmp_path: Path, precision: str) -> None:
    from lverse.train.logger import read_metrics

    tr = _fit(tokens, tmp_path / precision, {"freeze": "second"}, precision=precision, max_steps=4, log_every=1)
    rows = read_metrics(tr.run_dir)
    assert {"cycle/l_ig", "cycle/l_tr", "cycle/l_tg", "cycle/l_ir"} <= {k for r in rows for k in r}
    assert all(math.isfinite(r["loss"]) for r in rows) and tr.state.nonfinite_steps == 0
    assert all(bool(torch.isfinite(w).all()) for _, w in tr.precision.named_weights(tr.task.model))


def _worker(rank: int, port: int, tokens: str, tok: str, run_dir: str, out: str, cyc: dict) -> None:
    os.environ.update(rank_env(rank, port))
    torch.set_num_threads(1)
    cfg = cfg_for(Path(tokens), Path(tok), Path(run_dir), max_steps=4, batch_size=2, strategy="ddp")
    cfg.model.n_layer = 1
    cfg.cycle = CycleConfig(**cyc)
    tr = Trainer(cfg.train, lambda: Stage2Task(cfg), full_config=cfg)
    tr.fit()
    torch.save(tr.task.model.state_dict(), f"{out}/r{rank}.pt")
    cleanup()
    os._exit(0)  # as test_stage2_training's workers: no gloo teardown at exit


def test_two_ddp_processes_hold_identical_weights(tokens: tuple[Path, Path], tmp_path: Path) -> None:
    """DDP with two passes per step, one of them through detached weights (freeze: second)."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), *map(str, tokens), str(tmp_path / "ddp"), str(tmp_path), {"freeze": "second"}),
             nprocs=2, join=True)
    a, b = torch.load(tmp_path / "r0.pt", weights_only=True), torch.load(tmp_path / "r1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cycle_config_errors(tokens: tuple[Path, Path], tmp_path: Path) -> None:
    for bad, match in (({"trainable": "keys"}, "trainable"), ({"freeze": "both"}, "freeze"), ({"w_ir": -1.0}, "w_ir"),
                       ({"tau": 0.0}, "tau")):
        with pytest.raises(ConfigError, match=match):
            _fit(tokens, tmp_path / "x", bad)
    cfg = cfg_for(*tokens, tmp_path / "y")
    cfg.cycle, cfg.directions = CycleConfig(), "mixed"
    with pytest.raises(ConfigError, match="mixed"):
        Stage2Task(cfg)
