"""Prior preservation (DreamBooth, Ruiz et al. 2023): images of the subject's class trained beside
its photos, so the class itself keeps its look while the token learns the subject.

Class images come from `--class-data-dir`. When it holds fewer than `--num-class-images`, the base
model renders the shortfall as generated-NNNNN.png, image N from seed N with the evaluation
sampler, into that folder, or (without one) into a cache folder keyed by everything that shapes
the images: model, VAE, prompt, resolution, precision and sampler. A later run reuses them and
renders none; an interrupted one renders only what is missing. Under `accelerate launch` each
process renders the images whose index modulo the process count is its rank, then all wait, so
each image is rendered once and identically whatever the process count.

Each micro-batch draws as many class rows as instance rows, from the loop's one seeded generator
(so a checkpoint's generator state is all the class sampling needs to resume), and the two go
through the UNet in one call; the loss is the instance MSE + prior_loss_weight x the class MSE.
With aspect-ratio buckets the class images are cut to each bucket of the photos, and the class
rows come from the instance rows' bucket.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_dreambooth.batches import CachedExamples, bucket_size, cache_examples, prepare_examples
from sparse_dreambooth.config import TrainConfig
from sparse_dreambooth.data import image_files
from sparse_dreambooth.data.captions import fill_placeholders
from sparse_dreambooth.data.images import upright_rgb
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_path, cache_dir, write_json
from sparse_dreambooth.model import evaluation_scheduler

DEFAULT_CLASS_PROMPT = "a {class}"
GENERATED = re.compile(r"^generated-(\d+)\.png$")
# The sampler of evaluation images (model.evaluation_scheduler): DPM-Solver++ order 2.
SAMPLING_STEPS = 30
GUIDANCE = 7.5
CACHE_FOLDER = "class-images"
IDENTITY_FILE = "class_images.json"


def generated_name(index: int) -> str:
    return f"generated-{index:05d}.png"


@dataclass(frozen=True)
class ClassImages:
    """Where a run's class images are, which it trains on, and which must still be rendered."""

    folder: Path
    prompt: str
    paths: tuple[Path, ...]  # the class images trained on, in order: the folder's own, then generated ones
    missing: tuple[int, ...]  # indices of generated images not on disk yet
    identity: dict  # what shapes a generated image


def class_prompt(config: TrainConfig, class_name: str) -> str:
    template = config.data.class_prompt or DEFAULT_CLASS_PROMPT
    return fill_placeholders(template, config.data.token, class_name)


def plan_class_images(config: TrainConfig, class_name: str, base_model: str) -> ClassImages:
    """The class images a run trains on, checked before any model loads.

    The folder's own images (not generated-N.png) come first, sorted, up to --num-class-images;
    generated-0, -1, ... fill the rest. Every own image is decoded now, so a broken one fails early.

    Raises:
        UserError: --class-data-dir is a file, cannot be created, or holds an unreadable image.
    """
    data, model = config.data, config.model
    prompt = class_prompt(config, class_name)
    identity = {
        "model": base_model,
        "vae": model.vae,
        "variant": model.variant,
        "prompt": prompt,
        "resolution": data.resolution,
        "mixed_precision": config.train.mixed_precision,
        "sampler": f"dpmsolver++ order 2, {SAMPLING_STEPS} steps, guidance {GUIDANCE}, seed = image index",
    }
    if data.class_data_dir is not None:
        folder = Path(data.class_data_dir)
    else:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_dir() / CACHE_FOLDER / key
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--class-data-dir {folder} is a file, not a folder; name a folder of class images")
    own = [path for path in image_files(folder) if not GENERATED.match(path.name)][: data.num_class_images]
    generated = [folder / generated_name(index) for index in range(data.num_class_images - len(own))]
    missing = tuple(index for index, path in enumerate(generated) if not path.is_file())
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the class image folder {folder}: {error.strerror or error}") from None
    for path in own:
        upright_rgb(path)
    return ClassImages(folder, prompt, tuple(own + generated), missing, identity)


@torch.no_grad()
def render_missing(
    pipe, class_images: ClassImages, resolution: int, accelerator, stop_requested: Callable[[], bool]
) -> bool:
    """Render the missing class images, each from its own seed and written atomically; False if
    `stop_requested` (asked of every process together) ended it early, keeping those on disk.

    In round r the process of rank k renders image r * processes + k if it is missing, so each
    image is rendered once; every process runs the same rounds, as `stop_requested` needs.
    """
    from diffusers import StableDiffusionXLPipeline
    from tqdm.auto import tqdm

    rank, processes = accelerator.process_index, accelerator.num_processes
    missing = set(class_images.missing)
    if missing and accelerator.is_main_process:
        write_json(class_images.folder / IDENTITY_FILE, class_images.identity)
    scheduler = evaluation_scheduler(pipe.scheduler.config)
    renderer = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler})
    renderer.set_progress_bar_config(disable=True)
    rounds = range(0, len(class_images.paths), processes)  # the generated indices are fewer than the paths
    mine = sum(start + rank in missing for start in rounds)
    with tqdm(
        total=mine, desc="class images", unit="image", disable=not (missing and accelerator.is_main_process)
    ) as bar:
        for start in rounds:
            index = start + rank
            if index in missing:
                with accelerator.autocast():  # the frozen UNet in the compute dtype, the VAE in fp32
                    image = renderer(
                        class_images.prompt,
                        num_inference_steps=SAMPLING_STEPS,
                        guidance_scale=GUIDANCE,
                        height=resolution,
                        width=resolution,
                        generator=torch.Generator().manual_seed(index),
                    ).images[0]
                with atomic_path(class_images.folder / generated_name(index)) as tmp:
                    image.save(tmp, format="PNG")
                bar.update(1)
            if stop_requested():
                return False
    accelerator.wait_for_everyone()
    return True


def class_examples(
    pipe, class_images: ClassImages, config: TrainConfig, device, first_index: int, photos: list[CachedExamples]
) -> list[CachedExamples]:
    """The class images (all on disk) cached as training examples of the class prompt, one
    `CachedExamples` per bucket of the `photos`, in their order.

    Without buckets that is one, cut as the photos are. With buckets every class image is cut to
    each bucket the photos use, so a micro-batch's class rows have its instance rows' size and
    one UNet call still takes both. `first_index` numbers them after the instance photos, so
    their random crops differ.
    """
    prompts = [class_images.prompt] * len(class_images.paths)
    if not config.data.buckets:
        examples = prepare_examples(class_images.paths, prompts, config, first_index=first_index)
        return cache_examples(pipe, examples, device, config.data.latent_cache)
    per_bucket = []
    with warnings.catch_warnings():
        # A square render covers a non-square bucket only upscaled (by its long side / resolution,
        # 1.3x for 1344x768 at 1024): expected of every class image, so not warned about each time.
        warnings.filterwarnings("ignore", message=".* it is upscaled", category=UserWarning)
        for size in map(bucket_size, photos):
            examples = prepare_examples(class_images.paths, prompts, config, first_index, sizes=[size])
            per_bucket += cache_examples(pipe, examples, device, config.data.latent_cache)
    return per_bucket


def instance_and_prior_loss(terms: torch.Tensor, instance_rows: int, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's loss from each element's (weighted) error `terms` (losses.loss_terms): the mean
    over the first `instance_rows` rows, plus `prior_loss_weight` x the mean over the class rows
    after them, each a mean over its own rows (as diffusers' script).

    With no class rows it is the plain mean over the instance rows.
    """
    instance = terms[:instance_rows].mean()
    if instance_rows == len(terms):
        return instance
    return instance + prior_loss_weight * terms[instance_rows:].mean()
