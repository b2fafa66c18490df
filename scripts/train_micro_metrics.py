"""Train the micro world's metric models and write them into the package.

    python scripts/train_micro_metrics.py            # about 10 min of CPU on one thread

Writes sparse_dreambooth/micro/weights/metric_models.safetensors (+ metric_models.json: version,
sha256) and docs/micro-metrics.md (what they measure on data they never saw). Deterministic: the
same arguments (and the same --threads, torch build and CPU) give the same weight bytes.

1. Identity encoder (the DINO stand-in): random instances of every class, each rendered several
   times under a random pose, scale, position and context. InfoNCE on two renders per instance,
   with the batch's other instances as negatives; batches hold several instances of each of a few
   classes, so some negatives differ only in appearance.
2. Dual encoder (the CLIP stand-in): world scenes and their captions, symmetric InfoNCE; scenes
   in a batch that share a caption count as positives for each other.
Both draw a share of their instances in random colours (OFF_PALETTE_FRACTION), as the micro
subjects' colours are outside the world's palettes.
Both see mild blur, noise and shifts, so that a generated image, which is never a clean render,
still embeds near the renders it resembles.
"""

import argparse
import dataclasses
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_dreambooth.files import write_text
from sparse_dreambooth.micro import world
from sparse_dreambooth.micro.metric_models import (
    INPUT_SIZE,
    METRIC_MODELS_VERSION,
    START_WORD,
    UNKNOWN_WORD,
    WEIGHTS_DIR,
    DualEncoder,
    IdentityEncoder,
    MicroMetricModels,
    caption_words,
    save_metric_models,
)
from sparse_dreambooth.micro.metric_proofs import HELD_OUT_SEED, measure

REPO = Path(__file__).resolve().parents[1]


# Scene attributes that change what the instance looks like rather than where it is: identity
# views never use them (outfits, shine and wetness stay, as the subject is still recognisable).
RECOLOURING_ATTRIBUTES = ("red", "purple", "cube shaped")
# The world's random instances take their colours from per-class palettes, and the micro subjects
# have colours outside them (a teal dog). A share of training instances get colours drawn from the
# whole RGB cube instead, so that neither encoder learns "dog" as "brown".
OFF_PALETTE_FRACTION = 0.3


@dataclass(frozen=True)
class Plan:
    seed: int = 0
    identity_instances: int = 2000  # random instances, spread evenly over the classes
    identity_views: int = 3  # renders of each
    identity_steps: int = 240
    identity_classes_per_batch: int = 4
    identity_instances_per_class: int = 16  # x 2 views x 4 classes = 128 images a step
    dual_scenes: int = 8000
    dual_steps: int = 240
    dual_batch: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    identity_temperature: float = 0.1
    dual_temperature: float = 0.07


