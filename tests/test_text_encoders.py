"""Adapters on both text encoders (--train-text-encoder), on the tiny model.

The oracles: the layer names and budgets are worked out here from the encoders' configs; a run
with the flag is compared with one without it (the UNet's adapters start the same) and with
itself (bytes); sampling is compared with the same run's encoder adapters zeroed; and every
export is loaded by diffusers' own code (`load_lora_weights`, its kohya conversion,
`from_pretrained`), whose text-encoder outputs must match our adapted encoders'.
"""

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from conftest import FAST, cli_error, launch, run_cli
from PIL import Image
from safetensors.torch import load_file

from sparse_dreambooth import adapters
from sparse_dreambooth.adapters.io import adapter_tensors
from sparse_dreambooth.config import dump_yaml, merge_settings
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.export import export_adapter
from sparse_dreambooth.files import write_safetensors
from sparse_dreambooth.model import encode_prompts, load_pipeline, model_identity
from sparse_dreambooth.text_encoders import prepare_for_adapters, text_encoder_parts

PROMPTS = ["a zjw toy on a beach", "a photo of a zjw toy"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def expected_encoder_layers(pipe) -> dict[str, tuple[int, int]]:
    """Every self-attention projection of every layer of both encoders, from their configs."""
    layers = {}
    for prefix in ("text_encoder", "text_encoder_2"):
        config = getattr(pipe, prefix).config
        for index in range(config.num_hidden_layers):
            for projection in PROJECTIONS:
                name = f"{prefix}.encoder.layers.{index}.self_attn.{projection}"
                layers[name] = (config.hidden_size, config.hidden_size)
    return layers


def encoder_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], PROMPTS)


def config_for(method: str, **settings):
    """As the tiny recipe: budget_scale 1 (SDXL's default budget is larger than the tiny encoders' layers)."""
    return merge_settings(None, {"model": "tiny", "subject": "demo", "method": method, "budget_scale": 1.0, **settings})


def encoder_tensors(path) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in adapters.read_adapter(path)[1].items() if name.startswith("text_encoder")}


def unet_tensors(path) -> dict[str, torch.Tensor]:
    return {
        name: tensor for name, tensor in adapters.read_adapter(path)[1].items() if not name.startswith("text_encoder")
    }


