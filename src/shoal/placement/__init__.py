"""Placement: which nodes run which layers of a model. Pure functions of profiles and a card."""

from shoal.placement.allocate import NodeCapacity, allocate_layers
from shoal.placement.memory import MemoryModel, bits_per_weight, memory_model, usable_memory
from shoal.placement.overrides import Override, parse_overrides
from shoal.placement.place import NoFit, Placement, place
from shoal.placement.previews import Preview, previews

__all__ = [
    "MemoryModel",
    "NoFit",
    "NodeCapacity",
    "Override",
    "Placement",
    "Preview",
    "allocate_layers",
    "bits_per_weight",
    "memory_model",
    "parse_overrides",
    "place",
    "previews",
    "usable_memory",
]
