"""AugVAE-ML / -SL: shapes, token layout, parameter counts, shared quantizer, ml_to_sl, I/O."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lverse.config import to_dict
from lverse.models.augvae import AugVAE, AugVAEConfig, ml_to_sl

# Narrow: 8 channels in 4 GroupNorm groups (the paper's 32 groups would need 32 channels).
TINY = dict(
    resolution=16, hidden_dim=8, norm_groups=4, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
    num_levels=3, codebook_size=16, codebook_dim=8,
)


def _tiny(variant: str = "ml") -> AugVAE:
    torch.manual_seed(0)
    return AugVAE(AugVAEConfig(variant=variant, **TINY))


def test_token_grids_and_shapes_ml() -> None:
    m = _tiny("ml")
    assert m.token_grids == [(8, 8), (4, 4), (2, 2)]
    assert m.tokens_per_image == 64 + 16 + 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = m(x)
    assert out.recon.shape == x.shape
    assert [tuple(i.shape) for i in out.indices] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert out.commit_loss.dim() == 0 and out.commit_loss.item() > 0
    m.eval()
    tokens = m.encode(x)
    assert tokens.shape == (2, 84) and tokens.dtype == torch.long
    # flat layout: each level's map in raster order, finest first
    idx = m(x).indices
    assert torch.equal(tokens, torch.cat([i.flatten(1) for i in idx], 1))
    assert torch.equal(tokens[:, 64:80].view(2, 4, 4), idx[1])
    rec = m.decode(tokens)
    assert rec.shape == x.shape
    torch.testing.assert_close(rec, m(x).recon, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        m.decode(tokens[:, :-1])
    with pytest.raises(ValueError, match="token ids"):
        m.decode(torch.full_like(tokens, 16))
    with pytest.raises(ValueError, match="expected images"):
        m.encode(torch.zeros(1, 3, 32, 32))


def test_token_grids_and_shapes_sl() -> None:
    m = _tiny("sl")
    assert m.token_grids == [(4, 4)] and m.tokens_per_image == 16
    assert len(m.encoders) == 2 and len(m.decoders) == 2 and m.connectors is not None
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = m(x)
    assert out.recon.shape == x.shape
    assert [tuple(i.shape) for i in out.indices] == [(3, 4, 4)]
    m.eval()
    tokens = m.encode(x)
    assert tokens.shape == (3, 16)
    assert m.decode(tokens).shape == x.shape


def test_paper_size_parameter_counts() -> None:
    with torch.device("meta"):
        ml = AugVAE(AugVAEConfig(variant="ml"))
        sl = AugVAE(AugVAEConfig(variant="sl"))
    assert ml.num_parameters() == 221_224_195
    assert sl.num_parameters() == 112_289_283
    assert ml.token_grids == [(64, 64), (32, 32), (16, 16), (8, 8)] and ml.tokens_per_image == 5440
    assert sl.token_grids == [(32, 32)] and sl.tokens_per_image == 1024
    # the codebook is a buffer, not a trainable parameter
    assert "quantizer.embedding" in dict(ml.named_buffers())
    assert not any(n.startswith("quantizer.") for n, _ in ml.named_parameters())


def test_one_quantizer_shared_by_all_levels() -> None:
    m = _tiny("ml")
    qs = m.quantizers
    assert len(qs) == 3 and all(q is m.quantizer for q in qs)
    assert sum(1 for mod in m.modules() if type(mod).__name__ == "EMAVectorQuantizer") == 1
    # shared 1x1 weights are single tensors with one bias row per level; no duplicate storage
    sd = m.state_dict()
    assert sd["pre_quant.weight"].shape == (8, 8, 1, 1) and sd["pre_quant.bias"].shape == (3, 8)
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(ptrs) == len(set(ptrs))
    # a training step applies one pooled EMA update driven by the indices of all levels
    m.train()
    before = m.quantizer.cluster_size.clone()
    out = m(torch.rand(1, 3, 16, 16))
    counts = torch.bincount(torch.cat([i.flatten() for i in out.indices]), minlength=16).float()
    torch.testing.assert_close(m.quantizer.cluster_size, 0.99 * before + 0.01 * counts)


def test_ml_to_sl_copies_kept_weights() -> None:
    ml = _tiny("ml")
    ml.train()
    ml(torch.rand(2, 3, 16, 16))  # move the EMA statistics away from their initial values
    sl = ml_to_sl(ml)
    assert sl.cfg.variant == "sl" and sl.token_grids == [(4, 4)]
    msd, ssd = ml.state_dict(), sl.state_dict()
    pairs = {f"encoders.{i}.": f"encoders.{i}." for i in range(2)}
    pairs.update({"decoders.1.": "decoders.0.", "decoders.2.": "decoders.1."})
    checked = 0
    for mk, mv in msd.items():
        for src, dst in pairs.items():
            if mk.startswith(src):
                assert torch.equal(ssd[dst + mk[len(src):]], mv), mk
                checked += 1
    assert checked == sum(1 for k in ssd if k.startswith(("encoders.", "decoders.")))
    for k in ("pre_quant.weight", "post_quant.weight", "quantizer.embedding",
              "quantizer.cluster_size", "quantizer.embed_avg"):
        assert torch.equal(ssd[k], msd[k]), k
    assert torch.equal(ssd["pre_quant.bias"][0], msd["pre_quant.bias"][1])
    assert torch.equal(ssd["post_quant.bias"][0], msd["post_quant.bias"][1])
    assert set(ssd) - set(msd) == {"connectors.0.weight", "connectors.0.bias",
                                   "connectors.1.weight", "connectors.1.bias"}
    # SL encodes the second level only: its tokens equal the ML's second-level tokens
    x = torch.rand(2, 3, 16, 16)
    ml.eval()
    sl.eval()
    assert torch.equal(sl.encode(x), ml.encode(x)[:, 64:80])
    with pytest.raises(ValueError, match="AugVAE-ML"):
        ml_to_sl(sl)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    m = _tiny("sl").eval()
    path = m.save(tmp_path / "vae.safetensors")
    m2 = AugVAE.load(path)
    assert m2.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(m2.eval().encode(x), m.encode(x))
    m3 = AugVAE.from_config(to_dict(m.cfg))
    assert m3.cfg == m.cfg
    with pytest.raises(ValueError, match="unknown key"):
        AugVAE.from_config({"hidden": 3})
    with pytest.raises(ValueError, match="variant"):
        AugVAE(AugVAEConfig(variant="xl", **TINY))


def test_reduced_precision_quantizer_stays_fp32() -> None:
    m = _tiny("ml").half()
    assert m.encoders[0].conv_in.weight.dtype == torch.float16
    assert m.quantizer.embedding.dtype == torch.float32
    out = m(torch.rand(1, 3, 16, 16).half())
    assert out.recon.dtype == torch.float16 and out.commit_loss.dtype == torch.float32
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.rand(1, 3, 16, 16))
    assert out.commit_loss.dtype == torch.float32


def test_norm_groups_is_the_groupnorm_group_count() -> None:
    m = _tiny("sl")
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and {n.num_groups for n in norms} == {TINY["norm_groups"]}
    assert AugVAEConfig().norm_groups == 32  # the paper's and the released checkpoints'
    with pytest.raises(ValueError, match="norm_groups"):
        AugVAE(AugVAEConfig(variant="ml", **{**TINY, "norm_groups": 3}))  # 8 channels, 3 groups


def test_files_with_the_retired_norm_key(tmp_path: Path) -> None:
    """Files written before norm_groups hold "norm": "group" (GroupNorm, 32 groups): they load;
    "channel" (a per-position norm, retired) is refused with the file named."""
    cfg = {**TINY, "hidden_dim": 32}
    del cfg["norm_groups"]
    m = AugVAE(AugVAEConfig(variant="sl", **cfg)).eval()
    path = m.save(tmp_path / "old.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["config"]["norm_groups"]
    meta["config"]["norm"] = "group"
    path.with_suffix(".json").write_text(json.dumps(meta))
    old = AugVAE.load(path)
    assert old.cfg == m.cfg and old.cfg.norm_groups == 32
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(old.eval().encode(x), m.encode(x))
    meta["config"]["norm"] = "channel"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"old\.safetensors: .*norm='channel'"):
        AugVAE.load(path)
    with pytest.raises(ValueError, match="norm='channel'"):
        AugVAE.from_config(meta["config"])


def test_shipped_config_loads_with_32_groups() -> None:
    """checkpoints/shapes/augvae.json predates norm_groups and holds "norm": "group"."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes" / "augvae.safetensors"
    if not path.is_file():
        pytest.skip("no shipped checkpoints")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"].get("norm") == "group" and "norm_groups" not in meta["config"]
    m = AugVAE.load(path)
    assert m.cfg.norm_groups == 32
    assert {mod.num_groups for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)} == {32}
