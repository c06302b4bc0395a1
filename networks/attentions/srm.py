"""SRM: style-based recalibration (Lee, Kim, Nam, ICCV 2019).

Per (N, C) map of M = H*W values:
    mu    = mean_HW(x)
    sigma = sqrt(sum_HW((x - mu)^2) / (M - 1) + 1e-5)            # unbiased variance
    z_c   = w_c0 mu_c + w_c1 sigma_c                              # channel-wise fully connected, a [C, 2] weight
    out   = x * sigmoid(BatchNorm_C(z))

The [C, 2] weight is a depthwise Conv1d(C, C, 2, groups=C, no bias) over the [mu, sigma] pair (its
weight is [C, 1, 2]), which thop counts as a conv; it starts at zero, as in the authors' code.
A 1x1 map has no variance to estimate; as in SimAM we take it as 0 there (M - 1 clamped to 1)
instead of dividing 0 by 0. Like any batchnorm, training needs more than one value per channel,
i.e. a batch of at least 2.
"""
import torch
from torch import nn

from . import params

EPS = 1e-5


def style_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2]: per-channel mean and standard deviation (in float32 for half inputs)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    flat = xf.flatten(2)
    mu = flat.mean(dim=2, keepdim=True)
    var = (flat - mu).pow(2).sum(dim=2, keepdim=True) / max(flat.shape[2] - 1, 1)
    return torch.cat([mu, (var + EPS).sqrt()], dim=2).to(x.dtype)


class SRMModule(nn.Module):
    # At the end of the residual branch, after its last norm (where SE sits).
    placement = "end"
    default_param = None

    @classmethod
    def check_param(cls, param):
        return params.none("srm", param)

    def __init__(self, channels: int, param=None):
        super().__init__()
        self.check_param(param)
        self.cfc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False)
        self.bn = nn.BatchNorm1d(channels)
        self.init_weights()

    def init_weights(self):
        nn.init.zeros_(self.cfc.weight)

    def forward(self, x):
        z = self.bn(self.cfc(style_pool(x)))  # [N, C, 1]
        return x * torch.sigmoid(z).unsqueeze(-1)
