"""Evidence that the micro metric models measure what they stand in for.

On data none of them was trained on:
- the micro subjects' photos (`subjects.MICRO_SUBJECTS`; the world's `random_instance` never
  draws them): same-subject pairs should score above different-subject pairs, for the identity
  encoder (DINO) and the dual encoder's image tower (CLIP-I);
- held-out world scenes (a seed the training never uses), each with its own caption: a caption
  should retrieve its own scene among them (CLIP-T), and score it above the other captions.

`scripts/train_micro_metrics.py` writes these figures into docs/micro-metrics.md; the tests in
tests/test_micro_metrics.py assert margins on them.
"""

import numpy as np
import torch

from sparse_dreambooth.micro import world
from sparse_dreambooth.micro.metric_models import MicroMetricModels
from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS, subject_photos

# The training script draws its scenes from seeds below this; held-out scenes come from here on.
HELD_OUT_SEED = 1_000_003
HELD_OUT_SCENES = 100


def subject_photo_set() -> tuple[list, np.ndarray]:
    """Every micro subject's photos and, per photo, the index of its subject."""
    images, labels = [], []
    for label, name in enumerate(sorted(MICRO_SUBJECTS)):
        photos = subject_photos(name)
        images.extend(photos)
        labels.extend([label] * len(photos))
    return images, np.asarray(labels)


def held_out_scenes(count: int = HELD_OUT_SCENES, seed: int = HELD_OUT_SEED) -> list:
    """The first `count` scenes of the held-out stream whose captions are all different, so a
    caption names exactly one of them (chance of retrieving it: 1/count)."""
    chosen, captions = [], set()
    for scene in world.scenes(seed, 50 * count):
        text = world.caption(scene)
        if text not in captions:
            captions.add(text)
            chosen.append(scene)
            if len(chosen) == count:
                return chosen
    raise ValueError(f"the world's held-out stream has fewer than {count} distinct captions")


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(n, m) cosine similarities between rows, in float64."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a @ b.T).numpy()


def pair_separation(embeddings: torch.Tensor, labels: np.ndarray) -> dict:
    """Same-label vs different-label pair cosines over all unordered pairs.

    Returns: mean_same, mean_different, separation (their difference), auc (the fraction of
    (same pair, different pair) combinations in which the same pair scores higher; ties count
    half; 0.5 is chance), and the pair counts.
    """
    similarity = cosine(embeddings, embeddings)
    upper = np.triu_indices(len(labels), k=1)
    values = similarity[upper]
    same = labels[upper[0]] == labels[upper[1]]
    same_values, different_values = values[same], values[~same]
    return {
        "mean_same": float(same_values.mean()),
        "mean_different": float(different_values.mean()),
        "separation": float(same_values.mean() - different_values.mean()),
        "auc": _auc(same_values, different_values),
        "same_pairs": int(same.sum()),
        "different_pairs": int((~same).sum()),
    }


def _auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) + P(tie) / 2, by ranking both sets together (Mann-Whitney U)."""
    values = np.concatenate([positives, negatives])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # average ranks over ties
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: len(positives)].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(positives) * len(negatives)))


def retrieval(models: MicroMetricModels, scenes: list) -> dict:
    """Caption <-> image retrieval among `scenes` with the dual encoder, and CLIP-T.

    Returns: text_to_image_top1 and image_to_text_top1 (fractions of queries whose own partner
    ranks first), chance (1/len(scenes)), clip_t_matching (mean cosine of an image and its own
    caption) and clip_t_mismatched (mean over every other caption).
    """
    images = [world.render(scene) for scene in scenes]
    captions = [world.caption(scene) for scene in scenes]
    similarity = cosine(models.dual.embed_images(images), models.dual.embed_texts(captions))  # (image, caption)
    n = len(scenes)
    own = np.arange(n)
    off_diagonal = ~np.eye(n, dtype=bool)
    return {
        "scenes": n,
        "text_to_image_top1": float((similarity.argmax(axis=0) == own).mean()),
        "image_to_text_top1": float((similarity.argmax(axis=1) == own).mean()),
        "chance": 1.0 / n,
        "clip_t_matching": float(similarity[own, own].mean()),
        "clip_t_mismatched": float(similarity[off_diagonal].mean()),
    }


def subject_class_accuracy(models: MicroMetricModels, images: list, labels: np.ndarray) -> dict:
    """Zero-shot class recognition of the micro subjects (colours the world's palettes never use):
    the fraction of their photos whose best-scoring caption among "a photo of a <class>", over
    every world class, names the subject's own class."""
    names = sorted(MICRO_SUBJECTS)
    classes = list(world.CLASSES)
    similarity = cosine(
        models.dual.embed_images(images), models.dual.embed_texts([f"a photo of a {c}" for c in classes])
    )
    truth = np.asarray([classes.index(MICRO_SUBJECTS[names[label]].class_name) for label in labels])
    return {"classes": len(classes), "top1": float((similarity.argmax(axis=1) == truth).mean())}


def lpips_ladder(models: MicroMetricModels, images: list, labels: np.ndarray) -> dict:
    """Mean micro-LPIPS distance at three degrees of difference: a photo and a slightly blurred copy
    of it (near_copy), two photos of one subject (same_subject, at another pose and scale), and
    photos of two subjects (different_subjects). A perceptual distance must order them so."""
    from PIL import ImageFilter

    from sparse_dreambooth.micro.metric_models import image_pixels

    blurred = [image.filter(ImageFilter.GaussianBlur(0.6)) for image in images]
    upper = np.triu_indices(len(images), k=1)
    same = labels[upper[0]] == labels[upper[1]]
    with torch.inference_mode():
        features = models.lpips.tapped(image_pixels(images))
        near = models.lpips.distance(features, models.lpips.tapped(image_pixels(blurred)))
        pairs = torch.cat(  # one image against all later ones at a time, to bound the memory
            [
                models.lpips.distance([f[[i]] for f in features], [f[i + 1 :] for f in features])
                for i in range(len(images) - 1)
            ]
        )
    pairs = pairs.double().numpy()
    return {
        "near_copy": float(near.double().mean()),
        "same_subject": float(pairs[same].mean()),
        "different_subjects": float(pairs[~same].mean()),
    }


def measure(models: MicroMetricModels) -> dict:
    """Every figure above, for the report."""
    images, labels = subject_photo_set()
    return {
        "subjects": len(MICRO_SUBJECTS),
        "subject_photos": len(images),
        "identity": pair_separation(models.identity.embed_images(images), labels),
        "clip_i": pair_separation(models.dual.embed_images(images), labels),
        "subject_class": subject_class_accuracy(models, images, labels),
        "lpips": lpips_ladder(models, images, labels),
        "retrieval": retrieval(models, held_out_scenes()),
    }
