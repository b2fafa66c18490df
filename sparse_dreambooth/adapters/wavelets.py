"""One-level inverse 2D DWT of a sparse coefficient matrix, in PEFT's WaveFT layout.

The coefficient matrix C (out x in) is read as four quadrants, as PEFT does:
top-left = cA, top-right = cH, bottom-left = cV, bottom-right = cD, and
dW = pywt.waverec2((cA, (cH, cV, cD)), wavelet). For filters longer than 2 taps PEFT first pads C
by (filter length - 2) rows and columns (then up to even sizes) with the positions centred, and
centre-crops dW back to (out x in).

The transform is separable: dW = S_out @ M @ S_in^T, where S are 1D synthesis matrices whose first
half of columns upsample-and-filter with rec_lo and second half with rec_hi, and M is C with its
off-diagonal quadrants exchanged (pywt's cH is detail along rows, approximation along columns).
So one coefficient touches only an L x L patch of dW (L = filter length): its "footprint", an
outer product of two filter rows. We never build S; we scatter footprints, O(p L^2) work.

Random-sparse (SHiRA) is the same with the identity transform: L = 1, tap 1, no padding.
"""

from dataclasses import dataclass

import torch

from sparse_dreambooth.errors import UserError


def synthesis_filters(wavelet: str) -> tuple[list[float], list[float]]:
    """The (rec_lo, rec_hi) reconstruction filters of a discrete pywt wavelet."""
    import pywt

    try:
        bank = pywt.Wavelet(wavelet)
    except ValueError:
        raise UserError(f"unknown wavelet {wavelet!r}; see pywt.wavelist(kind='discrete')") from None
    return list(bank.rec_lo), list(bank.rec_hi)


@dataclass(frozen=True)
class AxisLayout:
    """How one axis of length `size` is padded before the inverse DWT (PEFT's convention)."""

    size: int
    filter_length: int

    @property
    def padded(self) -> int:
        # The inverse DWT of P coefficients yields P - L + 2 samples: pad by L - 2, then to even.
        padded = self.size + max(self.filter_length - 2, 0)
        return padded + padded % 2 if self.filter_length > 1 else self.size

    @property
    def offset(self) -> int:
        """Where position 0 sits in the padded axis: positions are centred."""
        return (self.padded - self.size) // 2

    @property
    def half(self) -> int:
        return self.padded // 2

    @property
    def crop(self) -> int:
        """First reconstructed sample kept by the centre crop."""
        reconstructed = self.padded - self.filter_length + 2
        return (reconstructed - self.size) // 2


@dataclass(frozen=True)
class Footprints:
    """Where each of p coefficients lands in dW: rows start..start+L-1 weighted by a filter band.

    `band` is 0 for rec_lo, 1 for rec_hi. Starts may be negative or run past the edge; those taps
    fall outside the crop and are dropped.
    """

    row_start: torch.Tensor  # (p,) int64
    row_band: torch.Tensor  # (p,) int64
    col_start: torch.Tensor  # (p,) int64
    col_band: torch.Tensor  # (p,) int64


def footprints(shape: tuple[int, int], positions: torch.Tensor, filter_length: int) -> Footprints:
    """Footprints of coefficients at `positions` (2, p) = (row, col) of an out x in matrix C."""
    rows_axis, cols_axis = AxisLayout(shape[0], filter_length), AxisLayout(shape[1], filter_length)
    row = positions[0].long() + rows_axis.offset
    col = positions[1].long() + cols_axis.offset
    if filter_length == 1:
        zeros = torch.zeros_like(row)
        return Footprints(row, zeros, col, zeros)
    in_bottom = row >= rows_axis.half
    in_right = col >= cols_axis.half
    # Quadrant to separable form: the row filter is rec_hi exactly for cH (top-right) and cD
    # (bottom-right), the column filter exactly for cV (bottom-left) and cD.
    row_band, col_band = in_right.long(), in_bottom.long()
    row_index = row - in_bottom.long() * rows_axis.half
    col_index = col - in_right.long() * cols_axis.half
    # Sample n of the inverse DWT takes tap t of coefficient k where n = 2k + t - (L - 2).
    shift = filter_length - 2
    return Footprints(
        row_start=2 * row_index - shift - rows_axis.crop,
        row_band=row_band,
        col_start=2 * col_index - shift - cols_axis.crop,
        col_band=col_band,
    )


def footprint_index(prints: Footprints, filter_length: int, shape: tuple[int, int]):
    """Flat indices (p, L, L) into the out x in matrix of every tap, and which fall inside it."""
    out_features, in_features = shape
    taps = torch.arange(filter_length, device=prints.row_start.device)
    rows = prints.row_start[:, None] + taps  # (p, L)
    cols = prints.col_start[:, None] + taps
    inside = ((rows >= 0) & (rows < out_features))[:, :, None] & ((cols >= 0) & (cols < in_features))[:, None, :]
    return rows[:, :, None] * in_features + cols[:, None, :], inside


def scatter_footprints(
    values: torch.Tensor,
    prints: Footprints,
    filters: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """dW (out x in) = sum over coefficients of value * outer(row taps, col taps), cropped.

    Args:
        values: (p,) coefficient values (already scaled); gradients flow back to them.
        prints: their footprints.
        filters: (2, L) tensor of [rec_lo, rec_hi] ([[1.0]] for the identity transform).
        shape: (out, in) of the result.
    """
    flat_index, inside = footprint_index(prints, filters.shape[1], shape)
    row_taps = filters[prints.row_band]  # (p, L)
    col_taps = filters[prints.col_band]
    patch = values[:, None, None] * row_taps[:, :, None] * col_taps[:, None, :]  # (p, L, L)
    delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return delta.index_add(0, flat_index[inside], patch[inside]).view(shape)


def filter_bank(wavelet: str | None, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(2, L) [rec_lo, rec_hi] for a wavelet, or [[1.0]] (identity) for None."""
    if wavelet is None:
        return torch.ones(1, 1, dtype=dtype, device=device)
    low, high = synthesis_filters(wavelet)
    return torch.tensor([low, high], dtype=dtype, device=device)


def idwt2(coefficients: torch.Tensor, wavelet: str) -> torch.Tensor:
    """One-level inverse 2D DWT of a full coefficient matrix, padded and cropped as PEFT does.

    Equals pywt.waverec2 on the quadrants when no padding is needed (db1, or any filter on a
    matrix already padded); used as the dense reference and for inspection.
    """
    shape = tuple(coefficients.shape)
    filters = filter_bank(wavelet, coefficients.dtype, coefficients.device)
    rows, cols = torch.meshgrid(
        torch.arange(shape[0], device=coefficients.device),
        torch.arange(shape[1], device=coefficients.device),
        indexing="ij",
    )
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    prints = footprints(shape, positions, filters.shape[1])
    return scatter_footprints(coefficients.reshape(-1), prints, filters, shape)
