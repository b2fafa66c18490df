"""Export and import against the other libraries' own loaders, on the tiny model.

Every round trip is judged by the other side's code: diffusers' load_lora_weights (including its
kohya conversion), PEFT's PeftModel.from_pretrained / get_peft_model, and diffusers'
from_pretrained for merged folders. Outputs are compared numerically on fixed UNet inputs.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, cli_error, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sparse_dreambooth import adapters
from sparse_dreambooth.config import dump_yaml, merge_settings
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.export import export_adapter, import_adapter, peft_wavelets
from sparse_dreambooth.files import write_safetensors
from sparse_dreambooth.model import load_pipeline, model_identity, tiny_pipeline_path

TINY_BASE = "tiny-sdxl-v1-seed0"
# The tiny UNet's 136 attention projections include, in kohya's documented naming
# (lora_unet_ + the diffusers module name with dots as underscores):
KOHYA_EXAMPLES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_attn2_to_k": (64, 96),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": (64, 96),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0": (64, 64),
}
RUNS = {
    "lora": {"rank": 2, "alpha": 3.0},  # scale 1.5: exercises alpha handling in every format
    "waveft": {"wavelet": "db2", "allocation": "proportional", "budget_scale": 1.5},  # per-layer counts
    "random-sparse": {},
}


def fresh_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline_path(), subfolder="unet")


def unet_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, 96, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 64, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    }


@torch.no_grad()
def unet_output(unet) -> torch.Tensor:
    return unet(**unet_inputs()).sample


def assert_same_output(actual, expected, tolerance=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * expected.abs().max().item())


def randomise(parameters, scale, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run folder per method with random (non-trivial) adapter values, and its UNet output."""
    built = {}
    base_output = unet_output(fresh_unet())
    for method, settings in RUNS.items():
        run = tmp_path_factory.mktemp(method)
        config = merge_settings(
            None, {"model": "tiny", "subject": "demo", "method": method, **settings, "output": str(run)}
        )
        unet = fresh_unet()
        adapters.attach(unet, config.adapter)
        parameters = [p for layer in adapters.adapted_layers(unet).values() for p in layer.adapter.parameters()]
        randomise(parameters, 0.1 if method == "lora" else 0.01)
        adapters.save_adapter(unet, run / "adapter.safetensors", config.adapter, base_model=model_identity("tiny"))
        (run / "config.yaml").write_text(dump_yaml(config))
        output = unet_output(unet)
        assert (output - base_output).abs().max() > 0.05, "the adapter must change the output"
        built[method] = (run, output)
    return built


# --- diffusers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora.safetensors", "lora-folder"])
def test_lora_loads_with_diffusers_load_lora_weights(runs, tmp_path, name):
    run, expected = runs["lora"]
    out = tmp_path / name
    result = export_adapter(run, "diffusers", out)
    assert result.relative_error is None
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(out))
    assert_same_output(unet_output(pipe.unet), expected)


@pytest.mark.slow
def test_a_sparse_adapter_needs_rank_for_diffusers_and_its_svd_loads(runs, tmp_path):
    run, expected = runs["random-sparse"]
    with pytest.raises(UserError, match="--rank"):
        export_adapter(run, "diffusers", tmp_path / "x.safetensors")
    # Full rank (64 >= every layer's smaller side) is exact; diffusers loads it as any LoRA.
    result = export_adapter(run, "diffusers", tmp_path / "full.safetensors", rank=64)
    assert result.relative_error < 1e-5
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(tmp_path / "full.safetensors"))
    assert_same_output(unet_output(pipe.unet), expected, tolerance=1e-4)


# --- PEFT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(RUNS))
def test_peft_from_pretrained_reproduces_our_outputs(runs, tmp_path, method):
    from peft import PeftModel

    run, expected = runs[method]
    out = tmp_path / "peft"
    run_cli("export", "--run", run, "--format", "peft", "--out", out)
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == ("LORA" if method == "lora" else "WAVEFT")
    if method != "lora":
        assert peft_config["use_idwt"] == (method == "waveft")
    if method == "waveft":
        assert peft_config["n_frequency_pattern"], "proportional allocation gives per-layer counts"
    unet = fresh_unet()
    PeftModel.from_pretrained(unet, out)  # injects PEFT's own layers into the UNet
    assert_same_output(unet_output(unet), expected)


