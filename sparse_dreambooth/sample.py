"""Render a run's evaluation images: the subject's 25 DreamBooth prompts x 4 seeds, as the
authors sampled (DPM-Solver++ order 2, 30 steps, guidance 7.5).

Each image has its own generator seeded with its seed, so an image does not depend on which
batch or process renders it. Under `accelerate launch` the prompt x seed jobs are dealt out
across processes; each image is rendered once. Images already on disk are skipped, so an
interrupted run picks up where it stopped. At the end `grid.png` shows the subject's photos above
a few prompts' samples, one row per prompt and one column per seed, so a run can be judged at a glance.
"""

import contextlib
import dataclasses
import json
import math
import signal
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from sparse_dreambooth import data, runs
from sparse_dreambooth.config import load_config
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_path, write_json
from sparse_dreambooth.model import evaluation_scheduler, load_base_pipeline, model_identity
from sparse_dreambooth.runs import (
    ADAPTER_FILE,
    CONFIG_FILE,
    EMA_ADAPTER_FILE,
    EVALUATION_SEEDS,
    MANIFEST,
    resolve_subject,
)
from sparse_dreambooth.text_encoders import merge_adapter

GRID_FILE = "grid.png"
GRID_PROMPTS = 8  # rows of the grid: this many prompts spread over the list
GRID_SEEDS = 4  # columns: the first seeds
GRID_TILE = 128  # smallest tile side; 64 px micro samples are upscaled (nearest) to be seen
GRID_LABEL_WIDTH = 190


@dataclass(frozen=True)
class Job:
    prompt_index: int
    sample_index: int
    seed: int
    prompt: str

    @property
    def file_name(self) -> str:
        return runs.sample_name(self.prompt_index, self.sample_index, self.seed)


def plan_jobs(prompts: list[str], seeds: list[int]) -> list[Job]:
    return [
        Job(prompt_index, sample_index, seed, prompt)
        for prompt_index, prompt in enumerate(prompts)
        for sample_index, seed in enumerate(seeds)
    ]


def sample(
    run: Path,
    base: bool = False,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    num_steps: int = 30,
    guidance: float = 7.5,
    batch_size: int = 1,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    output: Path | None = None,
    ema: bool = False,
    model_settings: dict | None = None,
) -> Path:
    """Render images for a run folder; return the folder they went to.

    Args:
        run: a training run folder (config.yaml + adapter.safetensors).
        base: sample the base model without the adapter, for reference.
        prompts: prompts to render instead of the subject's 25 evaluation prompts.
        seeds: one image per seed per prompt. Default: 42, 43, 44, 45.
        resolution: image side; default the run's training resolution.
        output: where the PNGs and samples.json go; default run/samples (run/samples-base, run/samples-ema).
        ema: sample the moving average of the adapter weights (adapter-ema.safetensors) instead.
        model_settings: model settings replacing the run's (None values keep the run's), e.g.
            {"model": "/new/place/of/the/folder"}.
    """
    from accelerate import Accelerator

    run = Path(run)
    runs.require_run(run)
    if base and ema:
        raise UserError("--ema samples the adapter's moving average; --method base has no adapter: choose one")
    adapter_file = EMA_ADAPTER_FILE if ema else ADAPTER_FILE
    if ema and not (run / EMA_ADAPTER_FILE).is_file() and (run / ADAPTER_FILE).is_file():
        raise UserError(f"{run} has no {EMA_ADAPTER_FILE}: it was trained without --ema-decay; sample without --ema")
    if not base and not (run / adapter_file).is_file():
        raise UserError(
            f"{run} has no {adapter_file} yet: finish (or --resume) the training, or sample with --method base"
        )
    config = load_config(run / CONFIG_FILE)
    seeds = list(seeds or EVALUATION_SEEDS)
    resolution = resolution or config.data.resolution
    output = Path(output or run / (runs.BASE_SAMPLES if base else runs.EMA_SAMPLES if ema else runs.SAMPLES))
    _check_settings(prompts, seeds, num_steps, guidance, batch_size, resolution, output)
    subject = run_subject(run, config)
    prompts = prompts or data.evaluation_prompts(subject, config.data.token)

    state = Accelerator()  # reads the launcher's settings (ACCELERATE_USE_CPU, ranks) as training does
    dtype = torch.float16 if state.device.type == "cuda" else torch.float32
    model = dataclasses.replace(
        config.model, **{key: value for key, value in (model_settings or {}).items() if value is not None}
    )
    pipe = load_base_pipeline(model, dtype)
    pipe.scheduler = evaluation_scheduler(pipe.scheduler.config)
    if not base:
        merge_adapter(pipe, run / adapter_file, model_identity(model.model, model.revision, model.variant))
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)

    jobs = plan_jobs(prompts, seeds)
    with _signals_end_the_process():  # SIGTERM unwinds like Ctrl-C, so no temporary file is left
        _render(pipe, state, jobs, output, batch_size, negative_prompt, num_steps, guidance, resolution)
    state.wait_for_everyone()
    if state.is_main_process:
        settings = {"num_steps": num_steps, "guidance": guidance, "negative_prompt": negative_prompt}
        settings["resolution"] = resolution
        _write_manifest(output, run, None if base else adapter_file, subject, jobs, settings)
    state.wait_for_everyone()
    state.end_training()  # destroy the process group now, not in the interpreter's teardown
    state.print(f"{len(jobs)} images in {output}")
    if state.is_main_process:
        state.print(f"grid: {write_grid(output, jobs, subject.image_paths)}")
    return output


