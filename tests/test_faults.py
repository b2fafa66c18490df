"""Faults and flags the held-out checks of issue 15 (item 7) found escaping: unwritable --output,
disk full, resume of a foreign checkpoint or a differently spelled folder, sample's flags, sample
from another directory, an interrupted sample, a non-UTF-8 photo folder and stale staging folders.

Training runs are the tiny model, in process where a fault is injected, in a subprocess where a
real signal or the command's stderr is the point.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sparse_dreambooth import checkpoint
from sparse_dreambooth.cli import app
from sparse_dreambooth.config import load_config
from sparse_dreambooth.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--config", str(CONFIGS / "tiny.yaml"), "--resolution", "32"]


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def run_ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def user_error(*args) -> str:
    """The one-line UserError a command ends with."""
    result = invoke(*args)
    assert isinstance(result.exception, UserError), (result.output, result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


def cli(*args, cache: Path):
    environment = {**os.environ, "SPARSE_DB_CACHE": str(cache)}
    command = [sys.executable, "-m", "sparse_dreambooth", *map(str, args)]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


# --- --output that cannot be a run folder ---------------------------------------------------------


@pytest.mark.slow
def test_an_output_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    cases = {
        existing: "is a file, not a folder",
        Path("/proc/version/run"): "cannot write the run folder",  # under a file (ENOTDIR, even for root)
        Path("/sys/kernel/sparse-db-run"): "cannot write the run folder",  # sysfs refuses root too
    }
    for output, fragment in cases.items():
        result = cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", output, cache=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("sparse-db: error:")]
        assert len(lines) == 1 and fragment in lines[0] and str(output) in lines[0], result.stderr[-2000:]
    assert existing.read_text() == "mine"


# --- a run with a relative, non-UTF-8 photo folder: train, sample elsewhere, resume ---------------


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """Trained from its own folder with a relative --instance-dir whose name is not UTF-8
    (TensorBoard's settings log must still be written); 2 steps, a checkpoint after the first."""
    home = tmp_path_factory.mktemp("home")
    photos = home / os.fsdecode(b"fotos-\xe9t\xe9")  # Latin-1 bytes: Python keeps them as surrogates
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 40), (60 * index, 90, 200)).save(photos / f"{index}.png")
    previous = os.getcwd()
    os.chdir(home)
    try:
        instance_dir = os.path.relpath(photos)
        args = ["train", *FAST, "--instance-dir", instance_dir, "--class-name", "vase", "--checkpoint-every", "1"]
        run_ok(*args, "--steps", "2", "--output", "run")
    finally:
        os.chdir(previous)
    return home, home / "run", args


def test_training_with_a_non_utf8_folder_name_logs_its_settings(relative_run):
    _, run, _ = relative_run
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard wrote its log"
    assert (run / "adapter.safetensors").is_file()


def test_sample_from_another_directory_needs_no_photos(relative_run, tmp_path, monkeypatch):
    home, run, _ = relative_run
    saved = load_config(run / "config.yaml").data.instance_dir
    assert Path(saved).is_absolute(), "relative paths are resolved when the run starts"
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples"
    run_ok("sample", "--run", run, "--num-steps", "1", "--seeds", "42", "--prompt", "a zjw vase", "--output", out)
    assert len(list(out.glob("prompt_*.png"))) == 1
    # Even with the photos gone: sampling needs the class and kind, which the run recorded.
    moved = home / "elsewhere"
    Path(saved).rename(moved)
    try:
        run_ok("sample", "--run", run, "--num-steps", "1", "--seeds", "43", "--prompt", "a zjw vase", "--output", out)
    finally:
        moved.rename(saved)
    assert len(list(out.glob("prompt_*.png"))) == 2


@pytest.mark.slow
def test_resume_latest_accepts_the_same_folder_however_spelled(relative_run, monkeypatch):
    home, run, args = relative_run
    monkeypatch.chdir(home)
    # Debris of a kill -9 mid-checkpoint (files.atomic_folder's staging names): removed by the next run.
    stale = [run / "checkpoints" / ".step-9.partial-0123abcd", run / "checkpoints" / ".step-1.old-4567ef"]
    for folder in stale:
        folder.mkdir()
        (folder / "adapter.safetensors").write_bytes(b"half")
    for steps, spelling in ((3, "run/"), (4, "./run"), (5, str(run.resolve()))):
        run_ok(*args, "--steps", steps, "--output", spelling, "--resume", "latest")
        assert not any(folder.exists() for folder in stale)
    assert json.loads((run / "run.json").read_text())["steps"] == 5


