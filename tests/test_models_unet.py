"""The CARE-SST U-Net: parameter names and shapes as CARE-SST has them, odd sizes, time embedding, blocks."""
import math

import pytest
import torch

from ddpm_engine.models import build_model
from ddpm_engine.models.layers import Attention, GlobalResponseNorm, LayerNorm2d, LinearAttention, ResBlock
from ddpm_engine.models.unet import pad_like, sinusoidal_embedding


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _resblock(prefix, c, c_emb=None, c_skip=0):
    p = {f"{prefix}.depthwise.weight": (c, (c + c_skip) // c, 7, 7), f"{prefix}.depthwise.bias": (c,),
         f"{prefix}.channelwise.0.weight": (4 * c, c), f"{prefix}.channelwise.0.bias": (4 * c,),
         f"{prefix}.channelwise.2.gamma": (1, 1, 1, 4 * c), f"{prefix}.channelwise.2.beta": (1, 1, 1, 4 * c),
         f"{prefix}.channelwise.4.weight": (c, 4 * c), f"{prefix}.channelwise.4.bias": (c,)}
    if c_emb:
        p |= {f"{prefix}.mlp.1.weight": (c, c_emb), f"{prefix}.mlp.1.bias": (c,)}
    return p


def _attention(prefix, c, linear, heads=4, dh=32, mem=4):
    kv = (2, heads, dh, mem) if linear else (2, heads, mem, dh)
    p = {f"{prefix}.mem_kv": kv, f"{prefix}.to_qkv.weight": (3 * heads * dh, c, 1, 1)}
    out = f"{prefix}.to_out.0" if linear else f"{prefix}.to_out"
    return p | {f"{out}.weight": (c, heads * dh, 1, 1), f"{out}.bias": (c,)}


def care_sst_parameters(c_in, c_out, e, d):
    """The issue's module list, written out independently of the implementation."""
    p = {"inc.0.weight": (d, c_in, 3, 3)}
    p |= _resblock("inc_block1.block1", d) | _resblock("inc_block1.block2", d, e) | _attention("sa0", d, True)
    for i, (ci, co) in enumerate([(d, 2 * d), (2 * d, 4 * d)], start=1):
        p |= {f"down{i}.down.1.weight": (co, ci, 2, 2), f"down{i}.down.1.bias": (co,)}
        p |= _resblock(f"down{i}.block1.block1", co) | _resblock(f"down{i}.block1.block2", co, e)
        p |= _attention(f"sa{i}", co, True)
    p |= {"down3.1.weight": (8 * d, 4 * d, 2, 2), "down3.1.bias": (8 * d,)}
    for s in (1, 2, 3):
        p |= _resblock(f"bot{s}_1", 8 * d) | _resblock(f"bot{s}_2", 8 * d) | _attention(f"bot_sa{s}", 8 * d, False)
    for i, (ci, co) in enumerate([(8 * d, 4 * d), (4 * d, 2 * d), (2 * d, d)], start=1):
        p |= {f"up{i}.up.1.weight": (ci, co, 2, 2), f"up{i}.up.1.bias": (co,)}
        p |= _resblock(f"up{i}.block1", co, c_skip=co) | _resblock(f"up{i}.block2", co, e)
        p |= _attention(f"sa{i + 3}", co, True)
    return p | {"outc.weight": (c_out, d, 1, 1), "outc.bias": (c_out,)}


def test_parameter_names_and_shapes_match_care_sst():
    model = build_model("care-sst", c_in=2, c_out=1, embed_dim=32, dim=8)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == care_sst_parameters(2, 1, 32, 8)
    assert (model.c_in, model.c_out) == (2, 1)


@pytest.mark.parametrize("size", [300, 75])
def test_forward_runs_at_odd_sizes_300_150_75_37(size):
    model = build_model("care-sst", c_in=3, c_out=2, embed_dim=16, dim=4, heads=2, dim_head=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), torch.tensor([0.3]))
    assert out.shape == (1, 2, size, size) and torch.isfinite(out).all()


