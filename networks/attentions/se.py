"""Squeeze-and-Excitation (Hu et al., 2018), laid out as the SimAM reference code has it."""
from torch import nn


class SEModule(nn.Module):
    # At the end of the residual branch, after its last norm.
    placement = "end"
    default_param = 16

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // int(reduction))
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
