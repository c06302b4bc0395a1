"""CIFAR ResNet (He et al., 2016, Sec. 4.2) with a pluggable attention module.

Layout of the SimAM reference (kuangliu-style): a 3x3 stem with 16 channels, three stages of
16/32/64 (x expansion) channels at strides 1/2/2, a projection shortcut (1x1 conv + BN) wherever the
shape changes, global average pooling and a `linear` classifier. Keys match the reference's, so its
checkpoints load with strict=True. Weights keep PyTorch's default init, as in the reference.

Depth 6n+2 uses n basic blocks per stage (ResNet-20/32/56/110), depth 9n+2 n bottlenecks (ResNet-164).
"""
from torch import nn

from .attentions import attach
from .registry import register_model
from .resnet import conv1x1, conv3x3


def projection(inp, out, stride, norm=True):
    """The shortcut: identity (an empty Sequential, no keys) unless the shape changes."""
    if stride == 1 and inp == out:
        return nn.Sequential()
    layers = [conv1x1(inp, out, stride)]
    if norm:
        layers.append(nn.BatchNorm2d(out))
    return nn.Sequential(*layers)


def make_stages(block, blocks, attention, widths=(16, 32, 64)):
    """Three stages of `blocks` blocks; the first block of stages 2 and 3 halves the resolution."""
    stages, inp = [], widths[0]
    for i, planes in enumerate(widths):
        layers = []
        for j in range(blocks):
            layers.append(block(inp, planes, 2 if i > 0 and j == 0 else 1, attention))
            inp = planes * block.expansion
        stages.append(nn.Sequential(*layers))
    return stages, inp


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp, planes, stride=1, attention=None):
        super().__init__()
        self.conv1 = conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = attach(conv3x3(planes, planes), attention, "mid", planes)
        self.bn2 = attach(nn.BatchNorm2d(planes), attention, "end", planes)
        self.shortcut = projection(inp, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride=1, attention=None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv1x1(inp, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = attach(conv3x3(planes, planes, stride), attention, "mid", planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out)
        self.bn3 = attach(nn.BatchNorm2d(out), attention, "end", out)
        self.shortcut = projection(inp, out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block, blocks, num_classes=10, attention=None):
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        (self.layer1, self.layer2, self.layer3), width = make_stages(block, blocks, attention)
        self.linear = nn.Linear(width, num_classes)

    def forward_features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        return self.linear(self.forward_features(x).mean(dim=(2, 3)))


@register_model("resnet20", dataset="cifar")
def resnet20(**kw):
    return CifarResNet(BasicBlock, 3, **kw)


@register_model("resnet32", dataset="cifar")
def resnet32(**kw):
    return CifarResNet(BasicBlock, 5, **kw)


@register_model("resnet56", dataset="cifar")
def resnet56(**kw):
    return CifarResNet(BasicBlock, 9, **kw)


@register_model("resnet110", dataset="cifar")
def resnet110(**kw):
    return CifarResNet(BasicBlock, 18, **kw)


@register_model("resnet164", dataset="cifar")
def resnet164(**kw):
    return CifarResNet(Bottleneck, 18, **kw)