def test_resume_of_a_checkpoint_with_other_adapter_settings_is_refused(relative_run, tmp_path, monkeypatch):
    home, run, args = relative_run
    monkeypatch.chdir(home)
    checkpoint_folder = sorted((run / "checkpoints").glob("step-*"))[0]  # waveft, from the run above
    message = user_error(*args, "--method", "lora", "--output", tmp_path / "new", "--resume", checkpoint_folder)
    assert "method='waveft'" in message and "method='lora'" in message
    assert not (tmp_path / "new" / "adapter.safetensors").exists()


@pytest.mark.slow
def test_resume_may_change_the_kernel_and_deterministic_mode(relative_run, tmp_path, monkeypatch):
    """They change how a step is computed, not what is trained: a run (and its checkpoint's
    adapter, saved with kernel=fused) continues under other values."""
    home, run, args = relative_run
    monkeypatch.chdir(home)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    steps = json.loads((copy / "run.json").read_text())["steps"] + 1  # other tests may have resumed the run
    run_ok(*args, "--steps", steps, "--output", copy, "--resume", "latest", "--kernel", "delta", "--deterministic")
    assert json.loads((copy / "run.json").read_text())["steps"] == steps


# --- disk full ------------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_is_one_line_naming_the_folder_and_the_survivor(tmp_path, monkeypatch):
    written = []

    def fills_the_disk_on_the_second(path, tensors, metadata=None):
        written.append(path)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, tensors, metadata)

    real = checkpoint.write_safetensors
    monkeypatch.setattr(checkpoint, "write_safetensors", fills_the_disk_on_the_second)
    run = tmp_path / "run"
    message = user_error(
        "train", *FAST, "--subject", "demo", "--steps", "4", "--checkpoint-every", "1", "--output", run
    )
    survivor = run / "checkpoints" / "step-1"
    assert "disk is full" in message and str(run) in message and str(survivor) in message, message
    assert "--resume latest" in message
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step-1"], "no staging debris"


# --- sample's flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--resolution", "30"], "multiple of 8"),
        (["--resolution", "-8"], "multiple of 8"),
        (["--guidance", "nan"], "finite"),
        (["--seeds", "123456789012345678901234567890"], "range"),
        (["--seeds", ","], "names no seed"),
        (["--seeds", "4x"], "comma-separated integers"),
        (["--batch-size", "0"], "positive"),
        (["--num-steps", "-1"], "positive"),
        (["--prompt", " "], "--prompt is empty"),
        (["--method", "lora"], "'adapter' or 'base'"),
        (["--output", "/proc/version/samples"], "cannot write"),
    ],
)
def test_every_sample_flag_is_checked_in_one_line(relative_run, flags, fragment):
    _, run, _ = relative_run
    assert fragment in user_error("sample", "--run", run, *flags)


def test_sample_output_that_is_a_file_and_a_missing_run(relative_run, tmp_path):
    _, run, _ = relative_run
    (tmp_path / "file").write_text("x")
    assert "is a file" in user_error("sample", "--run", run, "--output", tmp_path / "file")
    assert "not a run folder" in user_error("sample", "--run", tmp_path / "nowhere")


# --- an interrupted sample ---------------------------------------------------------------------------

# Saving an image stalls after its first bytes, so the signal lands while the temporary file exists.
# A shell that starts a job in the background (`cmd &` without job control) makes it ignore SIGINT,
# and Python then keeps that: the child gets Ctrl-C's default handler back, as in a terminal.
SLOW_SAVE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from PIL import Image
original = Image.Image.save
def stalled(self, fp, *args, **kwargs):
    original(self, fp, *args, **kwargs)
    print("saving", flush=True)
    time.sleep(120)
Image.Image.save = stalled
from sparse_dreambooth.cli import main
sys.argv = ["sparse-db", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_sample_leaves_no_temporary_file(relative_run, tmp_path, signum):
    _, run, _ = relative_run
    out = tmp_path / "samples"
    args = ["sample", "--run", run, "--num-steps", "1", "--seeds", "42", "--prompt", "x", "--output", out]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "saving\n", process.stderr.read()[-3000:]  # blocks until the stall
    assert list(out.glob(".*.tmp")), "the image is being written through a temporary file"
    process.send_signal(signum)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not list(out.glob(".*")), "the image being written left its temporary file"
