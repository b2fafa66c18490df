"""The sparse kernels against independent oracles: the dense reference path (`delta_weight()`
through autograd), finite differences, PEFT's WaveFT, and a record of every tensor they create."""

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_dreambooth.adapters.layer import AdaptedLinear
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions

# One wavelet of every discrete pywt family, from 2 taps (haar, db1 the default) to 62 (dmey), and
# the identity (random-sparse).
FAMILIES = ["haar", "db1", "db3", "sym4", "coif2", "bior2.4", "rbio3.1", "dmey", None]
SHAPES = [(40, 24), (33, 17), (16, 16)]


def make_layer(shape, wavelet, budget=37, bias=True, dtype=torch.float32, scaling=2.5, position_seed=5):
    """A frozen nn.Linear with a sparse adapter whose coefficients are random (not zero)."""
    out_features, in_features = shape
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias).to(dtype).requires_grad_(False)
    positions = random_positions(shape, min(budget, out_features * in_features), seed=position_seed)
    adapter = SparseAdapter(shape, positions, scaling, wavelet)
    with torch.no_grad():
        adapter.coefficients.normal_()
    return AdaptedLinear(base, adapter.to(dtype))


def reference_output(layer, x):
    """base(x) + x @ delta^T with the dense delta, differentiated by autograd."""
    return layer.base(x) + F.linear(x.to(layer.adapter.coefficients.dtype), layer.adapter.delta_weight()).to(x.dtype)


def output_and_gradients(forward, layer, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    layer.adapter.coefficients.grad = None
    output = forward(x)
    output.backward(grad_output)
    return output.detach(), x.grad, layer.adapter.coefficients.grad.clone()


def assert_relative_close(actual, expected, tolerance):
    """Max abs difference within `tolerance` of the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() <= tolerance * scale, ((actual - expected).abs().max() / scale).item()


PATHS = {
    "fused": lambda layer: layer,  # AdaptedLinear: base and adapter in one matmul
    "delta": lambda layer: lambda x: layer.base(x) + layer.adapter(x),  # the adapter's share alone
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wavelet", FAMILIES)
def test_outputs_and_gradients_equal_the_dense_reference(wavelet, shape, path):
    layer = make_layer(shape, wavelet, bias=shape[0] != 33)
    x = torch.randn(2, 5, shape[1])
    grad_output = torch.randn(2, 5, shape[0])
    ours = output_and_gradients(PATHS[path](layer), layer, x, grad_output)
    expected = output_and_gradients(lambda x: reference_output(layer, x), layer, x, grad_output)
    for actual, wanted in zip(ours, expected, strict=False):
        assert_relative_close(actual, wanted, 1e-5)


USES = {
    "non-contiguous input": lambda layer, x: layer(x.transpose(0, 1).contiguous().transpose(0, 1)),
    "two calls, one backward": lambda layer, x: layer(x) + layer(2 * x),
    "gradient checkpointing": lambda layer, x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_training_usage_patterns_match_the_reference(use):
    layer = make_layer((40, 24), "db2")
    x, grad_output = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    ours = output_and_gradients(lambda x: USES[use](layer, x), layer, x, grad_output)
    expected = output_and_gradients(
        lambda x: USES[use](lambda inputs: reference_output(layer, inputs), x), layer, x, grad_output
    )
    for actual, wanted in zip(ours, expected, strict=False):
        assert_relative_close(actual, wanted, 1e-5)


FUNCTIONAL_PATHS = {
    "fused": lambda layer, x, coefficients: torch.func.functional_call(
        layer, {"adapter.coefficients": coefficients}, (x,)
    ),
    "delta": lambda layer, x, coefficients: (
        layer.base(x) + torch.func.functional_call(layer.adapter, {"coefficients": coefficients}, (x,))
    ),
}


@pytest.mark.parametrize("path", sorted(FUNCTIONAL_PATHS))
@pytest.mark.parametrize("wavelet", FAMILIES)
def test_gradcheck_in_float64(wavelet, path):
    layer = make_layer((9, 7), wavelet, budget=20, dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    coefficients = layer.adapter.coefficients.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *inputs: FUNCTIONAL_PATHS[path](layer, *inputs), (x, coefficients))


class TensorRecorder(TorchDispatchMode):
    """Element counts of every tensor any op creates (stored values for sparse results)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # Views and in-place ops return tensors that already existed (the weight among them).
        if not func.is_view and not func._schema.is_mutable:
            for tensor in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(tensor, torch.Tensor):
                    self.sizes.append(tensor.numel() if tensor.layout == torch.strided else tensor._nnz())
        return result


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("wavelet", ["db1", "db3", None])
def test_no_dense_delta_and_no_dense_weight_gradient(wavelet, path):
    shape = (40, 24)
    layer = make_layer(shape, wavelet, budget=20)
    x = torch.randn(3, shape[1], requires_grad=True)  # every activation is far smaller than out x in
    saved = []
    with (
        TensorRecorder() as recorder,
        torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor),
    ):
        PATHS[path](layer)(x).square().sum().backward()
    dense = shape[0] * shape[1]
    assert recorder.sizes and max(recorder.sizes) < dense, "a tensor of the weight's size was built"
    # Kept for backward: activations, coefficients, touched delta values; the frozen weight itself
    # only where the base layer runs on its own and keeps it for its grad_input.
    kept = [tensor.numel() for tensor in saved if tensor.data_ptr() != layer.base.weight.data_ptr()]
    assert kept and max(kept) < dense
    assert layer.base.weight.grad is None and layer.adapter.coefficients.grad is not None


