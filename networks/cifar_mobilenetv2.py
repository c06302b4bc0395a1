"""MobileNetV2 for CIFAR (kuangliu-style, as the SimAM reference has it) with a pluggable attention module.

CIFAR changes to the ImageNet net: stride-1 stem and second stage (32x32 in, 4x4 before pooling),
ReLU instead of ReLU6, an expansion conv even where t=1, and a 1x1 conv + BN `shortcut` on stride-1
blocks whose width changes (stride-2 blocks have no residual). Keys match the reference's.
Weights keep PyTorch's default init, as in the reference.
"""
from torch import nn

from .attentions import attach
from .cifar_resnet import conv1x1, projection
from .registry import register_model


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1 (linear)."""

    def __init__(self, inp, out, expansion, stride, attention=None):
        super().__init__()
        hidden = expansion * inp
        self.conv1 = conv1x1(inp, hidden)
        self.bn1 = nn.BatchNorm2d(hidden)
        dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.conv2 = attach(dw, attention, "mid", hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = conv1x1(hidden, out)
        self.bn3 = attach(nn.BatchNorm2d(out), attention, "end", out)
        self.shortcut = projection(inp, out, 1) if stride == 1 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out if self.shortcut is None else out + self.shortcut(x)


class CifarMobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride of the first)
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes=10, attention=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, inp = [], 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, t, s if i == 0 else 1, attention))
                inp = c
        self.layers = nn.Sequential(*layers)
        self.conv2 = conv1x1(inp, 1280)
        self.bn2 = nn.BatchNorm2d(1280)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(1280, num_classes)

    def forward_features(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(x)))

    def forward(self, x):
        return self.linear(self.forward_features(x).mean(dim=(2, 3)))


@register_model("mobilenetv2", dataset="cifar")
def mobilenetv2(**kw):
    return CifarMobileNetV2(**kw)
