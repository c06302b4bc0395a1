"""The optimizer side of the modern recipes, as torchvision's classification reference builds them:
parameter groups with their own weight decay, and the weights' exponential moving average (EMA).

    groups = param_groups(model, weight_decay, norm_weight_decay=0.0)        # torchvision's set_weight_decay
    ema = make_ema(model, decay, steps, epochs, world_size, per_rank_batch)   # its decay adjustment
"""
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

# torchvision's set_weight_decay default: every normalization layer of torch.nn.
NORM_CLASSES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                nn.LocalResponseNorm)


def param_groups(model, weight_decay, norm_weight_decay=None, bias_weight_decay=None):
    """SGD parameter groups as torchvision's utils.set_weight_decay with custom key "bias":
    parameters named `bias` (any module, norms included) take bias_weight_decay, other parameters of
    normalization layers norm_weight_decay, the rest weight_decay. A None decay puts its parameters in
    the "other" group; empty groups are left out. Order: other, norm, bias."""
    groups = {"other": [], "norm": [], "bias": []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if bias_weight_decay is not None and name == "bias":
                groups["bias"].append(p)
            elif norm_weight_decay is not None and isinstance(module, NORM_CLASSES):
                groups["norm"].append(p)
            else:
                groups["other"].append(p)
    decay = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    return [{"params": ps, "weight_decay": decay[k]} for k, ps in groups.items() if ps]


def make_optimizer(model, args):
    """SGD as the paper's recipe; --norm-weight-decay / --bias-weight-decay split the parameters into
    groups. Without them: one group of model.parameters(), exactly as before."""
    norm_wd, bias_wd = getattr(args, "norm_weight_decay", None), getattr(args, "bias_weight_decay", None)
    params = model.parameters() if norm_wd is None and bias_wd is None else \
        param_groups(model, args.weight_decay, norm_wd, bias_wd)
    return torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


class ExponentialMovingAverage(AveragedModel):
    """torchvision reference's EMA: avg = decay * avg + (1 - decay) * weights, over parameters AND
    buffers (use_buffers=True: BatchNorm statistics are averaged too); the first update copies."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_param, param, num_averaged):
            return decay * avg_param + (1 - decay) * param

        super().__init__(model, device, ema_avg, use_buffers=True)
        self.decay = decay


def ema_decay(decay, steps, epochs, world_size, per_rank_batch, accum_steps=1):
    """torchvision's adjustment (from pycls), which keeps the decay per image seen independent of the
    batch, the update interval and the epochs: alpha = min(1, (1 - decay) * images per EMA update / epochs).
    With gradient accumulation an optimizer step sees accum_steps batches (torchvision has none: 1)."""
    adjust = world_size * per_rank_batch * accum_steps * steps / epochs
    alpha = min(1.0, (1.0 - decay) * adjust)
    return 1.0 - alpha


def make_ema(model, args, world_size, per_rank_batch, device):
    decay = ema_decay(args.model_ema_decay, args.model_ema_steps, args.epochs, world_size, per_rank_batch,
                      args.grad_accum_steps)
    return ExponentialMovingAverage(model, decay, device=device)
