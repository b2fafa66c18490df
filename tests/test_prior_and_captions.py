"""Prior preservation (class images, the instance + prior loss, resume, two processes) and per-image
captions, on the tiny model.

Oracles: the base pipeline rendering a class image itself, the loss recomputed from the UNet's own
output and the noise redrawn in the loop's order, `encode_prompts` of each photo's caption, and
hand-written expected prompts.
"""

import json
import os
import signal
import textwrap
import time

import diffusers
import numpy as np
import pytest
import torch
from conftest import FAST, cli_error, launch, run_cli, run_subprocess
from PIL import Image

from sparse_dreambooth import adapters
from sparse_dreambooth.config import DataSettings, merge_settings
from sparse_dreambooth.data import custom_subject, get_subject
from sparse_dreambooth.data.captions import training_prompts
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.model import encode_prompts, load_pipeline
from sparse_dreambooth.prior import instance_and_prior_loss

PRIOR = ["--with-prior-preservation", "--num-class-images", "2"]


class UNetCalls:
    """Every training forward of the UNet: its inputs and prediction (the UNet class's forward wrapped)."""

    def __init__(self, monkeypatch):
        self.calls = []
        forward = diffusers.UNet2DConditionModel.forward

        def recording(unet, sample, timestep, encoder_hidden_states, *args, **kwargs):
            output = forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)
            if not torch.is_grad_enabled():  # the pipeline rendering class images: not training
                return output
            self.calls.append(
                {
                    "sample": sample.detach().clone(),
                    "timestep": timestep.detach().clone(),
                    "embeds": encoder_hidden_states.detach().clone(),
                    "pooled": kwargs["added_cond_kwargs"]["text_embeds"].detach().clone(),
                    "time_ids": kwargs["added_cond_kwargs"]["time_ids"].detach().clone(),
                    "prediction": output.sample.detach().clone(),
                }
            )
            return output

        monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", recording)


def _pipeline_calls(monkeypatch) -> list[str]:
    """The prompts of every SDXL pipeline call from now on (a class image is one call)."""
    prompts = []
    call = diffusers.StableDiffusionXLPipeline.__call__

    def counting(pipe, prompt=None, *args, **kwargs):
        prompts.append(prompt)
        return call(pipe, prompt, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "__call__", counting)
    return prompts


def _encode(pipe, prompt: str):
    return encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], [prompt])


# --- prior preservation -------------------------------------------------------------------------


def test_class_images_are_rendered_by_the_base_model_once_then_reused(tmp_path, monkeypatch):
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(classes / "mine.png")  # the folder's own image counts
    common = [*FAST, "--subject", "demo", "--steps", "1", *PRIOR, "--class-data-dir", classes]
    rendered = _pipeline_calls(monkeypatch)
    run_cli("train", *common, "--output", tmp_path / "first")
    assert rendered == ["a toy"], "one own image + one generated make the two asked for"
    generated = classes / "generated-00000.png"
    first_bytes, first_inode = generated.read_bytes(), generated.stat().st_ino
    assert json.loads((tmp_path / "first" / "run.json").read_text())["class_images"] == {
        "folder": str(classes),
        "images": 2,
        "prompt": "a toy",
    }

    run_cli("train", *common, "--output", tmp_path / "second")
    assert rendered == ["a toy"], "the second run renders nothing"
    assert generated.stat().st_ino == first_inode and generated.read_bytes() == first_bytes

    # The oracle: the base pipeline itself, DPM-Solver++ 2 at 30 steps and guidance 7.5, seed = index 0.
    from sparse_dreambooth.model import evaluation_scheduler

    pipe = load_pipeline("tiny")
    pipe.scheduler = evaluation_scheduler(pipe.scheduler.config)
    expected = pipe(
        "a toy",
        num_inference_steps=30,
        guidance_scale=7.5,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(generated)), np.asarray(expected))
    assert not list(classes.glob(".*")), "no temporary file is left"


