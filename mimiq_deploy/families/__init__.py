"""Model families: what the MimiQ method needs of an architecture, one module each (vit.py, swin.py).

A new family is one new module with a `Family` subclass (base.py) and its entry in FAMILIES."""
from torch import nn

from ..errors import MimiqError
from . import swin, vit
from .base import Family, QueryLayout

FAMILIES = (vit.FAMILY, swin.FAMILY)

__all__ = ["FAMILIES", "Family", "QueryLayout", "family_of", "capture_attention"]


def family_of(model: nn.Module) -> Family:
    """The family whose attention blocks `model` has; a one-line error for a model of none."""
    for family in FAMILIES:
        if family.owns(model):
            return family
    raise MimiqError(f"{type(model).__name__} has no attention blocks of a known family: supported are "
                     "ViT / DeiT (timm Attention) and Swin (timm WindowAttention) models")


def capture_attention(model: nn.Module) -> nn.Module:
    """Replace the attention blocks of `model` (in place) by their captured versions; returns model."""
    return family_of(model).capture(model)
