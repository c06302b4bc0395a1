"""CBAM (Woo et al., 2018): channel gate then spatial gate, key names as in the SimAM reference.

C/r in the channel gate's MLP is floor(C / r), at least 1, as in SE.
"""
import torch
from torch import nn

from . import params


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        # Index 0 is a parameter-free Flatten, so the Linear layers sit at mlp.1 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x):
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(avg + mx)[:, :, None, None]


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _ConvBN()

    def forward(self, x):
        # Channel-wise max first, then mean: the order the 7x7 conv's weights expect.
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAMModule(nn.Module):
    # At the end of the residual branch, after its last norm.
    placement = "end"
    default_param = 16

    @classmethod
    def check_param(cls, param):
        return params.integer("cbam", "reduction", param)

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.ChannelGate = ChannelGate(channels, self.check_param(reduction))
        self.SpatialGate = SpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))
