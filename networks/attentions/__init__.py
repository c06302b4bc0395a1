"""Attention registry.

Each module class carries its own placement rule (`placement`) and default parameter
(`default_param`); blocks ask an `AttentionLayer` where it goes instead of testing names.
Adding a module: one new file with the class, one entry in ATTENTIONS.

placement:
  "mid" -- inside the residual branch, right after the spatial (3x3 or depthwise) conv, before its norm
  "end" -- at the end of the residual branch, after its last norm, before the addition
"""
from typing import Optional

from torch import nn

from .cbam import CBAMModule
from .se import SEModule
from .simam import SimAM

ATTENTIONS = {
    "se": SEModule,
    "cbam": CBAMModule,
    "simam": SimAM,
}
ATTENTION_CHOICES = ("none",) + tuple(ATTENTIONS)


def _lookup(name: str):
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention type {name!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")
    return ATTENTIONS[name]


def create_attention(name: str, channels: int, param=None) -> nn.Module:
    """The attention module `name` for a `channels`-channel map; param=None means its default."""
    cls = _lookup(name)
    return cls(channels, cls.default_param if param is None else param)


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
    """The parameter a module really uses: `param`, or the module's default; None without attention."""
    if name is None or name == "none":
        return None
    return _lookup(name).default_param if param is None else param


def attention_layer(name: Optional[str], param=None) -> Optional[AttentionLayer]:
    """The factory blocks take, or None for no attention ("none")."""
    if name is None or name == "none":
        return None
    return AttentionLayer(name, param)


def attach(layer: nn.Module, attn: Optional[AttentionLayer], placement: str, channels: int) -> nn.Module:
    """`layer` followed by the attention module when the module belongs at `placement`.

    The reference wraps the preceding layer in a Sequential, which is what gives the state_dict
    its `conv2.0.weight` / `bn3.1.fc.0.weight` keys.
    """
    if attn is None or attn.placement != placement:
        return layer
    return nn.Sequential(layer, attn(channels))
