"""ImageNet ResNet / ResNeXt with a pluggable attention module.

Layout and key names follow torchvision (so plain networks load its weights) and the SimAM
reference code (so attention networks load the authors' checkpoints with strict=True).
"""
from torch import nn

from .attentions import attach, init_attention_weights
from .registry import register_model


def conv3x3(inp, out, stride=1, groups=1):
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(inp, out, stride=1):
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, attention=None):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = attach(conv3x3(planes, planes), attention, "mid", planes)
        self.bn2 = attach(nn.BatchNorm2d(planes), attention, "end", planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, attention=None):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = attach(conv3x3(width, width, stride, groups), attention, "mid", width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out)
        self.bn3 = attach(nn.BatchNorm2d(out), attention, "end", out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64, attention=None):
        super().__init__()
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attention)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attention)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attention)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attention)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_attention_weights(self)  # e.g. GC's zero last conv, which the loop above overwrote

    def _make_layer(self, block, planes, blocks, stride, attention):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, attention)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, self.groups, self.base_width, attention))
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        x = self.avgpool(self.forward_features(x))
        return self.fc(x.flatten(1))


@register_model("resnet18", dataset="imagenet")
def resnet18(**kw):
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


@register_model("resnet34", dataset="imagenet")
def resnet34(**kw):
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


@register_model("resnet50", dataset="imagenet")
def resnet50(**kw):
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


@register_model("resnet101", dataset="imagenet")
def resnet101(**kw):
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)


@register_model("resnet152", dataset="imagenet")
def resnet152(**kw):
    return ResNet(Bottleneck, [3, 8, 36, 3], **kw)


@register_model("resnext50_32x4d", dataset="imagenet")
def resnext50_32x4d(**kw):
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kw)
