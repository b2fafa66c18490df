"""DreamBooth training of an adapter on the SDXL UNet, read top to bottom.

    sparse-db train --subject dog6 --method waveft                    # one GPU
    accelerate launch -m sparse_dreambooth train --config ...        # several

Order of events: check the input and the run folder (before any model loads), load SDXL, cache
the VAE latents and text embeddings once, attach the adapter to the UNet, then one loop of
optimizer steps with gradient accumulation, checkpoints and logs, and finally adapter.safetensors
and run.json. Every random draw of the loop comes from one seeded generator that every process
holds identically (each takes its own slice of a global batch), so a run is reproducible and its
generator state fits in a checkpoint.
"""

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from sparse_dreambooth import __version__, data
from sparse_dreambooth.adapters import attach, load_adapter, save_adapter, trainable_parameter_count
from sparse_dreambooth.config import TrainConfig, dump_yaml, load_config
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_path, write_json, write_safetensors, write_text
from sparse_dreambooth.model import add_time_ids, encode_prompts, evaluation_scheduler, load_pipeline, model_identity

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# Settings that may change when a run is resumed: they do not change what was computed so far.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "checkpoints_kept", "validate_every", "validation_prompt"}


def resolve_subject(config: TrainConfig) -> data.Subject:
    settings = config.data
    return data.find_subject(settings.subject, settings.data_root, settings.instance_dir, settings.class_name)


# --- run folder and checkpoints ----------------------------------------------------------------


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still a temp dir)."""
    return sorted((output / CHECKPOINTS).glob("step-*"), key=lambda path: int(path.name.split("-")[1]))


def resolve_resume(output: Path, resume: str | None) -> Path | None:
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
    output = config.output_dir
    if resume is not None:
        saved = load_config(output / CONFIG_FILE) if (output / CONFIG_FILE).is_file() else None
        if saved is not None:
            changed = [
                f"{section}.{key}"
                for section, values in config.to_dict().items()
                for key, value in values.items()
                if key not in RESUMABLE_CHANGES and saved.to_dict()[section][key] != value
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


def save_checkpoint(
    path: Path, unet, adapter_config, base_model, optimizer, scheduler, generator, step, scaler
) -> None:
    """Adapter, optimizer, scheduler, generator and step, as safetensors + JSON; no pickles.

    Written into a temp folder and renamed, so a crash mid-write leaves the previous checkpoint.
    """
    optimizer_state = optimizer.state_dict()
    tensors = {"generator": generator.get_state()}
    scalars = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    staging = path.parent / f".{path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(unet, staging / ADAPTER_FILE, adapter_config, base_model=base_model)
    write_safetensors(staging / "training_state.safetensors", tensors)
    write_json(staging / "training_state.json", meta)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def load_checkpoint(path: Path, optimizer, scheduler, generator, scaler) -> int:
    """Restore what `save_checkpoint` wrote (the adapter is loaded separately); return the step."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "training_state.safetensors"))
        meta = json.loads((path / "training_state.json").read_text())
    except (OSError, SafetensorError, ValueError) as error:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({error}); resume from an earlier one") from None
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["optimizer_scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    generator.set_state(tensors["generator"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return meta["step"]


# --- guards: early checks, one run per folder, signals --------------------------------------------


def check_adapter_fits(config: TrainConfig) -> None:
    """Fail on a budget the model's layers cannot hold, from the UNet config alone (no weights)."""
    from sparse_dreambooth.adapters.budget import lora_ranks, sparse_budgets
    from sparse_dreambooth.adapters.layer import target_linears
    from sparse_dreambooth.model import unet_skeleton

    skeleton = unet_skeleton(config.model.model, config.model.revision)
    if skeleton is None:
        return  # single-file checkpoints: checked when the adapter is attached
    linears = target_linears(skeleton, config.adapter.targets)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    (lora_ranks if config.adapter.method == "lora" else sparse_budgets)(config.adapter, shapes)


@contextlib.contextmanager
def run_lock(output: Path):
    """Hold output/.lock for the run: a second run on the same folder fails at once. The OS drops
    the lock when the process dies, so a killed run never leaves the folder locked."""
    import fcntl

    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".lock", "a+") as handle:
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


# --- cached training examples --------------------------------------------------------------------


@dataclass
class CachedExamples:
    """Every (image, flip) variant as a VAE latent distribution, its time ids, and the prompt."""

    latent_mean: torch.Tensor  # (N, 4, h, w)
    latent_std: torch.Tensor  # (N, 4, h, w)
    time_ids: torch.Tensor  # (N, 6)
    prompt_embeds: torch.Tensor  # (1, 77, D)
    pooled_embeds: torch.Tensor  # (1, D2)