def parse(argv=None) -> tuple[Plan, argparse.Namespace]:
    """The plan (every field is a flag: --identity-steps 100) and the other arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of what fixes the bytes)")
    parser.add_argument("--output", type=Path, default=WEIGHTS_DIR, help="folder for the weights and manifest")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "micro-metrics.md", help="markdown figures")
    args = parser.parse_args(argv)
    return Plan(**{name: getattr(args, name) for name in asdict(defaults)}), args


def main(argv=None) -> int:
    plan, args = parse(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started, started_cpu = time.perf_counter(), time.process_time()
    models = train(plan)
    training_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    provenance = {"trained_by": "scripts/train_micro_metrics.py", "plan": asdict(plan), "threads": args.threads}
    weights = save_metric_models(models, args.output, provenance)
    print(
        f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) after {training_seconds:.0f} s "
        f"({cpu_seconds:.0f} s of CPU)",
        flush=True,
    )

    figures = measure(models)
    figures["untrained"] = _untrained_figures(plan.seed)
    write_text(args.report, report(figures, plan, args.threads, (training_seconds, cpu_seconds), weights))
    print(f"wrote {args.report}", flush=True)
    print(json.dumps({key: figures[key] for key in ("identity", "clip_i", "retrieval")}, indent=1))
    return 0


def train(plan: Plan) -> MicroMetricModels:
    identity = train_identity(plan)
    dual = train_dual(plan)
    return MicroMetricModels(identity, dual)


# --- data ------------------------------------------------------------------------------------------


def _rendered(scenes: list) -> torch.Tensor:
    """uint8 (n, 3, INPUT_SIZE, INPUT_SIZE) renders; kept as bytes so 20k images fit in ~250 MB."""
    batch = []
    for scene in scenes:
        batch.append(np.asarray(world.render(scene, size=INPUT_SIZE).convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def _to_pixels(rendered: torch.Tensor) -> torch.Tensor:
    """uint8 renders -> float [-1, 1], as `metric_models.image_pixels` maps PIL images."""
    return rendered.float() / 127.5 - 1.0


def identity_instances(plan: Plan) -> tuple[list, np.ndarray]:
    """The identity encoder's random training instances, the classes taken in turn, and each one's
    class index. (Drawn from their own generator, so they can be listed without rendering.)"""
    rng = np.random.default_rng([plan.seed, 1])
    class_names = sorted(world.CLASSES)
    classes = np.arange(plan.identity_instances) % len(class_names)
    return [_maybe_off_palette(world.random_instance(class_names[index], rng), rng) for index in classes], classes


def _maybe_off_palette(instance, rng: np.random.Generator):
    """The instance, or (with probability OFF_PALETTE_FRACTION) it in uniformly random colours."""
    if rng.random() >= OFF_PALETTE_FRACTION:
        return instance
    body, accent, marking = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3))
    return dataclasses.replace(instance, body=body, accent=accent, marking_colour=marking)


def identity_views(plan: Plan) -> tuple[torch.Tensor, np.ndarray]:
    """(instances, views, 3, H, W) uint8 renders of the training instances, and their class indices."""
    instances, classes = identity_instances(plan)
    rng = np.random.default_rng([plan.seed, 4])
    scenes = []
    for instance in instances:
        for _ in range(plan.identity_views):
            scene = world.random_scene(rng, instance=instance)
            if scene.attribute in RECOLOURING_ATTRIBUTES:  # another colour or shape is not the same thing
                scene = dataclasses.replace(scene, attribute=None)
            scenes.append(scene)
    renders = _rendered(scenes)
    return renders.view(plan.identity_instances, plan.identity_views, *renders.shape[1:]), classes


def caption_pairs(plan: Plan) -> tuple[torch.Tensor, list[str]]:
    """uint8 renders of the training scenes and their captions."""
    rng = np.random.default_rng([plan.seed, 5])
    scenes = [
        dataclasses.replace(scene, instance=_maybe_off_palette(scene.instance, rng))
        for scene in world.scenes(plan.seed, plan.dual_scenes)
    ]
    return _rendered(scenes), [world.caption(scene) for scene in scenes]


def vocabulary_of(captions: list[str]) -> list[str]:
    """Every caption word, and every word of the world's class names and contexts, sorted."""
    words = {word for text in captions for word in caption_words(text)}
    words |= {word for text in [*world.CLASSES, *world.CONTEXTS] for word in caption_words(text)}
    return [UNKNOWN_WORD, START_WORD, *sorted(words)]


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a shift of up to 3 px (edges replicated), for half of them a Gaussian blur of
    sigma up to 1 px, and pixel noise of std up to 0.06 (in [-1, 1] units)."""
    n = pixels.shape[0]
    shifts = torch.randint(-3, 4, (n, 2), generator=generator)
    padded = torch.nn.functional.pad(pixels, (3, 3, 3, 3), mode="replicate")
    size = pixels.shape[-1]
    shifted = torch.stack(
        [padded[i, :, 3 + dy : 3 + dy + size, 3 + dx : 3 + dx + size] for i, (dy, dx) in enumerate(shifts.tolist())]
    )
    sigma = torch.rand(n, generator=generator) * (torch.rand(n, generator=generator) < 0.5)
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-offsets.square()[None] / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, 5); sigma ~0 gives the identity kernel
    blurred = _separable_blur(shifted, kernel)
    noise = torch.randn(shifted.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.06)
    return blurred + noise


def _separable_blur(pixels: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own 1D kernel along rows then columns (edges replicated)."""
    n, channels, height, width = pixels.shape
    weight = kernel.repeat_interleave(channels, dim=0)  # (n * c, 5)
    flat = pixels.reshape(1, n * channels, height, width)
    flat = torch.nn.functional.pad(flat, (2, 2, 0, 0), mode="replicate")
    flat = torch.nn.functional.conv2d(flat, weight[:, None, None, :], groups=n * channels)
    flat = torch.nn.functional.pad(flat, (0, 0, 2, 2), mode="replicate")
    flat = torch.nn.functional.conv2d(flat, weight[:, None, :, None], groups=n * channels)
    return flat.view(n, channels, height, width)