def test_base_weight_keeps_its_exact_bits_even_when_the_forward_fails():
    layer = make_layer((40, 24), "db2")
    original = layer.base.weight.detach().clone()
    x = torch.randn(4, 24, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.base.weight, original)
    with pytest.raises(RuntimeError):
        layer(torch.randn(4, 23))  # wrong width: the matmul fails with the delta added
    assert torch.equal(layer.base.weight, original)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, "weight"])
@pytest.mark.parametrize("wavelet", ["db1", "sym4", None])
def test_mixed_precision_matches_the_reference_and_gives_float32_gradients(wavelet, input_dtype, weight_dtype):
    """As in training: the base in half precision under autocast, the coefficients in float32."""
    shape = (40, 24)
    layer = make_layer(shape, wavelet)
    layer.base.to(weight_dtype)
    input_dtype = weight_dtype if input_dtype == "weight" else input_dtype
    x = torch.randn(2, 5, shape[1]).to(input_dtype)
    grad_output = torch.randn(2, 5, shape[0])
    with torch.autocast("cpu", dtype=weight_dtype):
        output, grad_x, grad_coefficients = output_and_gradients(layer, layer, x, grad_output.to(weight_dtype))
        expected = output_and_gradients(lambda x: reference_output(layer, x), layer, x, grad_output.to(weight_dtype))
    assert output.dtype == expected[0].dtype and grad_x.dtype == x.dtype
    assert grad_coefficients.dtype == torch.float32
    # Half precision rounds the output once and each product; compare at that precision.
    tolerance = 2e-2 if weight_dtype == torch.bfloat16 else 4e-3
    for actual, wanted in zip((output, grad_x, grad_coefficients), expected, strict=False):
        assert_relative_close(actual.float(), wanted.float(), tolerance)
    # The float32 gradient is at least as close to exact arithmetic as the reference's.
    exact = make_layer(shape, wavelet).double()
    exact.base.weight.data.copy_(layer.base.weight.double())
    _, _, exact_grad = output_and_gradients(exact, exact, x.double(), grad_output.to(weight_dtype).double())
    ours_error = (grad_coefficients.double() - exact_grad).abs().max()
    assert ours_error <= (expected[2].double() - exact_grad).abs().max() + 1e-6 * exact_grad.abs().max()


@pytest.mark.parametrize("wavelet", ["db1", "db3", None])
def test_coefficient_gradients_equal_peft(wavelet):
    from peft import WaveFTConfig, get_peft_model

    shape = (40, 24)
    layer = make_layer(shape, wavelet, budget=50, scaling=25.0, position_seed=777)  # PEFT's defaults
    holder = nn.Module()
    holder.proj = nn.Linear(shape[1], shape[0])
    holder.proj.load_state_dict(layer.base.state_dict())
    config = WaveFTConfig(
        n_frequency=50,
        scaling=25.0,
        wavelet_family=wavelet or "db1",
        use_idwt=wavelet is not None,
        random_loc_seed=777,
        target_modules=["proj"],
    )
    peft_layer = get_peft_model(holder, config).base_model.model.proj
    spectrum = peft_layer.waveft_spectrum["default"]
    with torch.no_grad():
        spectrum.copy_(layer.adapter.coefficients)
    x, grad_output = torch.randn(6, shape[1]), torch.randn(6, shape[0])
    _, ours_x, ours = output_and_gradients(layer, layer, x, grad_output)
    x_peft = x.clone().requires_grad_(True)
    peft_layer(x_peft).backward(grad_output)
    assert_relative_close(ours, spectrum.grad, 1e-5)
    assert_relative_close(ours_x, x_peft.grad, 1e-5)


