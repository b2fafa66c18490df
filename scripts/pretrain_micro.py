"""Pretrain the micro SDXL (`--model micro`) on the micro world and write the weights the package ships.

    python scripts/pretrain_micro.py --work-dir /tmp/micro-pretrain

Phases, each printing its progress and saving checkpoints into --work-dir, so an interrupted run
resumes where it stopped (rerun the same command):
  1. render the training scenes (the micro world is procedural: nothing is downloaded);
  2. train the VAE on 32 px crops of them (it is convolutional, so crops teach it at a quarter of the
     cost) with their colour channels shuffled, then round it to fp16, as it ships;
  3. encode every scene once (posterior mean and std) and measure the latent scaling factor;
  4. train the UNet (and both text encoders with it) on those latents with SDXL's noise schedule
     and conditioning, 10 % of captions dropped to zero embeddings (what the pipeline feeds for
     "no prompt") so classifier-free guidance works; half the captions start "a photo of", half
     are in the prompt lists' bare form;
  5. write sparse_dreambooth/micro/<weights file> (fp16: the EMA of the UNet and text
     encoders, the VAE) and print its sha256, which goes into sparse_dreambooth/micro/model.py.

Deterministic: every random choice comes from a seed and the step number, torch runs one thread, so
the same command on the same machine writes the same bytes (resumed or not).
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: one thread, one reduction order

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparse_dreambooth.files import write_safetensors
from sparse_dreambooth.micro import model as micro
from sparse_dreambooth.micro import world
from sparse_dreambooth.model import add_time_ids, encode_prompts

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Plan:
    seed: int = 0
    scenes: int = 24000
    # v1 stopped at 2600 steps, before the VAE learns colour (its loss falls from 0.24 to 0.15
    # between steps 2000 and 3000 of one cosine cycle): it reconstructed the subjects' teal as blue.
    vae_steps: int = 8000
    vae_batch: int = 8
    vae_crop: int = 32
    vae_lr: float = 1.5e-3
    unet_steps: int = 8000
    unet_batch: int = 16
    unet_lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 500


QUICK_PLAN = Plan(scenes=256, vae_steps=20, unet_steps=30, warmup_steps=5, checkpoint_every=10)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_000_019 + step)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a module, its optimizer's state and the step, in one safetensors file.


def save_checkpoint(path: Path, step: int, modules: dict, optimizer: torch.optim.Optimizer) -> None:
    tensors = {
        f"{name}.{key}": value.detach().clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous().clone()
    write_safetensors(path, tensors, metadata={"step": str(step)})


def load_checkpoint(path: Path, modules: dict, optimizer: torch.optim.Optimizer) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, field = key.split(".")
            state["state"].setdefault(int(index), {})[field] = value
    optimizer.load_state_dict(state)
    with safe_open(path, "pt") as handle:
        return int(handle.metadata()["step"])


def round_to_fp16(module: torch.nn.Module) -> None:
    """Make the fp32 weights exactly what the fp16 file will hold, so training sees the shipped model."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())


# ---------------------------------------------------------------------------------------------
# Phases