def test_peft_export_refuses_what_peft_would_load_wrongly(runs, tmp_path):
    run, _ = runs["waveft"]
    config, tensors, metadata = adapters.read_adapter(run / "adapter.safetensors")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors[f"{name}.positions"] = tensors[f"{name}.positions"].flip(1).contiguous()  # not PEFT's draw order
    moved = tmp_path / "moved.safetensors"
    write_safetensors(moved, tensors, metadata)
    with pytest.raises(UserError, match=f"{name}.*positions.*PEFT"):
        export_adapter(moved, "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def sparse_run(tmp_path, wavelet: str) -> tuple[Path, torch.Tensor]:
    """A WaveFT run folder with random coefficients for `wavelet`, and its UNet output."""
    config = merge_settings(None, {"model": "tiny", "subject": "demo", "wavelet": wavelet, "budget": 64})
    unet = fresh_unet()
    adapters.attach(unet, config.adapter)
    randomise([p for layer in adapters.adapted_layers(unet).values() for p in layer.adapter.parameters()], 0.01)
    run = tmp_path / wavelet
    run.mkdir()
    adapters.save_adapter(unet, run / "adapter.safetensors", config.adapter, base_model=model_identity("tiny"))
    (run / "config.yaml").write_text(dump_yaml(config))
    return run, unet_output(unet)


@pytest.mark.parametrize("wavelet", ["db1", "haar", "sym4"])
def test_wavelets_peft_reproduces_export_and_load_back_exactly(tmp_path, wavelet):
    from peft import PeftModel

    run, expected = sparse_run(tmp_path, wavelet)
    run_cli("export", "--run", run, "--format", "peft", "--out", tmp_path / "peft")
    unet = fresh_unet()
    PeftModel.from_pretrained(unet, tmp_path / "peft")
    assert_same_output(unet_output(unet), expected)


@pytest.mark.parametrize("wavelet", ["coif4", "coif5", "db12", "bior2.2"])
def test_wavelets_peft_cannot_reproduce_are_refused_in_one_line(tmp_path, wavelet):
    # peft 0.21.2: coif4's filter is not pywt's (outputs differ by 2e-2), coif5 crashes in its
    # transform, db12 is accepted by WaveFTConfig but unknown to its layer, bior2.2 is not a PEFT name.
    run, _ = sparse_run(tmp_path, wavelet)
    message = cli_error("export", "--run", run, "--format", "peft", "--out", tmp_path / "peft")
    assert "\n" not in message
    assert f"cannot reproduce the {wavelet!r} wavelet" in message and "--format merged" in message
    assert "db1-10, sym2-10, coif1-3" in message  # what peft 0.21.2 reproduces, as probed
    assert not (tmp_path / "peft").exists()


def test_the_wavelets_named_as_working_are_those_peft_reproduces():
    # Oracle: PEFT's own layer against pywt.waverec2 on the padded coefficient matrix, per name.
    import pywt
    from peft import WaveFTConfig
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    from peft.tuners.waveft.layer import WaveFTLinear

    def reproduced(name):
        try:
            layer = WaveFTLinear(torch.nn.Linear(9, 7), "default", WaveFTConfig(wavelet_family=name), n_frequency=20)
            with torch.no_grad():
                layer.waveft_spectrum["default"].copy_(torch.linspace(-1, 1, 20))
                theirs = layer.get_delta_weight("default").double().numpy()
        except Exception:
            return False
        rows, cols = WAVELET_REDUCTIONS[name]
        padded = np.zeros((7 + rows + (7 + rows) % 2, 9 + cols + (9 + cols) % 2))
        row, col = layer.waveft_indices["default"].numpy()
        padded[row + (padded.shape[0] - 7) // 2, col + (padded.shape[1] - 9) // 2] = np.linspace(-1, 1, 20)
        half_rows, half_cols = padded.shape[0] // 2, padded.shape[1] // 2
        quadrants = (padded[:half_rows, :half_cols], padded[:half_rows, half_cols:], padded[half_rows:, :half_cols])
        full = pywt.waverec2((quadrants[0], (quadrants[1], quadrants[2], padded[half_rows:, half_cols:])), name)
        top, left = (full.shape[0] - 7) // 2, (full.shape[1] - 9) // 2
        return theirs.shape == (7, 9) and np.allclose(theirs, 25 * full[top : top + 7, left : left + 9], atol=1e-4)

    assert set(peft_wavelets()) == {name for name in WAVELET_REDUCTIONS if reproduced(name)}


# --- kohya / A1111 / ComfyUI ---------------------------------------------------------------------


def test_kohya_lora_layout_and_diffusers_kohya_conversion(runs, tmp_path):
    run, expected = runs["lora"]
    out = tmp_path / "kohya.safetensors"
    run_cli("export", "--run", run, "--format", "kohya", "--out", out)
    tensors = load_file(str(out))
    assert len(tensors) == 136 * 3
    for key, (out_features, in_features) in KOHYA_EXAMPLES.items():
        assert tensors[f"{key}.lora_down.weight"].shape == (2, in_features)
        assert tensors[f"{key}.lora_up.weight"].shape == (out_features, 2)
        assert tensors[f"{key}.alpha"].shape == () and tensors[f"{key}.alpha"].item() == 3.0
    assert all(key.startswith("lora_unet_") and "." not in key.split(".", 1)[0] for key in tensors)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora"
    half = export_adapter(run, "kohya", tmp_path / "half.safetensors", dtype="fp16").path
    assert {tensor.dtype for tensor in load_file(str(half)).values()} == {torch.float16}
    # diffusers reads kohya files through its own kohya -> diffusers key conversion.
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(out))
    assert_same_output(unet_output(pipe.unet), expected)


@pytest.mark.parametrize("method", ["waveft", "random-sparse"])
def test_kohya_export_of_a_sparse_adapter_needs_rank_or_full_diff(runs, tmp_path, method):
    run, _ = runs[method]
    message = cli_error("export", "--run", run, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert "\n" not in message
    assert all(part in message for part in ("--rank R", "--full-diff", "--format peft or merged"))
    both = ("--rank", "4", "--full-diff")
    assert "pass one" in cli_error(
        "export", "--run", run, "--format", "kohya", "--out", tmp_path / "k.safetensors", *both
    )
    assert not (tmp_path / "k.safetensors").exists()
    lora, _ = runs["lora"]
    assert "for sparse adapters" in cli_error(
        "export", "--run", lora, "--format", "kohya", "--out", tmp_path / "k.safetensors", "--full-diff"
    )
    assert "applies to --format kohya" in cli_error(
        "export", "--run", run, "--format", "peft", "--out", tmp_path / "p", "--full-diff"
    )


def test_kohya_full_diffs_are_the_exact_weight_differences(runs, tmp_path):
    run, expected = runs["waveft"]
    out = tmp_path / "full.safetensors"
    announced = []
    export_adapter(
        run, "kohya", out, full_diff=True, dtype="fp16", notify=lambda line: announced.append((line, out.exists()))
    )
    diffs = load_file(str(out))
    # The size is stated before the file exists, and is the size of what was written.
    tensor_bytes = sum(diff.numel() * diff.element_size() for diff in diffs.values())
    assert announced == [(f"writing {out}: 136 dense weight differences, {tensor_bytes / 1e6:,.1f} MB", False)]
    assert out.stat().st_size == pytest.approx(tensor_bytes, rel=0.05)
    # The command line says it too; fp32 this time, twice the bytes.
    assert f"{tensor_bytes * 2 / 1e6:,.1f} MB" in run_cli(
        "export", "--run", run, "--format", "kohya", "--out", out, "--full-diff", "--overwrite"
    )
    diffs = load_file(str(out))
    assert len(diffs) == 136 and all(key.endswith(".diff") for key in diffs)
    for key, shape in KOHYA_EXAMPLES.items():
        assert diffs[f"{key}.diff"].shape == shape
    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"]) == {"algo": "full"}
    # Apply them as ComfyUI's "diff" patch does (W += diff) on a fresh UNet found by kohya name.
    unet = fresh_unet()
    linears = {f"lora_unet_{name.replace('.', '_')}": module for name, module in unet.named_modules()}
    with torch.no_grad():
        for key, diff in diffs.items():
            linears[key.removesuffix(".diff")].weight += diff
    assert_same_output(unet_output(unet), expected)


@pytest.mark.slow
def test_kohya_svd_approximation_reports_its_error(runs, tmp_path):
    run, expected = runs["waveft"]
    errors = {}
    for rank in (2, 8, 64):
        result = export_adapter(run, "kohya", tmp_path / f"r{rank}.safetensors", rank=rank)
        errors[rank] = result.relative_error
        assert f"relative error {result.relative_error:.4f}" in result.summary
    assert 1 > errors[2] > errors[8] > errors[64] and errors[64] < 1e-5
    # The reported error is the error of the file as written, checked here on one layer.
    tensors = load_file(str(tmp_path / "r8.safetensors"))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    key = "lora_unet_" + name.replace(".", "_")
    unet = fresh_unet()
    adapters.load_adapter(unet, run / "adapter.safetensors")
    delta = unet.get_submodule(name).adapter.delta_weight().detach()
    approximation = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    assert tensors[f"{key}.alpha"].item() == 8
    layer_error = ((delta - approximation).norm() / delta.norm()).item()
    result = export_adapter(run, "kohya", tmp_path / "r8.safetensors", rank=8, overwrite=True)
    assert result.layer_errors[name] == pytest.approx(layer_error, rel=1e-4)
    # Full rank loads through diffusers' kohya conversion like any LoRA.
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(tmp_path / "r64.safetensors"))
    assert_same_output(unet_output(pipe.unet), expected, tolerance=1e-4)


# --- merged --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method,pipeline", [("waveft", False), ("lora", True)])
def test_merged_folder_loads_with_from_pretrained(runs, tmp_path, method, pipeline):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    run, expected = runs[method]
    out = tmp_path / "merged"
    run_cli("export", "--run", run, "--format", "merged", "--out", out, *(["--pipeline"] if pipeline else []))
    if pipeline:
        unet = StableDiffusionXLPipeline.from_pretrained(out).unet
    else:
        unet = UNet2DConditionModel.from_pretrained(out)
    assert not adapters.adapted_layers(unet)
    assert_same_output(unet_output(unet), expected)
    # Bit for bit the weights of our own merge, loaded onto the base model.
    ours = fresh_unet()
    adapters.load_adapter(ours, run / "adapter.safetensors", base_model=TINY_BASE)
    adapters.unload(ours)
    theirs = unet.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())


