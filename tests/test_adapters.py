"""The adapter core against independent oracles: pywt, PEFT, finite differences, exact bits."""

import json
import warnings

import numpy as np
import pytest
import pywt
import torch
from torch import nn

import sparse_dreambooth as sd
from sparse_dreambooth.adapters import budget as budgets
from sparse_dreambooth.adapters import sparse as sparse_module
from sparse_dreambooth.adapters.wavelets import AxisLayout
from sparse_dreambooth.errors import UserError

ALL_WAVELETS = pywt.wavelist(kind="discrete")
PEFT_WAVELETS = ["db1", "db2", "db3", "db7", "sym2", "sym5", "coif1", "coif3"]


class TwoProjections(nn.Module):
    """A toy attention block: the adapted projections feed a layer that is not adapted."""

    def __init__(self, in_features=24, out_features=40):
        super().__init__()
        self.to_q = nn.Linear(in_features, out_features)
        self.to_k = nn.Linear(in_features, out_features, bias=False)
        self.mix = nn.Linear(out_features, 8)

    def forward(self, x):
        return self.mix(torch.tanh(self.to_q(x)) * self.to_k(x))


def fresh_model(seed=0, **shape):
    torch.manual_seed(seed)
    return TwoProjections(**shape)


def randomise_adapters(model, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sd.adapted_layers(model).values():
            for parameter in layer.adapter.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype))


def pywt_reference(coefficients: np.ndarray, wavelet: str) -> np.ndarray:
    """PEFT's padded transform computed with pywt.waverec2: centre C in a padded matrix, read
    the quadrants, reconstruct, centre-crop back."""
    rows, cols = coefficients.shape
    filter_length = pywt.Wavelet(wavelet).rec_len
    row_axis, col_axis = AxisLayout(rows, filter_length), AxisLayout(cols, filter_length)
    padded = np.zeros((row_axis.padded, col_axis.padded))
    padded[row_axis.offset : row_axis.offset + rows, col_axis.offset : col_axis.offset + cols] = coefficients
    half_rows, half_cols = row_axis.half, col_axis.half
    quadrants = (
        padded[:half_rows, :half_cols],
        (padded[:half_rows, half_cols:], padded[half_rows:, :half_cols], padded[half_rows:, half_cols:]),
    )
    full = pywt.waverec2(quadrants, wavelet)
    top, left = (full.shape[0] - rows) // 2, (full.shape[1] - cols) // 2
    return full[top : top + rows, left : left + cols]


# --- the transform -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 10), (7, 5), (1, 3), (33, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_idwt2_equals_pywt_waverec2_for_every_discrete_wavelet(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for wavelet in ALL_WAVELETS:
        coefficients = rng.normal(size=shape)
        ours = sd.idwt2(torch.tensor(coefficients, dtype=dtype), wavelet)
        assert ours.dtype == dtype
        np.testing.assert_allclose(
            ours.double().numpy(), pywt_reference(coefficients, wavelet), atol=tolerance, err_msg=wavelet
        )


def test_idwt2_unpadded_haar_is_plain_waverec2():
    # No padding, no crop: the quadrant layout alone decides the result.
    coefficients = np.arange(48, dtype=np.float64).reshape(6, 8)
    quadrants = (coefficients[:3, :4], (coefficients[:3, 4:], coefficients[3:, :4], coefficients[3:, 4:]))
    np.testing.assert_allclose(
        sd.idwt2(torch.tensor(coefficients), "db1").numpy(), pywt.waverec2(quadrants, "db1"), atol=1e-12
    )


