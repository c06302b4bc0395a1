"""GC: the global context block of GCNet (Cao et al., 2019), fusion by addition.

    a       = softmax_j(W_k x_j + b_k)                   # W_k: Conv2d(C, 1, 1), over the H*W positions j
    context = sum_j a_j x_j                              # [N, C, 1, 1]
    t       = W_v2 relu(LayerNorm(W_v1 context))         # Conv2d(C, C/r, 1) -> LN over [C/r, 1, 1] -> ReLU
                                                         #   -> Conv2d(C/r, C, 1)
    out     = x + t                                      # t broadcast over H, W

All convs have biases. C/r is floor(C / r), at least 1 (as SE). The last conv starts at zero
(`init_weights`, as GCNet does), so a new block adds nothing until it learns a context.
The softmax runs in float32 for float16/bfloat16 inputs; float32 and float64 inputs keep their dtype.
"""
import torch
from torch import nn

from . import params


class GCModule(nn.Module):
    # At the end of the residual branch, after its last norm (where SE sits).
    placement = "end"
    default_param = 16

    @classmethod
    def check_param(cls, param):
        return params.integer("gc", "reduction", param)

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // self.check_param(reduction))
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.init_weights()

    def init_weights(self):
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x):
        n, c, h, w = x.shape
        logits = self.conv_mask(x).view(n, h * w, 1)
        if logits.dtype in (torch.float16, torch.bfloat16):  # half: softmax in float32; float64 stays float64
            logits = logits.float()
        a = torch.softmax(logits, dim=1).to(x.dtype)  # [N, HW, 1]
        context = torch.bmm(x.reshape(n, c, h * w), a).view(n, c, 1, 1)
        return x + self.transform(context)
