"""The main job end to end on the tiny model: train, sample, reproducibility, resume, 2 processes.

Runs go through the real CLI (in-process where possible, subprocesses for multi-process), and
their results are checked by a second code path: the adapter file read back and applied to a
freshly loaded UNet, never the training loop's own view of itself.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, FIXTURE_DATA, launch, run_cli, run_subprocess
from PIL import Image
from typer.testing import CliRunner

from sparse_dreambooth import adapters
from sparse_dreambooth.cli import app
from sparse_dreambooth.model import load_pipeline


def denoising_loss(unet, pipe, image_paths, resolution, draws=48) -> float:
    """Mean epsilon-prediction MSE over fixed (image, noise, timestep) draws, computed here from
    the pipeline's own components, independently of the training loop."""
    from sparse_dreambooth.data import get_subject, instance_prompt, prepare_image
    from sparse_dreambooth.model import add_time_ids, encode_prompts

    generator = torch.Generator().manual_seed(1234)
    subject = get_subject(None, "demo")
    embeds, pooled = encode_prompts(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], [instance_prompt(subject)]
    )
    losses = []
    with torch.no_grad():
        for draw in range(draws):
            image = prepare_image(image_paths[draw % len(image_paths)], resolution)
            latents = pipe.vae.encode(image.pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timestep = torch.randint(0, 1000, (1,), generator=generator)
            noisy = pipe.scheduler.add_noise(latents, noise, timestep)
            time_ids = add_time_ids(image.original_size, image.crop_top_left, image.target_size)[None]
            prediction = unet(
                noisy, timestep, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
            ).sample
            losses.append(torch.mean((prediction - noise) ** 2).item())
    return float(np.mean(losses))


@pytest.mark.slow
def test_training_lowers_the_denoising_loss_on_the_subject(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--resolution", "64", "--subject", "demo", "--output", str(run))
    from diffusers import DDPMScheduler

    from sparse_dreambooth.data import get_subject

    pipe = load_pipeline("tiny")
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = get_subject(None, "demo").image_paths
    before = denoising_loss(pipe.unet, pipe, images, 64)
    adapters.load_adapter(pipe.unet, run / "adapter.safetensors")
    after = denoising_loss(pipe.unet, pipe, images, 64)
    # A random tiny UNet learns slowly through attention adapters alone: 60 steps give ~9%.
    assert after < 0.95 * before, (before, after)


# One method on real photos in the quick loop; the other two in the full suite.
@pytest.mark.parametrize(
    "method",
    ["waveft", pytest.param("random-sparse", marks=pytest.mark.slow), pytest.param("lora", marks=pytest.mark.slow)],
)
def test_train_and_sample_on_a_real_dreambooth_subject(tmp_path, method):
    run = tmp_path / method
    run_cli(
        "train",
        *FAST,
        "--subject",
        "dog6",
        "--data-root",
        FIXTURE_DATA,
        "--method",
        method,
        "--steps",
        "2",
        "--output",
        str(run),
    )
    config, tensors, metadata = adapters.read_adapter(run / "adapter.safetensors")
    assert config.method == method and metadata["base_model"] == "tiny-sdxl-v1-seed0"

    # The file's parameter count equals the budget, computed from the UNet's own layer shapes.
    unet = load_pipeline("tiny").unet
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"))
    }
    lora_r1 = sum(out_features + in_features for out_features, in_features in shapes.values())
    trainable = sum(t.numel() for name, t in tensors.items() if not name.endswith("positions"))
    if method == "lora":
        assert trainable == lora_r1
    else:
        assert trainable == round(lora_r1 / len(shapes)) * len(shapes)
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["trainable_parameters"] == trainable and run_info["subject"]["class"] == "dog"

    run_cli("sample", "--run", str(run), "--num-steps", "2", "--seeds", "42", "--prompt", "a zjw dog on the beach")
    manifest = json.loads((run / "samples" / "samples.json").read_text())
    assert [image["file"] for image in manifest["images"]] == ["prompt_00_sample_0_seed_42.png"]
    assert Image.open(run / "samples" / "prompt_00_sample_0_seed_42.png").size == (32, 32)
    assert Image.open(run / "samples" / "grid.png").size == (190 + 128, 2 * 128)  # photos row + one prompt


def test_sample_grid_shows_photos_then_spread_prompts_by_seed(tmp_path):
    from sparse_dreambooth.sample import plan_jobs, write_grid

    prompts = [f"prompt number {index}" for index in range(25)]
    jobs = plan_jobs(prompts, [42, 43, 44, 45])

    def colour(index: int) -> tuple[int, int, int]:
        return (index * 10 % 256, index * 37 % 256, index * 91 % 256)

    for number, job in enumerate(jobs):
        Image.new("RGB", (64, 64), colour(number)).save(tmp_path / job.file_name)
    photos = []
    for index in range(5):
        photos.append(tmp_path / f"photo_{index}.png")
        Image.new("RGB", (300, 200), (255, 0, index)).save(photos[-1])
    grid = write_grid(tmp_path, jobs, photos)
    assert grid == tmp_path / "grid.png" and not list(tmp_path.glob(".*"))  # nothing left from the atomic write
    image = np.asarray(Image.open(grid))
    # 64 px samples are shown as 128 px tiles after a 190 px label column: 4 seeds wide, photos + 8 prompts tall.
    assert image.shape == (9 * 128, 190 + 4 * 128, 3)
    # Rows 1-8: prompts 0, 3, 7, 10, 14, 17, 21, 24 (spread, first and last kept); columns: the seeds in order.
    for row, prompt_index in enumerate([0, 3, 7, 10, 14, 17, 21, 24], start=1):
        for column in range(4):
            tile = image[row * 128 : (row + 1) * 128, 190 + column * 128 : 190 + (column + 1) * 128]
            assert (tile == colour(prompt_index * 4 + column)).all(), (row, column)
    top = image[:128, 190 : 190 + 4 * 128]  # the first 4 photos, centre-cropped to squares
    assert all((top[:, 128 * index : 128 * (index + 1)] == (255, 0, index)).all() for index in range(4))
    assert (image[128:, :190] != 255).any()  # the prompt labels are drawn


@pytest.mark.slow
def test_sample_renders_what_the_unmerged_adapter_renders(tmp_path):
    # `sample` merges the adapter into plain nn.Linear weights; the oracle renders the same image
    # through the adapter layers' own forward (weights untouched) and must agree to the pixel.
    from sparse_dreambooth.model import evaluation_scheduler

    run = tmp_path / "run"
    # A small learning rate: a delta far larger than the random weights makes the tiny model so
    # ill-conditioned that any two float32 paths (merged or not) drift 1% apart from float64.
    run_cli("train", *FAST, "--subject", "demo", "--steps", "2", "--lr", "1e-3", "--output", str(run))
    prompt = "a zjw toy on the beach"
    args = ["--run", str(run), "--num-steps", "3", "--seeds", "42", "--prompt", prompt]
    run_cli("sample", *args, "--output", str(tmp_path / "merged"))
    run_cli("sample", *args, "--method", "base", "--output", str(tmp_path / "base"))

    pipe = load_pipeline("tiny")
    pipe.scheduler = evaluation_scheduler(pipe.scheduler.config)
    adapters.load_adapter(pipe.unet, run / "adapter.safetensors")
    with torch.no_grad():
        expected = pipe(
            prompt,
            num_inference_steps=3,
            guidance_scale=7.5,
            height=32,
            width=32,
            generator=[torch.Generator().manual_seed(42)],
            output_type="np",
        ).images[0]
    expected = np.round(expected * 255).astype(np.int16)
    name = "prompt_00_sample_0_seed_42.png"
    merged = np.asarray(Image.open(tmp_path / "merged" / name), dtype=np.int16)
    base = np.asarray(Image.open(tmp_path / "base" / name), dtype=np.int16)
    assert np.abs(merged - expected).max() <= 1
    assert np.abs(base - expected).mean() > 1, "the adapter must change the image"


@pytest.mark.slow
def test_sampling_renders_the_25_prompts_of_the_subjects_kind(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", str(run))
    run_cli("sample", "--run", str(run), "--num-steps", "1", "--seeds", "42,43")
    manifest = json.loads((run / "samples" / "samples.json").read_text())
    assert len(manifest["images"]) == 50 and manifest["kind"] == "object"
    assert manifest["images"][3] == {
        "file": "prompt_01_sample_1_seed_43.png",
        "prompt_index": 1,
        "sample_index": 1,
        "seed": 43,
        "prompt": "a zjw toy in the snow",
    }
    assert len(list((run / "samples").glob("prompt_*.png"))) == 50


@pytest.mark.slow
def test_the_same_command_twice_gives_identical_bytes(tmp_path):
    run = tmp_path / "run"
    files = []
    for _ in range(2):
        run_cli("train", *FAST, "--subject", "demo", "--steps", "3", "--output", str(run), "--overwrite")
        run_cli(
            "sample",
            "--run",
            str(run),
            "--num-steps",
            "2",
            "--seeds",
            "42,43",
            "--prompt",
            "a zjw toy",
            "--output",
            str(tmp_path / "samples"),
        )
        outputs = [run / "adapter.safetensors", *sorted((tmp_path / "samples").glob("*.png"))]
        files.append({path.name: path.read_bytes() for path in outputs})
        for path in outputs[1:]:
            path.unlink()  # sampling skips images already on disk
    assert files[0].keys() == files[1].keys() and len(files[0]) == 4  # adapter, 2 images, grid.png
    for name in files[0]:
        assert files[0][name] == files[1][name], name


@pytest.mark.slow
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = [*FAST, "--subject", "demo", "--checkpoint-every", "2"]
    run_cli("train", *common, "--steps", "4", "--output", str(whole))
    run_cli("train", *common, "--steps", "2", "--checkpoint-every", "1", "--output", str(resumed))
    # A finished 2-step run, extended to 4 steps from its step-1 checkpoint: steps 2-4 are redone.
    run_cli(
        "train", *common, "--steps", "4", "--output", str(resumed), "--resume", str(resumed / "checkpoints" / "step-1")
    )
    assert json.loads((resumed / "run.json").read_text())["steps"] == 4
    # Bit-exact: RNG, optimizer and scheduler state all came back (the files differ only in --output).
    _, expected, _ = adapters.read_adapter(whole / "adapter.safetensors")
    _, actual, _ = adapters.read_adapter(resumed / "adapter.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_and_sample(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    # Two processes with batch 1 each see the same global batch as one process with batch 2.
    # With a huge Adam epsilon the update is lr * m / eps, linear in the gradient, so the two runs
    # differ only by all-reduce rounding; plain Adam's first steps are sign(g), and rounding flips
    # the sign of the ~1e-12 gradients of q/k in the random tiny model's near-uniform attention.
    common = [*FAST, "--subject", "demo", "--steps", "2", "--lr", "1.0", "--adam-epsilon", "1e3"]
    run_cli("train", *common, "--batch-size", "2", "--output", str(single))
    launch("train", *common, "--batch-size", "1", "--output", str(double))
    _, one, _ = adapters.read_adapter(single / "adapter.safetensors")
    _, two, _ = adapters.read_adapter(double / "adapter.safetensors")
    largest = max(tensor.abs().max() for tensor in one.values() if tensor.is_floating_point())
    assert largest > 1e-6, "the run must have moved the adapter"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4 * largest.item())

    sample_args = [
        "--run",
        str(single),
        "--num-steps",
        "2",
        "--seeds",
        "42,43,44",
        "--prompt",
        "a zjw toy",
        "--prompt",
        "a red zjw toy",
    ]
    run_cli("sample", *sample_args, "--output", str(tmp_path / "one-process"))
    launch("sample", *sample_args, "--batch-size", "2", "--output", str(tmp_path / "two-processes"))
    one_images = sorted((tmp_path / "one-process").glob("prompt_*.png"))
    assert len(one_images) == 6
    for path in one_images:
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "two-processes" / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, path.name


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", str(run))
    result = CliRunner().invoke(app, ["train", *FAST, "--subject", "demo", "--steps", "1", "--output", str(run)])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)


@pytest.mark.slow
def test_validation_images_and_flipped_examples(tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        *FAST,
        "--subject",
        "demo",
        "--steps",
        "2",
        "--validate-every",
        "1",
        "--random-flip",
        "--output",
        str(run),
    )
    for step in (1, 2):
        assert Image.open(run / "validation" / f"step-{step}.png").size == (32, 32)
    assert json.loads((run / "run.json").read_text())["steps"] == 2


# What diffusers, transformers and the Hub print on their own when nobody silences them.
THIRD_PARTY_NOISE = [
    "Loading pipeline components",
    "Loading weights",
    "Writing model shards",
    "Fetching",
    "it/s]",  # any tqdm bar in the default unit: ours count step/s and batch/s
    "torchvision",
    "Siglip",
    "Traceback",
]


@pytest.mark.slow
def test_a_run_shows_our_progress_and_messages_only(tmp_path):
    # As a user's first run: a fresh cache, so the tiny model is built and saved here too.
    cache, run = tmp_path / "cache", tmp_path / "run"
    train = run_subprocess("train", *FAST, "--subject", "demo", "--steps", "2", "--output", run, cache=cache)
    sample = run_subprocess(
        "sample", "--run", run, "--num-steps", "1", "--seeds", "42", "--prompt", "a zjw toy", cache=cache
    )
    expected = [
        (train, "train:", [f"adapter written to {run / 'adapter.safetensors'}"]),
        (sample, "sample:", [f"1 images in {run / 'samples'}", f"grid: {run / 'samples' / 'grid.png'}"]),
    ]
    for result, bar, messages in expected:
        assert result.returncode == 0, result.stderr[-3000:]
        output = result.stdout + result.stderr
        for noise in THIRD_PARTY_NOISE:
            assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
        lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
        assert any(line.startswith(bar) for line in lines), output[-3000:]
        # Besides our bar and our warnings, exactly our closing messages.
        assert [line for line in lines if not line.startswith((bar, "sparse-db: warning:"))] == messages, output


@pytest.mark.multiprocess
def test_ddp_broadcasts_no_adapter_buffers_per_step(tmp_path):
    """Two gloo processes: DDP as `sparse-db train` prepares it sends no buffer on a step, where
    plain `accelerator.prepare` re-sends every adapter position and kernel plan each forward."""
    output = tmp_path / "broadcast.json"
    launch(str(output), script=Path(__file__).with_name("ddp_broadcast_probe.py"))
    results = json.loads(output.read_text())
    ours, default = results["sparse-db train"], results["accelerate default"]
    assert ours["buffer_bytes"] == default["buffer_bytes"] > 0
    assert default["bytes_per_step"] >= default["buffer_bytes"], "the counter must see DDP's buffer broadcasts"
    assert ours["bytes_per_step"] == 0
