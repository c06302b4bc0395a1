"""Squeeze-and-Excitation (Hu et al., 2018), laid out as the SimAM reference code has it.

    s   = sigmoid(W2 relu(W1 avgpool_HW(x))),  W1: [C/r, C], W2: [C, C/r], no biases
    out = x * s

C/r is floor(C / r), at least 1 (the reference's rule): a reduction larger than the channel count
builds one hidden unit rather than failing.
"""
from torch import nn

from . import params


class SEModule(nn.Module):
    # At the end of the residual branch, after its last norm.
    placement = "end"
    default_param = 16

    @classmethod
    def check_param(cls, param):
        return params.integer("se", "reduction", param)

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // self.check_param(reduction))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        n, c = x.shape[:2]
        w = self.fc(self.avg_pool(x).view(n, c)).view(n, c, 1, 1)
        return x * w
