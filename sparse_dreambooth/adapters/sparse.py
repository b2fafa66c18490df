"""WaveFT and random-sparse (SHiRA): p trainable coefficients at fixed random positions.

delta = scaling * T(C), where C is zero except at the positions and T is the one-level inverse 2D
DWT (WaveFT) or the identity (random-sparse).
"""

import torch
from torch import nn
from torch.nn import functional as F

from sparse_dreambooth.adapters.wavelets import (
    Footprints,
    filter_bank,
    footprint_index,
    footprints,
    scatter_footprints,
)


def random_positions(shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """PEFT's WaveFT positions: the first `count` of a seeded permutation of out*in, as (row, col).

    torch.randperm's output is not promised across torch versions, so adapter files store the
    positions themselves; this is only used when an adapter is created.
    """
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count]
    return torch.stack([flat // in_features, flat % in_features])


class SparseAdapter(nn.Module):
    """Trainable coefficients behind a fixed linear transform of a sparse matrix.

    Args:
        shape: (out_features, in_features) of the adapted weight.
        positions: (2, p) row and column of each coefficient in the out x in matrix C.
        scaling: multiplier of the delta.
        wavelet: pywt wavelet name for WaveFT; None for random-sparse (identity transform).
    """

    def __init__(self, shape: tuple[int, int], positions: torch.Tensor, scaling: float, wavelet: str | None):
        super().__init__()
        self.shape = tuple(shape)
        self.scaling = scaling
        self.wavelet = wavelet
        self.coefficients = nn.Parameter(torch.zeros(positions.shape[1], device=positions.device))
        self.register_buffer("positions", positions.long())
        self.filter_length = filter_bank(wavelet, torch.float64).shape[1]
        prints = footprints(self.shape, self.positions, self.filter_length)
        # Derived from positions, so kept out of the state dict.
        for name in ("row_start", "row_band", "col_start", "col_band"):
            self.register_buffer(f"_{name}", getattr(prints, name), persistent=False)

    def _footprints(self) -> Footprints:
        return Footprints(self._row_start, self._row_band, self._col_start, self._col_band)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out x in) delta, in the coefficients' dtype."""
        values = self.coefficients * self.scaling
        filters = filter_bank(self.wavelet, values.dtype, values.device)
        return scatter_footprints(values, self._footprints(), filters, self.shape)

    def touched_indices(self) -> torch.Tensor:
        """Flat indices of the weight entries the delta can change (for a bit-exact unmerge)."""
        flat_index, inside = footprint_index(self._footprints(), self.filter_length, self.shape)
        return flat_index[inside].unique()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ delta^T: the adapter's share of the layer output. The seam for a fast kernel."""
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta).to(x.dtype)

    def extra_repr(self) -> str:
        transform = f"idwt2({self.wavelet})" if self.wavelet else "identity"
        return f"shape={self.shape}, p={self.coefficients.numel()}, scaling={self.scaling}, transform={transform}"