def prepare_images(subject: data.Subject, config: TrainConfig) -> list[data.PreparedImage]:
    """Decode every (image, flip) variant up front, so a broken file fails before models load."""
    flips = (False, True) if config.data.random_flip else (False,)
    return [
        data.prepare_image(
            path,
            config.data.resolution,
            flip=flip,
            center_crop=config.data.center_crop,
            rng=random.Random(config.train.seed * 1000 + index),
        )
        for index, path in enumerate(subject.image_paths)
        for flip in flips
    ]


@torch.no_grad()
def cache_examples(pipe, images: list[data.PreparedImage], prompt: str, device) -> CachedExamples:
    means, stds = [], []
    for image in images:
        distribution = pipe.vae.encode(image.pixels[None].to(device, pipe.vae.dtype)).latent_dist
        means.append(distribution.mean.float().cpu())
        stds.append(distribution.std.float().cpu())
    time_ids = [add_time_ids(image.original_size, image.crop_top_left, image.target_size) for image in images]
    prompt_embeds, pooled = encode_prompts(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], [prompt]
    )
    return CachedExamples(
        torch.cat(means), torch.cat(stds), torch.stack(time_ids), prompt_embeds.float().cpu(), pooled.float().cpu()
    )


@torch.no_grad()
def render_validation(pipe, unet, prompt: str, config: TrainConfig, path: Path) -> None:
    """One image of the current adapter (unmerged), seeded like evaluation sampling."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = evaluation_scheduler(pipe.scheduler.config)
    validation = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler})
    validation.set_progress_bar_config(disable=True)
    unet.eval()
    image = validation(
        prompt,
        num_inference_steps=30,
        height=config.data.resolution,
        width=config.data.resolution,
        generator=torch.Generator().manual_seed(config.train.seed),
    ).images[0]
    unet.train()
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --- the run ------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train an adapter as `config` says; return the run folder.

    Everything a user can get wrong is checked before a model loads. SIGINT/SIGTERM end the run
    after the current step with a checkpoint (exit code 130/143); `resume="latest"` continues it.
    """
    from accelerate import Accelerator

    started = time.perf_counter()
    output = config.output_dir
    subject = resolve_subject(config)
    images = prepare_images(subject, config)
    resume_from = resolve_resume(output, resume)
    check_output(config, resume_from, overwrite)
    check_adapter_fits(config)

    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision, log_with="tensorboard", project_dir=str(output / "logs")
    )
    lock = run_lock(output) if accelerator.is_main_process else contextlib.nullcontext()
    with lock, StopRequests() as stop:
        return _run(config, accelerator, subject, images, resume_from, overwrite, stop, started)