# --- training --------------------------------------------------------------------------------------


def _optimizer(model: torch.nn.Module, plan: Plan, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _soft_info_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's softmax against its positives, weighted equally."""
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _log(name: str, step: int, steps: int, loss: float, started: float) -> None:
    if step == 0 or (step + 1) % 40 == 0 or step + 1 == steps:
        print(f"{name} step {step + 1}/{steps} loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


def train_identity(plan: Plan) -> IdentityEncoder:
    started = time.perf_counter()
    views, classes = identity_views(plan)
    print(f"identity: rendered {views.shape[0]} x {views.shape[1]} views ({time.perf_counter() - started:.0f} s)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        model = IdentityEncoder()
    model.train()
    optimizer, schedule = _optimizer(model, plan, plan.identity_steps)
    rng = np.random.default_rng([plan.seed, 2])
    generator = torch.Generator().manual_seed(plan.seed + 2)
    by_class = [np.flatnonzero(classes == index) for index in range(classes.max() + 1)]
    for step in range(plan.identity_steps):
        chosen_classes = rng.choice(
            len(by_class), size=min(plan.identity_classes_per_batch, len(by_class)), replace=False
        )
        instances = np.concatenate(
            [rng.choice(by_class[c], size=plan.identity_instances_per_class, replace=False) for c in chosen_classes]
        )
        pair = np.stack([rng.choice(plan.identity_views, size=2, replace=False) for _ in instances])
        first, second = views[instances, pair[:, 0]], views[instances, pair[:, 1]]
        pixels = augment(_to_pixels(torch.cat([first, second])), generator)
        embeddings = torch.nn.functional.normalize(model.tower(pixels), dim=-1)
        n = len(instances)
        logits = embeddings @ embeddings.T / plan.identity_temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), -1e9)  # an image is not its own pair
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        loss = torch.nn.functional.cross_entropy(logits, partner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        _log("identity", step, plan.identity_steps, loss.item(), started)
    return model.eval()


def train_dual(plan: Plan) -> DualEncoder:
    started = time.perf_counter()
    renders, captions = caption_pairs(plan)
    vocabulary = vocabulary_of(captions)
    caption_ids = np.unique(captions, return_inverse=True)[1]
    print(
        f"dual: rendered {len(captions)} scenes, {caption_ids.max() + 1} distinct captions, "
        f"{len(vocabulary)} words ({time.perf_counter() - started:.0f} s)"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed + 1)
        model = DualEncoder(vocabulary)
    model.train()
    optimizer, schedule = _optimizer(model, plan, plan.dual_steps)
    rng = np.random.default_rng([plan.seed, 3])
    generator = torch.Generator().manual_seed(plan.seed + 3)
    for step in range(plan.dual_steps):
        batch = rng.choice(len(captions), size=plan.dual_batch, replace=False)
        pixels = augment(_to_pixels(renders[batch]), generator)
        image = torch.nn.functional.normalize(model.tower(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.text([captions[i] for i in batch]), dim=-1)
        logits = image @ text.T / plan.dual_temperature
        ids = torch.from_numpy(caption_ids[batch])
        positives = ids[:, None] == ids[None, :]  # scenes with the same caption match each other's
        loss = 0.5 * (_soft_info_nce(logits, positives) + _soft_info_nce(logits.T, positives))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        _log("dual", step, plan.dual_steps, loss.item(), started)
    return model.eval()


# --- report ----------------------------------------------------------------------------------------


def _untrained_figures(seed: int) -> dict:
    """The same figures for the same networks at their random initialisation: the floor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        models = MicroMetricModels(IdentityEncoder(), DualEncoder(vocabulary_of([])))
    return measure(models)


def report(figures: dict, plan: Plan, threads: int, seconds: tuple[float, float], weights: Path) -> str:
    identity, clip_i, lpips, found = figures["identity"], figures["clip_i"], figures["lpips"], figures["retrieval"]
    floor = figures["untrained"]
    manifest = json.loads((weights.parent / "metric_models.json").read_text())

    def pair_row(name: str, trained: dict, untrained: dict) -> str:
        return (
            f"| {name} | {trained['mean_same']:.3f} | {trained['mean_different']:.3f} | "
            f"{trained['separation']:.3f} | {trained['auc']:.3f} | {untrained['separation']:.3f} | "
            f"{untrained['auc']:.3f} |"
        )

    rows = [
        ("caption -> image top-1", "text_to_image_top1"),
        ("image -> caption top-1", "image_to_text_top1"),
        ("CLIP-T, own caption (cosine)", "clip_t_matching"),
        ("CLIP-T, other captions (cosine)", "clip_t_mismatched"),
    ]
    retrieval_rows = "\n".join(f"| {name} | {found[key]:.3f} | {floor['retrieval'][key]:.3f} |" for name, key in rows)
    return f"""# Micro metric models: what they measure

Written by `python scripts/train_micro_metrics.py` (version {METRIC_MODELS_VERSION}); rerun it to
refresh these figures. The networks are `sparse_dreambooth/micro/metric_models.py`; the figures
come from `sparse_dreambooth/micro/metric_proofs.py` on data none of the networks was trained on.

- Training: {seconds[0] / 60:.1f} min wall clock, {seconds[1] / 60:.1f} min of CPU, on {threads} torch thread(s)
  ({platform.machine()}, torch {torch.__version__}); identity encoder {plan.identity_steps} steps over
  {plan.identity_instances} random instances x {plan.identity_views} renders, dual encoder {plan.dual_steps} steps
  over {plan.dual_scenes} captioned scenes; {OFF_PALETTE_FRACTION:.0%} of instances in random colours.
- Weights: `{weights.name}`, {manifest["bytes"] / 1e6:.2f} MB, sha256 `{manifest["sha256"]}`.

## Same subject vs different subject (the micro subjects, never seen in training)

{figures["subjects"]} subjects, {figures["subject_photos"]} photos: {identity["same_pairs"]} same-subject pairs,
{identity["different_pairs"]} different-subject pairs. Cosine similarity of the embeddings; AUC is the
fraction of (same pair, different pair) combinations ordered correctly (0.5 = chance).

| encoder | mean same | mean different | separation | AUC | untrained separation | untrained AUC |
|---|---|---|---|---|---|---|
{pair_row("identity (micro-DINO)", identity, floor["identity"])}
{pair_row("dual image tower (micro-CLIP-I)", clip_i, floor["clip_i"])}

Zero-shot class of the subjects' photos (dual encoder, best of "a photo of a <class>" over the
{figures["subject_class"]["classes"]} classes): top-1 {figures["subject_class"]["top1"]:.2f}
(untrained {floor["subject_class"]["top1"]:.2f}).

Micro-LPIPS (identity encoder features, unweighted), mean distance: {lpips["near_copy"]:.3f} between a photo
and a slightly blurred copy (Gaussian, radius 0.6 px), {lpips["same_subject"]:.3f} between two photos of one
subject (another pose, scale and position), {lpips["different_subjects"]:.3f} between photos of two subjects.
It is a distance between pictures, not identities: a subject moved or rescaled is a different picture.

## Caption <-> image (held-out world scenes)

{found["scenes"]} scenes from seed {HELD_OUT_SEED} (training uses seed {plan.seed}), each with a different
caption; chance top-1 = {found["chance"]:.0%}.

| figure | trained | untrained |
|---|---|---|
{retrieval_rows}
"""


if __name__ == "__main__":
    raise SystemExit(main())
