"""Parameters and FLOPs exactly as the SimAM paper counts them (see README.md).

The paper's table comes from thop 0.0.31 (2020): FLOPs = multiply-adds for one 3xSxS image, with
  conv       out_elements * (in_channels / groups * kernel_h * kernel_w + 1 if bias)
  batchnorm  2 * in_elements (inference: normalise, then scale-and-shift)
  linear     out_elements * in_features
  avgpool    out_elements * (window + 1);  ReLU, max-pool, dropout: 0;  anything else: 0
The thop installed here (0.1.x) drops the conv bias term and counts an affine batchnorm as
4 * in_elements, which raises e.g. ResNet-50 from 4.11 G to 4.13 G. We still count with thop, but
override those two rules through `custom_ops` so the figures match the paper to the last digit.

What the convention leaves out -- the attention modules' own element-wise work (SimAM's formula,
the sigmoid gates and the rescaling in SE/CBAM, CBAM's functional poolings) -- is counted
separately as `attention_elementwise`: one op per element-wise arithmetic op, comparison or
sigmoid, and one op per input value of a reduction (a mean over K values: K adds + 1 divide).
"""
import copy
import math

import torch
from torch import nn

from networks.attentions.cbam import CBAMModule
from networks.attentions.se import SEModule
from networks.attentions.simam import SimAM


# ---------------------------------------------------------------- thop 0.0.31 rules

def _count_conv_2020(m, x, y):
    # One multiply-add per weight tap per output element, plus one for the bias when there is one.
    per_output = m.in_channels // m.groups * math.prod(m.kernel_size) + (m.bias is not None)
    m.total_ops += torch.DoubleTensor([y.numel() * per_output])


def _count_bn_2020(m, x, y):
    # Inference batchnorm folds into one multiply and one add per element, affine or not.
    m.total_ops += torch.DoubleTensor([2 * x[0].numel()])


PAPER_OPS = {t: _count_conv_2020 for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}
PAPER_OPS.update({t: _count_bn_2020 for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)})


# ---------------------------------------------------------------- element-wise work thop leaves out
# Each takes the module's input shape (N, C, H, W) and returns the ops per the rule in the docstring.

def simam_elementwise(n, c, h, w):
    """Per channel of M = h*w values: mean (M adds + 1 div), x - mean, square (M each), variance
    (M adds, / n, + lambda, * 4), d / s, + 0.5, sigmoid, x * gate (M each): 8 M + 4."""
    return n * c * (8 * h * w + 4)


def se_elementwise(n, c, h, w):
    """thop counts the pooling and both Linear layers; left: sigmoid (C) and x * gate (C*H*W)."""
    return n * (c * h * w + c)


def cbam_elementwise(n, c, h, w):
    """thop counts the MLP (twice, it runs twice), the 7x7 conv and its BN. Left:
    channel gate: spatial mean (CHW adds + C divs), spatial max (CHW), avg + max (C), sigmoid (C),
    x * gate (CHW); spatial gate: channel max (CHW), channel mean (CHW adds + HW divs), sigmoid (HW),
    x * gate (CHW). Total 6 CHW + 3 C + 2 HW."""
    return n * (6 * c * h * w + 3 * c + 2 * h * w)


ELEMENTWISE = {SimAM: simam_elementwise, SEModule: se_elementwise, CBAMModule: cbam_elementwise}


# ---------------------------------------------------------------- profiling

def _unwrap(model):
    """The plain module under DataParallel/DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _meta_copy(model):
    """A copy of `model` on the meta device, made without copying any weights (cheap on any device).

    Counting needs only shapes, and working on a copy leaves the caller's model, its mode, hooks and
    state_dict untouched whatever thop registers.
    """
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


@torch.no_grad()
def profile_model(model, image_size=224):
    """dict(params, flops, attention_elementwise) for one 3 x image_size x image_size image.

    params and flops (multiply-adds) follow the paper's thop 0.0.31 convention; attention_elementwise
    is the attention modules' element-wise work that convention leaves out. `model` is not modified.
    """
    from thop import profile

    m = _meta_copy(_unwrap(model)).eval()
    work = []
    for mod in m.modules():
        if isinstance(mod, SimAM):
            mod.impl = "formula"  # plain ops: the compiled kernel has nothing to offer on meta tensors
        rule = ELEMENTWISE.get(type(mod))
        if rule is not None:
            mod.register_forward_hook(lambda _m, x, _y, rule=rule: work.append(rule(*x[0].shape)))
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    flops, params = profile(m, inputs=(x,), custom_ops=PAPER_OPS, verbose=False)
    return dict(params=int(params), flops=int(flops), attention_elementwise=int(sum(work)))


def format_summary(arch, attention_type, stats):
    """One line, e.g. `resnet50 + simam: 25.56 M params, 4.11 G FLOPs`."""
    return (f"{arch} + {attention_type}: {stats['params'] / 1e6:.2f} M params, "
            f"{stats['flops'] / 1e9:.2f} G FLOPs")