def _run(config, accelerator, subject, images, resume_from, overwrite, stop, started) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    train_cfg, output = config.train, config.output_dir
    main = accelerator.is_main_process
    if main:
        if overwrite and resume_from is None:
            shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
            (output / ADAPTER_FILE).unlink(missing_ok=True)
        write_text(output / CONFIG_FILE, dump_yaml(config))
    torch.manual_seed(train_cfg.seed)

    # Frozen parts in the compute dtype; the VAE in fp32 (SDXL's VAE overflows in fp16).
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[train_cfg.mixed_precision]
    model_cfg = config.model
    pipe = load_pipeline(
        model_cfg.model,
        vae=model_cfg.vae,
        revision=model_cfg.revision,
        variant=model_cfg.variant,
        torch_dtype=weight_dtype,
    )
    base_model = model_identity(model_cfg.model, model_cfg.revision)
    device = accelerator.device
    if weight_dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.to(device)
    cache_started = time.perf_counter()
    examples = cache_examples(pipe, images, data.instance_prompt(subject, config.data.token), device)
    cache_seconds = time.perf_counter() - cache_started
    scaling_factor = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    validation_prompt = train_cfg.validation_prompt or data.evaluation_prompts(subject, config.data.token)[0]
    if not train_cfg.validate_every:
        for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            frozen.to("cpu")  # only needed again for validation images: free the accelerator's memory

    unet = pipe.unet
    if resume_from is not None:
        load_adapter(unet, resume_from / ADAPTER_FILE, base_model=base_model)
    else:
        attach(unet, config.adapter)
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=train_cfg.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.weight_decay,
        eps=train_cfg.adam_epsilon,
    )
    # Stepped by hand once per optimizer step, so its length does not depend on the process count.
    lr_scheduler = get_scheduler(
        train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.steps
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, optimizer, lr_scheduler, generator, accelerator.scaler)

    def checkpoint(at_step: int) -> Path:
        path = output / CHECKPOINTS / f"step-{at_step}"
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(
                path,
                accelerator.unwrap_model(unet),
                config.adapter,
                base_model,
                optimizer,
                lr_scheduler,
                generator,
                at_step,
                accelerator.scaler,
            )
            for old in checkpoint_dirs(output)[: -train_cfg.checkpoints_kept]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return path

    if main:
        accelerator.init_trackers(
            "sparse-db",
            config={
                key: value
                for values in config.to_dict().values()
                for key, value in values.items()
                if isinstance(value, (int, float, str, bool))
            },
        )
    world, rank, batch = accelerator.num_processes, accelerator.process_index, train_cfg.batch_size
    mine = slice(rank * batch, (rank + 1) * batch)
    latent_shape = examples.latent_mean.shape[1:]
    step_seconds: list[float] = []
    last_loss = float("nan")
    with tqdm(total=train_cfg.steps, initial=step, disable=not main, desc="train", unit="step") as progress:
        while step < train_cfg.steps:
            step_started = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            for micro in range(train_cfg.grad_accum):
                # One global batch drawn identically on every process; each trains on its slice.
                global_batch = batch * world
                index = torch.randint(len(examples.time_ids), (global_batch,), generator=generator)[mine]
                latent_noise = torch.randn((global_batch, *latent_shape), generator=generator)[mine]
                noise = torch.randn((global_batch, *latent_shape), generator=generator)[mine]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (global_batch,), generator=generator
                )[mine]
                latents = (examples.latent_mean[index] + examples.latent_std[index] * latent_noise) * scaling_factor
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                last_micro = micro == train_cfg.grad_accum - 1
                with accelerator.autocast(), contextlib.nullcontext() if last_micro else accelerator.no_sync(unet):
                    prediction = unet(
                        noisy.to(device, weight_dtype),
                        timesteps.to(device),
                        examples.prompt_embeds.expand(batch, -1, -1).to(device, weight_dtype),
                        added_cond_kwargs={
                            "text_embeds": examples.pooled_embeds.expand(batch, -1).to(device, weight_dtype),
                            "time_ids": examples.time_ids[index].to(device, weight_dtype),
                        },
                    ).sample
                    loss = F.mse_loss(prediction.float(), target.to(device).float())
                    accelerator.backward(loss / train_cfg.grad_accum)
                step_loss += loss.detach() / train_cfg.grad_accum
            # Reduced first, so every process takes the same decision below.
            last_loss = accelerator.reduce(step_loss, reduction="mean").item()
            if not math.isfinite(last_loss):
                kept = checkpoint_dirs(output)
                raise UserError(
                    f"the loss became {last_loss} at step {step + 1}; lower --lr or use --mixed-precision bf16/no"
                    + (f"; the last good checkpoint is {kept[-1]}" if kept else "")
                )
            accelerator.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds.append(time.perf_counter() - step_started)

            accelerator.log({"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if train_cfg.validate_every and step % train_cfg.validate_every == 0:
                if main:
                    render_validation(
                        pipe,
                        accelerator.unwrap_model(unet),
                        validation_prompt,
                        config,
                        output / "validation" / f"step-{step}.png",
                    )
                accelerator.wait_for_everyone()
            stopping = (
                accelerator.reduce(
                    torch.tensor(float(stop.received is not None), device=device), reduction="sum"
                ).item()
                > 0
            )
            if stopping and step < train_cfg.steps:
                break
            if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < train_cfg.steps:
                checkpoint(step)

    if step < train_cfg.steps:  # stopped by a signal
        path = checkpoint(step)
        accelerator.end_training()
        if main:
            print(f"stopped at step {step}; checkpoint in {path}; continue with --resume latest", file=sys.stderr)
        raise SystemExit(128 + (stop.received or signal.SIGTERM))

    accelerator.wait_for_everyone()
    if main:
        adapter_unet = accelerator.unwrap_model(unet)
        save_adapter(
            adapter_unet,
            output / ADAPTER_FILE,
            config.adapter,
            base_model=base_model,
            metadata={"run_config": dump_yaml(config)},
        )
        write_json(
            output / RUN_FILE,
            {
                "sparse_dreambooth": __version__,
                "versions": _versions(),
                "subject": {
                    "name": subject.name,
                    "class": subject.class_name,
                    "kind": subject.kind,
                    "images": len(subject.image_paths),
                },
                "base_model": base_model,
                "trainable_parameters": trainable_parameter_count(adapter_unet),
                "steps": step,
                "final_loss": last_loss,
                "seed": train_cfg.seed,
                "processes": world,
                "seconds": {
                    "total": time.perf_counter() - started,
                    "caching": cache_seconds,
                    "mean_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
                },
            },
        )
    # Every rank tears the process group down together, once the main one has written: a rank that
    # leaves while another still works can hang the gloo/NCCL shutdown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"adapter written to {output / ADAPTER_FILE}")
    return output


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
