"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR with a pluggable attention module.

Layout of the SimAM reference (itself after the widely used xternalz code): WRN-d-k has (d-4)/6
pre-activation blocks per stage, widths 16k/32k/64k, dropout 0.3 between the two convs, and a bare
1x1 `convShortcut` where the width changes. Every attention module sits after conv2, the block's last
layer (both "after the 3x3 conv" and "end of the branch").
"""
from torch import nn

from .cifar_preresnet import attach_any
from .cifar_resnet import conv1x1, conv3x3
from .registry import register_model


class WideBasicBlock(nn.Module):
    def __init__(self, inp, out, stride=1, drop_rate=0.0, attention=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inp, out, stride)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = attach_any(conv3x3(out, out), attention, ("mid", "end"), out)
        self.equal_in_out = inp == out
        # Key name as in the reference; an identity shortcut never changes the stride (stage-first blocks widen).
        self.convShortcut = None if self.equal_in_out else conv1x1(inp, out, stride)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        # A projecting block's shortcut sees the pre-activated input, an identity one the raw input.
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class WideStage(nn.Module):
    """One stage; the extra level gives the reference's `blockN.layer.M` keys."""

    def __init__(self, blocks, inp, out, stride, drop_rate, attention):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(inp if i == 0 else out, out, stride if i == 0 else 1, drop_rate, attention)
              for i in range(blocks)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, drop_rate=0.3, num_classes=10, attention=None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate, attention)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate, attention)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate, attention)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)

        # The reference's init: He-normal (fan_out) convs, unit BN, zero classifier bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def forward(self, x):
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


@register_model("wideresnet28x10", dataset="cifar")
def wideresnet28x10(**kw):
    return WideResNet(28, 10, **kw)


@register_model("wideresnet40x10", dataset="cifar")
def wideresnet40x10(**kw):
    return WideResNet(40, 10, **kw)
