"""Faster / Mask R-CNN + FPN (torchvision's detection models) over our attention backbones.

    from networks import create_detector
    model = create_detector("mask_rcnn", "resnet50", "simam", 0.1, min_size=800, max_size=1333)

The backbone is `create_net(arch, attention_type, ...)` without its classifier, wrapped the way
torchvision's `fasterrcnn_resnet50_fpn` wraps its ResNet: every BatchNorm frozen (FrozenBatchNorm2d:
fixed statistics and affine terms, the mmdetection recipe's `norm_eval` + `requires_grad=False`),
the stem and layer1 frozen, an FPN over layer1..layer4 plus a max-pooled P6. For resnet50 without
attention the state_dict is torchvision's key for key, so its COCO weights load with strict=True;
with attention the backbone keys are our ImageNet model's under `backbone.body.`.
"""
import inspect

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .registry import create_net

DETECTORS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}
STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # trainable_layers counts from the top


class FrozenBatchNorm(FrozenBatchNorm2d):
    """FrozenBatchNorm2d for inputs of any rank [N, C, ...]: the BatchNorm1d inside SRM sees [N, C, 1]."""

    def forward(self, x):
        if x.dim() == 4:
            return super().forward(x)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


def freeze_batchnorm(module):
    """Replace every BatchNorm (2d, and the 1d of attention modules such as SRM) under `module` by a
    frozen one holding the same statistics (FrozenBatchNorm2d's keys: no num_batches_tracked)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            frozen = (FrozenBatchNorm2d if isinstance(child, nn.BatchNorm2d) else FrozenBatchNorm)(
                child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def resnet_fpn_backbone(arch, attention_type="none", attention_param=None, trainable_layers=3,
                        frozen_bn=True, out_channels=256):
    """Our ResNet/ResNeXt body (to layer4) + FPN; stages below the top `trainable_layers` are frozen
    (3: conv1/bn1 and layer1, as torchvision's and mmdetection's frozen_stages=1)."""
    body = create_net(arch, attention_type, attention_param)
    if not all(hasattr(body, f"layer{i}") for i in range(1, 5)):
        raise ValueError(f"detection needs a ResNet-style backbone (layer1..layer4), not {arch!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    if frozen_bn:
        freeze_batchnorm(body)
    train = STAGES[:trainable_layers]
    if trainable_layers == 5:
        train += ("bn1",)
    for name, p in body.named_parameters():
        if not name.startswith(train):
            p.requires_grad_(False)
    # IntermediateLayerGetter keeps the children up to layer4: avgpool and fc are dropped.
    top = body.inplanes  # layer4's width; each stage below halves it
    widths = [top // 8, top // 4, top // 2, top]
    return BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, widths, out_channels,
                           extra_blocks=LastLevelMaxPool())


def create_detector(kind, arch="resnet50", attention_type="none", attention_param=None, num_classes=91,
                    trainable_layers=3, frozen_bn=True, **kw):
    """torchvision's FasterRCNN / MaskRCNN over our backbone; `kw` goes to the detector (min_size,
    max_size, box_score_thresh, ...). Labels are category ids (COCO: 91 slots, 80 used)."""
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of: {', '.join(DETECTORS)}")
    # torchvision passes unknown keywords on to its transform, which ignores them: catch typos here.
    known = set(inspect.signature(DETECTORS[kind].__init__).parameters) | {"size_divisible", "fixed_size"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"unknown {kind} option {unknown[0]!r}")
    backbone = resnet_fpn_backbone(arch, attention_type, attention_param, trainable_layers, frozen_bn)
    return DETECTORS[kind](backbone, num_classes=num_classes, **kw)
