"""Sweeps: subjects x methods x budgets x scalings from a YAML grid, then evaluate and report.

    sparse-db sweep configs/sweeps/tiny.yaml                  # everything, here
    sparse-db sweep configs/sweeps/paper.yaml --dry-run       # the commands, one job at a time
    sparse-db sweep configs/sweeps/paper.yaml --shard 3/40    # job array task 3 of 40
    sparse-db sweep configs/sweeps/paper.yaml --report-only   # once every shard has finished

A job is one run folder, OUTPUT/SUBJECT/NAME (NAME from the grid values: waveft_x1_s25), taken
through train -> sample -> evaluate. Every stage that is already finished is skipped, and an
unfinished training resumes from its latest checkpoint, so a sweep can be re-run after any
interruption. Shard i of n takes jobs i, i+n, i+2n, ... of the sorted job list: the shards are
disjoint and together cover every job. Nothing here imports torch until a job runs.
"""

import gc
import itertools
import json
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_dreambooth.config import TrainConfig, leaf_fields, merge_settings, read_yaml
from sparse_dreambooth.errors import UserError, did_you_mean
from sparse_dreambooth.methods import METHODS
from sparse_dreambooth.runs import (
    ADAPTER_FILE,
    EVALUATION_SEEDS,
    MANIFEST,
    METRICS_FILE,
    SAMPLES,
    checkpoint_dirs,
    resolve_subject,
)

SWEEP_KEYS = {"config", "output", "subjects", "settings", "grid", "sample", "evaluate", "report"}
SAMPLE_KEYS = {"seeds", "num_steps", "guidance", "batch_size", "negative_prompt", "resolution", "prompts"}
EVALUATE_KEYS = {
    "metric_models",
    "dino",
    "clip",
    "cmmd",
    "lpips",
    "device",
    "batch_size",
    "lpips_resolution",
    "cmmd_estimator",
}
REPORT_KEYS = {"resamples", "confidence", "seed", "rank_shapes", "grid_budget", "grid_prompts", "grid_columns", "out"}
# Settings a method ignores (or rejects): left out of its config and its run name.
# How grid keys appear in run names, in this order; other keys follow alphabetically as key-value.
NAME_CODES = {
    "budget_scale": "x",
    "budget": "p",
    "rank": "r",
    "alpha": "a",
    "scaling": "s",
    "wavelet": "",
    "allocation": "",
}


@dataclass
class Sweep:
    path: Path
    config: Path | None
    output: Path
    subjects: list[str]
    settings: dict[str, Any]
    grid: list[dict[str, list]]
    sample: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    subject: str
    name: str
    output: Path
    config: TrainConfig
    flags: dict[str, Any]  # the train flags on top of the sweep's base config

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.name}"


