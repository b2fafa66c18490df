"""Forward and backward of WaveFT and random-sparse layers without any dense (out x in) tensor.

PEFT rebuilds the dense delta on every forward and back-propagates through it: two extra
full-size matmuls plus a dense weight gradient per layer. Two facts make that unnecessary.

* The delta touches few weight entries. Coefficient k adds value_k * outer(row taps, col taps) to
  an L x L patch of the weight (L = filter length, 1 for random-sparse), so at most p * L^2
  entries change. The fused path adds them into the frozen base weight in place, runs the base
  layer's one matmul and writes the original bits back; backward does the same for
  grad_input = grad_output @ (W + delta). The layer then costs what the frozen layer costs plus
  O(p L^2) scatter work.
* The gradient of C is an SDDMM. The delta is A_out C A_in^T for fixed 1D synthesis matrices, so
  dLoss/dC = (G A_out)^T (X A_in) read at the p positions, where G is grad_output and X the input
  as (tokens x features) matrices. G A_out and X A_in are stride-2, L-tap filterings of G and X
  along the feature axis (the adjoint of the inverse DWT, computed here without building A), and
  the sampled product is `torch.sparse.sampled_addmm` over p entries: tokens * p multiply-adds
  instead of the tokens * out * in of a dense weight gradient.

When the base weight cannot be changed in place (it is trainable, or not a plain dense tensor)
the delta path computes only the adapter's share x @ delta^T with the delta as a sparse CSR
matrix (p L^2 entries); its backward is the same SDDMM.

Coefficient gradients are accumulated in float32 (float64 when the coefficients are float64)
whatever the activations' dtype, so mixed-precision training gets float32 gradients.
"""

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from sparse_dreambooth.adapters.wavelets import AxisLayout, Footprints, footprint_index

