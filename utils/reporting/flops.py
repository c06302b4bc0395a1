"""Parameters and FLOPs exactly as the SimAM paper counts them (see docs/networks-and-modules.md).

The paper's table comes from thop 0.0.31 (2020): FLOPs = multiply-adds for one 3xSxS image, with
  conv       out_elements * (in_channels / groups * kernel_h * kernel_w + 1 if bias)
  batchnorm  2 * in_elements (inference: normalise, then scale-and-shift)
  linear     out_elements * in_features
  avgpool    out_elements * (window + 1);  ReLU, max-pool, dropout: 0;  anything else: 0
The thop installed here (0.1.x) drops the conv bias term and counts an affine batchnorm as
4 * in_elements, which raises e.g. ResNet-50 from 4.11 G to 4.13 G. We still count with thop, but
override those two rules through `custom_ops` so the figures match the paper to the last digit.
Layers thop 0.0.31 had no rule for, which the later attention modules use, get one here:
  layernorm  2 * in_elements, as batchnorm (GC's; its statistics go to attention_elementwise)
  hardswish, sigmoid  0, as ReLU (CoordAtt's; their work goes to attention_elementwise)
(Conv1d -- ECA, SRM -- was already a conv in 0.0.31 and takes the conv rule above.)

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
from networks.attentions.coordatt import CoordAtt
from networks.attentions.eca import ECAModule
from networks.attentions.gc import GCModule
from networks.attentions.se import SEModule
from networks.attentions.simam import SimAM
from networks.attentions.srm import SRMModule
from networks.attentions.triplet import TripletAttention


# ---------------------------------------------------------------- thop 0.0.31 rules

def _count_conv_2020(m, x, y):
    # One multiply-add per weight tap per output element, plus one for the bias when there is one.
    per_output = m.in_channels // m.groups * math.prod(m.kernel_size) + (m.bias is not None)
    m.total_ops += torch.DoubleTensor([y.numel() * per_output])


def _count_bn_2020(m, x, y):
    # Inference batchnorm folds into one multiply and one add per element, affine or not.
    m.total_ops += torch.DoubleTensor([2 * x[0].numel()])


def _count_zero(m, x, y):
    # Activations count nothing in this convention (thop's ReLU rule); thop >= 0.1 registering a rule
    # also makes it count the layer's parameters (none here).
    m.total_ops += torch.DoubleTensor([0])


PAPER_OPS = {t: _count_conv_2020 for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}
PAPER_OPS.update({t: _count_bn_2020 for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                               nn.LayerNorm)})
PAPER_OPS.update({t: _count_zero for t in (nn.Hardswish, nn.Sigmoid)})


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


def eca_elementwise(n, c, h, w):
    """thop counts the pooling and the Conv1d; left, as SE: sigmoid (C) and x * gate (CHW)."""
    return n * (c * h * w + c)


def gc_elementwise(n, c, h, w, hidden):
    """thop counts the convs and the LayerNorm's scale-and-shift. Left: softmax over the HW positions
    (max, subtract, exp, sum, divide: 5 HW), the context as multiply-adds (CHW, the conv convention),
    the LayerNorm's statistics over K = C/r values (mean K + 1, subtract K, square K, variance K + 1,
    + eps, rsqrt, normalise K: 5 K + 4), the fusion x + t (CHW). Total 2 CHW + 5 HW + 5 K + 4."""
    return n * (2 * c * h * w + 5 * h * w + 5 * hidden + 4)


def srm_elementwise(n, c, h, w):
    """thop counts the channel-wise FC (a depthwise Conv1d, 2 C) and its BN. Left, per channel of
    M = HW values: mean (M + 1), std (subtract, square, sum: 3 M; divide, + eps, sqrt: 3), sigmoid (1),
    x * gate (M): 5 M + 5."""
    return n * c * (5 * h * w + 5)


def coordatt_elementwise(n, c, h, w, mid):
    """thop counts both poolings, the three convs and the BN. Left: h-swish on the m x (H + W)
    features (add, two clamps, multiply, divide: 5 each), the two sigmoids (C H + C W) and
    x * a_h * a_w (2 CHW)."""
    return n * (5 * mid * (h + w) + c * (h + w) + 2 * c * h * w)


def triplet_elementwise(n, c, h, w):
    """thop counts the three 7x7 convs and their BNs. Left, per branch on a plane of P positions
    pooled over A values (A P = CHW): Z-pool (max A P, mean A P + P), sigmoid (P), u * gate (A P):
    3 CHW + 2 P; the planes are C W, H C, H W. Then (cw + hc + hw) / 3: 3 CHW.
    Total 12 CHW + 2 (CW + CH + HW)."""
    return n * (12 * c * h * w + 2 * (c * w + c * h + h * w))


# Each: (module, input shape) -> ops. Modules whose count depends on their width read it off the module.
ELEMENTWISE = {
    SimAM: lambda m, *s: simam_elementwise(*s),
    SEModule: lambda m, *s: se_elementwise(*s),
    CBAMModule: lambda m, *s: cbam_elementwise(*s),
    ECAModule: lambda m, *s: eca_elementwise(*s),
    GCModule: lambda m, *s: gc_elementwise(*s, hidden=m.transform[0].out_channels),
    SRMModule: lambda m, *s: srm_elementwise(*s),
    CoordAtt: lambda m, *s: coordatt_elementwise(*s, mid=m.conv1.out_channels),
    TripletAttention: lambda m, *s: triplet_elementwise(*s),
}


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
            mod.register_forward_hook(lambda m_, x, _y, rule=rule: work.append(rule(m_, *x[0].shape)))
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    flops, params = profile(m, inputs=(x,), custom_ops=PAPER_OPS, verbose=False)
    return dict(params=int(params), flops=int(flops), attention_elementwise=int(sum(work)))


@torch.no_grad()
def profile_detector(model, size=(800, 1333), proposals=1000, detections=100):
    """dict(params, flops, flops_parts) of a torchvision Faster / Mask R-CNN at one `size` (h, w) image,
    part by part on shapes: backbone + FPN, the RPN head on every level, the box head for `proposals`
    RoIs and the mask head for `detections` (what mmdetection's get_flops counts). thop has no rule
    for RoIAlign, anchors and NMS: those are not counted. `model` is not modified."""
    from thop import profile
    from torchvision.ops import FrozenBatchNorm2d

    model = _unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    m = _meta_copy(model).eval()
    for mod in m.modules():
        if isinstance(mod, SimAM):
            mod.impl = "formula"
    ops = dict(PAPER_OPS)
    for mod in m.modules():  # frozen BatchNorm (2d, and SRM's 1d): inference BN either way
        if isinstance(mod, FrozenBatchNorm2d):
            ops[type(mod)] = PAPER_OPS[nn.BatchNorm2d]

    def count(module, *inputs):
        return int(profile(module, inputs=inputs, custom_ops=ops, verbose=False)[0])

    def meta(*shape):
        return torch.zeros(*shape, device="meta")

    parts = {"backbone+fpn": count(m.backbone, meta(1, 3, *size))}
    levels = [meta(1, 256, -(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32, 64)]
    parts["rpn_head"] = count(m.rpn.head, levels)
    parts["box_head"] = count(m.roi_heads.box_head, meta(proposals, 256, 7, 7)) + \
        count(m.roi_heads.box_predictor, meta(proposals, m.roi_heads.box_predictor.cls_score.in_features))
    if m.roi_heads.has_mask():
        parts["mask_head"] = count(m.roi_heads.mask_head, meta(detections, 256, 14, 14)) + \
            count(m.roi_heads.mask_predictor, meta(detections, 256, 14, 14))
    return dict(params=params, flops=sum(parts.values()), flops_parts=parts)


def format_summary(arch, attention_type, stats):
    """One line, e.g. `resnet50 + simam: 25.56 M params, 4.11 G FLOPs`."""
    return (f"{arch} + {attention_type}: {stats['params'] / 1e6:.2f} M params, "
            f"{stats['flops'] / 1e9:.2f} G FLOPs" + (f" {stats['where']}" if stats.get("where") else ""))
