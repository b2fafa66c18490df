"""WaveFT and random-sparse (SHiRA): p trainable coefficients at fixed random positions.

delta = scaling * T(C), where C is zero except at the positions and T is the one-level inverse 2D
DWT (WaveFT) or the identity (random-sparse). `delta_weight()` builds the dense delta (the
reference: merge, export and tests use it); training runs through the kernels in `kernels.py`,
which never build it.
"""

import torch
from torch import nn
from torch.nn import functional as F

from sparse_dreambooth.adapters import kernels
from sparse_dreambooth.adapters.wavelets import (
    Footprints,
    filter_bank,
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
        kernel: how training computes the layer (`AdapterConfig.kernel`): "fused" (base and
            adapter in one matmul where the base allows it), "delta" (the base layer, plus the
            adapter's share with the delta kept sparse) or "reference" (the base layer, plus
            x @ delta^T with the dense delta through autograd, as PEFT does).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        positions: torch.Tensor,
        scaling: float,
        wavelet: str | None,
        kernel: str = "fused",
    ):
        super().__init__()
        self.shape = tuple(shape)
        self.scaling = scaling
        self.wavelet = wavelet
        self.kernel = kernel
        self.coefficients = nn.Parameter(torch.zeros(positions.shape[1], device=positions.device))
        self.register_buffer("positions", positions.long())
        # Footprints and kernel indices are derived from the positions' values. On the meta device
        # (sizing a model without memory) there are none: the positions become known when a state
        # dict is loaded into real buffers, and everything is derived at first use after that.
        self._positions_known = not self.positions.is_meta
        self._derived = False
        if self._positions_known:
            self._derive_from_positions()
        # Loading a state dict may bring other positions: re-derive what depends on them.
        self.register_load_state_dict_post_hook(lambda module, _: module._positions_loaded())

    def _positions_loaded(self) -> None:
        # Loaded into meta buffers, the values are dropped: the positions stay unknown.
        self._positions_known = not self.positions.is_meta
        self._derived = False
        if self._positions_known:
            self._derive_from_positions()

    def _derive_from_positions(self) -> None:
        """Footprints and kernel indices of the current positions, as buffers outside the state dict."""
        filters = filter_bank(self.wavelet, torch.float64, self.positions.device)
        self.filter_length = filters.shape[1]
        prints = footprints(self.shape, self.positions, self.filter_length)
        identity = self.wavelet is None
        self._axes = tuple(kernels.AxisFilter.for_axis(size, filters, identity) for size in self.shape)
        derived = {f"_{name}": getattr(prints, name) for name in ("row_start", "row_band", "col_start", "col_band")}
        plan = kernels.build_plan(self.shape, prints, filters, *self._axes)
        derived.update({f"_{name}": tensor for name, tensor in plan.items()})
        for name, tensor in derived.items():
            self.register_buffer(name, tensor, persistent=False)
        self._derived = True

    def _ensure_derived(self) -> None:
        if self._derived:
            return
        if self.positions.is_meta or not self._positions_known:
            raise RuntimeError(
                "this sparse adapter was created on the meta device and has no positions yet: load its "
                "state dict (or adapter file) into real buffers before using it"
            )
        self._derive_from_positions()

    def _footprints(self) -> Footprints:
        return Footprints(self._row_start, self._row_band, self._col_start, self._col_band)

    def _plan(self) -> kernels.SparsePlan:
        self._ensure_derived()
        # Built once per set of buffers: moving the module to another device replaces them.
        cached = self.__dict__.get("_cached_plan")
        if cached is not None and cached.touched is self._touched and cached.scaling == self.scaling:
            return cached
        rows, cols = self._axes
        self._cached_plan = kernels.SparsePlan(
            shape=self.shape,
            scaling=self.scaling,
            rows=rows,
            cols=cols,
            touched=self._touched,
            touched_crow=self._touched_crow,
            tap_coefficient=self._tap_coefficient,
            tap_entry=self._tap_entry,
            tap_weight=self._tap_weight,
            tap_weight_float=self._tap_weight_float,
            sample_crow=self._sample_crow,
            sample_col=self._sample_col,
            sample_position=self._sample_position,
        )
        return self._cached_plan

    def delta_weight(self) -> torch.Tensor:
        """The dense (out x in) delta, in the coefficients' dtype."""
        self._ensure_derived()
        values = self.coefficients * self.scaling
        filters = filter_bank(self.wavelet, values.dtype, values.device)
        return scatter_footprints(values, self._footprints(), filters, self.shape)

    def touched_indices(self) -> torch.Tensor:
        """Flat indices of the weight entries the delta can change (for a bit-exact unmerge)."""
        self._ensure_derived()
        return self._touched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ delta^T: the adapter's share of the layer output, with the delta kept sparse."""
        return kernels.SparseDeltaMatmul.apply(x, self.coefficients, self._plan())

    def forward_with_base(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """base(x) + self(x): as one matmul with W + delta when the base is a frozen nn.Linear
        (kernel "fused"), else the base layer plus the adapter's share (dense for "reference")."""
        if self.kernel == "reference":
            return base(x) + F.linear(x.to(self.coefficients.dtype), self.delta_weight()).to(x.dtype)
        if self.kernel == "delta" or not kernels.can_fuse(base):
            return base(x) + self(x)
        return kernels.FusedSparseLinear.apply(x, self.coefficients, base.weight, base.bias, self._plan())

    def extra_repr(self) -> str:
        transform = f"idwt2({self.wavelet})" if self.wavelet else "identity"
        return (
            f"shape={self.shape}, p={self.coefficients.numel()}, scaling={self.scaling}, transform={transform}, "
            f"kernel={self.kernel}"
        )
