"""DreamBooth training of an adapter on the SDXL UNet, read top to bottom.

    sparse-db train --subject dog6 --method waveft                    # one GPU
    accelerate launch -m sparse_dreambooth train --config ...        # several

Order of events: check the input and the run folder (before any model loads), load SDXL, render
any missing class images (prior preservation), cache the VAE latents and text embeddings once,
attach the adapter to the UNet (with --train-text-encoder to both text encoders too, which then
encode each micro-batch's prompts: text_encoders.py), then one loop of optimizer steps with
gradient accumulation, checkpoints and logs, and finally adapter.safetensors (and
adapter-ema.safetensors with --ema-decay), run.json and the model card README.md. Every random
draw of the loop (instance and class rows alike) comes from one seeded generator that every
process holds identically (each takes its own slice of a global batch), so a run is reproducible
and its generator state fits in a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparse_dreambooth import __version__, runs
from sparse_dreambooth.adapters import BaseModel, attach, load_adapter, save_adapter, trainable_parameter_count
from sparse_dreambooth.batches import CachedExamples, cache_examples, joined, noisy_batch, pick_bucket, prepare_examples
from sparse_dreambooth.checkpoint import load_checkpoint, save_checkpoint
from sparse_dreambooth.config import TrainConfig, dump_yaml
from sparse_dreambooth.data import PreparedImage, Subject, evaluation_prompts
from sparse_dreambooth.data.captions import training_prompts
from sparse_dreambooth.ema import AdapterEMA
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_path, write_json, write_text
from sparse_dreambooth.losses import loss_terms
from sparse_dreambooth.methods import method_of
from sparse_dreambooth.model import evaluation_scheduler, load_base_pipeline, model_identity
from sparse_dreambooth.model_card import write_run_card
from sparse_dreambooth.optimizers import build_optimizer, check_optimizer
from sparse_dreambooth.prior import (
    ClassImages,
    class_examples,
    instance_and_prior_loss,
    plan_class_images,
    render_missing,
)
from sparse_dreambooth.sample import render_images
from sparse_dreambooth.text_encoders import (
    adapter_parameters,
    average_gradients,
    check_encoders_fit,
    prepare_for_adapters,
    text_encoder_parts,
    with_encoded_prompts,
)

if TYPE_CHECKING:
    from accelerate import Accelerator  # imported when a run starts: it is slow to import

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- guards: early checks and signals --------------------------------------------------------


def check_adapter_fits(config: TrainConfig) -> None:
    """Fail on a budget the model's layers cannot hold, from the UNet config alone (no weights).
    The text encoders' layers are checked as soon as they load (text_encoders.check_encoders_fit)."""
    from sparse_dreambooth.adapters.layer import target_linears
    from sparse_dreambooth.model import unet_skeleton

    skeleton = unet_skeleton(config.model.model, config.model.revision, config.model.model_config)
    linears = target_linears(skeleton, config.adapter.targets)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    method_of(config.adapter).layer_budgets(config.adapter, shapes)


def check_tracker(report_to: str) -> None:
    """--report-to wandb needs the wandb package: say so before anything loads."""
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                "--report-to wandb needs the wandb package: pip install 'sparse-dreambooth[wandb]' "
                "(or --report-to tensorboard)"
            ) from None


