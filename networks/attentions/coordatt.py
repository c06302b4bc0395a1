"""Coordinate attention (Hou, Zhou, Feng, CVPR 2021).

    z_h = mean_W(x)  [N, C, H, 1],  z_w = mean_H(x) as [N, C, W, 1]
    f   = h_swish(BN(W_1 [z_h ; z_w]))              # concatenated along the spatial axis; W_1: Conv2d(C, m, 1)
    f_h, f_w = split(f, [H, W])
    a_h = sigmoid(W_h f_h)   [N, C, H, 1]           # W_h, W_w: Conv2d(m, C, 1)
    a_w = sigmoid(W_w f_w)   as [N, C, 1, W]
    out = x * a_h * a_w

m = max(8, C // r); the convs have biases; h_swish(v) = v * relu6(v + 3) / 6.
"""
import torch
from torch import nn

from . import params


class CoordAtt(nn.Module):
    # At the end of the residual branch, after its last norm (where SE sits).
    placement = "end"
    default_param = 32

    @classmethod
    def check_param(cls, param):
        return params.integer("coordatt", "reduction", param)

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mid = max(8, channels // self.check_param(reduction))
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mid, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(mid, channels, kernel_size=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        z = torch.cat([self.pool_h(x), self.pool_w(x).transpose(2, 3)], dim=2)  # [N, C, H + W, 1]
        f_h, f_w = self.act(self.bn1(self.conv1(z))).split([h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(f_h))
        a_w = torch.sigmoid(self.conv_w(f_w)).transpose(2, 3)
        return x * a_h * a_w
