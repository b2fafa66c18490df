"""The adapter methods in one table: what each builds, and which config keys it reads.

    method          delta of an (out x in) weight                    trains
    waveft          scaling * IDWT2(C), C sparse at p seeded positions  p coefficients
    random-sparse   scaling * C (SHiRA: no transform)                  p coefficients
    lora            (alpha / r) * B @ A                                r * (out + in)

Torch-free (the protocol's tensor types are annotations only), so sweep planning and the CLI can
read the table without importing torch. The adapters themselves live in `adapters/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sparse_dreambooth.config import AdapterConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


class Adapter(Protocol):
    """What every method's per-layer module provides; `adapters.AdaptedLinear` relies on nothing else."""

    def delta_weight(self) -> torch.Tensor:
        """The scaled (out, in) weight update."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ delta_weight()^T: the adapter's share of the layer output."""

    def forward_with_base(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """base(x) + forward(x), computed together where the method can fuse the two."""

    def touched_indices(self) -> torch.Tensor | None:
        """Flat indices of the weight entries the delta can change; None when it changes all."""


# Keys of AdapterConfig that only some methods read; method, budget, budget_scale, adapter_seed
# and targets mean the same for every method.
METHOD_SPECIFIC_KEYS = frozenset({"scaling", "wavelet", "allocation", "cap_budget", "rank", "alpha"})


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        name: the config's `method`.
        low_rank: True for LoRA factors (lora_A, lora_B); False for sparse coefficients at stored
            positions.
        wavelet_transform: the coefficients go through a one-level inverse 2D DWT.
        keys: the METHOD_SPECIFIC_KEYS this method reads; the others do not change what it builds.
        peft_type: the PEFT tuner that holds the same adapter (WaveFT covers both sparse methods).
    """

    name: str
    low_rank: bool
    wavelet_transform: bool
    keys: frozenset[str]
    peft_type: str

    @property
    def ignored_keys(self) -> frozenset[str]:
        """Config keys a sweep need not vary (nor name runs by) for this method."""
        return METHOD_SPECIFIC_KEYS - self.keys

    def wavelet(self, config: AdapterConfig) -> str | None:
        """The wavelet of the transform, or None when the method has none."""
        return config.wavelet if self.wavelet_transform else None

    def scaling(self, config: AdapterConfig) -> float | None:
        """The sparse delta's multiplier, or None for LoRA (whose scale is alpha / r)."""
        return None if self.low_rank else config.scaling

    def layer_budgets(self, config: AdapterConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Per layer: the LoRA rank, or the number of sparse coefficients; fails on a budget that
        does not fit."""
        from sparse_dreambooth.adapters.budget import lora_ranks, sparse_budgets

        return (lora_ranks if self.low_rank else sparse_budgets)(config, shapes)


_SPARSE_KEYS = frozenset({"scaling", "allocation", "cap_budget"})
METHODS: dict[str, Method] = {
    "waveft": Method(
        "waveft", low_rank=False, wavelet_transform=True, keys=_SPARSE_KEYS | {"wavelet"}, peft_type="WAVEFT"
    ),
    "random-sparse": Method(
        "random-sparse", low_rank=False, wavelet_transform=False, keys=_SPARSE_KEYS, peft_type="WAVEFT"
    ),
    "lora": Method("lora", low_rank=True, wavelet_transform=False, keys=frozenset({"rank", "alpha"}), peft_type="LORA"),
}


def method_of(config: AdapterConfig) -> Method:
    """The table row of a (validated) adapter config."""
    return METHODS[config.method]