def zeroed_encoder_coefficients(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's tensors with the encoders' WaveFT coefficients set to zero (no delta)."""
    return {
        name: torch.zeros_like(tensor) if name.startswith("text_encoder") and name.endswith("coefficients") else tensor
        for name, tensor in tensors.items()
    }


# --- attaching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["waveft", "lora"])
def test_adapters_sit_on_the_four_projections_of_every_encoder_layer_and_leave_the_unet_as_it_was(method):
    pipe, plain = load_pipeline("tiny"), load_pipeline("tiny")
    config = config_for(method, train_text_encoder=True).adapter
    prepare_for_adapters(pipe, gradient_checkpointing=False)  # as training does
    layers = adapters.attach(pipe.unet, config, text_encoders=text_encoder_parts(pipe))
    adapters.attach(plain.unet, config_for(method).adapter)

    expected = expected_encoder_layers(pipe)
    encoder_layers = {name: layer for name, layer in layers.items() if name.startswith("text_encoder")}
    assert {name: (layer.out_features, layer.in_features) for name, layer in encoder_layers.items()} == expected
    # The UNet's adapters are exactly those of a run without the flag.
    unet_only = adapter_tensors(plain.unet)
    ours = adapter_tensors(pipe.unet, text_encoder_parts(pipe))
    assert all(torch.equal(ours[name], tensor) for name, tensor in unet_only.items())
    assert set(ours) - set(unet_only) == {name for name in ours if name.startswith("text_encoder")}
    # The encoders' budget: the UNet's rule on the encoders' layers (tiny: 12 of 32x32, 12 of 64x64).
    lora_r1 = sum(out_features + in_features for out_features, in_features in expected.values())
    assert lora_r1 == 12 * 64 + 12 * 128
    for name, layer in encoder_layers.items():
        if method == "lora":  # budget_scale 1: the rank whose total is nearest LoRA r=1's
            assert layer.adapter.rank == 1, name
        else:  # budget_scale 1, uniform: LoRA r=1's total spread evenly over the 24 layers
            assert layer.adapter.coefficients.numel() == round(lora_r1 / 24), name
    # Only adapter parameters train; the encoders' own weights (text_projection too) stay frozen.
    trainable = [p for encoder in (pipe.text_encoder, pipe.text_encoder_2) for p in encoder.parameters()]
    assert {id(p) for p in trainable if p.requires_grad} == {
        id(p) for layer in encoder_layers.values() for p in layer.adapter.parameters()
    }


def test_an_adapter_file_of_the_encoders_needs_them_to_load(tmp_path):
    pipe = load_pipeline("tiny")
    config = config_for("waveft", train_text_encoder=True).adapter
    adapters.attach(pipe.unet, config, text_encoders=text_encoder_parts(pipe))
    adapters.save_adapter(pipe.unet, tmp_path / "a.safetensors", config, text_encoders=text_encoder_parts(pipe))
    with pytest.raises(UserError, match="also adapts the text encoders"):
        adapters.load_adapter(load_pipeline("tiny").unet, tmp_path / "a.safetensors")


# --- training, resume, sampling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step waveft run with the flag (a checkpoint after each step), and the same without it."""
    root = tmp_path_factory.mktemp("text-encoders")
    common = [*FAST, "--subject", "demo", "--method", "waveft", "--steps", "2"]
    run_cli("train", *common, "--train-text-encoder", "--checkpoint-every", "1", "--output", root / "with")
    run_cli("train", *common, "--output", root / "without")
    return root


def test_training_moves_the_encoder_and_unet_adapters(trained):
    encoders = encoder_tensors(trained / "with" / "adapter.safetensors")
    coefficients = {name: tensor for name, tensor in encoders.items() if name.endswith("coefficients")}
    assert len(coefficients) == 24
    # WaveFT starts at zero: a non-zero coefficient got there by a gradient through the encoders.
    # SDXL reads the first encoder's penultimate hidden states, so its last layer (2 of 0-2) gets
    # none, while the second encoder's last layer makes the pooled embedding.
    unread = "text_encoder.encoder.layers.2."
    assert all(tensor.abs().max() > 0 for name, tensor in coefficients.items() if not name.startswith(unread))
    assert all(torch.count_nonzero(tensor) == 0 for name, tensor in coefficients.items() if name.startswith(unread))
    unet = unet_tensors(trained / "with" / "adapter.safetensors")
    assert any(tensor.abs().max() > 0 for name, tensor in unet.items() if name.endswith("coefficients"))
    # run.json and the model card count and name the encoders' layers too.
    record = json.loads((trained / "with" / "run.json").read_text())
    counted = sum(tensor.numel() for tensor in {**unet, **encoders}.values() if tensor.is_floating_point())
    assert record["trainable_parameters"] == counted
    assert "both text encoders' q_proj, k_proj, v_proj, out_proj" in (trained / "with" / "README.md").read_text()
    # The UNet trained on other conditioning than without the flag, so it learnt something else.
    without = unet_tensors(trained / "without" / "adapter.safetensors")
    assert unet.keys() == without.keys()
    assert not all(torch.equal(unet[name], without[name]) for name in unet)


def test_a_run_with_the_flag_gives_the_same_bytes_again_and_resumes_exactly(trained, tmp_path):
    common = [*FAST, "--subject", "demo", "--method", "waveft", "--train-text-encoder", "--steps", "2"]
    run_cli("train", *common, "--output", tmp_path / "again")
    for copy in ("resumed", "tampered"):  # the run stopped after its step-1 checkpoint
        shutil.copytree(
            trained / "with", tmp_path / copy, ignore=shutil.ignore_patterns("step-2", "run.json", "README.md")
        )
        (tmp_path / copy / "adapter.safetensors").unlink()
    # In one copy the checkpoint's encoder adapters are zeroed: a resume that ignored them would
    # not see it.
    step_1 = tmp_path / "tampered" / "checkpoints" / "step-1" / "adapter.safetensors"
    config, tensors, metadata = adapters.read_adapter(step_1)
    assert any(name.startswith("text_encoder") for name in tensors), "the checkpoint holds the encoders' adapters"
    write_safetensors(step_1, zeroed_encoder_coefficients(tensors), metadata)
    for copy in ("resumed", "tampered"):
        run_cli("train", *common, "--output", tmp_path / copy, "--resume", "latest")
    expected = load_file(str(trained / "with" / "adapter.safetensors"))
    for other in ("again", "resumed", "tampered"):
        actual = load_file(str(tmp_path / other / "adapter.safetensors"))
        assert actual.keys() == expected.keys()
        same = all(torch.equal(actual[name], expected[name]) for name in expected)
        assert same == (other != "tampered"), other


def test_gradient_checkpointing_through_the_encoders_trains_the_same(trained, tmp_path):
    common = [*FAST, "--subject", "demo", "--method", "waveft", "--train-text-encoder", "--steps", "2"]
    run_cli("train", *common, "--gradient-checkpointing", "--output", tmp_path / "checkpointed")
    expected = encoder_tensors(trained / "with" / "adapter.safetensors")
    actual = encoder_tensors(tmp_path / "checkpointed" / "adapter.safetensors")
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6 * tensor.abs().max().item() + 1e-12)


