"""ECA, GC, SRM, CoordAtt and Triplet attention against their papers' formulas, their parameter counts,
their parameter checks (and SE/CBAM/SimAM's), and their place in every network."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from networks import create_net, model_names
from networks.attentions import ATTENTIONS, attention_layer, create_attention, resolve_param
from networks.attentions.se import SEModule
from networks.cifar_preresnet import CifarPreResNet, PreActBottleneck
from networks.cifar_resnet import Bottleneck as CifarBottleneck
from networks.cifar_resnet import CifarResNet
from networks.cifar_wideresnet import WideResNet
from networks.mobilenetv2 import MobileNetV2
from networks.resnet import BasicBlock, Bottleneck, ResNet
from utils.recipe import run_name

NEW = ["eca", "gc", "srm", "coordatt", "triplet"]
SHAPES = [(1, 8, 1, 1), (2, 8, 7, 7), (1, 8, 56, 56), (3, 5, 5, 9)]  # 1x1, 7x7, 56x56, batch 1, odd


# ---------------------------------------------------------------- the formulas, written plainly (float64)

def bn_eval(z, bn, dim=1):
    """Inference batchnorm over axis `dim` with the module's running statistics and affine."""
    shape = [1] * z.dim()
    shape[dim] = -1
    v = lambda t: t.detach().view(shape)  # noqa: E731
    return (z - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)


def eca_ref(m, x):
    w = m.conv.weight.view(-1)
    k, c = len(w), x.shape[1]
    y = F.pad(x.mean((2, 3)), ((k - 1) // 2, (k - 1) // 2))  # zero padding across channels
    z = sum(w[i] * y[:, i:i + c] for i in range(k))
    return x * torch.sigmoid(z)[:, :, None, None]


def gc_ref(m, x):
    wk, bk = m.conv_mask.weight.view(-1), m.conv_mask.bias
    c1, ln, c2 = m.transform[0], m.transform[1], m.transform[3]
    logits = torch.einsum("nchw,c->nhw", x, wk) + bk
    a = torch.softmax(logits.flatten(1), dim=1).view_as(logits)
    context = torch.einsum("nchw,nhw->nc", x, a)
    h = context @ c1.weight.flatten(1).T + c1.bias
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + ln.eps)
    h = torch.relu(h * ln.weight.view(-1) + ln.bias.view(-1))
    t = h @ c2.weight.flatten(1).T + c2.bias
    return x + t[:, :, None, None]


def srm_ref(m, x):
    hw = x.shape[2] * x.shape[3]
    mu = x.mean((2, 3))
    var = x.var((2, 3), unbiased=True) if hw > 1 else torch.zeros_like(mu)  # defined as 0 on a 1x1 map
    std = torch.sqrt(var + 1e-5)
    w = m.cfc.weight.view(-1, 2)  # the [C, 2] channel-wise weight
    z = w[:, 0] * mu + w[:, 1] * std
    return x * torch.sigmoid(bn_eval(z, m.bn))[:, :, None, None]


def coordatt_ref(m, x):
    h = x.shape[2]
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # [N, C, H + W]
    f = torch.einsum("mc,ncl->nml", m.conv1.weight.flatten(1), z) + m.conv1.bias[:, None]
    f = bn_eval(f, m.bn1)
    f = f * torch.clamp(f + 3, 0, 6) / 6  # h-swish
    a_h = torch.sigmoid(torch.einsum("cm,nml->ncl", m.conv_h.weight.flatten(1), f[:, :, :h]) + m.conv_h.bias[:, None])
    a_w = torch.sigmoid(torch.einsum("cm,nml->ncl", m.conv_w.weight.flatten(1), f[:, :, h:]) + m.conv_w.bias[:, None])
    return x * a_h[:, :, :, None] * a_w[:, :, None, :]


def triplet_ref(m, x):
    def gate(g, u):
        z = torch.cat([u.max(1, keepdim=True).values, u.mean(1, keepdim=True)], 1)
        return u * torch.sigmoid(bn_eval(F.conv2d(z, g.conv.weight, padding=3), g.bn))

    cw = gate(m.cw, x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # pool H, C-W plane
    hc = gate(m.hc, x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # pool W, H-C plane
    return (cw + hc + gate(m.hw, x)) / 3


REF = {"eca": eca_ref, "gc": gc_ref, "srm": srm_ref, "coordatt": coordatt_ref, "triplet": triplet_ref}


def randomized(name, channels, param=None, dtype=torch.float64, seed=0):
    """The module in eval mode with every parameter and BN statistic random (GC's and SRM's zero inits
    would hide half their formula)."""
    torch.manual_seed(seed)
    m = create_attention(name, channels, param).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn_like(mod.running_mean) * 0.3)
                mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
    return m


# GC at its default reduction has one hidden unit on these few channels, where LayerNorm outputs its
# bias whatever the context: reduction 2 keeps the softmax pooling visible in the output.
FORMULA_PARAM = {"gc": 2}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NEW)
def test_module_matches_its_formula_float64(name, shape):
    m = randomized(name, shape[1], FORMULA_PARAM.get(name))
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        torch.testing.assert_close(m(x), REF[name](m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (1, 32, 56, 56), (3, 16, 5, 9)])
def test_gc_float64_equals_global_context_to_rounding(shape):
    """GCNet's block (timm's GlobalContext with fusion by addition) from its formula, in float64:
    softmax attention pooling over H*W, 1x1 conv -> LayerNorm -> ReLU -> 1x1 conv, added to x. A
    float32 step anywhere (the softmax) would leave ~1e-8 relative; float64 throughout leaves rounding."""
    m = randomized("gc", shape[1], 4)
    assert m.transform[0].out_channels == shape[1] // 4 > 1  # a hidden width where the context matters
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        got, want = m(x), gc_ref(m, x)
        delta = want - x  # the block's own contribution, where a float32 softmax would show
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert ((got - x) - delta).abs().max() <= 1e-12 * delta.abs().max()
    # Half inputs still take the softmax in float32 and come back in their own dtype.
    with torch.no_grad():
        half = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_eca_given_kernel_size_and_adaptive_sizes():
    m = randomized("eca", 16, 5)
    assert m.conv.kernel_size == (5,) and m.conv.padding == (2,)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), eca_ref(m, x))
    # t = int(|log2 C + 1| / 2), next odd: the paper's adaptive size.
    sizes = {c: create_attention("eca", c).conv.kernel_size[0] for c in (1, 16, 64, 128, 256, 512, 1024, 2048)}
    assert sizes == {1: 1, 16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}


