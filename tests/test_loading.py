"""Loading that needs no Hub and survives a move: single-file checkpoints with --model-config, the
budget check for them, and base-model identities built from the UNet's config and weights.

The single file is the tiny pipeline written in the original SDXL layout (tests/sdxl_checkpoint.py);
diffusers' own conversion reading it back into the tiny model's exact weights is the check that
the layout is right.
"""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from conftest import FAST, cli_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdxl_checkpoint import config_only_copy, write_single_file

from sparse_dreambooth.adapters import BaseModel
from sparse_dreambooth.adapters.io import check_base_model
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.model import (
    _leading_values,
    load_pipeline,
    model_identity,
    tiny_pipeline_path,
    unet_fingerprint,
    unet_skeleton,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def offline_with_an_empty_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(checkpoint, config folder): the tiny pipeline as one original-layout file, and its folder
    without any weights."""
    folder = tmp_path_factory.mktemp("single-file")
    checkpoint = folder / "tiny-sdxl.safetensors"
    write_single_file(tiny_pipeline_path(), checkpoint)
    return checkpoint, config_only_copy(tiny_pipeline_path(), folder / "configs")


def _copy_of_tiny(target, seed: int = 0):
    return shutil.copytree(tiny_pipeline_path(seed), target)


# --- single files -------------------------------------------------------------------------------


def test_a_single_file_loads_offline_with_model_config_into_the_same_weights(single_file):
    checkpoint, configs = single_file
    assert not list(configs.rglob("*.safetensors")), "the config folder must hold no weights"
    loaded = load_pipeline(str(checkpoint), model_config=str(configs))
    reference = load_pipeline("tiny")
    for component in COMPONENTS:
        ours, theirs = getattr(loaded, component).state_dict(), getattr(reference, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), f"{component}.{name}"
    assert loaded.tokenizer_2.pad_token == reference.tokenizer_2.pad_token
    assert loaded.scheduler.config == reference.scheduler.config


def test_a_single_file_offline_without_model_config_names_the_flag(single_file):
    checkpoint, _ = single_file
    for attempt in (lambda: load_pipeline(str(checkpoint)), lambda: unet_skeleton(str(checkpoint))):
        with pytest.raises(UserError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and "pass --model-config DIR" in message and str(checkpoint) in message


def test_model_config_is_only_for_single_files_and_must_be_a_config_folder(single_file, tmp_path):
    checkpoint, configs = single_file
    with pytest.raises(UserError, match="is for a single .safetensors checkpoint"):
        load_pipeline("tiny", model_config=str(configs))
    with pytest.raises(UserError, match="is for a single .safetensors checkpoint"):
        load_pipeline(str(tiny_pipeline_path()), model_config=str(configs))
    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(str(checkpoint), model_config=str(tmp_path))


def test_the_budget_check_reads_a_single_files_unet_from_model_config(single_file, tmp_path, monkeypatch):
    checkpoint, configs = single_file
    skeleton = unet_skeleton(str(checkpoint), model_config=str(configs))
    real = load_pipeline("tiny").unet
    shapes = {name: tuple(parameter.shape) for name, parameter in skeleton.named_parameters()}
    assert shapes == {name: tuple(parameter.shape) for name, parameter in real.named_parameters()}

    # A budget no layer holds fails before the model loads.
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the budget was checked")

    monkeypatch.setattr("sparse_dreambooth.train.load_base_pipeline", no_loading)
    message = cli_error(
        "train",
        *FAST,
        "--subject",
        "demo",
        "--model",
        checkpoint,
        "--model-config",
        configs,
        "--budget",
        10**9,
        "--output",
        tmp_path / "run",
    )
    assert "cap_budget" in message


# --- fingerprints -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (300,), (3, 5), (2, 600), (300, 2), (4, 3, 3, 3), (1, 1, 512)])
def test_leading_values_are_the_first_values_in_memory_order(tmp_path, shape):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    save_file({"t": tensor}, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        values = _leading_values(handle.get_slice("t"), list(shape), 256)
    assert torch.equal(values, tensor.reshape(-1)[:256])


def test_a_moved_folder_and_its_fp16_variant_have_the_fingerprint_of_the_original(tmp_path):
    original = model_identity("tiny")
    moved = _copy_of_tiny(tmp_path / "elsewhere" / "sdxl")
    assert model_identity(str(moved)).fingerprint == original.fingerprint
    assert model_identity(str(moved)).name == str(moved.resolve())

    # diffusers' fp16 variant: the fp32 file cast to fp16, loaded with variant="fp16".
    fp16 = _copy_of_tiny(tmp_path / "fp16")
    (fp16 / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    load_pipeline("tiny").unet.to(torch.float16).save_pretrained(fp16 / "unet", variant="fp16")
    assert (fp16 / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert model_identity(str(fp16), variant="fp16").fingerprint == original.fingerprint
    loaded = load_pipeline(str(fp16), variant="fp16").unet  # the variant reaches the loader
    for name, tensor in load_pipeline("tiny").unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name


def test_other_weights_or_another_architecture_change_the_fingerprint(tmp_path):
    original = model_identity("tiny").fingerprint
    assert model_identity(str(_copy_of_tiny(tmp_path / "seed1", seed=1))).fingerprint != original

    nudged = _copy_of_tiny(tmp_path / "nudged")
    weights = nudged / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"].view(-1)[0] += 0.01
    save_file(tensors, str(weights))
    assert model_identity(str(nudged)).fingerprint != original

    relabelled = _copy_of_tiny(tmp_path / "relabelled")
    config_path = relabelled / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] += 1
    config_path.write_text(json.dumps(config))
    assert model_identity(str(relabelled)).fingerprint != original


def test_a_hub_id_and_a_local_copy_of_its_files_are_one_model(tmp_path, monkeypatch):
    # The Hub cache's layout (refs/main -> snapshots/<commit>/...), filled by hand: no network.
    repo = tmp_path / "hub" / "models--some-org--tiny-sdxl"
    commit = "0" * 40
    shutil.copytree(tiny_pipeline_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = model_identity("some-org/tiny-sdxl")
    assert hub.name == "some-org/tiny-sdxl@main"
    assert hub.fingerprint == model_identity(str(_copy_of_tiny(tmp_path / "local"))).fingerprint


def test_a_single_files_fingerprint_is_its_unets_wherever_it_lies(single_file, tmp_path):
    checkpoint, _ = single_file
    moved = shutil.copy(checkpoint, tmp_path / "renamed.safetensors")
    assert model_identity(str(moved)).fingerprint == model_identity(str(checkpoint)).fingerprint
    # Only the UNet's tensors count: the text encoders and VAE of a checkpoint are not the UNet.
    unet_only = tmp_path / "unet-only.safetensors"
    save_file(
        {k: v for k, v in load_file(str(checkpoint)).items() if k.startswith("model.diffusion_model.")}, unet_only
    )
    assert unet_fingerprint(None, [unet_only], "model.diffusion_model.") == model_identity(str(checkpoint)).fingerprint


def test_base_models_match_by_fingerprint_and_old_files_by_name(tmp_path):
    here, there = BaseModel("/models/a", "unet-v1:1"), BaseModel("/moved/a", "unet-v1:1")
    check_base_model("x", here, there)  # moved: same weights
    with pytest.raises(UserError, match="other weights than the model now at '/models/a'"):
        check_base_model("x", here, BaseModel("/models/a", "unet-v1:2"))
    with pytest.raises(UserError, match="not '/models/b'"):
        check_base_model("x", here, BaseModel("/models/b", "unet-v1:2"))
    old_file = BaseModel("/models/a")  # written before fingerprints: its absolute path
    check_base_model("x", old_file, BaseModel("/models/a", "unet-v1:1"))
    with pytest.raises(UserError, match="predates weight fingerprints") as error:
        check_base_model("x", old_file, there)
    assert "\n" not in str(error.value)


# --- end to end: train, move, sample -------------------------------------------------------------


def test_an_adapter_trained_on_a_folder_samples_after_the_folder_moves_and_refuses_another_model(tmp_path):
    model = _copy_of_tiny(tmp_path / "models" / "sdxl")
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", 1, "--model", model, "--output", run)
    moved = model.rename(tmp_path / "sdxl-moved")
    quick = ("sample", "--run", run, "--num-steps", 1, "--seeds", 42, "--prompt", "a zjw toy")
    assert "does not exist" in cli_error(*quick, "--output", tmp_path / "s0")  # the run's path is gone
    run_cli(*quick, "--model", moved, "--output", tmp_path / "s1")
    assert (tmp_path / "s1" / "prompt_00_sample_0_seed_42.png").is_file()

    other = _copy_of_tiny(tmp_path / "other", seed=1)
    message = cli_error(*quick, "--model", other, "--output", tmp_path / "s2")
    assert f"trained on base model '{model.resolve()}', not '{other.resolve()}'" in message


def test_a_run_on_a_single_file_trains_and_samples_offline(single_file, tmp_path):
    checkpoint, configs = single_file
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", 1, "--model", checkpoint, "--model-config", configs,
            "--output", run)  # fmt: skip
    run_cli("sample", "--run", run, "--num-steps", 1, "--seeds", 42, "--prompt", "a zjw toy")
    assert (run / "samples" / "prompt_00_sample_0_seed_42.png").is_file()
    # A single file is known by its own tensors (original names), not as the folder it came from.
    recorded = json.loads((run / "run.json").read_text())["base_model_fingerprint"]
    assert recorded == model_identity(str(checkpoint)).fingerprint != model_identity("tiny").fingerprint
