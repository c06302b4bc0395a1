"""Model registry: each model family file registers its builders by name; create_net builds one by name
(networks/__init__.py imports every family, so the registry is full once `networks` is imported)."""
from .attentions import attention_layer

MODELS = {}  # name -> (builder, dataset)


def register_model(name, dataset):
    def wrap(fn):
        if name in MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        MODELS[name] = (fn, dataset)
        return fn

    return wrap


def model_names(dataset=None):
    return [n for n, (_, ds) in MODELS.items() if dataset is None or ds == dataset]


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