def test_merged_forward_is_the_base_layer():
    layer = make_layer((40, 24), "db1")
    x = torch.randn(4, 24)
    unmerged = layer(x)
    layer.merge()
    assert torch.equal(layer(x), layer.base(x))
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_trainable_base_falls_back_to_the_separate_adapter():
    layer = make_layer((40, 24), "db2")
    layer.base.weight.requires_grad_(True)
    x = torch.randn(4, 24)
    output = layer(x)
    output.sum().backward()
    torch.testing.assert_close(output, reference_output(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is not None


def test_loading_other_positions_rebuilds_the_kernel_indices():
    layer = make_layer((40, 24), "db2")
    donor = SparseAdapter((40, 24), random_positions((40, 24), 37, seed=9), 2.5, "db2")
    with torch.no_grad():
        donor.coefficients.normal_()
    layer.adapter.load_state_dict(donor.state_dict())
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.adapter.delta_weight(), donor.delta_weight())


def test_sdxl_architecture_has_the_560_projections_of_lora_r1_count():
    from sparse_dreambooth.adapters.budget import lora_r1_count
    from sparse_dreambooth.adapters.layer import target_linears
    from sparse_dreambooth.config import SDXL_ATTENTION_TARGETS
    from sparse_dreambooth.sdxl_architecture import build_sdxl_unet

    unet = build_sdxl_unet(device="meta")
    linears = target_linears(unet, list(SDXL_ATTENTION_TARGETS))
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    assert len(shapes) == 560
    assert lora_r1_count(shapes) == 1_451_520
    assert sum(parameter.numel() for parameter in unet.parameters()) == 2_567_463_684


class SortRecorder(TorchDispatchMode):
    """Element counts of the inputs of every sort-like op (sort, argsort, unique)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(word in func.__name__ for word in ("sort", "unique")):
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def test_setup_sorts_no_taps_and_builds_nothing_of_full_patch_size():
    """db38 (L = 76) at p = 2592 on a 64 x 96 weight: 15 M patch taps, 4 M of them inside. Setup
    used to sort all 4 M taps (twice) and mask the 15 M; now it sorts at most p L patch rows and
    builds nothing larger than the taps it keeps."""
    shape, count, length = (64, 96), 2592, 76
    positions = random_positions(shape, count, seed=777)
    with TensorRecorder() as created, SortRecorder() as sorted_sizes:
        adapter = SparseAdapter(shape, positions, 25.0, "db38")
    kept = adapter._tap_entry.numel()
    assert kept < count * length * length
    assert max(created.sizes) <= kept
    assert sorted_sizes.sizes and max(sorted_sizes.sizes) <= count * length


@pytest.mark.parametrize("wavelet", ["db1", "db3", "sym4", "db8", None])
@pytest.mark.parametrize("shape", [(40, 24), (7, 130)])
def test_touched_entries_are_the_union_of_the_footprints(wavelet, shape):
    """Oracle: every coefficient's L x L patch marked one entry at a time, clipped to the weight."""
    layer = make_layer(shape, wavelet, budget=30)
    adapter = layer.adapter
    length = adapter.filter_length
    expected = set()
    for k in range(adapter.coefficients.numel()):
        for a in range(length):
            for b in range(length):
                row, col = int(adapter._row_start[k]) + a, int(adapter._col_start[k]) + b
                if 0 <= row < shape[0] and 0 <= col < shape[1]:
                    expected.add(row * shape[1] + col)
    assert adapter.touched_indices().tolist() == sorted(expected)


# --- the kernel setting, devices, bf16 small updates, deterministic mode -------------------------

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def kernel_layer(kernel, shape, wavelet, dtype, device):
    layer = make_layer(shape, wavelet, budget=60, scaling=25.0).to(device)
    layer.base.to(dtype)
    layer.adapter.kernel = kernel
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wavelet", ["db1", "db3", None])
def test_fused_and_delta_kernels_match_the_reference_kernel(wavelet, dtype, device):
    """`adapter.kernel`: the fused and delta paths against the plain dense one (W0 x + x delta^T
    through autograd), under autocast in bf16 as training runs, on every device present."""
    shape = (48, 40)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 70, shape[1], generator=generator).to(device, dtype)
    grad_output = torch.randn(3, 70, shape[0], generator=generator).to(device, dtype)
    results = {}
    for kernel in ("fused", "delta", "reference"):
        layer = kernel_layer(kernel, shape, wavelet, dtype, device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results[kernel] = output_and_gradients(layer, layer, x, grad_output)
    # bf16 rounds the output and the reference's products (its delta too); fp32 agrees to rounding.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for kernel in ("fused", "delta"):
        for actual, wanted in zip(results[kernel], results["reference"], strict=True):
            assert actual.device.type == device
            assert_relative_close(actual.float(), wanted.float(), tolerance)


def test_kernel_setting_reaches_every_sparse_layer_and_is_checked():
    from sparse_dreambooth.adapters.layer import build_adapters
    from sparse_dreambooth.config import AdapterConfig
    from sparse_dreambooth.errors import UserError

    linears = {"proj": nn.Linear(24, 40)}
    for kernel in ("fused", "delta", "reference"):
        (adapter,) = build_adapters(AdapterConfig(method="waveft", budget=30, kernel=kernel), linears).values()
        assert adapter.kernel == kernel
    with pytest.raises(UserError, match="unknown kernel 'fuse'.*fused"):
        AdapterConfig(kernel="fuse")


def test_reference_kernel_is_the_dense_delta_through_autograd():
    """It builds the dense delta (what the other kernels never do) and gives PEFT's dense gradient."""
    layer = kernel_layer("reference", (40, 24), "db2", torch.float32, "cpu")
    x = torch.randn(3, 24)
    with TensorRecorder() as recorder:
        layer(x).sum().backward()
    assert max(recorder.sizes) >= 40 * 24


def count_calls(function_name, run):
    """How many times an aten op whose name contains `function_name` runs inside `run()`."""

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += function_name in func.__name__
            return func(*args, **(kwargs or {}))

    with Counter():
        run()
    return Counter.calls


def test_sddmm_chunks_follow_the_device_budget(monkeypatch):
    """CPU: chunks of 2^19 elements (cache-sized) as before; an accelerator's budget: one chunk per
    layer. The gradient is the same either way (to rounding of the per-chunk sums)."""
    from sparse_dreambooth.adapters import kernels

    shape, tokens = (320, 640), 4096
    assert kernels.chunk_tokens(tokens, 640 + 640, torch.device("cpu")) == (1 << 19) // 1280
    assert kernels.chunk_tokens(tokens, 640 + 640, torch.device("cuda")) == tokens
    assert kernels.chunk_tokens(10**6, 1280, torch.device("cuda")) == kernels.ACCELERATOR_CHUNK_ELEMENTS // 1280
    layer = make_layer(shape, "db1", budget=500)
    x, grad_output = torch.randn(tokens, shape[1]), torch.randn(tokens, shape[0])

    def gradient():
        return output_and_gradients(layer, layer, x, grad_output)[2]

    cpu_chunks = -(-tokens // kernels.chunk_tokens(tokens, 320 + 640, torch.device("cpu")))
    assert count_calls("sampled_addmm", gradient) == cpu_chunks > 1
    chunked = gradient()
    monkeypatch.setitem(kernels.SDDMM_CHUNK_ELEMENTS, "cpu", kernels.ACCELERATOR_CHUNK_ELEMENTS)
    assert count_calls("sampled_addmm", gradient) == 1
    assert_relative_close(gradient(), chunked, 1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wavelet", ["db1", "db3", None])
def test_half_precision_forward_rounds_the_patched_weight_once(wavelet, weight_dtype):
    """The fused forward under autocast is the matmul with round(W + delta), the sum formed in
    float32: not W + round(delta), which rounds twice. Oracle: the dense delta, summed by hand."""
    layer = make_layer((40, 24), wavelet, budget=60, scaling=25.0)
    with torch.no_grad():
        layer.adapter.coefficients.mul_(1e-3)  # deltas near a half-precision step of the weights
    layer.base.to(weight_dtype)
    x = torch.randn(7, 24).to(weight_dtype)
    with torch.no_grad():
        patched = (layer.base.weight.float() + layer.adapter.delta_weight()).to(weight_dtype)
        twice = layer.base.weight + layer.adapter.delta_weight().to(weight_dtype)
        assert not torch.equal(patched, twice), "the case must tell one rounding from two"
        with torch.autocast("cpu", dtype=weight_dtype):
            output, expected = layer(x), F.linear(x, patched, layer.base.bias)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("wavelet", ["db1", "db3", "sym4", None])
def test_deterministic_mode_sums_without_index_add_and_gives_the_same_bits(wavelet):
    layer = make_layer((40, 24), wavelet, budget=60)
    x, grad_output = torch.randn(2, 9, 24), torch.randn(2, 9, 40)
    default = output_and_gradients(layer, layer, x, grad_output)
    assert count_calls("index_add", lambda: layer(x)) == 1
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert count_calls("index_add", lambda: layer(x)) == 0
        deterministic = output_and_gradients(layer, layer, x, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    for actual, wanted in zip(deterministic, default, strict=True):
        assert torch.equal(actual, wanted)