def test_one_haar_coefficient_is_a_two_by_two_block_of_halves():
    coefficients = torch.zeros(8, 8, dtype=torch.float64)
    coefficients[1, 2] = 1.0  # in cA: the block at rows 2-3, cols 4-5
    delta = sd.idwt2(coefficients, "db1")
    torch.testing.assert_close(delta[2:4, 4:6], torch.full((2, 2), 0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    assert delta.count_nonzero() == 4


# --- against PEFT ----------------------------------------------------------------------------


def peft_delta(model, method, budget, scaling, wavelet, seed, coefficients_by_layer):
    """PEFT's WaveFT layer delta for the same coefficients (use_idwt=False for random-sparse)."""
    from peft import WaveFTConfig, get_peft_model

    config = WaveFTConfig(
        n_frequency=budget,
        scaling=scaling,
        wavelet_family=wavelet,
        use_idwt=method == "waveft",
        random_loc_seed=seed,
        target_modules=["to_q", "to_k"],
    )
    peft_model = get_peft_model(model, config)
    deltas = {}
    for name in ("to_q", "to_k"):
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.waveft_spectrum["default"].copy_(coefficients_by_layer[name])
        deltas[name] = layer.get_delta_weight("default")
    return deltas


@pytest.mark.parametrize(
    "method,wavelet", [("waveft", wavelet) for wavelet in PEFT_WAVELETS] + [("random-sparse", "db1")]
)
@pytest.mark.parametrize("shape", [(40, 24), (33, 17), (16, 16)])
def test_delta_equals_peft_waveft_for_the_same_coefficients(method, wavelet, shape):
    out_features, in_features = shape
    for budget, scaling, seed in [(1, 25.0, 777), (37, 3.5, 5), (out_features * in_features, 25.0, 777)]:
        ours = fresh_model(out_features=out_features, in_features=in_features)
        config = sd.AdapterConfig(
            method=method, budget=budget, scaling=scaling, wavelet=wavelet, adapter_seed=seed, targets=["to_q", "to_k"]
        )
        layers = sd.attach(ours, config)
        randomise_adapters(ours, seed=budget)
        coefficients = {name: layer.adapter.coefficients.detach().clone() for name, layer in layers.items()}
        reference = peft_delta(
            fresh_model(out_features=out_features, in_features=in_features),
            method,
            budget,
            scaling,
            wavelet,
            seed,
            coefficients,
        )
        for name, layer in layers.items():
            torch.testing.assert_close(layer.adapter.delta_weight(), reference[name], rtol=1e-5, atol=1e-5)


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,wavelet",
    [("waveft", "db1"), ("waveft", "db3"), ("waveft", "bior2.4"), ("random-sparse", "db1"), ("lora", "db1")],
)
def test_gradients_equal_finite_differences(method, wavelet):
    model = fresh_model(in_features=7, out_features=9).double()
    config = sd.AdapterConfig(method=method, budget=20, wavelet=wavelet, scaling=2.0, targets=["to_q"])
    layer = sd.attach(model, config)["to_q"].double()
    randomise_adapters(model, dtype=torch.float64)
    names = [f"adapter.{name}" for name, _ in layer.adapter.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for p in layer.adapter.parameters()]
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def forward(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=False)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *values))


