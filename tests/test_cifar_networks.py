"""CIFAR backbones against the reference layout, the reference log and the reference forward rules."""
import pytest
import torch
from torch import nn

from conftest import reference_layouts

from networks import create_net
from networks.attentions import attention_layer
from networks.attentions.simam import SimAM
from networks.cifar_mobilenetv2 import InvertedResidual
from networks.cifar_preresnet import PreActBasicBlock, PreActBottleneck
from networks.cifar_resnet import BasicBlock
from networks.cifar_wideresnet import WideBasicBlock, WideResNet
from networks.registry import MODELS, model_names

ATTNS = ["none", "se", "cbam", "simam"]
OFFICIAL = reference_layouts()["cifar"]
CIFAR_ARCHS = model_names("cifar")


def build_meta(arch, attn="none", param=None, num_classes=10):
    with torch.device("meta"):  # layout only: no memory, no init cost
        return create_net(arch, attn, param, num_classes=num_classes)


def test_every_reference_network_is_registered():
    ref_archs = {key.split("/")[0] for key in OFFICIAL}
    assert len(OFFICIAL) == 96 and len(ref_archs) == 12
    # The reference code also defines PreResNet-32, which the fixture does not list.
    assert set(CIFAR_ARCHS) == ref_archs | {"preresnet32"}
    assert all(MODELS[a][1] == "cifar" for a in CIFAR_ARCHS)


@pytest.mark.parametrize("key", list(OFFICIAL))
def test_state_dict_layout_matches_reference(key):
    arch, attn, classes = key.split("/")
    model = build_meta(arch, attn, num_classes=int(classes[1:]))
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == OFFICIAL[key]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL[key]["params"]


def test_reference_log_resnet20_simam_cifar100_params():
    model = create_net("resnet20", "simam", num_classes=100)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == 0.278


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_simam_follows_every_blocks_conv2(arch):
    # SimAM has no parameters, so the layout test cannot see where it sits.
    model = build_meta(arch, "simam")
    simam = {n for n, m in model.named_modules() if isinstance(m, SimAM)}
    wrapped = {n + ".1" for n, m in model.named_modules() if n.endswith(".conv2") and isinstance(m, nn.Sequential)}
    assert simam == wrapped and len(simam) > 0
    assert all(m.e_lambda == 1e-4 for m in model.modules() if isinstance(m, SimAM))


@pytest.mark.parametrize("arch", ["resnet20", "resnet164", "preresnet20", "preresnet164", "mobilenetv2"])
@pytest.mark.parametrize("attn", ATTNS)
def test_forward_shape(arch, attn):
    torch.manual_seed(0)
    model = create_net(arch, attn, num_classes=100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


@pytest.mark.parametrize("attn", ATTNS)
def test_small_wideresnet_forward_shape(attn):
    # The same code path as WRN-28-10 at a fraction of the cost.
    torch.manual_seed(0)
    model = WideResNet(10, 2, num_classes=10, attention=attention_layer(attn)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_wideresnet28x10_forward_and_dropout():
    torch.manual_seed(0)
    model = create_net("wideresnet28x10", "simam", num_classes=10)
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.3] * 12  # the reference's rate, one per block
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert model(x).shape == (1, 10)
        model.train()
        block, h = model.block1.layer[1], torch.randn(2, 160, 8, 8)
        assert not torch.equal(block(h), block(h))  # dropout acts in training
        block.eval()
        assert torch.equal(block(h), block(h))


def _zero(module):
    for p in module.parameters():
        nn.init.zeros_(p)


def test_blocks_follow_the_reference_residual_rules():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        # Post-activation: ReLU after the sum.
        b = BasicBlock(16, 16).eval()
        _zero(b.bn2)
        torch.testing.assert_close(b(x), x.relu())
        # Pre-activation: raw input added, no ReLU after the sum.
        b = PreActBasicBlock(16, 16).eval()
        _zero(b.conv2)
        torch.testing.assert_close(b(x), x)
        b = PreActBottleneck(64, 16).eval()
        _zero(b.conv3)
        x64 = torch.randn(2, 64, 8, 8)
        torch.testing.assert_close(b(x64), x64)
        # Projection shortcut of a pre-activation block: a bare 1x1 conv on the raw input.
        b = PreActBasicBlock(16, 32, stride=2).eval()
        _zero(b.conv2)
        torch.testing.assert_close(b(x), b.shortcut[0](x))
        # WRN: a projecting block's shortcut sees the pre-activated input.
        b = WideBasicBlock(16, 32, stride=2).eval()
        _zero(b.conv2)
        torch.testing.assert_close(b(x), b.convShortcut(b.bn1(x).relu()))
        # MobileNetV2: linear bottleneck; residual only at stride 1.
        b = InvertedResidual(16, 16, 6, 1).eval()
        _zero(b.bn3)
        torch.testing.assert_close(b(x), x)
        b = InvertedResidual(16, 16, 6, 2).eval()
        _zero(b.bn3)
        assert b(x).abs().sum() == 0 and b(x).shape == (2, 16, 4, 4)


def test_attention_param_reaches_cifar_modules():
    m = build_meta("preresnet164", "se", 8)
    assert m.layer3[0].conv3[1].fc[0].weight.shape == (32, 256)  # 256 / 8
    m = build_meta("resnet20", "simam", 0.1)
    assert {mod.e_lambda for mod in m.modules() if isinstance(mod, SimAM)} == {0.1}


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'resnet21'.*resnet20"):
        create_net("resnet21", num_classes=10)
    with pytest.raises(ValueError, match="unknown attention type 'nope'"):
        create_net("preresnet164", "nope", num_classes=10)