class StopRequests:
    """Turns SIGINT/SIGTERM into a request the loop honours between steps (checkpoint, then exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- validation images --------------------------------------------------------------------------


@torch.no_grad()
def render_validation(pipe, unet: torch.nn.Module, prompt: str, config: TrainConfig, path: Path) -> None:
    """One image of the current adapter (unmerged), seeded like evaluation sampling.

    The UNet is in the compute dtype and the VAE in fp32; `render_images` autocasts the one and
    decodes with the other, as sampling does.
    """
    from diffusers import StableDiffusionXLPipeline

    scheduler = evaluation_scheduler(pipe.scheduler.config)
    validation = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler})
    validation.set_progress_bar_config(disable=True)
    unet.eval()
    (image,) = render_images(
        validation,
        prompt=prompt,
        num_inference_steps=30,
        height=config.data.resolution,
        width=config.data.resolution,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    unet.train()
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --- setup ------------------------------------------------------------------------------------


@dataclass
class Training:
    """Everything the loop works with, built once by `_setup`."""

    accelerator: Accelerator
    pipe: object  # the StableDiffusionXLPipeline; its frozen parts encode and render validation
    unet: torch.nn.Module  # adapted, wrapped by accelerate
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # every random draw of the loop
    examples: list[CachedExamples]  # one per bucket (one without --buckets)
    class_examples: list[CachedExamples] | None  # prior preservation's class images, bucket by bucket, or None
    alphas_cumprod: torch.Tensor
    prediction_type: str
    scaling_factor: float
    weight_dtype: torch.dtype
    base_model: BaseModel
    validation_prompt: str
    cache_seconds: float
    ema: AdapterEMA | None  # the moving average of `trainable`, with --ema-decay
    text_encoders: dict[str, torch.nn.Module] | None = None  # adapted too, with --train-text-encoder
    step: int = 0


def _check_checkpoint_adapter(config: TrainConfig, checkpoint: Path) -> None:
    """A checkpoint continues only the adapter it holds: refuse one trained with other adapter settings."""
    from sparse_dreambooth.adapters.io import read_adapter

    saved, _, _ = read_adapter(checkpoint / runs.ADAPTER_FILE)
    ours = config.adapter.to_dict()
    changed = [
        key for key, value in saved.to_dict().items() if ours.get(key) != value and key not in runs.RESUMABLE_CHANGES
    ]
    if changed:
        key = changed[0]
        raise UserError(
            f"--resume {checkpoint}: its adapter has {key}={saved.to_dict()[key]!r}, this run {key}={ours[key]!r}; "
            "resume with the settings it was trained with, or start a new run without --resume"
        )


def _with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """The photo paths resolved now, so the saved run reads the same from any working directory."""
    paths = {
        key: str(Path(value).expanduser().resolve())
        for key in runs.PATH_SETTINGS
        if (value := getattr(config.data, key)) is not None
    }
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **paths))


def _disk_error(error: OSError, what: Path, output: Path) -> UserError:
    """One line for a failed write: what, why, and the checkpoint that survived."""
    survivors = runs.checkpoint_dirs(output)
    kept = f"the last complete checkpoint is {survivors[-1]}" if survivors else "no checkpoint was completed"
    cause = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return UserError(f"cannot write {what}: {cause} in {output}; {kept}; free space and continue with --resume latest")


def _prepare_output(config: TrainConfig, resume_from: Path | None, overwrite: bool) -> None:
    output = config.output_dir
    runs.remove_stale_staging(output)  # a kill -9 mid-checkpoint leaves a hidden staging folder
    if overwrite and resume_from is None:
        shutil.rmtree(output / runs.CHECKPOINTS, ignore_errors=True)
        for finished in (runs.ADAPTER_FILE, runs.EMA_ADAPTER_FILE, runs.MODEL_CARD):
            (output / finished).unlink(missing_ok=True)
    write_text(output / runs.CONFIG_FILE, dump_yaml(config))


def _load_model(config: TrainConfig, device: torch.device, weight_dtype: torch.dtype):
    """The SDXL pipeline: frozen parts in the compute dtype, the VAE in fp32 (it overflows in fp16)."""
    return load_base_pipeline(config.model, weight_dtype).to(device)


def _optimizer(trainable: list[torch.nn.Parameter], config: TrainConfig):
    from diffusers.optimization import get_scheduler

    train_cfg = config.train
    optimizer = build_optimizer(trainable, train_cfg)
    # Stepped by hand once per optimizer step, so its length does not depend on the process count.
    lr_scheduler = get_scheduler(
        train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.steps
    )
    return optimizer, lr_scheduler


def _setup(
    config: TrainConfig,
    accelerator: Accelerator,
    subject: Subject,
    images: list[tuple[PreparedImage, str]],
    class_images: ClassImages | None,
    resume_from: Path | None,
    stop: StopRequests,
) -> Training:
    """Load SDXL, render class images, cache the examples, attach (or reload) the adapter, build the optimizer."""
    from diffusers import DDPMScheduler

    train_cfg = config.train
    weight_dtype = WEIGHT_DTYPES[train_cfg.mixed_precision]
    pipe = _load_model(config, accelerator.device, weight_dtype)
    text_encoders = text_encoder_parts(pipe) if config.adapter.train_text_encoder else None
    if text_encoders is not None:
        check_encoders_fit(text_encoders, config.adapter)
    base_model = model_identity(config.model.model, config.model.revision, config.model.variant)
    cache_started = time.perf_counter()
    examples = cache_examples(pipe, images, accelerator.device, config.data.latent_cache)
    classes = None
    if class_images is not None:
        finished = render_missing(
            pipe, class_images, config.data.resolution, accelerator, lambda: _any_process_received(stop, accelerator)
        )
        if not finished:
            _stop_rendering(class_images, accelerator, stop)
        # Numbered after the photos, so their random crops differ.
        classes = class_examples(pipe, class_images, config, accelerator.device, len(subject.image_paths), examples)
    cache_seconds = time.perf_counter() - cache_started
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if not train_cfg.validate_every:
        for frozen in [pipe.vae] + ([] if text_encoders else [pipe.text_encoder, pipe.text_encoder_2]):
            frozen.to("cpu")  # only needed again for validation images: free the accelerator's memory

    unet = pipe.unet
    if text_encoders is not None:
        prepare_for_adapters(pipe, train_cfg.gradient_checkpointing)
    if resume_from is not None:
        load_adapter(unet, resume_from / runs.ADAPTER_FILE, base_model=base_model, text_encoders=text_encoders)
    else:
        attach(unet, config.adapter, text_encoders=text_encoders)
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    if text_encoders is not None:
        trainable += adapter_parameters(text_encoders)
    optimizer, lr_scheduler = _optimizer(trainable, config)
    unet, optimizer = prepare_for_training(accelerator, unet, optimizer)
    # Under mixed precision Accelerate wraps the forward in autocast and casts its outputs to fp32.
    # The loop autocasts itself and validation renders through render_images, which autocasts the
    # UNet and decodes in fp32: the wrapper goes, so nothing works only because of it.
    accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    training = Training(
        accelerator=accelerator,
        pipe=pipe,
        unet=unet,
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=torch.Generator().manual_seed(train_cfg.seed),
        examples=examples,
        class_examples=classes,
        alphas_cumprod=noise_scheduler.alphas_cumprod,
        prediction_type=noise_scheduler.config.prediction_type,
        scaling_factor=pipe.vae.config.scaling_factor,
        weight_dtype=weight_dtype,
        base_model=base_model,
        validation_prompt=train_cfg.validation_prompt or evaluation_prompts(subject, config.data.token)[0],
        cache_seconds=cache_seconds,
        ema=AdapterEMA(trainable, train_cfg.ema_decay) if train_cfg.ema_decay is not None else None,
        text_encoders=text_encoders,
    )
    if resume_from is not None:
        training.step = load_checkpoint(
            resume_from, optimizer, lr_scheduler, training.generator, accelerator.scaler, training.ema
        )
    return training


def _scalar_settings(config: TrainConfig) -> dict:
    """The settings TensorBoard can show as hyperparameters. Its log is UTF-8: a path that is not
    (a folder name in another encoding, kept by Python as surrogates) is written with escapes."""
    return {
        key: value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value
        for values in config.to_dict().values()
        for key, value in values.items()
        if isinstance(value, (int, float, str, bool))
    }


# --- one optimizer step -------------------------------------------------------------------------


def _accumulated_loss(training: Training, config: TrainConfig) -> float:
    """Forward and backward over `grad_accum` micro-batches; the loss averaged over all processes."""
    accelerator, examples, unet = training.accelerator, training.examples, training.unet
    batch, accum, device, dtype = (
        config.train.batch_size,
        config.train.grad_accum,
        accelerator.device,
        training.weight_dtype,
    )
    rank = accelerator.process_index

    def draw(from_examples: CachedExamples):
        drawn = noisy_batch(
            from_examples,
            training.alphas_cumprod,
            training.prediction_type,
            training.scaling_factor,
            training.generator,
            global_batch=batch * accelerator.num_processes,
            mine=slice(rank * batch, (rank + 1) * batch),
            noise_offset=config.train.noise_offset,
        )
        if training.text_encoders is not None:  # the prompts through the adapted encoders, not the cache
            with accelerator.autocast():
                drawn = with_encoded_prompts(training.pipe, from_examples, drawn)
        return drawn

    step_loss = torch.zeros((), device=device)
    for micro in range(accum):
        bucket = pick_bucket(examples, training.generator)
        drawn = draw(examples[bucket])
        if training.class_examples is not None:  # as many class rows of the same bucket, after the instance rows
            drawn = joined(drawn, draw(training.class_examples[bucket]))
        # Gradients are synchronised across processes only on the last micro-batch.
        syncing = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(unet)
        with accelerator.autocast(), syncing:
            prediction = unet(
                drawn.noisy.to(device, dtype),
                drawn.timesteps.to(device),
                drawn.prompt_embeds.to(device, dtype),
                added_cond_kwargs={
                    "text_embeds": drawn.pooled_embeds.to(device, dtype),
                    "time_ids": drawn.time_ids.to(device, dtype),
                },
            ).sample
            terms = loss_terms(
                prediction.float(),
                drawn.target.to(device).float(),
                drawn.timesteps,
                training.alphas_cumprod,
                training.prediction_type,
                config.train,
            )
            loss = instance_and_prior_loss(terms, batch, config.train.prior_loss_weight)
            accelerator.backward(loss / accum)
        step_loss += loss.detach() / accum
    # Reduced, so every process takes the same decisions afterwards.
    return accelerator.reduce(step_loss, reduction="mean").item()


def _optimizer_step(training: Training, config: TrainConfig, loss: float) -> None:
    if not math.isfinite(loss):
        kept = runs.checkpoint_dirs(config.output_dir)
        raise UserError(
            f"the loss became {loss} at step {training.step + 1}; lower --lr or use --mixed-precision bf16/no"
            + (f"; the last good checkpoint is {kept[-1]}" if kept else "")
        )
    if training.text_encoders is not None:  # outside DDP: averaged over the processes here
        average_gradients(adapter_parameters(training.text_encoders), training.accelerator)
    training.accelerator.clip_grad_norm_(training.trainable, config.train.max_grad_norm)
    training.optimizer.step()
    training.lr_scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)
    if training.ema is not None:
        training.ema.update()
    training.step += 1


def _checkpoint(training: Training, config: TrainConfig) -> Path:
    accelerator, output = training.accelerator, config.output_dir
    path = runs.checkpoint_path(output, training.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            save_checkpoint(
                path,
                accelerator.unwrap_model(training.unet),
                config.adapter,
                training.base_model,
                training.optimizer,
                training.lr_scheduler,
                training.generator,
                training.step,
                accelerator.scaler,
                training.ema,
                training.text_encoders,
            )
        except OSError as error:
            raise _disk_error(error, path, output) from None
        for old in runs.checkpoint_dirs(output)[: -config.train.checkpoints_kept]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def _validate(training: Training, config: TrainConfig) -> None:
    if training.accelerator.is_main_process:
        path = config.output_dir / runs.VALIDATION / f"step-{training.step}.png"
        unet = training.accelerator.unwrap_model(training.unet)
        render_validation(training.pipe, unet, training.validation_prompt, config, path)
    training.accelerator.wait_for_everyone()


def _any_process_received(stop: StopRequests, accelerator: Accelerator) -> bool:
    """True on every process once any process received SIGINT/SIGTERM."""
    received = torch.tensor(float(stop.received is not None), device=accelerator.device)
    return accelerator.reduce(received, reduction="sum").item() > 0


def _stop_rendering(class_images: ClassImages, accelerator: Accelerator, stop: StopRequests) -> None:
    """End the run on a signal that came while class images were rendered: they are kept, and the
    same command renders only the rest."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        done = sum(path.is_file() for path in class_images.paths)
        print(
            f"stopped while rendering class images; {done} of {len(class_images.paths)} are in "
            f"{class_images.folder}; run the same command again to render the rest and train",
            file=sys.stderr,
        )
    raise SystemExit(128 + (stop.received or signal.SIGTERM))


