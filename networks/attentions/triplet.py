"""Triplet attention (Misra, Nalamada, Arasanipalai, Hou, WACV 2021).

Three branches, each a gate on one plane of the [C, H, W] map:
    gate(u)  = u * sigmoid(BN(conv7x7(Z(u))))       # Z: [max, mean] over u's first (channel) axis: 2 maps
                                                    # conv 2 -> 1, padding 3, no bias; BN(1)
    cw: u = x rotated to [N, H, C, W]  (pools H, attends the C-W plane), rotated back
    hc: u = x rotated to [N, W, H, C]  (pools W, attends the H-C plane), rotated back
    hw: u = x                          (pools C, attends the H-W plane)
    out = (cw + hc + hw) / 3
The BN has momentum 0.01, as in the authors' code (and CBAM's spatial gate).
"""
import torch
from torch import nn

from . import params


class AttentionGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, u):
        z = torch.cat([u.amax(dim=1, keepdim=True), u.mean(dim=1, keepdim=True)], dim=1)  # max first, then mean
        return u * torch.sigmoid(self.bn(self.conv(z)))


class TripletAttention(nn.Module):
    # At the end of the residual branch, after its last norm (where SE sits).
    placement = "end"
    default_param = None

    @classmethod
    def check_param(cls, param):
        return params.none("triplet", param)

    def __init__(self, channels: int = None, param=None):
        super().__init__()
        self.check_param(param)
        self.cw = AttentionGate()
        self.hc = AttentionGate()
        self.hw = AttentionGate()

    def forward(self, x):
        cw = self.cw(x.transpose(1, 2)).transpose(1, 2)
        hc = self.hc(x.transpose(1, 3)).transpose(1, 3)
        return (cw + hc + self.hw(x)) / 3