def test_batch_elements_are_independent_and_time_matters():
    model = build_model("care-sst", embed_dim=16, dim=4, heads=2, dim_head=8).eval()
    with torch.no_grad():
        for p in model.parameters():  # GRN gamma/beta start at 0; make every path count
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 2, 33, 47)
        both = model(x, torch.tensor([0.1, 0.9]))
        one = model(x[1:], torch.tensor([0.9]))
        other_t = model(x[1:], torch.tensor([0.2]))
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)
    assert (one - other_t).abs().max() > 1e-4


def test_time_embedding_is_sin_cos_of_raw_t():
    e = 8
    inv_freq = 1.0 / 10000 ** (torch.arange(0, e, 2).float() / e)
    emb = sinusoidal_embedding(torch.tensor([0.5]), inv_freq)
    expected = [math.sin(0.5 / 10000 ** (2 * k / e)) for k in range(4)] + [math.cos(0.5 / 10000 ** (2 * k / e)) for k in range(4)]
    torch.testing.assert_close(emb[0], torch.tensor(expected))


def test_global_response_norm_formula():
    grn = GlobalResponseNorm(3)
    with torch.no_grad():
        grn.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3))
        grn.beta.fill_(0.5)
    x = torch.randn(2, 4, 5, 3)
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.gamma * (x * n) + grn.beta + x)


@pytest.mark.parametrize("gap", [(0, 0), (1, 0), (0, 1), (1, 1), (3, 2)])
def test_skip_padding_puts_half_the_gap_left_top(gap):
    x = torch.ones(1, 1, 4, 5)
    ref = torch.zeros(1, 1, 4 + gap[0], 5 + gap[1])
    out = pad_like(x, ref)
    top, left = gap[0] // 2, gap[1] // 2
    assert out.shape == ref.shape
    assert out.sum() == 20 and out[0, 0, top:top + 4, left:left + 5].sum() == 20


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="care-sst"):
        build_model("resnet")


def test_export_forms_compute_what_the_modules_compute(monkeypatch):
    """Under ONNX export the channel LayerNorm runs as reductions over axis 1 of NCHW, the fused q/k/v projection
    as three convolutions and the grouped depthwise conv over [x, skip] as a depthwise conv per input channel plus
    a 1x1 group sum (all faster under OpenVINO): the same outputs as the modules' own forward, to fp32 rounding."""
    torch.manual_seed(0)
    norm, block = LayerNorm2d(8), ResBlock(8, c_skip=8)
    linear, softmax = LinearAttention(8, heads=2, dim_head=4), Attention(8, 2, 4)
    x, skip = torch.randn(2, 8, 9, 7) * 3 + 1, torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        eager = [norm(x), block(x, skip=skip), linear(x), softmax(x)]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        exported = [norm(x), block(x, skip=skip), linear(x), softmax(x)]
    for want, got in zip(eager, exported):
        assert not torch.equal(got, want * 0)  # the blocks really ran
        torch.testing.assert_close(got, want, rtol=0, atol=6e-7)  # measured 4.8e-7 on each


def test_exported_graph_splits_no_channels_and_groups_one_input_per_conv(tmp_path):
    """The exported CARE-SST graph holds no channel Split/Slice after a convolution, no grouped Conv with more than
    one input channel per group and no channels-last LayerNormalization (patterns OpenVINO runs slowly)."""
    import onnx
    from onnx import numpy_helper

    from ddpm_engine.export import export_onnx

    torch.manual_seed(0)
    model = build_model("care-sst", c_in=2, c_out=1, embed_dim=16, dim=8, heads=1, dim_head=8).eval()
    graph = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", opt_size=(16, 16)).path)).graph
    weights = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    weights |= {n.output[0]: tuple(n.attribute[0].t.dims) for n in graph.node if n.op_type == "Constant"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    conv_out = {n.output[0] for n in convs}
    assert not [n.name for n in graph.node if n.op_type in ("Split", "Slice") and n.input[0] in conv_out]
    assert not [n.name for n in graph.node if n.op_type == "LayerNormalization"]
    for n in convs:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        assert group == 1 or weights[n.input[1]][1] == 1, (n.name, group, weights[n.input[1]])