# --- merge, counts, files --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_merge_matches_unmerged_forward_and_unmerge_restores(method):
    model = fresh_model()
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}
    sd.attach(model, sd.AdapterConfig(method=method, budget=64, wavelet="db2", targets=["to_q", "to_k"]))
    randomise_adapters(model)
    x = torch.randn(4, 24)
    unmerged = model(x)
    sd.merge(model)
    assert not torch.equal(model.to_q.weight, original["to_q.weight"])
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    sd.unmerge(model)
    for name in ("to_q.weight", "to_k.weight"):
        restored = model.get_submodule(name.split(".")[0]).weight
        if method == "lora":
            torch.testing.assert_close(restored, original[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(restored, original[name]), "sparse unmerge must restore the exact bits"
    if method != "lora":
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_half_precision_merge_rounds_once(method, dtype):
    """Merged weight == round(W + delta) formed in fp32; unmerge gives the original bits back."""
    model = fresh_model(in_features=48, out_features=64).to(dtype)
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}
    sd.attach(model, sd.AdapterConfig(method=method, budget=512, wavelet="db2", targets=["to_q", "to_k"]))
    for layer in sd.adapted_layers(model).values():
        for parameter in layer.adapter.parameters():
            # Small values next to the weights: where double rounding differs from single rounding.
            torch.nn.init.normal_(parameter, std=0.05 if method == "lora" else 1e-3)
    expected = {
        name: (layer.base.weight.float() + layer.adapter.delta_weight().float()).to(dtype)
        for name, layer in sd.adapted_layers(model).items()
    }
    sd.merge(model)
    for name, layer in sd.adapted_layers(model).items():
        assert not torch.equal(layer.base.weight, original[f"{name}.weight"])
        assert torch.equal(layer.base.weight, expected[name])
    sd.unmerge(model)
    if method != "lora":
        for name, layer in sd.adapted_layers(model).items():
            assert torch.equal(layer.base.weight, original[f"{name}.weight"])


@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(method, tmp_path, monkeypatch):
    model = fresh_model()
    config = sd.AdapterConfig(method=method, budget=50, wavelet="sym3", targets=["to_q", "to_k"])
    sd.attach(model, config)
    randomise_adapters(model)
    x = torch.randn(5, 24)
    expected = model(x)
    path = tmp_path / "adapter.safetensors"
    sd.save_adapter(model, path, config, base_model="toy")

    # Positions come from the file, never from re-running the generator.
    def no_redraw(*args, **kwargs):
        raise AssertionError("positions were re-drawn on load")

    monkeypatch.setattr(sparse_module, "random_positions", no_redraw)
    monkeypatch.setattr("sparse_dreambooth.adapters.layer.random_positions", no_redraw)
    reloaded = fresh_model()
    assert sd.load_adapter(reloaded, path, base_model="toy") == config
    assert torch.equal(reloaded(x), expected)

    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        assert json.loads(metadata["adapter_config"])["method"] == method
        assert metadata["base_model"] == "toy" and metadata["sparse_dreambooth_version"] == sd.__version__
        if method != "lora":
            assert handle.get_tensor("to_q.positions").dtype == torch.int32


def test_positions_follow_peft_seeded_permutation():
    model = fresh_model()
    layers = sd.attach(model, sd.AdapterConfig(method="waveft", budget=30, adapter_seed=123, targets=["to_q"]))
    flat = torch.randperm(40 * 24, generator=torch.Generator().manual_seed(123))[:30]
    assert torch.equal(layers["to_q"].adapter.positions, torch.stack([flat // 24, flat % 24]))


def test_loading_onto_another_base_model_or_shape_is_refused(tmp_path):
    model = fresh_model()
    config = sd.AdapterConfig(budget=10, targets=["to_q", "to_k"])
    sd.attach(model, config)
    path = tmp_path / "a.safetensors"
    sd.save_adapter(model, path, config, base_model="model-a")
    with pytest.raises(UserError, match="model-a"):
        sd.load_adapter(fresh_model(), path, base_model="model-b")
    with pytest.raises(UserError, match="to_q"):
        sd.load_adapter(fresh_model(in_features=12), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match="truncated"):
        sd.load_adapter(fresh_model(), path)


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    """SDXL base UNet's 560 attention projections, written out from its architecture:
    70 transformer blocks (4 + 20 down, 10 mid, 30 + 6 up) at 640 or 1280 channels; self-attention
    is C->C, cross-attention keys and values read the 2048-d text states."""
    shapes = {}
    for block, channels in enumerate([640] * 10 + [1280] * 60):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"block{block}.attn1.{projection}"] = (channels, channels)
            cross_in = 2048 if projection in ("to_k", "to_v") else channels
            shapes[f"block{block}.attn2.{projection}"] = (channels, cross_in)
    return shapes


def test_default_budget_is_lora_rank_one_on_sdxl():
    shapes = sdxl_attention_shapes()
    assert len(shapes) == 560
    assert budgets.lora_r1_count(shapes) == 1_451_520
    for config in (sd.AdapterConfig(), sd.AdapterConfig(budget_scale=1.0)):
        assert set(budgets.sparse_budgets(config, shapes).values()) == {2592}
    assert set(budgets.lora_ranks(sd.AdapterConfig(method="lora"), shapes).values()) == {1}
    assert set(budgets.lora_ranks(sd.AdapterConfig(method="lora", budget_scale=3), shapes).values()) == {3}


@pytest.mark.parametrize("scale", [0.8, 0.9, 1.0, 1.5, 2.0, 3.0])
def test_paper_budget_scales_on_sdxl(scale):
    shapes = sdxl_attention_shapes()
    target = round(scale * 1_451_520)
    uniform = budgets.sparse_budgets(sd.AdapterConfig(budget_scale=scale), shapes)
    assert set(uniform.values()) == {round(target / 560)}
    proportional = budgets.sparse_budgets(sd.AdapterConfig(budget_scale=scale, allocation="proportional"), shapes)
    assert abs(sum(proportional.values()) - target) <= len(shapes) / 2  # rounded per layer
    # Proportional to out*in: a 1280x2048 layer gets 6.4x the share of a 640x640 one, to rounding.
    big, small = proportional["block10.attn2.to_k"], proportional["block0.attn1.to_q"]
    assert abs(big - small * (1280 * 2048) / (640 * 640)) <= 1 + (1280 * 2048) / (640 * 640)


def peft_proportional_counts(model, targets, n_frequency) -> dict[str, int]:
    """PEFT's own per-layer counts for proportional_parameters=True, from its allocation code."""
    from peft import WaveFTConfig
    from peft.tuners.waveft.model import WaveFTModel

    config = WaveFTConfig(n_frequency=n_frequency, proportional_parameters=True, target_modules=targets)
    # The method reads only its arguments; calling it unbound sizes a meta model without building PEFT layers.
    return WaveFTModel._calculate_proportional_parameters(None, model, config)


def our_proportional_counts(model, targets, budget) -> dict[str, int]:
    from sparse_dreambooth.adapters.layer import target_linears

    shapes = {name: (lin.out_features, lin.in_features) for name, lin in target_linears(model, targets).items()}
    return budgets.sparse_budgets(sd.AdapterConfig(budget=budget, allocation="proportional"), shapes)


@pytest.mark.parametrize("n_frequency", [1, 2592, 5184])
def test_proportional_counts_are_peft_s_on_sdxl(n_frequency):
    from sparse_dreambooth.sdxl_architecture import build_sdxl_unet

    unet = build_sdxl_unet(device="meta")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    theirs = peft_proportional_counts(unet, targets, n_frequency)
    ours = our_proportional_counts(unet, targets, n_frequency)
    assert len(ours) == 560
    assert ours == theirs


def test_proportional_counts_are_peft_s_when_the_floor_of_one_binds():
    """Six layers at p=1 (a target of 6): PEFT gives the big layer 6 and each small one 1, 11 in all."""
    from peft import WaveFTConfig, get_peft_model

    shapes = [(8, 16), (64, 64), (2, 8), (1, 4), (2, 4), (16, 2)]
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(in_features, out_features) for out_features, in_features in shapes))
    targets = [str(index) for index in range(len(shapes))]
    ours = our_proportional_counts(model, targets, 1)
    config = WaveFTConfig(n_frequency=1, proportional_parameters=True, target_modules=targets, use_idwt=False)
    peft_model = get_peft_model(model, config)
    theirs = {
        name.removeprefix("base_model.model.").removesuffix(".waveft_spectrum.default"): parameter.numel()
        for name, parameter in peft_model.named_parameters()
        if "waveft_spectrum" in name
    }
    assert ours == theirs
    assert sum(ours.values()) == 11


def test_proportional_counts_are_peft_s_on_the_tiny_unet():
    from peft import WaveFTConfig, get_peft_model

    from sparse_dreambooth.model import load_pipeline

    unet = load_pipeline("tiny").unet
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    ours = our_proportional_counts(unet, targets, 40)
    config = WaveFTConfig(n_frequency=40, proportional_parameters=True, target_modules=targets)
    peft_model = get_peft_model(unet, config)
    theirs = {
        name.removeprefix("base_model.model.").removesuffix(".waveft_spectrum.default"): parameter.numel()
        for name, parameter in peft_model.named_parameters()
        if "waveft_spectrum" in name
    }
    assert ours == theirs


@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_attached_parameter_count_equals_the_budget(method):
    model = fresh_model()
    config = sd.AdapterConfig(method=method, budget=128, targets=["to_q", "to_k"])
    sd.attach(model, config)
    expected = 2 * 128 if method != "lora" else 2 * round(256 / (2 * 64)) * 64
    assert sd.trainable_parameter_count(model) == expected
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_budget_too_large_is_an_error_or_capped_on_request():
    with pytest.raises(UserError, match="cap_budget"):
        sd.attach(fresh_model(), sd.AdapterConfig(budget=40 * 24 + 1, targets=["to_q"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = sd.attach(fresh_model(), sd.AdapterConfig(budget=10_000, cap_budget=True, targets=["to_q"]))
    assert layers["to_q"].adapter.coefficients.numel() == 40 * 24
    assert any("capped" in str(warning.message) for warning in caught)
    with pytest.raises(UserError, match="rank"):
        sd.attach(fresh_model(), sd.AdapterConfig(method="lora", rank=25, targets=["to_q"]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "wavft"}, "did you mean 'waveft'"),
        ({"wavelet": "db99"}, "unknown wavelet 'db99'"),
        ({"wavelet": "haarr"}, "did you mean 'haar'"),
        ({"budget": 0}, "budget must be a positive"),
        ({"budget": -5}, "budget must be a positive"),
        ({"budget_scale": 0.0}, "budget_scale must be positive"),
        ({"budget": 10, "budget_scale": 1.0}, "not both"),
        ({"method": "lora", "allocation": "proportional"}, "one rank"),
        ({"rank": 4}, "rank is a LoRA setting"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_bad_configs_name_the_fix(kwargs, message):
    with pytest.raises(UserError, match=message):
        sd.AdapterConfig(**kwargs)


def test_no_matching_target_is_an_error():
    with pytest.raises(UserError, match="no linear layer matches"):
        sd.attach(fresh_model(), sd.AdapterConfig(targets=["to_v"]))


def test_targets_match_suffix_and_glob():
    from sparse_dreambooth.adapters.layer import target_linears

    model = nn.Sequential(TwoProjections(), TwoProjections())
    assert list(target_linears(model, ["to_q"])) == ["0.to_q", "1.to_q"]
    assert list(target_linears(model, ["1.to_*"])) == ["1.to_q", "1.to_k"]


@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_attach_on_the_meta_device_sizes_the_model_and_loads_later(method):
    """Sizing without memory: the meta model's count is the real one, and loading the real
    model's state dict (assign=True, as accelerate does) gives a working, identical adapter."""
    from diffusers import UNet2DConditionModel

    from sparse_dreambooth.model import load_pipeline

    config = sd.AdapterConfig(method=method, wavelet="db3", budget=48)
    real = load_pipeline("tiny").unet
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(real.config)
    sd.attach(meta, config)
    sd.attach(real, config)
    assert sd.trainable_parameter_count(meta) == sd.trainable_parameter_count(real) > 0
    randomise_adapters(real)
    meta.load_state_dict(real.state_dict(), assign=True)
    layer = next(iter(sd.adapted_layers(meta).values()))
    twin = sd.adapted_layers(real)[next(iter(sd.adapted_layers(meta)))]
    assert torch.equal(layer.adapter.delta_weight(), twin.adapter.delta_weight())
    x = torch.randn(3, layer.in_features)
    assert torch.equal(layer(x), twin(x))


@pytest.mark.parametrize("method", ["waveft", "random-sparse", "lora"])
def test_sdxl_is_sized_on_the_meta_device_at_lora_r1_s_count(method):
    from sparse_dreambooth.sdxl_architecture import build_sdxl_unet

    unet = build_sdxl_unet(device="meta")
    sd.attach(unet, sd.AdapterConfig(method=method))
    assert sd.trainable_parameter_count(unet) == 1_451_520  # 560 x 2592, or LoRA r=1


@pytest.mark.parametrize(
    ("target", "replacement", "message"),
    [
        (b'"adapter_config":"{', b'"adapter_config":"[', "'adapter_config' metadata is not valid JSON"),
        (b'"layers":"{', b'"layers":"[', "'layers' metadata is not valid JSON"),
        (b'\\"method\\"', b'\\"mexhod\\"', "'adapter_config' metadata holds an unknown setting"),
    ],
)
def test_one_damaged_byte_of_metadata_is_a_one_line_error(tmp_path, target, replacement, message):
    model = fresh_model()
    config = sd.AdapterConfig(budget=20, targets=["to_q"])
    sd.attach(model, config)
    path = tmp_path / "adapter.safetensors"
    sd.save_adapter(model, path, config, base_model="toy")
    blob = path.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    assert blob.count(target, 0, header_end) == 1
    damaged = blob.replace(target, replacement, 1)
    assert sum(a != b for a, b in zip(blob, damaged, strict=True)) == 1
    path.write_bytes(damaged)
    with pytest.raises(UserError, match=message):
        sd.load_adapter(fresh_model(), path)
