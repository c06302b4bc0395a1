"""SimAM: a parameter-free 3-D attention module (Yang et al., ICML 2021).

For a map X [N, C, H, W] and lambda:
    n     = H*W - 1
    d     = (X - mean_HW(X))^2
    v     = sum_HW(d) / n
    E_inv = d / (4 * (v + lambda)) + 0.5
    out   = X * sigmoid(E_inv)

Statistics are computed in float32 for float16/bfloat16 inputs; the output keeps the input dtype.

A 1x1 map (n = 0) has no spatial variance to estimate; the reference divides 0 by 0 and returns
NaN. We define v = 0 there (n is clamped to 1), so d = 0, E_inv = 0.5 and out = X * sigmoid(0.5).

The module runs the fused version (simam_fused.py: same numbers, only X kept for backward);
SIMAM_IMPL=formula in the environment, or SimAM(impl="formula"), runs the formula below instead.
"""
import torch
from torch import nn

from . import params
from .simam_fused import resolve_impl, simam_fused


def simam_formula(x: torch.Tensor, e_lambda: float = 1e-4) -> torch.Tensor:
    """The paper's formula in plain PyTorch (the reference for every faster variant)."""
    h, w = x.shape[-2:]
    n = max(h * w - 1, 1)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    d = (xf - xf.mean(dim=(2, 3), keepdim=True)).pow(2)
    e_inv = d / (4 * (d.sum(dim=(2, 3), keepdim=True) / n + e_lambda)) + 0.5
    return (xf * torch.sigmoid(e_inv)).to(x.dtype)


def simam(x: torch.Tensor, e_lambda: float = 1e-4, impl: str = None) -> torch.Tensor:
    """SimAM by the chosen implementation (None: $SIMAM_IMPL, default "auto"; see simam_fused.py)."""
    impl = resolve_impl(impl)
    if impl == "formula":
        return simam_formula(x, e_lambda)
    return simam_fused(x, e_lambda, impl)


class SimAM(nn.Module):
    # Inside the residual branch, right after the spatial (3x3 / depthwise) conv, before its norm.
    placement = "mid"
    default_param = 1e-4

    @classmethod
    def check_param(cls, param):
        # lambda = 0 divides by a zero variance on a constant map; a negative one can do it anywhere.
        return params.positive("simam", "lambda", param)

    def __init__(self, channels: int = None, e_lambda: float = 1e-4, impl: str = None):
        super().__init__()
        self.e_lambda = self.check_param(e_lambda)
        self.impl = impl  # None: follow $SIMAM_IMPL at each call

    def forward(self, x):
        return simam(x, self.e_lambda, self.impl)

    def extra_repr(self):
        return f"lambda={self.e_lambda:g}"