def _check_keys(where: str, values: dict, allowed) -> None:
    for key in values:
        if key not in allowed:
            raise UserError(
                f"unknown key {key!r} in {where}{did_you_mean(str(key), allowed)}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )


def _as_list(key: str, value) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UserError(f"grid key {key!r} has an empty list; give at least one value")
    return values


def load_sweep(path) -> Sweep:
    """Read and check a sweep YAML (every key, every grid value's type, before anything runs)."""
    path = Path(path)
    tree = read_yaml(path)
    _check_keys(str(path), tree, SWEEP_KEYS)
    leaves = leaf_fields()
    config = tree.get("config")
    config_path = (path.parent / config).resolve() if config else None
    if config_path is not None and not config_path.is_file():
        raise UserError(f"{path}: config {config!r} does not exist (paths are relative to the sweep file)")
    settings = tree.get("settings") or {}
    grid = tree.get("grid") or [{}]
    if (
        not isinstance(settings, dict)
        or not isinstance(grid, list)
        or not all(isinstance(entry, dict) for entry in grid)
    ):
        raise UserError(
            f"{path}: settings must be a mapping of config keys, grid a list of mappings of config keys to lists"
        )
    for key in [*settings, *(key for entry in grid for key in entry)]:
        if key in ("subject", "output", "instance_dir"):
            raise UserError(
                f"{path}: {key!r} is set by the sweep; list subjects under 'subjects' and the folder under 'output'"
            )
        if key not in leaves:
            raise UserError(f"{path}: unknown config key {key!r}{did_you_mean(key, leaves)}")
    grid = [{key: _as_list(key, value) for key, value in entry.items()} for entry in grid]
    subjects = tree.get("subjects")
    if subjects is None:
        raise UserError(f"{path}: list the subjects, e.g. 'subjects: [dog6, backpack]', or 'subjects: all'")
    if subjects == "all":
        from sparse_dreambooth import data

        subjects = [subject.name for subject in data.list_subjects(data.resolve_data_root(settings.get("data_root")))]
    subjects = [str(subject) for subject in _as_list("subjects", subjects)]
    for section, allowed in (("sample", SAMPLE_KEYS), ("evaluate", EVALUATE_KEYS), ("report", REPORT_KEYS)):
        _check_keys(f"{path} {section}", tree.get(section) or {}, allowed)
    if "output" not in tree:
        raise UserError(f"{path}: set 'output', the folder the run folders go to")
    return Sweep(
        path=path,
        config=config_path,
        output=Path(tree["output"]),
        subjects=subjects,
        settings=settings,
        grid=grid,
        sample=tree.get("sample") or {},
        evaluate=tree.get("evaluate") or {},
        report=tree.get("report") or {},
    )


def _format(value) -> str:
    if value is None:  # a grid's `null`: the setting left at its default (off, for snr_gamma)
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _ignored_keys(method: str) -> frozenset[str]:
    """Keys the method does not read (none for a name the config will reject)."""
    return METHODS[method].ignored_keys if method in METHODS else frozenset()


def run_name(method: str, values: dict[str, Any], axes: list[str]) -> str:
    """'waveft_x1_s25': the method and the value of every grid axis that applies to it."""
    ordered = [key for key in NAME_CODES if key in axes] + sorted(key for key in axes if key not in NAME_CODES)
    parts = [method]
    for key in ordered:
        if key == "method" or key in _ignored_keys(method):
            continue
        value = _format(values[key])
        parts.append(f"{NAME_CODES[key]}{value}" if key in NAME_CODES else f"{key}-{value}")
    return "_".join(part.replace("/", "-").replace(" ", "") for part in parts)


def plan(sweep: Sweep) -> list[Job]:
    """Every job of the sweep, de-duplicated by run folder and sorted by subject then name."""
    base = read_yaml(sweep.config) if sweep.config else None
    axes = list(dict.fromkeys(key for entry in sweep.grid for key in entry))
    jobs: dict[str, Job] = {}
    for subject in sweep.subjects:
        for entry in sweep.grid:
            keys = list(entry)
            for combination in itertools.product(*(entry[key] for key in keys)):
                flags = {**sweep.settings, **dict(zip(keys, combination, strict=False)), "subject": subject}
                method = flags.get("method") or ((base or {}).get("adapter") or {}).get("method", "waveft")
                flags = {key: value for key, value in flags.items() if key not in _ignored_keys(method)}
                values = _flat(merge_settings(base, flags))
                name = run_name(method, values, axes)
                output = sweep.output / subject / name
                flags["output"] = str(output)
                if f"{subject}/{name}" not in jobs:
                    jobs[f"{subject}/{name}"] = Job(subject, name, output, merge_settings(base, flags), flags)
    return [jobs[key] for key in sorted(jobs)]


def _flat(config: TrainConfig) -> dict[str, Any]:
    return {key: value for section in config.to_dict().values() for key, value in section.items()}


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes i/n, e.g. 0/4 (task 0 of 4), got {text!r}") from None
    if count <= 0 or not 0 <= index < count:
        raise UserError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0, as job-array task ids)")
    return index, count


def shard(jobs: list[Job], index: int, count: int) -> list[Job]:
    return jobs[index::count]


# --- state of a job --------------------------------------------------------------------------------


def train_state(job: Job) -> str:
    """'done' (adapter written), 'resume' (a checkpoint exists) or 'new'."""
    if (job.output / ADAPTER_FILE).is_file():
        return "done"
    if checkpoint_dirs(job.output):
        return "resume"
    return "new"


