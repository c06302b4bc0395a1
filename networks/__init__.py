"""Backbones with a pluggable attention module.

    from networks import create_net
    model = create_net("resnet50", attention_type="simam", attention_param=0.1)
"""
from . import mobilenetv2, resnet  # noqa: F401  (registers the ImageNet models)
from . import cifar_mobilenetv2, cifar_preresnet, cifar_resnet, cifar_wideresnet  # noqa: F401  (the CIFAR models)
from .attentions import ATTENTION_CHOICES, attention_layer, create_attention  # noqa: F401
from .detection import DETECTORS, create_detector  # noqa: F401
from .registry import MODELS, create_net, model_names  # noqa: F401

IMAGENET_ARCHS = tuple(model_names("imagenet"))