def render_scenes(scenes: list[world.Scene]) -> np.ndarray:
    """The scenes as uint8 images, N x 64 x 64 x 3."""
    images = np.empty((len(scenes), world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    for index, scene in enumerate(scenes):
        images[index] = np.asarray(world.render(scene))
        if (index + 1) % 4000 == 0:
            log(f"render: {index + 1}/{len(scenes)} scenes")
    return images


CHANNEL_ORDERS = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(plan: Plan, vae, images: np.ndarray, work: Path) -> None:
    final = work / "vae.safetensors"
    if final.is_file():
        vae.load_state_dict(_load_prefixed(final, "vae"))
        log("vae: trained already (work dir)")
        return
    if not (work / "vae-checkpoint.safetensors").is_file():
        # Start with a narrow posterior (std ~0.05): the default (std 1) buries the latents in noise
        # and a short training never gets the decoder past blur. The tiny KL term keeps it honest.
        with torch.no_grad():
            vae.encoder.conv_out.bias[vae.config.latent_channels :] = -6.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    checkpoint = work / "vae-checkpoint.safetensors"
    start = load_checkpoint(checkpoint, {"vae": vae}, optimizer) if checkpoint.is_file() else 0
    vae.train()
    started, running = time.perf_counter(), None
    size, crop = world.IMAGE_SIZE, plan.vae_crop
    for step in range(start, plan.vae_steps):
        generator = step_generator(plan.seed, 1, step)
        index = torch.randint(0, len(images), (plan.vae_batch,), generator=generator)
        corner = torch.randint(0, size - crop + 1, (plan.vae_batch, 2), generator=generator)
        # Each crop's colour channels in a random order: the world's palettes leave most hues unseen
        # (no teal, lilac or pink figures), and a VAE that never saw a hue pulls it onto one it knows.
        order = torch.randint(0, len(CHANNEL_ORDERS), (plan.vae_batch,), generator=generator)
        pixels = torch.stack(
            [
                to_pixels(images[i : i + 1])[0, CHANNEL_ORDERS[o], top : top + crop, left : left + crop]
                for i, (top, left), o in zip(index.tolist(), corner.tolist(), order.tolist(), strict=True)
            ]
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, plan.vae_steps, plan.vae_lr, plan.warmup_steps // 2)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        error = reconstruction - pixels
        # L1 + L2 on pixels, L1 on their horizontal and vertical differences (keeps edges sharp), and
        # the small KL term that keeps the latents near a unit Gaussian's scale, as SD's VAE has.
        edges = (error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()) / 2
        loss = error.abs().mean() + error.pow(2).mean() + edges + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step + 1
        if done % 25 == 0 or done == plan.vae_steps:
            _progress("vae", done, plan.vae_steps, start, started, running)
        if done % plan.checkpoint_every == 0 and done < plan.vae_steps:
            save_checkpoint(checkpoint, done, {"vae": vae}, optimizer)
    vae.eval()
    round_to_fp16(vae)
    write_safetensors(final, {f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()})
    checkpoint.unlink(missing_ok=True)


def encode_scenes(plan: Plan, vae, images: np.ndarray, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    path = work / "latents.safetensors"
    if path.is_file():
        tensors = load_file(path)
        log("encode: latents cached (work dir)")
        return tensors["mean"], tensors["std"]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            posterior = vae.encode(to_pixels(images[start : start + 64])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            if (start // 64 + 1) % 50 == 0:
                log(f"encode: {start + 64}/{len(images)} scenes")
    mean, std = torch.cat(means), torch.cat(stds)
    write_safetensors(path, {"mean": mean.contiguous(), "std": std.contiguous()})
    return mean, std


def reconstruction_error(vae, images: np.ndarray) -> float:
    with torch.no_grad():
        pixels = to_pixels(images[:64])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return float((decoded - pixels).abs().mean() * 127.5)


def train_unet(plan: Plan, pipe, latent_mean, latent_std, scaling_factor, captions, work: Path) -> dict:
    """Train the UNet and both text encoders together; return their exponential moving averages.

    The text encoders are trained too: frozen at their random initialisation (token embeddings of
    std 0.02) they hand the UNet prompts it learned to ignore within a 2000-step budget.
    """
    from diffusers import DDPMScheduler

    trained = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    averages = {name: copy.deepcopy(module).requires_grad_(False) for name, module in trained.items()}
    final = work / "unet.safetensors"
    if final.is_file():
        for name, average in averages.items():
            average.load_state_dict(_load_prefixed(final, f"ema_{name}"))
        log("unet: trained already (work dir)")
        return averages
    unet = pipe.unet
    parameters = [p for module in trained.values() for p in module.requires_grad_(True).parameters()]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    optimizer = torch.optim.AdamW(parameters, lr=plan.unet_lr, weight_decay=0.01)
    checkpoint = work / "unet-checkpoint.safetensors"
    modules = {**trained, **{f"ema_{name}": average for name, average in averages.items()}}
    start = load_checkpoint(checkpoint, modules, optimizer) if checkpoint.is_file() else 0
    tokenizers, text_encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    size = world.IMAGE_SIZE
    time_ids = add_time_ids((size, size), (0, 0), (size, size)).repeat(plan.unet_batch, 1)
    photo_captions, bare_captions = captions
    count = len(photo_captions)
    for module in trained.values():
        module.train()
    started, running = time.perf_counter(), None
    for step in range(start, plan.unet_steps):
        generator = step_generator(plan.seed, 2, step)
        # Each epoch visits every scene once, in an order fixed by the seed and the epoch.
        epoch, offset = divmod(step * plan.unet_batch, count)
        order = np.random.default_rng([plan.seed, epoch]).permutation(count)
        index = torch.from_numpy(np.resize(np.roll(order, -offset), plan.unet_batch))
        choice = torch.rand(plan.unet_batch, generator=generator)
        prompts = [
            photo_captions[i] if c < 0.5 else bare_captions[i]
            for i, c in zip(index.tolist(), choice.tolist(), strict=True)
        ]
        # encode_prompts without its no_grad: the same computation, with gradients into the encoders.
        prompt_embeds, pooled = encode_prompts.__wrapped__(tokenizers, text_encoders, prompts)
        keep = (torch.rand(plan.unet_batch, generator=generator) >= plan.caption_dropout).float()
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]
        noise_sample = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise_sample) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (plan.unet_batch,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, plan.unet_steps, plan.unet_lr, plan.warmup_steps)
        prediction = unet(
            noisy, timesteps, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        # Min-SNR weighting (Hang et al. 2023) for epsilon prediction: the easy, low-noise steps do
        # not dominate, which speeds up training a lot when samples are few.
        weight = torch.clamp(snr[timesteps], max=plan.min_snr_gamma) / snr[timesteps]
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(plan.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in trained.items():
                for average, parameter in zip(averages[name].parameters(), module.parameters(), strict=True):
                    average.lerp_(parameter, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        if done % 50 == 0 or done == plan.unet_steps:
            _progress("unet", done, plan.unet_steps, start, started, running)
        if done % plan.checkpoint_every == 0 and done < plan.unet_steps:
            save_checkpoint(checkpoint, done, modules, optimizer)
    tensors = {
        f"ema_{n}.{k}": v.contiguous() for n, average in averages.items() for k, v in average.state_dict().items()
    }
    write_safetensors(final, tensors)
    checkpoint.unlink(missing_ok=True)
    return averages


def _load_prefixed(path: Path, name: str) -> dict:
    from safetensors.torch import load_file

    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}


def _progress(phase: str, done: int, total: int, start: int, started: float, loss: float) -> None:
    elapsed = time.perf_counter() - started
    per_step = elapsed / max(1, done - start)
    eta = per_step * (total - done) / 60
    log(f"{phase}: step {done}/{total}  loss {loss:.4f}  {per_step:.2f} s/step  eta {eta:.1f} min")


def export(pipe, averages: dict, scaling_factor: float, plan: Plan, output: Path, timings: dict) -> str:
    modules = {"vae": pipe.vae, **averages}
    tensors = {
        f"{name}.{key}": value.detach().half().contiguous()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    metadata = {
        "version": micro.MICRO_MODEL_VERSION,
        "vocabulary_sha256": micro.vocabulary_sha256(),
        "vae_scaling_factor": repr(scaling_factor),
        "plan": json.dumps(dataclasses.asdict(plan), sort_keys=True),
        "torch": torch.__version__,
    }
    write_safetensors(output, tensors, metadata=metadata)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    sizes = {name: sum(v.numel() for v in module.state_dict().values()) for name, module in modules.items()}
    log(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB); parameters: {sizes}")
    log(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return digest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints and caches; rerun to resume")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "sparse_dreambooth" / "micro" / micro.WEIGHTS_FILE)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny plan that checks the script end to end in a minute"
    )
    args = parser.parse_args(argv)
    plan = QUICK_PLAN if args.quick else Plan()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    plan_file = args.work_dir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != dataclasses.asdict(plan):
        sys.exit(f"{plan_file} records another plan; use a fresh --work-dir")
    plan_file.write_text(json.dumps(dataclasses.asdict(plan), indent=2) + "\n")
    log(f"plan: {dataclasses.asdict(plan)}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    timings, mark = {}, time.perf_counter()
    scenes = list(world.scenes(plan.seed, plan.scenes))
    # Captions with "a photo of", and in the prompt lists' bare form ("a dog on the beach").
    photo_captions = [world.caption(scene) for scene in scenes]
    bare_captions = [text.removeprefix("a photo of ") for text in photo_captions]
    # Once the scenes are encoded, a resumed run needs only their captions.
    images = None if (args.work_dir / "latents.safetensors").is_file() else render_scenes(scenes)
    timings["render"], mark = time.perf_counter() - mark, time.perf_counter()

    pipe = micro.build_micro_pipeline(seed=plan.seed)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        round_to_fp16(encoder)
        encoder.requires_grad_(False).eval()
    train_vae(plan, pipe.vae, images, args.work_dir)
    pipe.vae.requires_grad_(False).eval()
    if images is not None:
        log(f"vae: mean absolute reconstruction error {reconstruction_error(pipe.vae, images):.2f} / 255")
    timings["vae"], mark = time.perf_counter() - mark, time.perf_counter()

    latent_mean, latent_std = encode_scenes(plan, pipe.vae, images, args.work_dir)
    scaling_factor = float(1.0 / latent_mean.std())
    log(f"encode: latent std {latent_mean.std():.4f} -> scaling factor {scaling_factor:.5f}")
    timings["encode"], mark = time.perf_counter() - mark, time.perf_counter()

    averages = train_unet(
        plan, pipe, latent_mean, latent_std, scaling_factor, (photo_captions, bare_captions), args.work_dir
    )
    timings["unet"] = time.perf_counter() - mark
    digest = export(pipe, averages, scaling_factor, plan, args.output, timings)
    log(f"load average {os.getloadavg()[0]:.2f}; sha256 {digest}")
    print(f'set WEIGHTS_SHA256 = "{digest}" in sparse_dreambooth/micro/model.py')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