def _manifest(job: Job) -> dict | None:
    path = job.output / SAMPLES / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def sample_state(job: Job, expected: int | None) -> str:
    manifest = _manifest(job)
    if manifest is None:
        return "new"
    images = manifest["images"]
    if all((job.output / SAMPLES / image["file"]).is_file() for image in images) and (
        expected is None or len(images) == expected
    ):
        return "done"
    return "resume"


def evaluate_state(job: Job) -> str:
    path = job.output / SAMPLES / METRICS_FILE
    manifest = _manifest(job)
    if (
        path.is_file()
        and manifest is not None
        and json.loads(path.read_text()).get("num_images") == len(manifest["images"])
    ):
        return "done"
    return "new"


def sample_prompts(sweep: Sweep, job: Job) -> list[str] | None:
    """The first `sample.prompts` evaluation prompts of the job's subject (None: all 25)."""
    count = sweep.sample.get("prompts")
    if count is None:
        return None
    from sparse_dreambooth import data

    return data.evaluation_prompts(resolve_subject(job.config), job.config.data.token)[: int(count)]


def _expected_images(sweep: Sweep, prompts: list[str] | None) -> int:
    from sparse_dreambooth.data import OBJECT_PROMPT_TEMPLATES  # 25, as the live list

    seeds = sweep.sample.get("seeds") or EVALUATION_SEEDS
    return (len(prompts) if prompts is not None else len(OBJECT_PROMPT_TEMPLATES)) * len(seeds)


# --- commands (for --dry-run and cluster scripts) ------------------------------------------------


def _flag(key: str, value) -> list[str]:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else f"--no-{key.replace('_', '-')}"]
    if isinstance(value, list):
        return [name, ",".join(map(str, value))]
    return [name, _format(value)]


def commands(
    sweep: Sweep, job: Job, prompts: list[str] | None = None, skip_done: bool = True, until: str = "evaluate"
) -> list[list[str]]:
    """The `sparse-db` commands that take the job from where it is through stage `until`."""
    result = []
    state = train_state(job)
    if not (skip_done and state == "done"):
        command = ["sparse-db", "train"] + (["--config", str(sweep.config)] if sweep.config else [])
        for key, value in job.flags.items():
            if value is not None:  # a grid's `null` is the default: no flag
                command += _flag(key, value)
        if state == "resume":
            command += ["--resume", "latest"]
        result.append(command)
    if until == "train":
        return result
    if not (skip_done and sample_state(job, _expected_images(sweep, prompts)) == "done"):
        command = ["sparse-db", "sample", "--run", str(job.output)]
        for key, value in sweep.sample.items():
            if key == "prompts":
                for prompt in prompts or []:
                    command += ["--prompt", prompt]
            elif value is not None:
                command += _flag(key, value)
        result.append(command)
    if until == "sample":
        return result
    if not (skip_done and evaluate_state(job) == "done"):
        command = ["sparse-db", "evaluate", "--run", str(job.output)]
        for key, value in sweep.evaluate.items():
            if value is not None:
                command += _flag(key, value)
        result.append(command)
    return result


def report_command(sweep: Sweep) -> list[str]:
    options = dict(sweep.report)
    out = options.pop("out", None) or str(sweep.output / "report")
    command = ["sparse-db", "report", str(sweep.output), "--out", out]
    for key, value in options.items():
        if value is not None:
            command += _flag(key, value)
    return command


# --- running ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    jobs: list[Job]
    failed: list[tuple[str, str]]
    report: dict | None


def _free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _evaluate_options(sweep: Sweep) -> tuple[dict, bool]:
    options = dict(sweep.evaluate)
    return options, options.pop("cmmd_estimator", "unbiased") != "biased"


def load_models(sweep: Sweep):
    """The sweep's metric models, loaded on the CPU: done before any training, so a missing model
    stops the sweep at once instead of after hours; moved to the GPU only while evaluating."""
    from sparse_dreambooth.metric_models import MetricModels

    options, _ = _evaluate_options(sweep)
    device = options.pop("device", None)
    models = MetricModels.load(**options, device="cpu")
    models.target = device
    return models


