"""CIFAR pre-activation ResNet (He et al., 2016, "Identity Mappings") with a pluggable attention module.

Layout of the SimAM reference: 3x3 stem (no norm), three stages of BN-ReLU-conv blocks whose shortcut
is the raw input or a bare 1x1 conv, then the final BN + ReLU (`bn`), average pooling and `linear`.
Weights keep PyTorch's default init, as in the reference.

Where the modules go: a pre-activation branch ends with a conv, not a norm, so "end" lands on the last
conv (basic: conv2, bottleneck: conv3); "mid" lands after the 3x3 conv (conv2) in both blocks.
"""
from torch import nn

from .cifar_resnet import conv1x1, conv3x3, make_stages, projection
from .registry import register_model


def attach_any(layer, attention, placements, channels):
    """`layer` followed by the attention module when its placement is one of `placements`.

    For a layer that sits at several placements at once (the basic block's conv2 is both
    after the 3x3 conv and the end of the branch).
    """
    if attention is None or attention.placement not in placements:
        return layer
    return nn.Sequential(layer, attention(channels))


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp, planes, stride=1, attention=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = conv3x3(inp, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = attach_any(conv3x3(planes, planes), attention, ("mid", "end"), planes)
        self.shortcut = projection(inp, planes, stride, norm=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)  # the shortcut takes the raw input; no ReLU after the sum


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride=1, attention=None):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = conv1x1(inp, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = attach_any(conv3x3(planes, planes, stride), attention, ("mid",), planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = attach_any(conv1x1(planes, out), attention, ("end",), out)
        self.shortcut = projection(inp, out, stride, norm=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + self.shortcut(x)


class CifarPreResNet(nn.Module):
    def __init__(self, block, blocks, num_classes=10, attention=None):
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        (self.layer1, self.layer2, self.layer3), width = make_stages(block, blocks, attention)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(width, num_classes)

    def forward_features(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.relu(self.bn(x))

    def forward(self, x):
        return self.linear(self.forward_features(x).mean(dim=(2, 3)))


@register_model("preresnet20", dataset="cifar")
def preresnet20(**kw):
    return CifarPreResNet(PreActBasicBlock, 3, **kw)


@register_model("preresnet32", dataset="cifar")
def preresnet32(**kw):
    return CifarPreResNet(PreActBasicBlock, 5, **kw)


@register_model("preresnet56", dataset="cifar")
def preresnet56(**kw):
    return CifarPreResNet(PreActBasicBlock, 9, **kw)


@register_model("preresnet110", dataset="cifar")
def preresnet110(**kw):
    return CifarPreResNet(PreActBasicBlock, 18, **kw)


@register_model("preresnet164", dataset="cifar")
def preresnet164(**kw):
    return CifarPreResNet(PreActBottleneck, 18, **kw)