# --- the run ------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train an adapter as `config` says; return the run folder.

    Everything a user can get wrong is checked before a model loads. SIGINT/SIGTERM end the run
    after the current step with a checkpoint (exit code 130/143); `resume="latest"` continues it.
    """
    from accelerate import Accelerator

    started = time.perf_counter()
    config = _with_absolute_paths(config)
    output = config.output_dir
    subject = runs.resolve_subject(config)
    images = list(prepare_examples(subject.image_paths, training_prompts(subject, config.data), config))
    resume_from = runs.resolve_resume(output, resume)
    runs.check_output(config, resume_from, overwrite)
    if resume_from is not None:
        _check_checkpoint_adapter(config, resume_from)
    check_adapter_fits(config)
    check_tracker(config.train.report_to)
    class_images = None
    if config.data.with_prior_preservation:
        base_model = model_identity(config.model.model, config.model.revision, config.model.variant)
        class_images = plan_class_images(config, subject.class_name, base_model.fingerprint or base_model.name)

    with deterministic_algorithms(config.train.deterministic):
        accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            log_with=None if config.train.report_to == "none" else config.train.report_to,
            project_dir=str(output / runs.LOGS),
        )
        check_optimizer(config.train, accelerator.device)
        lock = runs.run_lock(output) if accelerator.is_main_process else contextlib.nullcontext()
        with lock, StopRequests() as stop:
            return _run(config, accelerator, subject, images, class_images, resume_from, overwrite, stop, started)


def prepare_for_training(accelerator: Accelerator, unet: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """`accelerator.prepare` the adapted UNet and its optimizer, with DDP broadcasting no buffers.

    DDP by default re-sends every buffer from rank 0 on each synced forward. The adapted UNet's
    only buffers are the adapters' positions and kernel plans (0.31 GB for WaveFT on SDXL): constants,
    equal on every process by construction (one seed, or one adapter file), and SDXL's UNet has
    no running statistics to keep in step. DDP still syncs them once when it wraps the model.
    Set on the wrapper rather than through DistributedDataParallelKwargs, which newer torch
    deprecates and which would skip that first sync as well.
    """
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if isinstance(unet, torch.nn.parallel.DistributedDataParallel):
        unet.broadcast_buffers = False
    return unet, optimizer


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic mode for the run (`train.deterministic`), restored afterwards.

    cuBLAS needs its workspace setting before its first call for the same bytes on CUDA; the
    sparse kernels read the mode and sum without atomics. Off, nothing changes.
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _run(
    config: TrainConfig,
    accelerator: Accelerator,
    subject: Subject,
    images: list[tuple[PreparedImage, str]],
    class_images: ClassImages | None,
    resume_from: Path | None,
    overwrite: bool,
    stop: StopRequests,
    started: float,
) -> Path:
    """Set up, then the loop: accumulate, step, log, validate, checkpoint; then the final files."""
    from tqdm.auto import tqdm

    train_cfg, output, main = config.train, config.output_dir, accelerator.is_main_process
    if main:
        _prepare_output(config, resume_from, overwrite)
    torch.manual_seed(train_cfg.seed)
    training = _setup(config, accelerator, subject, images, class_images, resume_from, stop)
    if main:
        tracker_settings = {}
        if train_cfg.report_to == "wandb":  # named after the run folder, its files where TensorBoard's would go
            (output / runs.LOGS).mkdir(parents=True, exist_ok=True)
            tracker_settings["wandb"] = {"name": output.name, "dir": str(output / runs.LOGS)}
        accelerator.init_trackers("sparse-db", config=_scalar_settings(config), init_kwargs=tracker_settings)

    step_seconds: list[float] = []
    loss = float("nan")
    with tqdm(total=train_cfg.steps, initial=training.step, disable=not main, desc="train", unit="step") as progress:
        while training.step < train_cfg.steps:
            step_started = time.perf_counter()
            loss = _accumulated_loss(training, config)
            _optimizer_step(training, config, loss)
            step_seconds.append(time.perf_counter() - step_started)
            step = training.step
            accelerator.log({"loss": loss, "lr": training.lr_scheduler.get_last_lr()[0]}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if train_cfg.validate_every and step % train_cfg.validate_every == 0:
                _validate(training, config)
            if _any_process_received(stop, accelerator) and step < train_cfg.steps:
                break
            if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < train_cfg.steps:
                _checkpoint(training, config)

    if training.step < train_cfg.steps:  # stopped by a signal
        path = _checkpoint(training, config)
        accelerator.end_training()
        if main:
            print(
                f"stopped at step {training.step}; checkpoint in {path}; continue with --resume latest", file=sys.stderr
            )
        raise SystemExit(128 + (stop.received or signal.SIGTERM))

    accelerator.wait_for_everyone()
    if main:
        seconds = {
            "total": time.perf_counter() - started,
            "caching": training.cache_seconds,
            "mean_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
        }
        try:
            _write_results(training, config, subject, class_images, loss, seconds)
        except OSError as error:
            raise _disk_error(error, output / runs.ADAPTER_FILE, output) from None
    # Every rank tears the process group down together, once the main one has written: a rank that
    # leaves while another still works can hang the gloo/NCCL shutdown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"adapter written to {output / runs.ADAPTER_FILE}")
    return output


def _write_results(
    training: Training,
    config: TrainConfig,
    subject: Subject,
    class_images: ClassImages | None,
    loss: float,
    seconds: dict,
) -> None:
    """adapter.safetensors (with the run's config inside), its moving average, run.json and README.md."""
    output = config.output_dir
    prior = {}
    if class_images is not None:
        prior["class_images"] = {
            "folder": str(class_images.folder),
            "images": len(class_images.paths),
            "prompt": class_images.prompt,
        }
    unet = training.accelerator.unwrap_model(training.unet)
    save_adapter(
        unet,
        output / runs.ADAPTER_FILE,
        config.adapter,
        base_model=training.base_model,
        metadata={"run_config": dump_yaml(config)},
        text_encoders=training.text_encoders,
    )
    if training.ema is not None:
        with training.ema.swapped_in():
            save_adapter(
                unet,
                output / runs.EMA_ADAPTER_FILE,
                config.adapter,
                base_model=training.base_model,
                metadata={"run_config": dump_yaml(config), "weights": f"EMA, decay {config.train.ema_decay}"},
                text_encoders=training.text_encoders,
            )
    write_json(
        output / runs.RUN_FILE,
        {
            "sparse_dreambooth": __version__,
            "versions": _versions(),
            "subject": {
                "name": subject.name,
                "class": subject.class_name,
                "kind": subject.kind,
                "images": len(subject.image_paths),
            },
            "base_model": training.base_model.name,
            "base_model_fingerprint": training.base_model.fingerprint,
            "trainable_parameters": trainable_parameter_count(unet, training.text_encoders),
            "steps": training.step,
            "final_loss": loss,
            "seed": config.train.seed,
            "processes": training.accelerator.num_processes,
            "seconds": seconds,
            **prior,
        },
    )
    write_run_card(output)


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
