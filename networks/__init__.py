"""Backbones with a pluggable attention module.

    from networks import create_net
    model = create_net("resnet50", attention_type="simam", attention_param=0.1)
"""
from . import mobilenetv2, resnet  # noqa: F401  (registers the ImageNet models)
from . import cifar_mobilenetv2, cifar_preresnet, cifar_resnet, cifar_wideresnet  # noqa: F401  (the CIFAR models)
from .attentions import ATTENTION_CHOICES, attention_layer, create_attention  # noqa: F401
from .registry import MODELS, model_names

IMAGENET_ARCHS = tuple(model_names("imagenet"))


def create_net(arch, attention_type="none", attention_param=None, num_classes=1000):
    """Build `arch` with `attention_type` (one of ATTENTION_CHOICES) in every block.

    attention_param: SE/CBAM/GC/CoordAtt reduction, SimAM lambda or ECA kernel size; None means the
    module's default (SRM and Triplet take none). A value the module cannot take raises ValueError.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(MODELS)}")
    attention = attention_layer(attention_type, attention_param)
    builder, _ = MODELS[arch]
    return builder(num_classes=num_classes, attention=attention)


from .detection import DETECTORS, create_detector  # noqa: E402,F401  (needs create_net above)