@pytest.mark.parametrize("name", NEW)
def test_gradcheck(name):
    m = randomized(name, 6)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("name", NEW)
def test_fresh_modules_start_as_their_papers_do(name):
    """GC's last conv is zero (x + 0 = x); SRM's channel-wise FC is zero (gate sigmoid(BN(0)) = 1/2)."""
    torch.manual_seed(0)
    m = create_attention(name, 16).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        if name == "gc":
            torch.testing.assert_close(m(x), x)
        elif name == "srm":
            torch.testing.assert_close(m(x), x * 0.5)
        else:
            assert not torch.allclose(m(x), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NEW)
def test_half_precision(name, dtype):
    m = randomized(name, 16, dtype=torch.float32)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        ref = m(x)
        out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("name", NEW)
def test_channels_last(name):
    m = randomized(name, 16, dtype=torch.float32)
    x = torch.randn(2, 16, 7, 9)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    out = m(xc)
    torch.testing.assert_close(out, m(x))
    out.sum().backward()
    assert xc.grad.shape == x.shape and torch.isfinite(xc.grad).all()


# ---------------------------------------------------------------- parameter counts

def param_formula(name, c, param=None):
    """Each module's own parameter count (with the reduction / kernel rules of its docstring)."""
    if name == "se":
        r = param or 16
        return 2 * c * max(1, c // r)
    if name == "eca":
        t = int(abs(math.log2(c) + 1) / 2)
        return param or (t if t % 2 else t + 1)
    if name == "gc":
        k = max(1, c // (param or 16))
        return (c + 1) + (c * k + k) + 2 * k + (k * c + c)  # mask conv, conv, LayerNorm, conv
    if name == "srm":
        return 2 * c + 2 * c  # [C, 2] channel-wise FC, BN affine
    if name == "coordatt":
        m = max(8, c // (param or 32))
        return (c * m + m) + 2 * m + 2 * (m * c + c)  # conv1, BN, conv_h and conv_w
    if name == "triplet":
        return 3 * (2 * 7 * 7 + 2)  # three 7x7 2->1 convs and their BN(1)
    raise KeyError(name)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("c", [3, 16, 64, 256, 2048])
def test_parameter_count_matches_formula(name, c):
    with torch.device("meta"):
        for param in {"eca": [None, 5], "gc": [None, 4], "coordatt": [None, 8]}.get(name, [None]):
            m = create_attention(name, c, param)
            assert sum(p.numel() for p in m.parameters()) == param_formula(name, c, param), (name, c, param)


# ---------------------------------------------------------------- parameter checks (every module)

BAD = [
    ("se", 0, "se: reduction must be an integer >= 1, got 0"),
    ("se", -1, "se: reduction must be an integer >= 1, got -1"),
    ("se", 2.5, "se: reduction must be an integer >= 1, got 2.5"),
    ("se", float("inf"), "se: reduction must be an integer >= 1, got inf"),
    ("se", "16", "se: reduction must be an integer >= 1, got '16'"),
    ("se", True, "se: reduction must be an integer >= 1, got True"),
    ("cbam", 0.0, "cbam: reduction must be an integer >= 1, got 0"),
    ("gc", 0, "gc: reduction must be an integer >= 1, got 0"),
    ("coordatt", 1.5, "coordatt: reduction must be an integer >= 1, got 1.5"),
    ("simam", 0, "simam: lambda must be a finite number > 0, got 0"),
    ("simam", -1e-4, "simam: lambda must be a finite number > 0, got -0.0001"),
    ("simam", float("nan"), "simam: lambda must be a finite number > 0, got nan"),
    ("simam", float("inf"), "simam: lambda must be a finite number > 0, got inf"),
    ("eca", 4, "eca: kernel size must be an odd integer >= 1, got 4"),
    ("eca", 0, "eca: kernel size must be an odd integer >= 1, got 0"),
    ("eca", -3, "eca: kernel size must be an odd integer >= 1, got -3"),
    ("eca", 3.5, "eca: kernel size must be an odd integer >= 1, got 3.5"),
    ("srm", 16.0, "srm: takes no parameter (leave --attention_param unset), got 16"),
    ("triplet", 1, "triplet: takes no parameter (leave --attention_param unset), got 1"),
]


@pytest.mark.parametrize("name,param,message", BAD)
def test_bad_parameters_are_one_clear_value_error(name, param, message):
    for build in (lambda: resolve_param(name, param), lambda: attention_layer(name, param),
                  lambda: create_attention(name, 8, param), lambda: ATTENTIONS[name](8, param)):
        with pytest.raises(ValueError) as e:
            build()
        assert str(e.value) == message


def test_good_parameters_build_as_given():
    # argparse gives floats: 16.0 builds the integer network, and resolve_param keeps the value as given.
    assert create_attention("se", 64, 16.0).fc[0].weight.shape == (4, 64)
    assert create_attention("cbam", 64, 8.0).ChannelGate.mlp[1].weight.shape == (8, 64)
    assert create_attention("eca", 64, 7.0).conv.kernel_size == (7,)
    assert create_attention("coordatt", 256, 16.0).conv1.out_channels == 16
    # A reduction larger than the channels keeps the reference's rule: one hidden unit (SE, CBAM, GC),
    # eight for CoordAtt (m = max(8, C // r)).
    assert create_attention("se", 64, 1000).fc[0].weight.shape == (1, 64)
    assert create_attention("gc", 64, 1000).transform[0].out_channels == 1
    assert create_attention("coordatt", 64, 1000).conv1.out_channels == 8
    assert [resolve_param(n, None) for n in ["none", "se", "simam"] + NEW] == [None, 16, 1e-4, None, 16, None, 32, None]
    assert resolve_param("se", 16.0) == 16.0 and isinstance(resolve_param("se", 16.0), float)


def test_run_folders_keep_todays_names():
    name = lambda att, p: run_name("imagenet", "resnet50", att, resolve_param(att, p), 0)  # noqa: E731
    assert name("se", 16.0) == name("se", None) == "imagenet-resnet50-se-param16.0-seed0"
    assert name("simam", 0.1) == "imagenet-resnet50-simam-param0.1-seed0"
    assert name("gc", None) == "imagenet-resnet50-gc-param16.0-seed0"
    assert name("coordatt", 8.0) == "imagenet-resnet50-coordatt-param8.0-seed0"
    assert name("eca", 5.0) == "imagenet-resnet50-eca-param5.0-seed0"
    assert name("srm", None) == "imagenet-resnet50-srm-seed0"  # nothing to name: no -param part
    assert name("triplet", None) == "imagenet-resnet50-triplet-seed0"
    assert name("eca", None) == "imagenet-resnet50-eca-seed0"  # adaptive kernel size


# ---------------------------------------------------------------- every network

def positions(model, kind):
    """{module name: channels} of every `kind` module (the channels read off its input layer)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, kind):
            parent = model.get_submodule(n.rsplit(".", 1)[0])
            prev = parent[int(n.rsplit(".", 1)[1]) - 1]
            out[n] = prev.num_features if isinstance(prev, nn.BatchNorm2d) else prev.out_channels
    return out


@pytest.fixture
def no_init(monkeypatch):
    """Layouts only: skip the weight initialisers (the networks are built on the CPU with uninitialised
    weights, faster than the meta device, whose initialisers run Python decompositions)."""
    for fn in ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "ones_", "zeros_", "constant_"):
        monkeypatch.setattr(nn.init, fn, lambda t, *a, **k: t)


@pytest.mark.parametrize("arch", model_names())
def test_every_network_builds_each_module_where_se_sits(arch, no_init):
    """Layout (weights left uninitialised): each new module takes the place of SE (same block, same
    wrapped layer, same channels), and the network's parameters are the plain network's plus the
    module's formula."""
    se = create_net(arch, "se", num_classes=10)
    where = positions(se, SEModule)
    plain = sum(p.numel() for p in se.parameters()) - sum(param_formula("se", c) for c in where.values())
    assert where
    for name in NEW:
        model = create_net(arch, name, num_classes=10)
        assert positions(model, ATTENTIONS[name]) == where, name
        expected = plain + sum(param_formula(name, c) for c in where.values())
        assert sum(p.numel() for p in model.parameters()) == expected, name


# One network per block family (ImageNet basic / grouped bottleneck / inverted residual; CIFAR
# post-activation basic and bottleneck, pre-activation bottleneck, wide, inverted residual), kept small:
# one block per stage or a narrow width; 32x32 inputs for the ImageNet nets, 16x16 for the CIFAR ones.
FAMILIES = {
    "resnet-basic": lambda a: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, attention=attention_layer(a)),
    "resnext-bottleneck": lambda a: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=32, width_per_group=4,
                                           attention=attention_layer(a)),
    "mobilenet_v2": lambda a: MobileNetV2(num_classes=10, width_mult=0.5, attention=attention_layer(a)),
    "resnet20": lambda a: create_net("resnet20", attention_type=a, num_classes=10),
    "cifar-bottleneck": lambda a: CifarResNet(CifarBottleneck, 1, attention=attention_layer(a)),
    "preresnet-bottleneck": lambda a: CifarPreResNet(PreActBottleneck, 1, attention=attention_layer(a)),
    "wideresnet10x2": lambda a: WideResNet(10, 2, attention=attention_layer(a)),
    "mobilenetv2": lambda a: create_net("mobilenetv2", attention_type=a, num_classes=10),
}


def tiny_input(family):
    size = 32 if family in ("resnet-basic", "resnext-bottleneck", "mobilenet_v2") else 16
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_backward_tiny_input(family):
    x = tiny_input(family)
    for name in NEW:
        torch.manual_seed(0)
        model = FAMILIES[family](name).train()
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), name
        out.logsumexp(1).sum().backward()
        mods = [m for m in model.modules() if isinstance(m, ATTENTIONS[name])]
        grads = [p.grad for m in mods for p in m.parameters()]
        assert mods and all(g is not None and torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("family", ["resnet-basic", "mobilenet_v2", "preresnet-bottleneck", "wideresnet10x2"])
def test_module_input_is_the_tensor_se_receives(family):
    """Same backbone weights, every attention module turned into the identity by a hook: per block,
    the new module's input is exactly the tensor SE's receives."""
    x = tiny_input(family)

    def inputs(model, kind):
        seen = {}
        for n, m in model.named_modules():
            if isinstance(m, kind):
                def grab(mod, args, out, n=n):
                    seen[n] = args[0].clone()
                    return args[0]  # identity: the rest of the network sees what it would without attention
                m.register_forward_hook(grab)
        with torch.no_grad():
            model(x)
        return seen

    torch.manual_seed(0)
    se = FAMILIES[family]("se").eval()
    ref = inputs(se, SEModule)
    for name in NEW:
        model = FAMILIES[family](name).eval()
        own = model.state_dict()
        backbone = {k: v for k, v in se.state_dict().items() if k in own and own[k].shape == v.shape}
        missing = model.load_state_dict(backbone, strict=False).missing_keys
        assert all(any(f"{p}." in k for p in positions(model, ATTENTIONS[name])) for k in missing), missing
        got = inputs(model, ATTENTIONS[name])
        assert list(got) == list(ref), name
        for n in ref:
            assert torch.equal(got[n], ref[n]), (name, n)
