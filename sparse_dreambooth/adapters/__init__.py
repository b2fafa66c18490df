"""Sparse and low-rank adapters for any torch model's linear layers.

from sparse_dreambooth.adapters import AdapterConfig, attach, merge, save_adapter, load_adapter
"""

from sparse_dreambooth.adapters.io import BaseModel, load_adapter, read_adapter, save_adapter
from sparse_dreambooth.adapters.layer import (
    AdaptedLinear,
    adapted_layers,
    attach,
    merge,
    trainable_parameter_count,
    unload,
    unmerge,
)
from sparse_dreambooth.adapters.wavelets import idwt2
from sparse_dreambooth.config import DEFAULT_BUDGET, METHODS, SDXL_ATTENTION_TARGETS, AdapterConfig

__all__ = [
    "DEFAULT_BUDGET",
    "METHODS",
    "SDXL_ATTENTION_TARGETS",
    "AdaptedLinear",
    "BaseModel",
    "AdapterConfig",
    "adapted_layers",
    "attach",
    "idwt2",
    "load_adapter",
    "merge",
    "read_adapter",
    "save_adapter",
    "trainable_parameter_count",
    "unload",
    "unmerge",
]
