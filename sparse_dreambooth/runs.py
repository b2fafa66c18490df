"""The run folder: what `sparse-db train` writes and every later command reads.

    RUN/
      config.yaml              the settings the run trained with (CONFIG_FILE)
      adapter.safetensors      the finished adapter (ADAPTER_FILE)
      adapter-ema.safetensors  its moving average, with --ema-decay (EMA_ADAPTER_FILE)
      run.json                 versions, timings, parameter count (RUN_FILE)
      README.md                the model card: model, method, budget, data licence, metrics (MODEL_CARD)
      checkpoints/step-N/      resumable state while training (CHECKPOINTS)
      samples/                 prompt_XX_sample_K_seed_S.png + samples.json (SAMPLES, MANIFEST)
        metrics.json           scores written by `sparse-db evaluate` (METRICS_FILE, PER_IMAGE_FILE)
      samples-ema/             the same for the moving average (`sparse-db sample --ema`, EMA_SAMPLES)

Torch-free, so planning a sweep and `--dry-run` never import torch. Every module that reads or
writes a run folder takes its names from here.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_dreambooth.errors import UserError

if TYPE_CHECKING:
    from sparse_dreambooth.config import TrainConfig
    from sparse_dreambooth.data import Subject

ADAPTER_FILE = "adapter.safetensors"
EMA_ADAPTER_FILE = "adapter-ema.safetensors"
MODEL_CARD = "README.md"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
LOGS = "logs"
SAMPLES = "samples"
BASE_SAMPLES = "samples-base"
EMA_SAMPLES = "samples-ema"
MANIFEST = "samples.json"
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "metrics_per_image.csv"
LOCK_FILE = ".lock"

# The DreamBooth protocol's four images per prompt (base seed 42 + image index).
EVALUATION_SEEDS = (42, 43, 44, 45)
SAMPLE_NAME = re.compile(r"^prompt_(\d+)_sample_(\d+)_seed_(-?\d+)\.png$")
SAMPLE_GLOB = "prompt_*_sample_*_seed_*.png"
# Settings that may change when a run is resumed: they do not change what was computed so far.
# `output` is the folder the saved settings were read from, however it is spelled.
# `kernel` and `deterministic` change how a step is computed, not what is trained; the latent
# cache holds exactly what encoding gives.
RESUMABLE_CHANGES = {
    "steps",
    "checkpoint_every",
    "checkpoints_kept",
    "validate_every",
    "validation_prompt",
    "output",
    "kernel",
    "deterministic",
    "report_to",
    "latent_cache",
}
# Settings naming a path: compared as the folder they resolve to.
PATH_SETTINGS = {"data_root", "instance_dir", "class_data_dir", "latent_cache"}


def sample_name(prompt_index: int, sample_index: int, seed: int) -> str:
    """The file name of one evaluation image; `SAMPLE_NAME` reads it back."""
    return f"prompt_{prompt_index:02d}_sample_{sample_index}_seed_{seed}.png"


def prompt_samples_glob(prompt_index: int) -> str:
    """A glob for every image of one prompt."""
    return f"prompt_{prompt_index:02d}_sample_*_seed_*.png"


def checkpoint_path(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step}"


def remove_stale_staging(output: Path) -> None:
    """Remove checkpoint folders a killed run left half-written or half-replaced (files.atomic_folder's
    hidden .step-N.partial-* and .step-N.old-*). Call only under the run's lock: nobody else writes them."""
    import shutil

    for stale in (output / CHECKPOINTS).glob(".step-*"):
        if ".partial-" in stale.name or ".old-" in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still a hidden staging folder)."""
    return sorted((output / CHECKPOINTS).glob("step-*"), key=lambda path: int(path.name.split("-")[1]))


def require_run(run: Path) -> None:
    """Fail with a clear message unless `run` is a run folder."""
    if not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a run folder (no {CONFIG_FILE}); pass the --output of a `sparse-db train` run")


def resolve_subject(config: TrainConfig) -> Subject:
    """The subject a run's data settings name."""
    from sparse_dreambooth import data

    settings = config.data
    return data.find_subject(settings.subject, settings.data_root, settings.instance_dir, settings.class_name)


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume` names ('latest' or a path), or None."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output)
        if not found:
            raise UserError(f"--resume latest: {output} has no checkpoint yet; start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / ADAPTER_FILE).is_file():
        raise UserError(
            f"--resume {resume}: not a checkpoint folder (no {ADAPTER_FILE}); use 'latest' or a "
            f"{CHECKPOINTS}/step-N folder"
        )
    return path


def check_output(config: TrainConfig, resume: Path | None, overwrite: bool) -> None:
    """Refuse to clobber a finished or unfinished run unless asked; resume only the same run."""
    from sparse_dreambooth.config import load_config

    output = config.output_dir
    check_writable_folder(output)
    if resume is not None:
        saved = load_config(output / CONFIG_FILE) if (output / CONFIG_FILE).is_file() else None
        if saved is not None:
            changed = [
                f"{section}.{key}"
                for section, values in config.to_dict().items()
                for key, value in values.items()
                if key not in RESUMABLE_CHANGES and not _same_setting(key, saved.to_dict()[section][key], value)
            ]
            if changed:
                raise UserError(
                    f"--resume: {changed[0]} differs from the run in {output}; resume with the run's own settings"
                )
        return
    if overwrite:
        return
    if (output / ADAPTER_FILE).is_file():
        raise UserError(f"{output} holds a finished run; pass --overwrite to replace it or choose another --output")
    if checkpoint_dirs(output):
        raise UserError(f"{output} holds an unfinished run; pass --resume latest to continue it or --overwrite")


def _same_setting(key: str, saved, value) -> bool:
    if key in PATH_SETTINGS and saved is not None and value is not None:
        return Path(saved).expanduser().resolve() == Path(value).expanduser().resolve()
    return saved == value


def check_writable_folder(folder: Path, what: str = "the run folder") -> None:
    """`folder` exists or can be made, and takes files: one line if it names a file or a place that
    refuses writes (read-only, under a file, no permission)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file, not a folder; choose another --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write {what} {folder}: {error.strerror or error}; choose another --output") from None


@contextlib.contextmanager
def run_lock(output: Path):
    """Hold output/.lock for the run: a second run on the same folder fails at once. The OS drops
    the lock when the process dies, so a killed run never leaves the folder locked."""
    import fcntl

    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UserError(
                f"another run (pid {handle.read().strip() or '?'}) is using {output}; wait for it or "
                f"choose another --output"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
