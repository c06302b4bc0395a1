"""Networks and attention registry against the reference layout, torchvision and the formulas."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import reference_layouts

from networks import IMAGENET_ARCHS, create_net
from networks.attentions import ATTENTIONS, create_attention
from networks.attentions.simam import SimAM, simam_formula

ATTNS = ["none", "se", "cbam", "simam"]


@pytest.fixture(scope="module")
def official():
    return reference_layouts()["imagenet"]


def test_fixture_covers_every_combination(official):
    assert sorted(official) == sorted(f"{a}/{t}" for a in IMAGENET_ARCHS for t in ATTNS)
    assert len(official) == 28


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
@pytest.mark.parametrize("attn", ATTNS)
def test_state_dict_layout_matches_reference(official, arch, attn):
    with torch.device("meta"):  # layout only: no memory, no init cost
        model = create_net(arch, attn)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    ref = official[f"{arch}/{attn}"]
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["params"]


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_forward_shapes_small_input(arch):
    torch.manual_seed(0)
    for attn in ATTNS:
        model = create_net(arch, attn, num_classes=7).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all(), (arch, attn)


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_plain_networks_load_torchvision_weights(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    ours = create_net(arch).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'resnet19'.*resnet18"):
        create_net("resnet19")
    with pytest.raises(ValueError, match="unknown attention type 'nope'.*simam"):
        create_net("resnet18", "nope")
    with pytest.raises(ValueError, match="unknown attention type"):
        create_attention("nope", 64)


def test_attention_params_reach_the_modules():
    m = create_net("resnet18", "simam", 0.1)
    lambdas = {mod.e_lambda for mod in m.modules() if isinstance(mod, SimAM)}
    assert lambdas == {0.1}
    assert {mod.e_lambda for mod in create_net("resnet18", "simam").modules() if isinstance(mod, SimAM)} == {1e-4}
    se = create_attention("se", 64, 8)
    assert se.fc[0].weight.shape == (8, 64)


def test_new_attention_is_one_registry_entry(monkeypatch):
    """A new module with a placement rule lands in every block without touching block code."""

    class Scale(nn.Module):
        placement = "mid"
        default_param = 2.0

        @classmethod
        def check_param(cls, param):
            return float(param)

        def __init__(self, channels, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    monkeypatch.setitem(ATTENTIONS, "scale", Scale)
    r50 = create_net("resnet50", "scale")
    assert isinstance(r50.layer1[0].conv2[1], Scale)  # right after the 3x3 conv
    mv2 = create_net("mobilenet_v2", "scale")
    assert isinstance(mv2.features[2].conv[1][1], Scale)  # right after the depthwise conv
    assert sum(isinstance(m, Scale) for m in r50.modules()) == 16


# --- SimAM against the paper's formula ------------------------------------------------------

def simam_numpy(x, lam):
    """The formula of simam.md, written independently in float64 numpy."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[2] * x.shape[3] - 1
    d = (x - x.mean(axis=(2, 3), keepdims=True)) ** 2
    v = d.sum(axis=(2, 3), keepdims=True) / n
    e_inv = d / (4 * (v + lam)) + 0.5
    return x / (1 + np.exp(-e_inv))


@pytest.mark.parametrize("lam", [1e-4, 0.1])
def test_simam_matches_formula_float64(lam):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    out = SimAM(5, lam)(x)
    np.testing.assert_allclose(out.numpy(), simam_numpy(x.numpy(), lam), rtol=1e-12, atol=1e-14)
    # A sanity value by hand: the energy depends only on distance to the mean, scaled by variance.
    x2 = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)  # mean 1, d = 1, v = 2/1
    e = 1 / (4 * (2 + lam)) + 0.5
    torch.testing.assert_close(SimAM(1, lam)(x2), x2 * torch.sigmoid(torch.tensor(e, dtype=torch.float64)))


def test_simam_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: simam_formula(t, 1e-4), (x,))
    assert torch.autograd.gradcheck(lambda t: SimAM(3, 0.1)(t), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_simam_half_precision_keeps_statistics_in_float32(dtype):
    torch.manual_seed(0)
    # Large offset and spread: half-precision variance sums overflow or lose all precision.
    x = (torch.randn(2, 8, 28, 28) * 30 + 200).to(dtype)
    out = SimAM(8, 1e-4)(x)
    assert out.dtype == dtype
    ref = torch.from_numpy(simam_numpy(x.float().numpy(), 1e-4)).float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_simam_channels_last():
    x = torch.randn(2, 16, 9, 9).to(memory_format=torch.channels_last)
    torch.testing.assert_close(SimAM()(x), SimAM()(x.contiguous()))


def test_simam_single_pixel_map_is_defined():
    """H*W = 1 gives n = 0; we define the variance as 0 there, so out = x * sigmoid(0.5)."""
    x = torch.randn(4, 3, 1, 1)
    out = SimAM()(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x * torch.sigmoid(torch.tensor(0.5)))


# --- SE and CBAM against their formulas -----------------------------------------------------

def test_se_formula():
    torch.manual_seed(0)
    se = create_attention("se", 32, 16)
    x = torch.randn(2, 32, 5, 5)
    w1, w2 = se.fc[0].weight, se.fc[2].weight
    s = torch.sigmoid(torch.relu(x.mean((2, 3)) @ w1.T) @ w2.T)
    torch.testing.assert_close(se(x), x * s[:, :, None, None])


def test_cbam_formula():
    torch.manual_seed(0)
    cbam = create_attention("cbam", 32, 16).eval()
    bn = cbam.SpatialGate.spatial.bn
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    x = torch.randn(2, 32, 6, 6)
    l1, l2 = cbam.ChannelGate.mlp[1], cbam.ChannelGate.mlp[3]
    mlp = lambda p: l2(torch.relu(l1(p)))  # noqa: E731
    y = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    pooled = torch.cat([y.amax(1, keepdim=True), y.mean(1, keepdim=True)], 1)  # max first, then mean
    conv = nn.functional.conv2d(pooled, cbam.SpatialGate.spatial.conv.weight, padding=3)
    z = (conv - 0.3) / torch.sqrt(torch.tensor(2.0 + bn.eps)) * bn.weight + bn.bias
    torch.testing.assert_close(cbam(x), y * torch.sigmoid(z))
    assert bn.momentum == 0.01