def test_resume_refuses_to_turn_the_flag_off(trained):
    message = cli_error(
        "train", *FAST, "--subject", "demo", "--method", "waveft", "--steps", "2",
        "--output", trained / "with", "--resume", trained / "with" / "checkpoints" / "step-1",
    )  # fmt: skip
    assert "train_text_encoder" in message


def test_a_budget_the_encoders_cannot_hold_fails_before_any_slow_work(tmp_path):
    # 2000 values fit every tiny UNet projection (64x64 and up) but not the first encoder's 32x32.
    message = cli_error(
        "train", *FAST, "--subject", "demo", "--steps", "1", "--budget", "2000", "--train-text-encoder",
        "--output", tmp_path / "run",
    )  # fmt: skip
    assert "does not fit layer 'text_encoder.encoder.layers.0.self_attn." in message


def test_with_buckets_and_the_latent_cache_each_row_encodes_its_own_photos_caption(tmp_path, monkeypatch):
    """The three together: examples kept per bucket still carry their prompts (each row of a UNet
    call is encoded from its own photo's caption), the latents still come from the cache, and a
    second run gives the same bytes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    # At 32 px (as test_buckets_and_latent_cache.py works out): 90x60 (w x h) -> bucket 24x40 (h x w),
    # cropped at top 1; 60x90 -> 40x24, left 1; 70x70 -> 32x32. Each photo's caption names its shape.
    caption_of = {
        (60, 90, 1, 0, 24, 40): "a wide photo",
        (90, 60, 0, 1, 40, 24): "a tall photo",
        (70, 70, 0, 0, 32, 32): "a square photo",
    }
    for index, ((height, width, *_), caption) in enumerate(caption_of.items()):
        pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(index))
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(photos / f"{index:02d}.png")
        (photos / f"{index:02d}.txt").write_text(caption)
    encoded, time_ids, vae_encodes = [], [], []
    encode, forward, vae_encode = (
        encode_prompts.__wrapped__,
        diffusers.UNet2DConditionModel.forward,
        diffusers.AutoencoderKL.encode,
    )

    def recording_encode(tokenizers, encoders, prompts):
        encoded.append(list(prompts))
        return encode(tokenizers, encoders, prompts)

    def recording_forward(unet, sample, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not validation
            time_ids.append([tuple(int(value) for value in row) for row in kwargs["added_cond_kwargs"]["time_ids"]])
        return forward(unet, sample, *args, **kwargs)

    def counting_vae_encode(vae, *args, **kwargs):
        vae_encodes.append(1)
        return vae_encode(vae, *args, **kwargs)

    # with_encoded_prompts calls encode_prompts.__wrapped__ (the version with gradients).
    recorded = type("Recorded", (), {"__wrapped__": staticmethod(recording_encode)})
    monkeypatch.setattr("sparse_dreambooth.text_encoders.encode_prompts", recorded)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", recording_forward)
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", counting_vae_encode)
    common = [*FAST, "--instance-dir", photos, "--class-name", "toy", "--captions", "sidecar", "--method", "waveft"]
    common += ["--train-text-encoder", "--buckets", "--latent-cache", tmp_path / "latents", "--batch-size", "2"]
    common += ["--steps", "6"]
    run_cli("train", *common, "--output", tmp_path / "first")
    assert len(vae_encodes) == 3 and len(list((tmp_path / "latents").glob("*/*.safetensors"))) == 3
    assert len(encoded) == len(time_ids) == 6 and len({rows[0][4:] for rows in time_ids}) > 1
    for prompts, rows in zip(encoded, time_ids, strict=True):
        assert prompts == [caption_of[row] for row in rows]
    vae_encodes.clear()
    run_cli("train", *common, "--output", tmp_path / "second")
    assert not vae_encodes  # every latent came from the cache
    first, second = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    moved = [
        tensor for name, tensor in first.items() if name.startswith("text_encoder_2") and tensor.is_floating_point()
    ]
    assert max(tensor.abs().max().item() for tensor in moved) > 0  # the encoders' adapters trained


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_average_the_encoder_adapters_gradients(tmp_path):
    """Two processes with batch 1 each train what one process with batch 2 does (see
    test_train.py's two-process test for the huge epsilon: updates linear in the gradient)."""
    single, double = tmp_path / "single", tmp_path / "double"
    common = [*FAST, "--subject", "demo", "--steps", "2", "--lr", "1.0", "--adam-epsilon", "1e3"]
    common += ["--method", "waveft", "--train-text-encoder"]
    run_cli("train", *common, "--batch-size", "2", "--output", single)
    launch("train", *common, "--batch-size", "1", "--output", str(double))
    one, two = (encoder_tensors(run / "adapter.safetensors") for run in (single, double))
    largest = max(tensor.abs().max() for tensor in one.values() if tensor.is_floating_point())
    assert largest > 1e-6, "the run must have moved the encoders' adapters"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4 * largest.item())


