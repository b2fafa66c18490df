"""sparse-dreambooth: DreamBooth for SDXL with sparse parameter-efficient adapters.

The adapter API is re-exported here lazily, so that `import sparse_dreambooth` (and the CLI's
--help) does not import torch.
"""

__version__ = "0.1.0"

_ADAPTER_API = {
    "AdapterConfig",
    "AdaptedLinear",
    "BaseModel",
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
}

__all__ = sorted(_ADAPTER_API) + ["__version__"]


def __getattr__(name: str):
    if name in _ADAPTER_API:
        from sparse_dreambooth import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'sparse_dreambooth' has no attribute {name!r}")
