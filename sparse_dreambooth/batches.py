"""What the training loop trains on: every training image encoded once, and the noisy batches
drawn from those.

Every (image, flip) variant is decoded up front (a broken file fails before any model loads),
VAE-encoded once into its latent distribution, and kept with its SDXL time ids and the prompt's
embeddings. Each micro-batch then samples latents from those distributions and noises them as
DDPM's forward process does, from the one seeded generator the loop holds.
"""

import random
from dataclasses import dataclass

import torch

from sparse_dreambooth.config import TrainConfig
from sparse_dreambooth.data import PreparedImage, Subject, prepare_image
from sparse_dreambooth.model import add_time_ids, encode_prompts


@dataclass
class CachedExamples:
    """Every (image, flip) variant as a VAE latent distribution, its time ids, and the prompt."""

    latent_mean: torch.Tensor  # (N, 4, h, w)
    latent_std: torch.Tensor  # (N, 4, h, w)
    time_ids: torch.Tensor  # (N, 6)
    prompt_embeds: torch.Tensor  # (1, 77, D)
    pooled_embeds: torch.Tensor  # (1, D2)


def prepare_images(subject: Subject, config: TrainConfig) -> list[PreparedImage]:
    """Decode every (image, flip) variant up front, so a broken file fails before models load."""
    flips = (False, True) if config.data.random_flip else (False,)
    return [
        prepare_image(
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
def cache_examples(pipe, images: list[PreparedImage], prompt: str, device: torch.device) -> CachedExamples:
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


@dataclass
class NoisyBatch:
    """One micro-batch of this process: which examples, their timesteps, the UNet input and target."""

    index: torch.Tensor  # (b,) rows of the cached examples
    timesteps: torch.Tensor  # (b,)
    noisy: torch.Tensor  # (b, 4, h, w) latents with noise added at `timesteps`
    target: torch.Tensor  # (b, 4, h, w) what the UNet should predict: the noise, or v


def noisy_batch(
    examples: CachedExamples,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    scaling_factor: float,
    generator: torch.Generator,
    global_batch: int,
    mine: slice,
    noise_offset: float = 0.0,
) -> NoisyBatch:
    """Draw a global batch from `generator` and return this process's slice of it, noised.

    Every process draws the same global batch (so the generator stays in step everywhere) and
    keeps rows `mine`. The latent is sampled from each image's cached VAE distribution, then
    noised as DDPM's forward process: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e, and the target is e
    (epsilon prediction) or v = sqrt(a_t) e - sqrt(1 - a_t) x_0 (v-prediction). Pure: no model.

    A noise offset adds `noise_offset` x N(0, 1) per image and channel to e (a constant over the
    image), so the model can also learn to shift an image's mean brightness. Its draw comes last,
    and only when it is on, so the other draws are the same with it and without it.
    """
    latent_shape = (global_batch, *examples.latent_mean.shape[1:])
    index = torch.randint(len(examples.time_ids), (global_batch,), generator=generator)[mine]
    latent_noise = torch.randn(latent_shape, generator=generator)[mine]
    noise = torch.randn(latent_shape, generator=generator)[mine]
    timesteps = torch.randint(0, len(alphas_cumprod), (global_batch,), generator=generator)[mine]
    if noise_offset:
        channels = (global_batch, latent_shape[1], 1, 1)
        noise = noise + noise_offset * torch.randn(channels, generator=generator)[mine]
    latents = (examples.latent_mean[index] + examples.latent_std[index] * latent_noise) * scaling_factor
    alpha_bar = alphas_cumprod.to(latents.dtype)[timesteps].view(-1, 1, 1, 1)
    signal_scale, noise_scale = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    noisy = signal_scale * latents + noise_scale * noise
    target = signal_scale * noise - noise_scale * latents if prediction_type == "v_prediction" else noise
    return NoisyBatch(index, timesteps, noisy, target)
