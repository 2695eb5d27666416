"""Backbones: the registry of the BoB field and the factory that builds them.

This is the only package that constructs models (timm, torchvision, and the Stable Diffusion
encoder); ``converters`` maps official checkpoint files to those architectures.
"""

from bob_cache.backbones.backbone import Backbone, Output, WeightsChoice
from bob_cache.backbones.converters import list_converters, register_converter
from bob_cache.backbones.factory import create_backbone, resolve_backbone_name
from bob_cache.backbones.registry import BackboneEntry, get_backbone_entry, list_backbones

__all__ = [
    "Backbone",
    "BackboneEntry",
    "Output",
    "WeightsChoice",
    "create_backbone",
    "get_backbone_entry",
    "list_backbones",
    "list_converters",
    "register_converter",
    "resolve_backbone_name",
]