def test_sample_uses_the_encoder_adapters(trained, tmp_path):
    zeroed = tmp_path / "zeroed"
    shutil.copytree(trained / "with", zeroed, ignore=shutil.ignore_patterns("checkpoints", "samples*"))
    config, tensors, metadata = adapters.read_adapter(zeroed / "adapter.safetensors")
    write_safetensors(zeroed / "adapter.safetensors", zeroed_encoder_coefficients(tensors), metadata)
    images = {}
    for run in (trained / "with", zeroed):
        out = tmp_path / f"samples-{run.name}"
        run_cli("sample", "--run", run, "--prompt", PROMPTS[0], "--seeds", "1", "--num-steps", "2", "--output", out)
        images[run.name] = torch.from_numpy(np.asarray(Image.open(out / "prompt_00_sample_0_seed_1.png"))).float()
    assert (images["with"] - images["zeroed"]).abs().max() > 0


# --- export, judged by diffusers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory):
    """LoRA (rank 2, alpha 3) and WaveFT run folders on the UNet and both encoders, with random
    adapter values, and our adapted encoders' outputs."""
    built = {}
    for method, settings in {"lora": {"rank": 2, "alpha": 3.0}, "waveft": {}}.items():
        run = tmp_path_factory.mktemp(method)
        config = config_for(method, train_text_encoder=True, output=str(run), **settings)
        pipe = load_pipeline("tiny")
        before = encoder_outputs(pipe)
        text_encoders = text_encoder_parts(pipe)
        layers = adapters.attach(pipe.unet, config.adapter, text_encoders=text_encoders)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in layers.values():
                for parameter in layer.adapter.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        adapters.save_adapter(
            pipe.unet,
            run / "adapter.safetensors",
            config.adapter,
            base_model=model_identity("tiny"),
            metadata={"run_config": dump_yaml(config)},
            text_encoders=text_encoders,
        )
        (run / "config.yaml").write_text(dump_yaml(config))
        outputs = encoder_outputs(pipe)
        assert (outputs[0] - before[0]).abs().max() > 0.05, "the adapters must change the embeddings"
        built[method] = (run, outputs)
    return built


def assert_same_encodings(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_load_lora_weights_reproduces_our_adapted_encoders(random_runs, tmp_path, format):
    run, expected = random_runs["lora"]
    out = tmp_path / "lora.safetensors"
    export_adapter(run, format, out)
    keys = set(load_file(str(out)))
    if format == "diffusers":  # diffusers' DreamBooth LoRA layout
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert "text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj.lora_B.weight" in keys
    else:  # kohya's
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.alpha" in keys
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(out))
    assert_same_encodings(encoder_outputs(pipe), expected)


def test_a_merged_pipeline_has_the_adapted_encoders_and_a_unet_folder_is_refused(random_runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run, expected = random_runs["waveft"]
    export_adapter(run, "merged", tmp_path / "merged", pipeline=True)
    assert_same_encodings(encoder_outputs(StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")), expected)
    assert "--pipeline" in cli_error("export", "--run", run, "--format", "merged", "--out", tmp_path / "unet")


@pytest.mark.parametrize("method", ["lora", "waveft"])
def test_peft_from_pretrained_of_each_encoder_folder_reproduces_our_encoders(random_runs, tmp_path, method):
    from peft import PeftModel

    run, expected = random_runs[method]
    out = tmp_path / "peft"
    export_adapter(run, "peft", out)
    pipe = load_pipeline("tiny")
    for encoder in ("text_encoder", "text_encoder_2"):
        setattr(pipe, encoder, PeftModel.from_pretrained(getattr(pipe, encoder), out / encoder))
    assert_same_encodings(encoder_outputs(pipe), expected)
    # The UNet's folder is the one a run without the flag exports: its layers only.
    unet_weights = load_file(str(out / "adapter_model.safetensors"))
    assert unet_weights and not any("self_attn" in name for name in unet_weights)


def test_the_flag_is_in_train_help():
    assert "--train-text-encoder" in run_cli("train", "--help")
