"""ImageNet MobileNetV2 with a pluggable attention module (layout of the SimAM reference).

Differs from torchvision in one name: the classifier has no dropout, so its Linear is
`classifier.0` (torchvision: `classifier.1`). A load hook renames torchvision's keys, so
torchvision's weights still load with strict=True.
"""
from torch import nn

from .attentions import init_attention_weights
from .registry import register_model


def _make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """conv -> [attention placed "mid"] -> BN -> ReLU6."""

    def __init__(self, inp, out, kernel_size=3, stride=1, groups=1, attention=None):
        padding = (kernel_size - 1) // 2
        conv = nn.Conv2d(inp, out, kernel_size, stride, padding, groups=groups, bias=False)
        layers = [conv]
        if attention is not None and attention.placement == "mid":
            layers.append(attention(out))
        layers += [nn.BatchNorm2d(out), nn.ReLU6(inplace=True)]
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, attention=None):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, attention=attention),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        if attention is not None and attention.placement == "end":
            layers.append(attention(oup))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride of the first)
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes=1000, width_mult=1.0, attention=None):
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features = [ConvBNReLU(3, inp, stride=2)]
        for t, c, n, s in self.SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t, attention))
                inp = out
        features.append(ConvBNReLU(inp, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._register_load_state_dict_pre_hook(_rename_torchvision_classifier)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init_attention_weights(self)  # e.g. GC's zero last conv, which the loop above overwrote

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))
        return self.classifier(x)


def _rename_torchvision_classifier(state_dict, prefix, *args):
    for name in ("weight", "bias"):
        tv = f"{prefix}classifier.1.{name}"
        ours = f"{prefix}classifier.0.{name}"
        if tv in state_dict and ours not in state_dict:
            state_dict[ours] = state_dict.pop(tv)


@register_model("mobilenet_v2", dataset="imagenet")
def mobilenet_v2(**kw):
    return MobileNetV2(**kw)