def test_instance_and_prior_loss_is_two_separate_mses():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn((5, 4, 3, 3), generator=generator), torch.randn((5, 4, 3, 3), generator=generator)
    squared = (prediction.double().numpy() - target.double().numpy()) ** 2
    expected = squared[:2].mean() + 0.3 * squared[2:].mean()  # by hand: 2 instance rows, 3 class rows
    assert instance_and_prior_loss((prediction - target) ** 2, 2, 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert instance_and_prior_loss((prediction - target) ** 2, 5, 0.3).item() == pytest.approx(squared.mean(), rel=1e-6)


def test_the_loop_feeds_instance_then_class_rows_and_weights_the_prior_loss(tmp_path, monkeypatch):
    run, weight = tmp_path / "run", 0.37
    unet = UNetCalls(monkeypatch)
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", *PRIOR, "--prior-loss-weight", weight, "--output", run)
    [call] = unet.calls  # one micro-batch: batch 1 and grad_accum 1 in the tiny recipe
    assert call["prediction"].shape[0] == 2, "instance and class rows in one UNet call"

    # The loop's draws redone in its order: the instance batch, then the class batch, seed 42.
    generator, shape = torch.Generator().manual_seed(42), (1, *call["sample"].shape[1:])
    noises, timesteps = [], []
    for examples in (len(get_subject(None, "demo").image_paths), 2):
        torch.randint(examples, (1,), generator=generator)
        torch.randn(shape, generator=generator)  # the latent's own sample from the VAE distribution
        noises.append(torch.randn(shape, generator=generator))
        timesteps.append(torch.randint(0, 1000, (1,), generator=generator))
    assert torch.equal(call["timestep"], torch.cat(timesteps))
    prediction, noise = call["prediction"].double(), torch.cat(noises).double()
    expected = ((prediction[0] - noise[0]) ** 2).mean() + weight * ((prediction[1] - noise[1]) ** 2).mean()
    assert json.loads((run / "run.json").read_text())["final_loss"] == pytest.approx(expected.item(), rel=1e-5)

    pipe = load_pipeline("tiny")
    for row, prompt in enumerate(["a zjw toy", "a toy"]):
        embeds, pooled = _encode(pipe, prompt)
        assert torch.equal(call["embeds"][row], embeds[0]) and torch.equal(call["pooled"][row], pooled[0]), prompt


@pytest.mark.slow
def test_resume_with_prior_preservation_matches_an_uninterrupted_run(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = [*FAST, "--subject", "demo", *PRIOR, "--random-flip", "--checkpoint-every", "2"]
    run_cli("train", *common, "--steps", "4", "--output", whole)
    run_cli("train", *common, "--steps", "2", "--checkpoint-every", "1", "--output", resumed)
    run_cli("train", *common, "--steps", "4", "--output", resumed, "--resume", resumed / "checkpoints" / "step-1")
    _, expected, _ = adapters.read_adapter(whole / "adapter.safetensors")
    _, actual, _ = adapters.read_adapter(resumed / "adapter.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_render_each_class_image_once(tmp_path, monkeypatch):
    # Every process records each class image it writes: a startup hook wraps files.atomic_path
    # (which prior.py imports by name), so the launched processes run the product code unchanged.
    hooks, log = tmp_path / "hooks", tmp_path / "writes.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import contextlib, os
            from sparse_dreambooth import files

            _atomic_path = files.atomic_path

            @contextlib.contextmanager
            def recording(path):
                with _atomic_path(path) as tmp:
                    yield tmp
                if os.path.basename(str(path)).startswith("generated-"):
                    with open({str(log)!r}, "a") as handle:
                        handle.write(os.environ.get("RANK", "?") + " " + os.path.basename(str(path)) + "\\n")

            files.atomic_path = recording
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    classes = tmp_path / "classes"
    launch("train", *FAST, "--subject", "demo", "--steps", "1", *PRIOR, "--num-class-images", "3",
           "--class-data-dir", classes, "--output", tmp_path / "run")  # fmt: skip
    writes = sorted(log.read_text().split("\n")[:-1])
    assert writes == ["0 generated-00000.png", "0 generated-00002.png", "1 generated-00001.png"]

    # The same images a single process renders (seed = index, whatever the process count), within
    # one grey level, as two-process sampling is: on an AVX512 CPU the process of rank 1 renders one
    # of image 1's 3072 values one level off a single process's (rank 0's two are identical).
    single = tmp_path / "single"
    monkeypatch.delenv("PYTHONPATH")
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", *PRIOR, "--num-class-images", "3",
            "--class-data-dir", single, "--output", tmp_path / "run-single")  # fmt: skip
    for index in range(3):
        name = f"generated-{index:05d}.png"
        launched, alone = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (classes, single))
        assert np.abs(launched - alone).max() <= 1, name


def test_prior_settings_are_checked_before_a_model_loads(tmp_path):
    not_a_folder = tmp_path / "file.png"
    not_a_folder.write_bytes(b"x")
    common = [*FAST, "--subject", "demo", "--with-prior-preservation", "--output", tmp_path / "run"]
    assert "is a file" in cli_error("train", *common, "--class-data-dir", not_a_folder)
    assert "num_class_images must be a positive integer" in cli_error("train", *common, "--num-class-images", "0")
    assert "0 or more" in cli_error("train", *common, "--prior-loss-weight", "-1")
    assert "{kind}" in cli_error("train", *common, "--class-prompt", "a photo of a {kind}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    assert "bad.png" in cli_error("train", *common, "--class-data-dir", broken)


# --- captions -------------------------------------------------------------------------------------


def _photos(folder, sizes=((40, 40), (48, 40), (56, 40))):
    """Photos a.png, b.png, c.png of different sizes (so their time ids tell them apart)."""
    folder.mkdir()
    for name, (width, height) in zip("abc", sizes, strict=False):
        Image.new("RGB", (width, height), (10 * width % 256, 90, 160)).save(folder / f"{name}.png")
    return folder


def test_sidecar_captions_are_templated_and_a_missing_one_falls_back(tmp_path):
    photos = _photos(tmp_path / "photos")
    (photos / "a.txt").write_text("{token} {class} asleep on grass\n")
    (photos / "b.txt").write_text("a {class} by the sea")
    (photos / "notes.txt").write_text("no photo's caption")
    with pytest.warns(UserWarning) as warned:
        subject = custom_subject(photos, "dog")
    assert [str(warning.message).split(": ")[-1] for warning in warned] == ["notes.txt"], "captions are no strays"
    settings = DataSettings(instance_dir=str(photos), class_name="dog", captions="sidecar")
    with pytest.warns(UserWarning, match="1 of 3 photos have no caption"):
        assert training_prompts(subject, settings) == ["zjw dog asleep on grass", "a dog by the sea", "a zjw dog"]
    settings.caption_template, settings.token = "a photo of {token} {class}, {caption}", "sks"
    with pytest.warns(UserWarning):
        assert training_prompts(subject, settings) == [
            "a photo of sks dog, sks dog asleep on grass",
            "a photo of sks dog, a dog by the sea",
            "a sks dog",
        ]
    settings.captions = "none"
    assert training_prompts(subject, settings) == ["a sks dog"] * 3


def test_metadata_jsonl_captions_and_auto(tmp_path):
    photos = _photos(tmp_path / "photos")
    (photos / "a.txt").write_text("a sidecar caption")
    lines = [{"file_name": "a.png", "text": "{token} on a sofa"}, {"file_name": "c.png", "text": "c's caption"}]
    (photos / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    subject = custom_subject(photos, "cat")
    for source in ("metadata", "auto"):  # auto prefers the folder's metadata.jsonl to sidecars
        settings = DataSettings(instance_dir=str(photos), class_name="cat", captions=source)
        with pytest.warns(UserWarning, match="1 of 3"):
            assert training_prompts(subject, settings) == ["zjw on a sofa", "a zjw cat", "c's caption"]
    (photos / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "fine"}\n{"file_name": "b.png",\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        training_prompts(subject, DataSettings(instance_dir=str(photos), class_name="cat", captions="metadata"))
    (photos / "metadata.jsonl").unlink()
    settings = DataSettings(instance_dir=str(photos), class_name="cat", captions="auto")
    with pytest.warns(UserWarning, match="2 of 3"):
        assert training_prompts(subject, settings)[0] == "a sidecar caption"
    with pytest.raises(UserError, match="no metadata.jsonl"):
        training_prompts(subject, DataSettings(instance_dir=str(photos), class_name="cat", captions="metadata"))


def test_caption_settings_are_checked():
    def error(**flags):
        with pytest.raises(UserError) as raised:
            merge_settings(None, {"subject": "demo", **flags})
        return str(raised.value)

    assert "choose one of none, sidecar, metadata, auto" in error(captions="sidecars")
    assert "must place the caption" in error(caption_template="a photo of {token} {class}")
    assert "{subject}" in error(caption_template="{subject}: {caption}")


def test_the_unet_sees_the_embeddings_of_each_photo_s_caption(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos")
    (photos / "a.txt").write_text("a {token} {class} in the snow")
    (photos / "b.txt").write_text("a {token} {class} on the beach")  # c.png has none: the instance prompt
    unet = UNetCalls(monkeypatch)
    run_cli("train", *FAST, "--instance-dir", photos, "--class-name", "dog", "--captions", "sidecar",
            "--steps", "3", "--batch-size", "2", "--output", tmp_path / "run")  # fmt: skip
    pipe = load_pipeline("tiny")
    # Each row's photo, told by its original size in the time ids, and that photo's own prompt encoded alone.
    prompt_of_height_width = {
        (40, 40): "a zjw dog in the snow",
        (40, 48): "a zjw dog on the beach",
        (40, 56): "a zjw dog",
    }
    expected = {size: _encode(pipe, prompt) for size, prompt in prompt_of_height_width.items()}
    seen = set()
    for call in unet.calls:
        for row in range(call["embeds"].shape[0]):
            size = tuple(int(value) for value in call["time_ids"][row, :2])
            embeds, pooled = expected[size]
            assert torch.equal(call["embeds"][row], embeds[0]) and torch.equal(call["pooled"][row], pooled[0]), size
            seen.add(size)
    assert len(seen) >= 2, "the draws must cover photos with different prompts"


@pytest.mark.slow
def test_ctrl_c_while_rendering_class_images_keeps_them_and_the_rerun_renders_the_rest(tmp_path):
    classes, cache = tmp_path / "classes", tmp_path / "cache"
    args = ["train", *FAST, "--subject", "demo", "--steps", "1", *PRIOR, "--num-class-images", "4"]
    args += ["--class-data-dir", classes, "--output", tmp_path / "run"]
    process = run_subprocess(*args, cache=cache, wait=False)
    deadline = time.monotonic() + 300
    while not (classes / "generated-00000.png").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "stopped while rendering class images" in stderr and "Traceback" not in stderr, stderr[-3000:]
    kept = {path.name: path.stat().st_ino for path in classes.glob("generated-*.png")}
    assert 1 <= len(kept) < 4 and not list(classes.glob(".*.tmp"))

    result = run_subprocess(*args, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in classes.glob("generated-*.png")) == [f"generated-0000{i}.png" for i in range(4)]
    assert all((classes / name).stat().st_ino == inode for name, inode in kept.items()), "kept images are not redone"