def run_job(sweep: Sweep, job: Job, models: dict, log=print, until: str = "evaluate") -> None:
    """train -> sample -> evaluate (up to `until`), each stage skipped when finished."""
    prompts = sample_prompts(sweep, job)
    state = train_state(job)
    if state != "done":
        from sparse_dreambooth.train import train

        log(f"[{job.key}] train" + (" (resuming)" if state == "resume" else ""))
        train(job.config, resume="latest" if state == "resume" else None)
        _free_memory()
        if (job.output / SAMPLES).exists():  # rendered by an adapter that no longer exists
            log(f"[{job.key}] removing samples of the previous adapter")
            shutil.rmtree(job.output / SAMPLES)
    if until == "train":
        return
    if sample_state(job, _expected_images(sweep, prompts)) != "done":
        from sparse_dreambooth.sample import sample

        log(f"[{job.key}] sample")
        options = {key: value for key, value in sweep.sample.items() if key != "prompts"}
        sample(job.output, prompts=prompts, **options)
        (job.output / SAMPLES / METRICS_FILE).unlink(missing_ok=True)  # scores of other images
        _free_memory()
    if until == "sample" or evaluate_state(job) == "done":
        return
    from sparse_dreambooth.evaluate import evaluate_samples, read_samples

    log(f"[{job.key}] evaluate")
    _, unbiased = _evaluate_options(sweep)
    if "models" not in models:
        models["models"] = load_models(sweep)
    loaded = models["models"]
    loaded.to(loaded.target)
    try:
        evaluate_samples(read_samples(job.output / SAMPLES), loaded, cmmd_unbiased=unbiased)
    finally:
        loaded.to("cpu")
        _free_memory()


def run_report(sweep: Sweep) -> dict:
    from sparse_dreambooth.report import report

    options = dict(sweep.report)
    out = options.pop("out", None) or sweep.output / "report"
    if "resamples" in options:
        options["n_resamples"] = options.pop("resamples")
    return report([sweep.output], out, **options)


STAGES = ("train", "sample", "evaluate")


def run_sweep(
    path,
    shard_text: str | None = None,
    dry_run: bool = False,
    make_report: bool = True,
    report_only: bool = False,
    until: str = "evaluate",
    log=print,
) -> SweepResult:
    """Run (or, with dry_run, print) this shard's jobs through stage `until`; report when the
    whole sweep ran here."""
    sweep = load_sweep(path)
    if sweep.evaluate.get("cmmd_estimator", "unbiased") not in ("unbiased", "biased"):
        raise UserError(f"{path}: evaluate.cmmd_estimator must be 'unbiased' or 'biased'")
    if until not in STAGES:
        raise UserError(f"--until must be one of {', '.join(STAGES)}, got {until!r}")
    index, count = parse_shard(shard_text)
    jobs = shard(plan(sweep), index, count)
    if report_only:
        return SweepResult(jobs, [], run_report(sweep))
    make_report = make_report and until == "evaluate"
    if dry_run:
        for job in jobs:
            states = f"train {train_state(job)}, sample {sample_state(job, None)}, evaluate {evaluate_state(job)}"
            log(f"# {job.key}: {states}")
            for command in commands(sweep, job, sample_prompts(sweep, job), until=until):
                log(shlex.join(command))
        if make_report:
            log("# then, when every job has finished:")
            log(shlex.join(report_command(sweep)))
        return SweepResult(jobs, [], None)
    models: dict = {}  # loaded once, for the whole sweep
    if until == "evaluate" and any(train_state(job) != "done" or evaluate_state(job) != "done" for job in jobs):
        models["models"] = load_models(sweep)
    failed = []
    for position, job in enumerate(jobs, start=1):
        log(f"job {position}/{len(jobs)}: {job.key}")
        try:
            run_job(sweep, job, models, log, until)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # one broken run must not stop a 500-run sweep
            traceback.print_exc(file=sys.stderr)
            failed.append((job.key, f"{type(error).__name__}: {error}"))
    result = None
    if make_report and count == 1:
        if any((job.output / SAMPLES / METRICS_FILE).is_file() for job in jobs):
            result = run_report(sweep)
    elif make_report:
        log(f"shard {index}/{count} done; when every shard has finished: {shlex.join(report_command(sweep))}")
    return SweepResult(jobs, failed, result)