def _render(pipe, state, jobs, output, batch_size, negative_prompt, num_steps, guidance, resolution) -> None:
    """This process's share of the jobs not yet on disk, each image written atomically."""
    from tqdm.auto import tqdm

    mine = [job for job in jobs[state.process_index :: state.num_processes] if not (output / job.file_name).is_file()]
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    for batch in tqdm(batches, desc="sample", unit="batch", disable=not state.is_main_process):
        images = render_images(
            pipe,
            prompt=[job.prompt for job in batch],
            negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
            generator=[torch.Generator().manual_seed(job.seed) for job in batch],
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
        )
        for job, image in zip(batch, images, strict=False):
            with atomic_path(output / job.file_name) as tmp:
                image.save(tmp, format="PNG")


@torch.no_grad()
def render_images(pipe, **call_arguments) -> list[Image.Image]:
    """`pipe(**call_arguments).images`, with the UNet in its own dtype under explicit autocast and the
    VAE decoding in fp32.

    The pipeline runs to latents inside `torch.autocast` for the UNet's dtype (off for fp32), so a
    bf16 or fp16 UNet works on its own, without Accelerate's wrapper that casts its outputs; the
    latents are then upcast to the VAE's dtype (fp32: SDXL's VAE overflows in fp16) and decoded as
    the pipeline decodes them. In fp32 this is exactly `pipe(...)`, byte for byte.
    """
    compute_dtype = pipe.unet.dtype
    with torch.autocast(pipe.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        latents = pipe(**call_arguments, output_type="latent").images
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # as the pipeline unscales: with the VAE's statistics if it has them
        mean, std = (torch.tensor(value).view(1, 4, 1, 1).to(latents.device, latents.dtype) for value in (mean, std))
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    decoded = vae.decode(latents, return_dict=False)[0]
    if pipe.watermark is not None:
        decoded = pipe.watermark.apply_watermark(decoded)
    return pipe.image_processor.postprocess(decoded, output_type="pil")


@contextlib.contextmanager
def _signals_end_the_process():
    """SIGTERM raises SystemExit(143) instead of killing outright, so `finally` blocks (the temporary
    file of the image being written) run, as they do for Ctrl-C."""

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# torch.Generator.manual_seed's range.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _check_settings(prompts, seeds, num_steps, guidance, batch_size, resolution, output: Path) -> None:
    """Every sample setting checked before a model loads, as train checks its own."""
    if num_steps <= 0 or batch_size <= 0:
        raise UserError("--num-steps and --batch-size must be positive")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number, got {guidance}")
    if resolution <= 0 or resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8 (SDXL's VAE scale), got {resolution}")
    for seed in seeds:
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise UserError(f"--seeds: {seed} is outside a generator seed's range [-2**63, 2**64-1]")
    if prompts is not None and not all(prompt.strip() for prompt in prompts):
        raise UserError("--prompt is empty; give the text to render")
    runs.check_writable_folder(output, "the samples folder")


def run_subject(run: Path, config) -> data.Subject:
    """Who the run is of, with its photos (for the grid) while they can still be found; else
    run.json's record, since class and kind are all the prompts need (the photos may have moved, or
    the command may run elsewhere)."""
    record = json.loads((run / runs.RUN_FILE).read_text()).get("subject") if (run / runs.RUN_FILE).is_file() else None
    if not (record and record.get("class") and record.get("kind") in data.SUBJECT_KINDS):
        return resolve_subject(config)
    try:
        return resolve_subject(config)
    except UserError:
        return data.Subject(record["name"], record["class"], record["kind"], ())


def grid_jobs(jobs: list[Job]) -> list[list[Job]]:
    """The grid's rows: up to `GRID_PROMPTS` prompts evenly spread over the list (first and last
    included), each with its first `GRID_SEEDS` samples."""
    by_prompt: dict[int, list[Job]] = {}
    for job in jobs:
        by_prompt.setdefault(job.prompt_index, []).append(job)
    indices = sorted(by_prompt)
    if len(indices) > GRID_PROMPTS:
        step = (len(indices) - 1) / (GRID_PROMPTS - 1)
        indices = [indices[round(row * step)] for row in range(GRID_PROMPTS)]
    return [sorted(by_prompt[index], key=lambda job: job.sample_index)[:GRID_SEEDS] for index in indices]


def write_grid(folder: Path, jobs: list[Job], photos) -> Path:
    """`folder/grid.png`: the subject's photos on top, then one row per chosen prompt (its text on
    the left), one column per seed. Written atomically; returns its path."""
    rows = grid_jobs(jobs)
    columns = max(len(row) for row in rows)
    with Image.open(folder / rows[0][0].file_name) as first:
        tile = max(GRID_TILE, first.width)
    font = ImageFont.load_default(13)
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + columns * tile, (len(rows) + 1) * tile), "white")
    draw = ImageDraw.Draw(grid)

    def put(path, row: int, column: int) -> None:
        with Image.open(path) as image:
            resample = Image.Resampling.NEAREST if image.width < tile else Image.Resampling.LANCZOS
            square = ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (tile, tile), resample)
            grid.paste(square, (GRID_LABEL_WIDTH + column * tile, row * tile))

    def label(text: str, row: int) -> None:
        draw.multiline_text((6, row * tile + 6), "\n".join(textwrap.wrap(text, 22)), fill="black", font=font)

    label("the subject's photos", 0)
    for column, photo in enumerate(list(photos)[:columns]):
        put(photo, 0, column)
    for row, row_jobs in enumerate(rows, start=1):
        label(row_jobs[0].prompt, row)
        for column, job in enumerate(row_jobs):
            put(folder / job.file_name, row, column)
    path = folder / GRID_FILE
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def _write_manifest(
    output: Path, run: Path, adapter_file: str | None, subject: data.Subject, jobs: list[Job], settings: dict
) -> None:
    """samples.json: which run and subject, how the images were rendered, and every image's prompt and seed."""
    write_json(
        output / MANIFEST,
        {
            "run": str(run),
            "adapter": adapter_file,
            "subject": subject.name,
            "class": subject.class_name,
            "kind": subject.kind,
            "settings": {"scheduler": "DPMSolverMultistepScheduler(dpmsolver++, order 2)", **settings},
            "images": [{"file": job.file_name, **asdict(job)} for job in jobs],
        },
    )
