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

With a bf16/fp16 weight, W + delta is formed in float32 and rounded once, so an entry of the delta
below half a bf16 step of its weight entry is lost to the forward (its gradient still counts).
Adding x @ delta^T in float32 beside the bf16 matmul instead keeps it, but rounds the output a
second time. Measured over training at scaling 1, 5 and 25 (BENCHMARKS.md, "bf16 and small
updates"), that ends as far from float32 training or further in all cases but one, at up to
2.5x the layer's time on CPU, so the fused path keeps the delta in the weight.

Under torch.use_deterministic_algorithms(True) (`train.deterministic`), the taps landing on one
weight entry are summed by a segmented reduction over taps sorted by entry instead of an
`index_add_` (atomics on CUDA); on CPU both give the same bits.
"""

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from sparse_dreambooth.adapters.wavelets import AxisLayout, Footprints

# Tokens per SDDMM chunk: at most this many elements across the two filtered axes, per device
# type. On CPU a chunk (about 2 MiB per operand in float32) stays in cache from its filtering to
# its sampled product, which measured fastest at SDXL's shapes. On an accelerator every chunk
# costs a dozen kernel launches and cuSPARSE's set-up, and cache is not the limit: one chunk per
# layer, unless its scratch would pass 256 MiB in float32 (SDXL's largest, 640 features over
# 4096 tokens at 1024 px, is 5 M elements per image). The scratch stays bounded either way.
SDDMM_CHUNK_ELEMENTS = {"cpu": 1 << 19}
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def chunk_tokens(tokens: int, elements_per_token: int, device: torch.device) -> int:
    """Tokens per SDDMM chunk on `device` (its memory budget over the elements one token needs)."""
    budget = SDDMM_CHUNK_ELEMENTS.get(device.type, ACCELERATOR_CHUNK_ELEMENTS)
    return min(tokens, max(1, budget // elements_per_token))


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

    The tensors are the adapter's (they follow it across devices); this object groups them, and
    what is derived from them, so a call builds no index tensor of its own.
    """

    shape: tuple[int, int]
    scaling: float
    rows: AxisFilter
    cols: AxisFilter
    touched: torch.Tensor  # (U,) sorted flat indices of the weight entries the delta can change
    touched_crow: torch.Tensor  # (out + 1,) CSR row pointers of `touched`
    # One entry per tap that lands inside W (T <= p L^2), in (coefficient, row tap, column tap)
    # order: its coefficient, the touched entry it lands on and its weight rec[row band][a] *
    # rec[col band][b].
    tap_coefficient: torch.Tensor  # (T,)
    tap_entry: torch.Tensor  # (T,)
    tap_weight: torch.Tensor  # (T,) float64
    tap_weight_float: torch.Tensor  # (T,) the same rounded to float32, the coefficients' usual dtype
    sample_crow: torch.Tensor  # (rows.slots + 1,) CSR pattern of the coefficients in filtered space
    sample_col: torch.Tensor  # (p,)
    sample_position: torch.Tensor  # (p,) CSR position of each coefficient
    # The deterministic sum's taps in entry order and run offsets, sorted at its first use.
    segments: dict = field(default_factory=dict, compare=False, repr=False)

    def _tap_weights(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float64:
            return self.tap_weight
        return self.tap_weight_float if dtype == torch.float32 else self.tap_weight.to(dtype)

    def touched_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The scaled delta at the touched entries, (U,), in the coefficients' dtype.

        Taps landing on one entry are summed in (coefficient, row tap, column tap) order, one
        after the other: by `index_add_`, or, in torch's deterministic mode, by a segmented sum
        over the taps sorted by entry (no atomics on CUDA; the same bits on CPU).
        """
        taps = coefficients.index_select(0, self.tap_coefficient)
        if self.rows.taps is not None:  # the identity's taps all weigh 1
            taps.mul_(self._tap_weights(coefficients.dtype))
        if torch.are_deterministic_algorithms_enabled():
            order, offsets = self._entry_segments()
            return torch.segment_reduce(taps.index_select(0, order).mul_(self.scaling), "sum", offsets=offsets)
        delta = torch.zeros(self.touched.numel(), dtype=coefficients.dtype, device=coefficients.device)
        return delta.index_add_(0, self.tap_entry, taps, alpha=self.scaling)

    def sparse_delta(self, delta_values: torch.Tensor) -> torch.Tensor:
        """The delta as an (out x in) CSR matrix with `delta_values` at the touched entries."""
        return _csr(self.touched_crow, self.touched % self.shape[1], delta_values, self.shape)

    def delta_share(self, x: torch.Tensor, delta_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x @ delta^T as a (tokens x out) `dtype` matrix, with the delta as a CSR matrix."""
        inputs = x.reshape(-1, self.shape[1])
        transposed = torch.empty(inputs.shape[1], inputs.shape[0], dtype=dtype, device=x.device).copy_(inputs.t())
        return torch.sparse.mm(self.sparse_delta(delta_values.to(dtype)), transposed).t()

    def coefficient_gradient(self, grad_output: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dLoss/dcoefficients from (tokens x out) grad_output and (tokens x in) inputs."""
        tokens = grad_output.shape[0]
        zeros = torch.zeros(self.sample_col.numel(), dtype=dtype, device=grad_output.device)
        sampled = _csr(self.sample_crow, self.sample_col, zeros, (self.rows.slots, self.cols.slots))
        chunk = chunk_tokens(tokens, self.rows.slots + self.cols.slots, grad_output.device)
        for start in range(0, tokens, chunk):
            filtered_grad = self.rows.analyse(grad_output[start : start + chunk], dtype)  # (row slots, n)
            filtered_input = self.cols.analyse(inputs[start : start + chunk], dtype)  # (col slots, n)
            # Accumulates chunk by chunk into the pattern's values, in place (no copy of the pattern).
            torch.sparse.sampled_addmm(sampled, filtered_grad, filtered_input.t(), alpha=self.scaling, out=sampled)
        return sampled.values().index_select(0, self.sample_position)

    def _entry_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The taps in entry order (a stable sort: each entry keeps its taps' order) and the
        offsets of each entry's run. Only deterministic mode needs them: sorted once, then kept."""
        if not self.segments:
            self.segments["order"] = torch.argsort(self.tap_entry, stable=True)
            self.segments["offsets"] = _row_pointers(self.tap_entry, self.touched.numel())
        return self.segments["order"], self.segments["offsets"]


def touched_entries(prints: Footprints, length: int, shape: tuple[int, int]) -> torch.Tensor:
    """Sorted flat indices of the weight entries some coefficient's patch covers.

    Patch k covers rows row_start + [0, L) and columns col_start + [0, L), clipped to the weight.
    Per row, the union of the column intervals of the patches crossing it is read off the
    intervals sorted by start: O(p L log(p L)) plus one step per touched entry, never p L^2.
    """
    out_features, in_features = shape
    device = prints.row_start.device
    rows = prints.row_start[:, None] + torch.arange(length, device=device)  # (p, L)
    first = prints.col_start.clamp(min=0)[:, None].expand_as(rows)
    end = (prints.col_start + length).clamp(max=in_features)[:, None].expand_as(rows)
    crossing = (rows >= 0) & (rows < out_features) & (end > first)
    row, first, end = rows[crossing], first[crossing], end[crossing]
    stride = in_features + 1  # keeps the rows apart in one sort key
    order = torch.argsort(row * stride + first)
    row, first, end = row[order], first[order], end[order]
    # The furthest end reached so far in the same row (a running max that restarts per row,
    # since every earlier row's keys are smaller); an interval adds only what lies past it.
    reach = torch.cummax(row * stride + end, 0).values
    before = torch.cat([reach.new_full((1,), -1), reach[:-1]]) - row * stride
    start = torch.maximum(first, before.clamp(min=0))
    added = (end - start).clamp(min=0)
    segment = torch.repeat_interleave(torch.arange(added.numel(), device=device), added)
    offset = torch.arange(segment.numel(), device=device) - (added.cumsum(0) - added)[segment]
    return (row * in_features + start)[segment] + offset


def build_plan(
    shape: tuple[int, int], prints: Footprints, filters: torch.Tensor, rows: AxisFilter, cols: AxisFilter
) -> dict[str, torch.Tensor]:
    """The index tensors of a SparsePlan, by field name (the adapter stores them as buffers).

    Linear in the T taps kept, with no sort of them and nothing of full p L^2 patch size: the
    taps stay in (coefficient, a, b) order, which for each touched entry is the order a stable
    sort by entry gives, so the sums in `touched_delta` keep their bits. (Sorting and masking
    every tap made a db38 layer take seconds to set up.)

    Args:
        prints: the coefficients' footprints.
        filters: (2, L) [rec_lo, rec_hi], or [[1.0]] for the identity.
        rows, cols: the filters of the out and in axes.
    """
    length = filters.shape[1]
    touched = touched_entries(prints, length, shape)
    coefficient, entries, tap_weight = _taps_inside(prints, filters, shape)
    if entries.numel() < shape[0] * shape[1]:
        tap_entry = torch.searchsorted(touched, entries)
    else:  # more taps than weight entries: a weight-sized lookup table is cheaper than searching
        slot = torch.empty(shape[0] * shape[1], dtype=torch.long, device=touched.device)
        slot[touched] = torch.arange(touched.numel(), device=touched.device)
        tap_entry = slot.index_select(0, entries)
    row_slot = rows.slot_of(prints.row_start, prints.row_band)
    col_slot = cols.slot_of(prints.col_start, prints.col_band)
    order = torch.argsort(row_slot * cols.slots + col_slot)
    sample_position = torch.empty_like(order)
    sample_position[order] = torch.arange(order.numel(), device=order.device)
    return {
        "touched": touched,
        "touched_crow": _row_pointers(touched // shape[1], shape[0]),
        "tap_coefficient": coefficient,
        "tap_entry": tap_entry,
        "tap_weight": tap_weight,
        "tap_weight_float": tap_weight.float(),
        "sample_crow": _row_pointers(row_slot, rows.slots),
        "sample_col": col_slot[order],
        "sample_position": sample_position,
    }


def _taps_inside(prints: Footprints, filters: torch.Tensor, shape: tuple[int, int]):
    """Every tap of every patch that lands inside the weight: its coefficient, flat weight entry
    and float64 weight rec[row band][a] * rec[col band][b], in (coefficient, a, b) order.

    Generated from each patch's clipped extent, first per patch row (at most p L of them), then
    per tap, with a handful of passes over the T taps kept and none over full p L^2 patches.
    """
    length, device = filters.shape[1], prints.row_start.device
    flat_filters = filters.double().reshape(-1)  # band, tap -> band * L + tap

    def clipped(start: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (-start).clamp(min=0, max=length)  # first tap inside the weight
        return first, ((size - start).clamp(min=0, max=length) - first).clamp(min=0)

    def expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For items with `counts` children each: every child's item, and its index within it."""
        item = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
        within = torch.arange(item.numel(), device=device) - (counts.cumsum(0) - counts).index_select(0, item)
        return item, within

    row_first, row_count = clipped(prints.row_start, shape[0])
    col_first, col_count = clipped(prints.col_start, shape[1])
    # Patch rows inside the weight (row tap a of coefficient k), then their taps (column tap b).
    row_coefficient, row_within = expand(row_count)
    row_tap = row_first.index_select(0, row_coefficient) + row_within
    row_origin = (prints.row_start.index_select(0, row_coefficient) + row_tap) * shape[1] + (
        prints.col_start + col_first
    ).index_select(0, row_coefficient)
    row_weight = flat_filters.index_select(0, prints.row_band.index_select(0, row_coefficient) * length + row_tap)
    col_origin = (prints.col_band * length + col_first).index_select(0, row_coefficient)  # flat_filters index
    tap_row, tap_within = expand(col_count.index_select(0, row_coefficient))
    coefficient = row_coefficient.index_select(0, tap_row)
    entries = row_origin.index_select(0, tap_row) + tap_within
    col_weight = flat_filters.index_select(0, col_origin.index_select(0, tap_row) + tap_within)
    return coefficient, entries, row_weight.index_select(0, tap_row) * col_weight


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
        with _without_autocast(x.device.type):
            output = plan.delta_share(x, plan.touched_delta(coefficients.to(dtype)), dtype)  # (tokens, out)
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
