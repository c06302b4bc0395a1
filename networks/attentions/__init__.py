"""Attention registry.

Each module class carries its own placement rule (`placement`) and default parameter
(`default_param`); blocks ask an `AttentionLayer` where it goes instead of testing names.
Adding a module: one new file with the class, one entry in ATTENTIONS.

placement:
  "mid" -- inside the residual branch, right after the spatial (3x3 or depthwise) conv, before its norm
  "end" -- at the end of the residual branch, after its last norm, before the addition

Each class also validates its own parameter (`check_param(param)`: the value it builds with, or a
one-line ValueError such as "se: reduction must be an integer >= 1, got 0"), and may define
`init_weights()`, which a network calls after its own initialisation loop (GC's zero last conv).
"""

from typing import Optional

from torch import nn

from .cbam import CBAMModule
from .coordatt import CoordAtt
from .eca import ECAModule
from .gc import GCModule
from .se import SEModule
from .simam import SimAM
from .srm import SRMModule
from .triplet import TripletAttention

ATTENTIONS = {
    "se": SEModule,
    "cbam": CBAMModule,
    "simam": SimAM,
    "eca": ECAModule,
    "gc": GCModule,
    "srm": SRMModule,
    "coordatt": CoordAtt,
    "triplet": TripletAttention,
}
ATTENTION_CHOICES = ("none",) + tuple(ATTENTIONS)


def _lookup(name: str):
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention type {name!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")
    return ATTENTIONS[name]


def create_attention(name: str, channels: int, param=None) -> nn.Module:
    """The attention module `name` for a `channels`-channel map; param=None means its default."""
    return _lookup(name)(channels, resolve_param(name, param))


class AttentionLayer:
    """A factory for one attention type and parameter: `layer(channels)` builds a module."""

    def __init__(self, name: str, param=None):
        self.name = name
        self.param = resolve_param(name, param)
        self.placement = _lookup(name).placement

    def __call__(self, channels: int) -> nn.Module:
        return create_attention(self.name, channels, self.param)

    def __repr__(self):
        return f"AttentionLayer({self.name!r}, param={self.param!r}, placement={self.placement!r})"


def resolve_param(name: Optional[str], param=None):
    """The parameter a module really uses: `param`, or the module's default; None without attention
    and for modules without a parameter (srm, triplet) or with an adaptive default (eca).

    A value the module cannot take raises ValueError (the module's `check_param`). The value comes back
    as given (16.0 stays 16.0), so run folders and checkpoints keep today's names and records.
    """
    if name is None or name == "none":
        return None
    cls = _lookup(name)
    param = cls.default_param if param is None else param
    cls.check_param(param)
    return param


def attention_layer(name: Optional[str], param=None) -> Optional[AttentionLayer]:
    """The factory blocks take, or None for no attention ("none")."""
    if name is None or name == "none":
        return None
    return AttentionLayer(name, param)


def init_attention_weights(model: nn.Module) -> None:
    """Re-apply each attention module's own init (`init_weights`) after a network's init loop."""
    kinds = tuple(ATTENTIONS.values())
    for m in model.modules():
        if isinstance(m, kinds) and hasattr(m, "init_weights"):
            m.init_weights()


def attach(layer: nn.Module, attn: Optional[AttentionLayer], placement: str, channels: int) -> nn.Module:
    """`layer` followed by the attention module when the module belongs at `placement`.

    The reference wraps the preceding layer in a Sequential, which is what gives the state_dict
    its `conv2.0.weight` / `bn3.1.fc.0.weight` keys.
    """
    if attn is None or attn.placement != placement:
        return layer
    return nn.Sequential(layer, attn(channels))
