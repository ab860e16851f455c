"""Official AugVAE checkpoints → lverse: reproduce the official outputs (golden files)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lverse.cli.convert import main
from lverse.convert import convert_official, load_official_checkpoint
from lverse.models.augvae import AugVAE

# $LVERSE_GOLDEN_DIR, else a copy inside the repo, else the shared reference directory
_CANDIDATES = [
    os.environ.get("LVERSE_GOLDEN_DIR", ""),
    str(Path(__file__).parent / "data" / "official-augvae-golden"),
    str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "official-augvae-golden"),  # ../shared beside the clone
]
GOLDEN = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "io.safetensors").is_file()), None)
if GOLDEN is None:
    pytest.skip(f"golden files not found in any of {_CANDIDATES}", allow_module_level=True)




@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "io.safetensors"))


@pytest.mark.parametrize("variant", ["ml", "sl"])
def test_converted_model_reproduces_official_outputs(variant: str, io: dict, tmp_path: Path) -> None:
    model = convert_official(GOLDEN / f"augvae_{variant}.ckpt")
    assert model.cfg.variant == variant and not model.training
    x = io["input"]
    expected_tokens, expected_rec = io[f"{variant}_tokens"], io[f"{variant}_reconstruction"]
    tokens = model.encode(x)
    assert torch.equal(tokens, expected_tokens)
    with torch.no_grad():
        out = model(x)
        from_tokens = model.decode(tokens)
    torch.testing.assert_close(out.recon, expected_rec, atol=1e-4, rtol=1e-4)
    # decode() reads the codebook directly (no straight-through rounding): same to float rounding
    torch.testing.assert_close(from_tokens, expected_rec, atol=1e-4, rtol=1e-4)

    # through the lverse file format: the CLI writes it, AugVAE.load reads it back
    out_path = tmp_path / f"{variant}.safetensors"
    assert main([str(GOLDEN / f"augvae_{variant}.ckpt"), str(out_path)]) == 0
    reloaded = AugVAE.load(out_path).eval()
    assert reloaded.cfg == model.cfg
    assert torch.equal(reloaded.encode(x), expected_tokens)
    with torch.no_grad():
        assert torch.equal(reloaded(x).recon, out.recon)


def test_config_read_from_hyper_parameters() -> None:
    ml = convert_official(GOLDEN / "augvae_ml.ckpt", variant="ml")
    c = ml.cfg
    assert (c.hidden_dim, c.ch_mult, c.num_res_blocks, c.z_channels) == (32, (1, 1, 2), 1, 32)
    assert (c.codebook_size, c.codebook_dim, c.resolution, c.num_levels) == (128, 32, 64, 4)
    assert (c.beta, c.ema_decay, c.ema_eps) == (0.25, 0.99, 1e-5)
    assert ml.token_grids == [(16, 16), (8, 8), (4, 4), (2, 2)]
    state, hp = load_official_checkpoint(GOLDEN / "augvae_ml.ckpt")
    assert isinstance(hp["args"], dict) and hp["args"]["attn_resolutions"] == [16, 8, 4, 2]
    assert all(v.dtype == torch.float32 for v in state.values())
    # official shares the 1x1 weights; the per-level biases land in level order
    assert torch.equal(ml.pre_quant.bias[2], state["pre_quants.2.bias"])
    assert torch.equal(ml.post_quant.bias[0], state["post_quants.3.bias"])  # finest <- last
    with pytest.raises(ValueError, match="'sl' but the keys are those of 'ml'"):
        convert_official(GOLDEN / "augvae_ml.ckpt", variant="sl")


def test_not_a_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"bogus\.ckpt: not a PyTorch Lightning checkpoint"):
        convert_official(bogus)
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"plain\.ckpt: .*'state_dict'"):
        load_official_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_official_checkpoint(tmp_path / "missing.ckpt")
    assert main([str(bogus), str(tmp_path / "out.safetensors")]) == 1


def test_unmapped_or_misshapen_key_is_named(tmp_path: Path) -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(GOLDEN / "augvae_ml.ckpt", map_location="cpu", weights_only=True)
    extra = dict(ckpt, state_dict=dict(ckpt["state_dict"], **{"encoders.0.surprise": torch.zeros(2)}))
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(ValueError, match="encoders.0.surprise"):
        convert_official(tmp_path / "extra.ckpt")
    sd = dict(ckpt["state_dict"])
    sd["decoders.1.conv_in.bias"] = torch.zeros(7, dtype=torch.float16)
    torch.save(dict(ckpt, state_dict=sd), tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"decoders\.1\.conv_in\.bias"):
        convert_official(tmp_path / "shape.ckpt")
    sd = dict(ckpt["state_dict"])
    sd["post_quants.2.weight"] = sd["post_quants.2.weight"] + 1
    torch.save(dict(ckpt, state_dict=sd), tmp_path / "unshared.ckpt")
    with pytest.raises(ValueError, match=r"post_quants\.2\.weight"):
        convert_official(tmp_path / "unshared.ckpt")
    # perceptual-loss weights in the released files are ignored
    sd = dict(ckpt["state_dict"], **{"loss.perceptual.net.0.weight": torch.zeros(3)})
    torch.save(dict(ckpt, state_dict=sd), tmp_path / "loss.ckpt")
    assert convert_official(tmp_path / "loss.ckpt").cfg.variant == "ml"


def _with_attn(src: Path, attn: list[int], dst: Path) -> Path:
    """A copy of an official checkpoint whose Namespace names other ``attn_resolutions``."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**dict(vars(ckpt["hyper_parameters"]["args"]), attn_resolutions=attn))
    torch.save(dict(ckpt, hyper_parameters=dict(ckpt["hyper_parameters"], args=args)), dst)
    return dst


def test_sl_attn_resolutions_in_either_released_form(io: dict, tmp_path: Path) -> None:
    # the golden SL carries the ML list, as the official finetuning leaves it
    _, hp = load_official_checkpoint(GOLDEN / "augvae_sl.ckpt")
    assert hp["args"]["attn_resolutions"] == [16, 8, 4, 2] and hp["args"]["finetune"] is True
    # the SL-only form (the kept grid alone) converts to the very same model
    sl_only = convert_official(_with_attn(GOLDEN / "augvae_sl.ckpt", [8], tmp_path / "sl8.ckpt"))
    assert sl_only.levels == [1] and sl_only.token_grids == [(8, 8)]
    assert torch.equal(sl_only.encode(io["input"]), io["sl_tokens"])
    # lists that fit neither form are refused, naming the file and both accepted forms
    for bad in ([16], [16, 8], [16, 8, 4, 2, 1], [32, 16, 8, 4]):
        with pytest.raises(ValueError, match=r"bad\.ckpt: attn_resolutions .* fit neither the ML "
                                             r"grid list \[16, 8, 4, 2\] .* kept grid \[8\]"):
            convert_official(_with_attn(GOLDEN / "augvae_sl.ckpt", bad, tmp_path / "bad.ckpt"))
    # an ML must list exactly its own grids
    with pytest.raises(ValueError, match=r"ml8\.ckpt: attn_resolutions \[8\] do not match .* \[16, 8, 4, 2\]"):
        convert_official(_with_attn(GOLDEN / "augvae_ml.ckpt", [8], tmp_path / "ml8.ckpt"))