# --- import --------------------------------------------------------------------------------------


def peft_adapter(method: str):
    from peft import LoraConfig, WaveFTConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if method == "lora":
        # Per-layer ranks and alphas: imported by padding to one rank and folding the scales.
        return LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=targets,
            rank_pattern={"attn2.to_k": 3},
            alpha_pattern={"attn1.to_q": 1},
            init_lora_weights=False,
        )
    return WaveFTConfig(
        n_frequency=40,
        scaling=10.0,
        wavelet_family="db3",
        use_idwt=method == "waveft",
        random_loc_seed=5,
        proportional_parameters=method == "waveft",
        target_modules=targets,
        init_weights=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_peft_trained_adapter_imports_and_samples_the_same(tmp_path, method):
    from diffusers import DPMSolverMultistepScheduler
    from peft import get_peft_model

    pipe = load_pipeline("tiny")
    peft_model = get_peft_model(pipe.unet, peft_adapter(method))  # adapts pipe.unet in place
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    randomise(trainable, 0.1 if method == "lora" else 0.02)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = unet_output(pipe.unet)

    run = tmp_path / "run"
    run_cli("import", tmp_path / "peft", "--output", run, "--model", "tiny", "--subject", "demo", "--resolution", "64")
    config, _, _ = adapters.read_adapter(run / "adapter.safetensors")
    assert config.method == method
    assert json.loads((run / "run.json").read_text())["origin"]["format"] == "peft"
    unet = fresh_unet()
    adapters.load_adapter(unet, run / "adapter.safetensors", base_model=TINY_BASE)
    assert_same_output(unet_output(unet), expected)

    # The same samples: `sparse-db sample` on the imported run vs the pipeline with PEFT's layers.
    run_cli("sample", "--run", run, "--num-steps", "2", "--seeds", "42", "--prompt", "a zjw toy")
    ours = np.asarray(Image.open(run / "samples" / "prompt_00_sample_0_seed_42.png"), dtype=np.int16)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    theirs = pipe(
        "a zjw toy",
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(42),
    ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1


@pytest.mark.slow
def test_a_trained_run_goes_to_peft_through_the_cli(tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    run_cli(
        "train",
        "--config",
        CONFIGS / "tiny.yaml",
        "--resolution",
        "32",
        "--checkpoint-every",
        "0",
        "--subject",
        "demo",
        "--method",
        "random-sparse",
        "--steps",
        "2",
        "--output",
        run,
    )
    ours = fresh_unet()
    adapters.load_adapter(ours, run / "adapter.safetensors", base_model=TINY_BASE)
    assert (unet_output(ours) - unet_output(fresh_unet())).abs().max() > 0, "training moved the adapter"
    output = run_cli("export", "--run", run, "--format", "peft", "--out", tmp_path / "peft")
    assert "PeftModel.from_pretrained" in output
    unet = fresh_unet()
    PeftModel.from_pretrained(unet, tmp_path / "peft")
    assert_same_output(unet_output(unet), unet_output(ours))


def test_ours_to_peft_and_back_is_bit_exact(runs, tmp_path):
    run, _ = runs["waveft"]
    export_adapter(run, "peft", tmp_path / "peft")
    imported = import_adapter(tmp_path / "peft", tmp_path / "back", model="tiny", subject="demo")
    _, before, _ = adapters.read_adapter(run / "adapter.safetensors")
    config, after, _ = adapters.read_adapter(imported / "adapter.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert config.targets == ["to_k", "to_out.0", "to_q", "to_v"]


def test_import_refuses_pickles_other_methods_and_foreign_layers(tmp_path):
    source = tmp_path / "peft"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "WAVEFT"}))
    (source / "adapter_model.bin").write_bytes(b"not unpickled")
    args = ["import", source, "--output", tmp_path / "run", "--model", "tiny", "--subject", "demo"]
    assert "pickled" in cli_error(*args)
    write_safetensors(
        source / "adapter_model.safetensors", {"base_model.model.text_model.q_proj.waveft_spectrum": torch.zeros(4)}
    )
    assert "not a linear layer" in cli_error(*args)
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    assert "imports WAVEFT and LORA" in cli_error(*args)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


# --- the command line ----------------------------------------------------------------------------


def test_export_errors_name_the_fix(runs, tmp_path):
    run, _ = runs["lora"]
    assert "did you mean 'kohya'" in cli_error("export", "--run", run, "--format", "kohyaa", "--out", tmp_path / "x")
    assert ".safetensors" in cli_error("export", "--run", run, "--format", "kohya", "--out", tmp_path / "x")
    assert "own rank" in cli_error(
        "export", "--run", run, "--format", "kohya", "--out", tmp_path / "x.safetensors", "--rank", "4"
    )
    assert "does not exist" in cli_error(
        "export", "--run", tmp_path / "nowhere", "--format", "peft", "--out", tmp_path / "p"
    )
    run_cli("export", "--run", run, "--format", "peft", "--out", tmp_path / "p")
    assert "--overwrite" in cli_error("export", "--run", run, "--format", "peft", "--out", tmp_path / "p")
    run_cli("export", "--run", run, "--format", "peft", "--out", tmp_path / "p", "--overwrite")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p"], "no staging folders left behind"


def test_export_and_import_help_do_not_import_torch():
    probe = (
        "import sys; from typer.testing import CliRunner; from sparse_dreambooth.cli import app; "
        "assert all(CliRunner().invoke(app, [c, '--help']).exit_code == 0 for c in ('export', 'import')); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
