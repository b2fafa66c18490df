"""Bad input, interruption and resume, one behaviour per test.

Input mistakes must give one line on stderr, exit code 2 and no traceback, before any model
loads (the per-test cache stays empty: the tiny model was never built). Runs that are stopped,
killed or resumed are real subprocesses on the tiny model; resumed runs must end bit-identical
to an uninterrupted one.

Covered elsewhere: image modes and EXIF rotation, and unsafe or corrupt archives, in test_data.py
(the messy-folder test below also trains on such images).
"""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, FIXTURE_DATA, assert_user_error, run_cli, run_subprocess
from PIL import Image

from sparse_dreambooth import adapters
from sparse_dreambooth.errors import UserError


def photo(path: Path, size=(48, 40), mode="RGB", colour=(200, 80, 40)):
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


# --- input checked before any model loads --------------------------------------------------


@pytest.mark.slow
def test_an_unknown_subject_lists_the_known_ones_and_how_to_download(tmp_path):
    result = run_subprocess("train", *FAST, "--subject", "dogg", "--data-root", FIXTURE_DATA, cache=tmp_path)
    assert_user_error(result, "unknown subject 'dogg'", "dog6", "sparse-db data download", cache=tmp_path)


@pytest.mark.slow
def test_an_empty_photo_folder_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    result = run_subprocess(
        "train", *FAST, "--instance-dir", tmp_path / "photos", "--class-name", "dog", cache=tmp_path
    )
    assert_user_error(result, "no images", cache=tmp_path)


@pytest.mark.slow
def test_a_truncated_jpeg_is_named(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "good.jpg")
    broken = photo(folder / "broken.jpg", size=(200, 200))
    broken.write_bytes(broken.read_bytes()[:300])
    result = run_subprocess("train", *FAST, "--instance-dir", folder, "--class-name", "dog", cache=tmp_path)
    assert_user_error(result, "broken.jpg", cache=tmp_path)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "wavft"], "did you mean 'waveft'"),
        (["--wavelet", "db99"], "unknown wavelet 'db99'"),
        (["--budget", "0"], "budget must be a positive"),
        (["--budget", "-3"], "budget must be a positive"),
    ],
)
def test_a_bad_method_wavelet_or_budget_is_named(tmp_path, flags, message):
    result = run_subprocess("train", *FAST, "--subject", "demo", *flags, cache=tmp_path)
    assert_user_error(result, message, cache=tmp_path)


@pytest.mark.slow
def test_a_budget_larger_than_a_layer_is_refused_before_the_weights_load(tmp_path):
    result = run_subprocess(
        "train", *FAST, "--subject", "demo", "--budget", "100000", "--output", tmp_path / "run", cache=tmp_path
    )
    assert_user_error(result, "does not fit layer", "cap_budget")
    assert not (tmp_path / "run" / "config.yaml").exists(), "the run started before the budget was checked"


