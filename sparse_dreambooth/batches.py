"""What the training loop trains on: every training image encoded once, and the noisy batches
drawn from those.

Every (image, flip) variant is decoded up front (a broken file fails before any model loads),
VAE-encoded once into its latent distribution (or read from the latent cache on disk), and kept
with its SDXL time ids and its prompt's embeddings (each distinct prompt encoded once). Each
micro-batch then samples latents from those distributions and noises them as DDPM's forward
process does, from the one seeded generator the loop holds.

With aspect-ratio buckets the examples are kept per bucket (one latent size each), and each
micro-batch first picks its bucket: a batch holds one bucket.
"""

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from sparse_dreambooth.config import TrainConfig
from sparse_dreambooth.data import PreparedImage, prepare_image
from sparse_dreambooth.data.buckets import bucket_sizes
from sparse_dreambooth.latent_cache import LatentCache, encode_latents
from sparse_dreambooth.model import add_time_ids, encode_prompts


@dataclass
class CachedExamples:
    """Every (image, flip) variant of one bucket as a VAE latent distribution, its time ids, and its prompt."""

    latent_mean: torch.Tensor  # (N, 4, h, w)
    latent_std: torch.Tensor  # (N, 4, h, w)
    time_ids: torch.Tensor  # (N, 6)
    prompt_embeds: torch.Tensor  # (P, 77, D) one row per distinct prompt
    pooled_embeds: torch.Tensor  # (P, D2)
    prompt_index: torch.Tensor  # (N,) each example's row of the prompt embeddings
    prompts: list[str] | None = None  # (P,) the prompt of each row, for encoders that train (text_encoders.py)


def prepare_examples(
    paths: Sequence[Path],
    prompts: Sequence[str],
    config: TrainConfig,
    first_index: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Iterator[tuple[PreparedImage, str]]:
    """Every (image, flip) variant decoded, with its image's prompt.

    Image `i` crops with its own seeded RNG, numbered from `first_index` so the class images
    (numbered after the instance photos) draw other crops than the photos. Each is cut to the one
    of `sizes` nearest its aspect ratio; by default SDXL's buckets with --buckets, else the square.
    """
    if sizes is None and config.data.buckets:
        sizes = bucket_sizes(config.data.resolution)
    flips = (False, True) if config.data.random_flip else (False,)
    for index, (path, prompt) in enumerate(zip(paths, prompts, strict=True), start=first_index):
        for flip in flips:
            image = prepare_image(
                path,
                config.data.resolution,
                flip=flip,
                center_crop=config.data.center_crop,
                rng=random.Random(config.train.seed * 1000 + index),
                buckets=sizes,
            )
            yield image, prompt


@torch.no_grad()
def cache_examples(
    pipe, examples: Iterable[tuple[PreparedImage, str]], device: torch.device, latent_cache: str | None = None
) -> list[CachedExamples]:
    """VAE latents and time ids of each example, and the embeddings of each distinct prompt, one
    `CachedExamples` per bucket (target size) in the order the buckets first occur.

    `examples` is consumed once, so a generator keeps only one decoded image in memory. With
    `latent_cache` (a folder) the latents are read from it where present and stored where not.
    """
    cache = LatentCache(Path(latent_cache), pipe.vae, device) if latent_cache is not None else None
    buckets: dict[tuple[int, int], dict[str, list]] = {}
    prompt_rows: dict[str, int] = {}
    for image, prompt in examples:
        bucket = buckets.setdefault(image.target_size, {"means": [], "stds": [], "time_ids": [], "prompts": []})
        mean, std = encode_latents(pipe.vae, image.pixels, device, cache)
        bucket["means"].append(mean)
        bucket["stds"].append(std)
        bucket["time_ids"].append(add_time_ids(image.original_size, image.crop_top_left, image.target_size))
        bucket["prompts"].append(prompt_rows.setdefault(prompt, len(prompt_rows)))
    encoders = ([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    # One prompt at a time: each example's embeddings are exactly what encoding its prompt alone gives.
    embeds, pooled = zip(*(encode_prompts(*encoders, [prompt]) for prompt in prompt_rows), strict=True)
    embeds, pooled = torch.cat(embeds).float().cpu(), torch.cat(pooled).float().cpu()
    return [
        CachedExamples(
            torch.cat(bucket["means"]),
            torch.cat(bucket["stds"]),
            torch.stack(bucket["time_ids"]),
            embeds,
            pooled,
            torch.tensor(bucket["prompts"], dtype=torch.long),
            list(prompt_rows),  # every bucket indexes the one table of prompts
        )
        for bucket in buckets.values()
    ]


def pick_bucket(buckets: Sequence[CachedExamples], generator: torch.Generator) -> int:
    """The index of the next batch's bucket: that of an example drawn uniformly from all of them,
    so each example is as likely as without buckets. With one bucket nothing is drawn, so a run
    without buckets draws exactly what it always did."""
    if len(buckets) == 1:
        return 0
    sizes = torch.tensor([len(bucket.time_ids) for bucket in buckets])
    example = torch.randint(int(sizes.sum()), (1,), generator=generator)
    return int(torch.searchsorted(sizes.cumsum(0), example, right=True))


def bucket_size(examples: CachedExamples) -> tuple[int, int]:
    """The (height, width) a bucket's images were cut to: the target size in their time ids."""
    height, width = examples.time_ids[0, 4:].tolist()
    return int(height), int(width)


@dataclass
class NoisyBatch:
    """One micro-batch of this process: which examples, the UNet's inputs, and its target."""

    index: torch.Tensor  # (b,) rows of the cached examples
    timesteps: torch.Tensor  # (b,)
    noisy: torch.Tensor  # (b, 4, h, w) latents with noise added at `timesteps`
    target: torch.Tensor  # (b, 4, h, w) what the UNet should predict: the noise, or v
    prompt_embeds: torch.Tensor  # (b, 77, D) each row's prompt
    pooled_embeds: torch.Tensor  # (b, D2)
    time_ids: torch.Tensor  # (b, 6)


def joined(first: NoisyBatch, second: NoisyBatch) -> NoisyBatch:
    """Two batches as one UNet call, `first`'s rows first (DreamBooth's instance + class rows);
    `index` then names rows of each batch's own examples."""
    return NoisyBatch(*(torch.cat([getattr(first, part.name), getattr(second, part.name)]) for part in fields(first)))


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
    (epsilon prediction) or v = sqrt(a_t) e - sqrt(1 - a_t) x_0 (v-prediction); each row carries
    its example's prompt embeddings and time ids. Pure: no model.

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
    prompt = examples.prompt_index[index]
    return NoisyBatch(
        index,
        timesteps,
        noisy,
        target,
        examples.prompt_embeds[prompt],
        examples.pooled_embeds[prompt],
        examples.time_ids[index],
    )