# Tokens per SDDMM chunk: this many elements across the two filtered axes. A chunk (about 2 MiB
# per operand in float32) stays in cache from its filtering to its sampled product, which measured
# fastest at SDXL's shapes, and the backward's scratch stays bounded whatever the token count.
SDDMM_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class AxisFilter:
    """The adjoint of the 1D inverse DWT along one weight axis (out or in).

    The filtered axis holds two bands of `half` slots each, band-major: slot band * half + j is
    sum_t taps[band][t] * sample[2j - lead + t], exactly what the coefficient whose footprint
    starts at sample 2j - lead with filter `band` sees. For the identity transform the slots are
    the samples themselves.
    """

    size: int  # samples along the axis
    slots: int  # length of the filtered axis
    lead: int  # zero samples needed before sample 0 (taps that fall left of the weight)
    taps: tuple[tuple[float, ...], ...] | None  # (rec_lo, rec_hi), None for the identity

    @classmethod
    def for_axis(cls, size: int, filters: torch.Tensor, identity: bool) -> "AxisFilter":
        if identity:
            return cls(size=size, slots=size, lead=0, taps=None)
        layout = AxisLayout(size, filters.shape[1])
        lead = layout.filter_length - 2 + layout.crop
        return cls(size=size, slots=2 * layout.half, lead=lead, taps=tuple(map(tuple, filters.tolist())))

    def slot_of(self, start: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
        """Filtered-axis slot of footprints starting at `start` with filter `band`."""
        if self.taps is None:
            return start
        return band * (self.slots // 2) + (start + self.lead) // 2

    def analyse(self, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Filter (tokens x size) features along the feature axis into a contiguous (slots x tokens).

        Tokens end up contiguous, so each entry the SDDMM samples is one contiguous dot product
        (strided operands measured 2-4x slower in torch.sparse.sampled_addmm).
        """
        if self.taps is None:
            return torch.empty(self.size, features.shape[0], dtype=dtype, device=features.device).copy_(features.t())
        tokens, half, length = features.shape[0], self.slots // 2, len(self.taps[0])
        # Rows are samples -lead .. slots + length - 3 - lead, zero outside the weight.
        padded = torch.empty(self.slots + length - 2, tokens, dtype=dtype, device=features.device)
        tail = padded.shape[0] - self.lead - self.size
        if self.lead:
            padded[: self.lead].zero_()
        if tail:
            padded[-tail:].zero_()
        padded[self.lead : self.lead + self.size].copy_(features.t())
        filtered = torch.empty(2, half, tokens, dtype=dtype, device=features.device)
        bands = filtered.unbind(0)
        for tap in range(length):
            samples = padded[tap : tap + 2 * half : 2]  # sample 2j - lead + tap for every j
            for band, taps in zip(bands, self.taps, strict=False):
                if tap == 0:
                    torch.mul(samples, taps[0], out=band)
                else:
                    band.add_(samples, alpha=taps[tap])
        return filtered.view(self.slots, tokens)


@dataclass(frozen=True)
class SparsePlan:
    """Everything the kernels need about one adapter's positions, precomputed once.

    The tensors live as buffers of the adapter (so they follow it across devices); this object
    only groups them for one call.
    """

    shape: tuple[int, int]
    scaling: float
    rows: AxisFilter
    cols: AxisFilter
    touched: torch.Tensor  # (U,) sorted flat indices of the weight entries the delta can change
    touched_crow: torch.Tensor  # (out + 1,) CSR row pointers of `touched`
    # One entry per tap that lands inside W (T <= p L^2), in the order of the entries they land
    # on: its coefficient, that touched entry and its weight rec[row band][a] * rec[col band][b].
    tap_coefficient: torch.Tensor  # (T,)
    tap_entry: torch.Tensor  # (T,)
    tap_weight: torch.Tensor  # (T,) float64
    sample_crow: torch.Tensor  # (rows.slots + 1,) CSR pattern of the coefficients in filtered space
    sample_col: torch.Tensor  # (p,)
    sample_position: torch.Tensor  # (p,) CSR position of each coefficient

    def touched_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The scaled delta at the touched entries, (U,), in the coefficients' dtype."""
        taps = coefficients.index_select(0, self.tap_coefficient)
        if self.rows.taps is not None:  # the identity's taps all weigh 1
            taps.mul_(self.tap_weight.to(coefficients.dtype))
        if self.tap_entry.numel() == self.touched.numel():  # no two taps share an entry
            return taps.mul_(self.scaling)
        delta = torch.zeros(self.touched.numel(), dtype=coefficients.dtype, device=coefficients.device)
        return delta.index_add_(0, self.tap_entry, taps, alpha=self.scaling)

    def sparse_delta(self, delta_values: torch.Tensor) -> torch.Tensor:
        """The delta as an (out x in) CSR matrix with `delta_values` at the touched entries."""
        return _csr(self.touched_crow, self.touched % self.shape[1], delta_values, self.shape)

    def coefficient_gradient(self, grad_output: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dLoss/dcoefficients from (tokens x out) grad_output and (tokens x in) inputs."""
        tokens = grad_output.shape[0]
        zeros = torch.zeros(self.sample_col.numel(), dtype=dtype, device=grad_output.device)
        sampled = _csr(self.sample_crow, self.sample_col, zeros, (self.rows.slots, self.cols.slots))
        chunk = max(1, SDDMM_CHUNK_ELEMENTS // (self.rows.slots + self.cols.slots))
        for start in range(0, tokens, chunk):
            filtered_grad = self.rows.analyse(grad_output[start : start + chunk], dtype)  # (row slots, n)
            filtered_input = self.cols.analyse(inputs[start : start + chunk], dtype)  # (col slots, n)
            # Accumulates chunk by chunk into the pattern's values.
            sampled = torch.sparse.sampled_addmm(sampled, filtered_grad, filtered_input.t(), alpha=self.scaling)
        return sampled.values().index_select(0, self.sample_position)


def build_plan(
    shape: tuple[int, int], prints: Footprints, filters: torch.Tensor, rows: AxisFilter, cols: AxisFilter
) -> dict[str, torch.Tensor]:
    """The index tensors of a SparsePlan, by field name (the adapter stores them as buffers).

    Args:
        prints: the coefficients' footprints.
        filters: (2, L) [rec_lo, rec_hi], or [[1.0]] for the identity.
        rows, cols: the filters of the out and in axes.
    """
    length = filters.shape[1]
    flat_index, inside = footprint_index(prints, length, shape)
    weights = filters[prints.row_band][:, :, None] * filters[prints.col_band][:, None, :]  # (p, L, L)
    coefficient = torch.arange(prints.row_start.numel(), device=inside.device)[:, None, None].expand_as(inside)
    tap_order = torch.argsort(flat_index[inside], stable=True)
    touched, tap_entry = flat_index[inside][tap_order].unique(return_inverse=True)
    row_slot = rows.slot_of(prints.row_start, prints.row_band)
    col_slot = cols.slot_of(prints.col_start, prints.col_band)
    order = torch.argsort(row_slot * cols.slots + col_slot)
    sample_position = torch.empty_like(order)
    sample_position[order] = torch.arange(order.numel(), device=order.device)
    return {
        "touched": touched,
        "touched_crow": _row_pointers(touched // shape[1], shape[0]),
        "tap_coefficient": coefficient[inside][tap_order],
        "tap_entry": tap_entry,
        "tap_weight": weights[inside][tap_order].double(),
        "sample_crow": _row_pointers(row_slot, rows.slots),
        "sample_col": col_slot[order],
        "sample_position": sample_position,
    }


def _row_pointers(rows: torch.Tensor, row_count: int) -> torch.Tensor:
    pointers = torch.zeros(row_count + 1, dtype=torch.long, device=rows.device)
    pointers[1:] = torch.bincount(rows, minlength=row_count).cumsum(0)
    return pointers


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _consume_csr_beta_notice() -> None:
    # torch warns once per process that sparse CSR support is "beta"; the kernels use only its
    # stable core (construction, sampled_addmm, mm). Trigger the one warning here, silenced, rather
    # than filter warnings around every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        _csr(torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1), (1, 1))


_consume_csr_beta_notice()


# --- fused path: base layer and adapter in one matmul ------------------------------------------


def can_fuse(base: torch.nn.Module) -> bool:
    """Whether `base` is a plain frozen nn.Linear whose weight may be patched in place for a call."""
    weight, bias = base.weight, base.bias
    return (
        type(base).forward is torch.nn.Linear.forward
        and not weight.requires_grad
        and not (bias is not None and bias.requires_grad)
        and weight.layout == torch.strided
        and weight.is_contiguous()
        and not (weight.is_inference() and not torch.is_inference_mode_enabled())
    )


@contextmanager
def delta_added(weight: torch.Tensor, touched: torch.Tensor, delta: torch.Tensor):
    """Temporarily add `delta` (at the flat `touched` entries) into `weight`, in place.

    The sum is formed in the wider of the two dtypes and rounded once into the weight's dtype; on
    exit the original entries are written back, so the weight keeps its exact bits.
    """
    flat = weight.view(-1)  # a frozen weight (see can_fuse): autograd does not track these writes
    original = flat.index_select(0, touched)
    if delta.dtype == weight.dtype:
        patched = original + delta
    else:
        wide = torch.promote_types(weight.dtype, delta.dtype)
        patched = (original.to(wide) + delta.to(wide)).to(weight.dtype)
    flat.scatter_(0, touched, patched)
    try:
        yield weight
    finally:
        flat.scatter_(0, touched, original)


class FusedSparseLinear(torch.autograd.Function):
    """y = F.linear(x, W + delta, b) for a frozen W, b: one matmul forward, one backward."""

    @staticmethod
    def forward(ctx, x, coefficients, weight, bias, plan: SparsePlan):
        delta = plan.touched_delta(coefficients)
        # Autocast (if on) applies to this F.linear exactly as it does to the base layer's own.
        with delta_added(weight, plan.touched, delta):
            output = F.linear(x, weight, bias)
        # The touched entries of the delta (p L^2 values at most) are kept for grad_input.
        ctx.save_for_backward(x, coefficients, delta)
        ctx.weight, ctx.plan, ctx.matmul_dtype = weight, plan, output.dtype
        # base(x) + adapter(x) has the wider of the base output's and the input's dtypes.
        return output if output.dtype == x.dtype else output.to(torch.promote_types(output.dtype, x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, coefficients, delta = ctx.saved_tensors
        plan, weight = ctx.plan, ctx.weight
        grad_output = grad_output.reshape(-1, plan.shape[0])
        grad_x = grad_coefficients = None
        # backward() may run inside the caller's autocast region; the dtypes here are explicit.
        with _without_autocast(grad_output.device.type):
            if ctx.needs_input_grad[1]:
                grad_coefficients = plan.coefficient_gradient(
                    grad_output, x.reshape(-1, plan.shape[1]), _accumulation_dtype(coefficients)
                )
            if ctx.needs_input_grad[0]:
                with delta_added(weight, plan.touched, delta):
                    grad_x = grad_output.to(ctx.matmul_dtype) @ weight.to(ctx.matmul_dtype)
                grad_x = grad_x.to(x.dtype).view(x.shape)
        return grad_x, grad_coefficients, None, None, None


# --- delta path: the adapter's share alone --------------------------------------------------


class SparseDeltaMatmul(torch.autograd.Function):
    """y = x @ delta^T with the delta as a sparse CSR matrix, in the accumulation dtype."""

    @staticmethod
    def forward(ctx, x, coefficients, plan: SparsePlan):
        dtype = _accumulation_dtype(coefficients)
        inputs = x.reshape(-1, plan.shape[1])
        with _without_autocast(x.device.type):
            delta = plan.sparse_delta(plan.touched_delta(coefficients.to(dtype)))
            transposed = torch.empty(inputs.shape[1], inputs.shape[0], dtype=dtype, device=x.device).copy_(inputs.t())
            output = torch.sparse.mm(delta, transposed).t()  # (tokens, out)
        ctx.save_for_backward(x, coefficients)
        ctx.plan = plan
        return output.to(x.dtype, memory_format=torch.contiguous_format).view(*x.shape[:-1], plan.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, coefficients = ctx.saved_tensors
        plan = ctx.plan
        dtype = _accumulation_dtype(coefficients)
        grad_output = grad_output.reshape(-1, plan.shape[0])
        grad_x = grad_coefficients = None
        with _without_autocast(grad_output.device.type):
            if ctx.needs_input_grad[1]:
                grad_coefficients = plan.coefficient_gradient(grad_output, x.reshape(-1, plan.shape[1]), dtype)
            if ctx.needs_input_grad[0]:
                delta = plan.sparse_delta(plan.touched_delta(coefficients.to(dtype)))
                transposed = torch.empty(
                    grad_output.shape[1], grad_output.shape[0], dtype=dtype, device=grad_output.device
                ).copy_(grad_output.t())
                grad_x = torch.sparse.mm(delta.t(), transposed).t()  # (tokens, in)
                grad_x = grad_x.to(x.dtype, memory_format=torch.contiguous_format).view(x.shape)
        return grad_x, grad_coefficients, None


def _without_autocast(device_type: str):
    # Entering a disabled autocast costs more than these small kernels: only when it is on.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _accumulation_dtype(coefficients: torch.Tensor) -> torch.dtype:
    return torch.float64 if coefficients.dtype == torch.float64 else torch.float32