@pytest.mark.slow
def test_unknown_or_mistyped_config_keys_suggest_the_closest(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  stepz: 10\n")
    assert_user_error(
        run_subprocess("train", "--config", recipe, "--subject", "demo", cache=tmp_path),
        "train.stepz",
        "'steps'",
        cache=tmp_path,
    )
    recipe.write_text("adapter:\n  steps: 10\n")
    assert_user_error(
        run_subprocess("train", "--config", recipe, "--subject", "demo", cache=tmp_path), "belongs in section 'train'"
    )
    recipe.write_text("train:\n  steps: ten\n")
    assert_user_error(
        run_subprocess("train", "--config", recipe, "--subject", "demo", cache=tmp_path), "steps must be int"
    )
    flag = run_subprocess("train", "--subject", "demo", "--lrr", "1", cache=tmp_path)
    assert flag.returncode == 2 and "--lr" in flag.stderr and "Traceback" not in flag.stderr


@pytest.mark.slow
def test_a_finished_run_is_refused_without_overwrite_or_resume(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", run)
    result = run_subprocess("train", *FAST, "--subject", "demo", "--steps", "1", "--output", run, cache=tmp_path)
    assert_user_error(result, "finished run", "--overwrite", cache=tmp_path)


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    first = run_subprocess(
        "train", *FAST, "--subject", "demo", "--steps", "100000", "--output", run, cache=tmp_path, wait=False
    )
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").exists():
            assert time.time() < deadline and first.poll() is None, (
                first.stderr.read() if first.poll() is not None else "timeout"
            )
            time.sleep(0.2)
        second = run_subprocess(
            "train", *FAST, "--subject", "demo", "--steps", "1", "--output", run, "--overwrite", cache=tmp_path
        )
        assert_user_error(second, "another run", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()


# --- messy photo folders train ----------------------------------------------------------------


@pytest.mark.slow
def test_a_messy_photo_folder_is_cleaned_up_with_notes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "cmyk.jpg", mode="CMYK")
    photo(folder / "rgba.png", mode="RGBA")
    photo(folder / "grey.png", mode="L")
    photo(folder / "palette.png", mode="P")
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    rotated = Image.new("RGB", (64, 40), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(folder / "rotated.jpg", exif=exif)
    photo(folder / "tiny.jpg", size=(16, 16))
    (folder / "notes.txt").write_text("not a photo")
    run = tmp_path / "run"
    result = run_subprocess(
        "train", *FAST, "--instance-dir", folder, "--class-name", "dog", "--steps", "1", "--output", run, cache=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sparse-db: warning: skipping 1 non-image file" in result.stderr and "notes.txt" in result.stderr
    assert "warnings.warn(" not in result.stderr, "a note for the user, not a place in our code"
    assert "smaller than the training resolution" in result.stderr and "tiny.jpg" in result.stderr
    assert json.loads((run / "run.json").read_text())["subject"]["images"] == 7


# --- during and after a run ---------------------------------------------------------------


def uninterrupted(tmp_path, steps):
    run = tmp_path / "uninterrupted"
    run_cli("train", *FAST, "--subject", "demo", "--steps", steps, "--output", run)
    return adapters.read_adapter(run / "adapter.safetensors")[1]


def assert_same_adapter(run: Path, expected: dict):
    actual = adapters.read_adapter(run / "adapter.safetensors")[1]
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_subprocess(
        "train",
        *FAST,
        "--subject",
        "demo",
        "--steps",
        "20",
        "--lr",
        "1e30",
        "--checkpoint-every",
        "1",
        "--output",
        run,
        cache=tmp_path,
    )
    assert_user_error(result, "the loss became", "at step", "last good checkpoint")
    failed_at = int(result.stderr.split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{failed_at - 1}").is_dir()
    assert not (run / "adapter.safetensors").exists()


def wait_for(predicate, process, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.stderr.read()[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_and_resume_latest_ends_bit_exact(tmp_path, signum):
    steps = 60
    run = tmp_path / "run"
    args = ["train", *FAST, "--subject", "demo", "--steps", steps, "--output", run]
    process = run_subprocess(*args, cache=tmp_path, wait=False)
    wait_for(lambda: (run / "logs").exists(), process)  # training has started
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "--resume latest" in stderr
    stopped = [path.name for path in (run / "checkpoints").iterdir()]
    assert len(stopped) == 1 and not (run / "adapter.safetensors").exists()
    assert int(stopped[0].split("-")[1]) < steps

    resumed = run_subprocess(*args, "--resume", "latest", cache=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["steps"] == steps
    assert_same_adapter(run, uninterrupted(tmp_path, steps))


@pytest.mark.slow
def test_kill_9_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    steps = 40
    run = tmp_path / "run"
    args = ["train", *FAST, "--subject", "demo", "--steps", steps, "--checkpoint-every", "1", "--output", run]
    process = run_subprocess(*args, cache=tmp_path, wait=False)
    checkpoints = run / "checkpoints"

    def writing_a_later_checkpoint() -> bool:
        # Kill the moment a checkpoint after the first two starts being written (its staging
        # folder appears); if polling never catches one, kill mid-run after step 10 anyway.
        names = os.listdir(checkpoints) if checkpoints.exists() else []
        steps_done = [int(name.split("-")[1]) for name in names if name.startswith("step-")]
        return (any(".partial" in name for name in names) and max(steps_done, default=0) >= 2) or max(
            steps_done, default=0
        ) >= 10

    wait_for(writing_a_later_checkpoint, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete = sorted(path for path in checkpoints.iterdir() if not path.name.startswith("."))
    assert complete, "the completed checkpoints must survive"
    for path in complete:  # every complete checkpoint is whole and loads
        assert {"adapter.safetensors", "training_state.safetensors", "training_state.json"} <= {
            p.name for p in path.iterdir()
        }
        adapters.read_adapter(path / "adapter.safetensors")

    resumed = run_subprocess(*args, "--resume", "latest", cache=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [path.name for path in checkpoints.iterdir() if path.name.startswith(".")], "staging debris stays"
    assert_same_adapter(run, uninterrupted(tmp_path, steps))


# --- adapter files that do not fit ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("adapter") / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", run)
    return run


def rewrite(source: Path, target: Path, edit_tensors=None, edit_metadata=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(source))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


def fresh_unet():
    from sparse_dreambooth.model import load_pipeline

    return load_pipeline("tiny").unet


@pytest.mark.slow
def test_an_adapter_for_another_base_model_is_refused_by_sample(trained_run, tmp_path):
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    rewrite(
        run / "adapter.safetensors",
        run / "adapter.safetensors",
        edit_metadata=lambda metadata: metadata.update(base_model="stabilityai/other@main", base_model_fingerprint="x"),
    )
    result = run_subprocess(
        "sample", "--run", run, "--num-steps", "1", "--seeds", "42", "--prompt", "x", cache=tmp_path
    )
    assert_user_error(result, "stabilityai/other@main", "tiny-sdxl")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t.pop(next(k for k in t if k.endswith("coefficients"))), "is missing"),
        (
            lambda t: t.update({"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.extra": torch.zeros(3)}),
            "unexpected tensor",
        ),
        (
            lambda t: t.update({k: torch.zeros(5) for k in [next(k for k in t if k.endswith("coefficients"))]}),
            "has shape (5,)",
        ),
    ],
)
def test_missing_extra_or_misshaped_tensors_are_named(trained_run, tmp_path, damage, message):
    path = rewrite(trained_run / "adapter.safetensors", tmp_path / "damaged.safetensors", edit_tensors=damage)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        adapters.load_adapter(fresh_unet(), path)
    assert "down_blocks" in str(caught.value) or "up_blocks" in str(caught.value) or "mid_block" in str(caught.value)


def test_a_truncated_adapter_file_is_refused(trained_run, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes((trained_run / "adapter.safetensors").read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        adapters.load_adapter(fresh_unet(), path)


def test_no_unpickling_anywhere_in_the_package():
    import re

    unpickling = re.compile(
        r"^\s*import pickle|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|trust_remote_code=True", re.M
    )
    package = Path(adapters.__file__).resolve().parents[1]
    offenders = [str(source) for source in package.rglob("*.py") if unpickling.search(source.read_text())]
    assert not offenders
