"""ECA: efficient channel attention (Wang et al., CVPR 2020).

    y   = avgpool_HW(x)                                  # [N, C]
    z   = conv1d_k(y) across the channel axis            # one [k] kernel, zero padding (k-1)/2, no bias
    out = x * sigmoid(z)

k is odd. None (the default) picks it from the channel count as the paper does (gamma 2, b 1):
t = int(|log2(C) + 1| / 2), k = t if t is odd else t + 1 (C = 64 -> 3, 256 -> 5, 2048 -> 7).
"""
import math

import torch
from torch import nn

from . import params


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    t = int(abs(math.log2(channels) + b) / gamma)
    return t if t % 2 else t + 1


class ECAModule(nn.Module):
    # At the end of the residual branch, after its last norm (where SE sits).
    placement = "end"
    default_param = None  # adaptive kernel size

    @classmethod
    def check_param(cls, param):
        return None if param is None else params.integer("eca", "kernel size", param, odd=True)

    def __init__(self, channels: int, k_size: int = None):
        super().__init__()
        k = self.check_param(k_size) or adaptive_kernel_size(channels)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        n, c = x.shape[:2]
        y = self.conv(self.avg_pool(x).view(n, 1, c))  # channels as the 1-D sequence
        return x * torch.sigmoid(y).view(n, c, 1, 1)
