"""The micro metric models: they load safely, they are reproducible, and they measure something.

The quality tests score the shipped weights on data they were never trained on (the micro
subjects, held-out scenes) against ground truth the world knows: which subject a photo shows,
which caption a scene was drawn from. Pair statistics are recomputed here by brute force rather
than trusted from `metric_proofs`.
"""

import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.metrics import cmmd, mean_pairwise_cosine
from sparse_dreambooth.micro import metric_proofs, world
from sparse_dreambooth.micro.metric_models import (
    EMBED_DIM,
    MANIFEST_FILE,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    image_pixels,
    load_metric_models,
)
from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS, subject_photos

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_micro_metrics.py"


@pytest.fixture(scope="module")
def models():
    return load_metric_models()


@pytest.fixture(scope="module")
def photos():
    return metric_proofs.subject_photo_set()


def _brute_force_pairs(embeddings: torch.Tensor, labels) -> tuple[list[float], list[float]]:
    vectors = embeddings.double().numpy()
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    same, different = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (same if labels[i] == labels[j] else different).append(float(vectors[i] @ vectors[j]))
    return same, different


def _brute_force_auc(same: list[float], different: list[float]) -> float:
    s, d = np.asarray(same)[:, None], np.asarray(different)[None, :]
    return float(((s > d) + 0.5 * (s == d)).mean())


@pytest.mark.parametrize(
    "encoder, min_separation, min_auc",
    [("identity", 0.25, 0.95), ("dual", 0.15, 0.85)],
    ids=["micro-dino", "micro-clip-i"],
)
def test_same_subject_photos_score_above_different_subjects(models, photos, encoder, min_separation, min_auc):
    images, labels = photos
    embeddings = getattr(models, encoder).embed_images(images)
    same, different = _brute_force_pairs(embeddings, labels)
    figures = metric_proofs.pair_separation(embeddings, labels)
    assert figures["separation"] == pytest.approx(np.mean(same) - np.mean(different), abs=1e-9)
    assert figures["auc"] == pytest.approx(_brute_force_auc(same, different), abs=1e-9)
    assert np.mean(same) - np.mean(different) > min_separation
    assert _brute_force_auc(same, different) > min_auc


def test_each_subject_is_closest_to_its_own_photos_under_the_dino_protocol(models, photos):
    # DreamBooth's DINO score of a subject's photos against each subject's photos (leave-one-out
    # for its own): its own set must win, for every subject.
    images, labels = photos
    embeddings = models.identity.embed_images(images)
    for label in np.unique(labels):
        own = np.flatnonzero(labels == label)
        scores = {}
        for other in np.unique(labels):
            members = np.flatnonzero(labels == other)
            per_photo = []
            for index in own:
                reference = [m for m in members if m != index]
                per_photo.append(mean_pairwise_cosine(embeddings[[index]], embeddings[reference])[0])
            scores[other] = np.mean(per_photo)
        assert max(scores, key=scores.get) == label, (sorted(MICRO_SUBJECTS)[label], scores)


@pytest.fixture(scope="module")
def held_out():
    scenes = metric_proofs.held_out_scenes()
    return scenes, [world.render(scene) for scene in scenes], [world.caption(scene) for scene in scenes]


def test_held_out_scenes_are_named_by_one_caption_each(held_out):
    scenes, _, captions = held_out
    assert len(scenes) == 100 and len(set(captions)) == 100
    assert len({scene.instance.class_name for scene in scenes}) == len(world.CLASSES)


def test_a_caption_retrieves_its_own_scene_far_above_chance(models, held_out):
    _, images, captions = held_out
    image_embeddings = models.dual.embed_images(images).double()
    text_embeddings = models.dual.embed_texts(captions).double()
    similarity = (
        torch.nn.functional.normalize(image_embeddings, dim=-1)
        @ torch.nn.functional.normalize(text_embeddings, dim=-1).T
    )
    own = torch.arange(len(captions))
    text_to_image = (similarity.argmax(dim=0) == own).double().mean().item()
    image_to_text = (similarity.argmax(dim=1) == own).double().mean().item()
    assert text_to_image > 0.3 and image_to_text > 0.3  # chance is 0.01
    figures = metric_proofs.retrieval(models, held_out[0])
    assert figures["text_to_image_top1"] == pytest.approx(text_to_image)
    assert figures["image_to_text_top1"] == pytest.approx(image_to_text)


def test_clip_t_scores_the_own_caption_above_the_others(models, held_out):
    _, images, captions = held_out
    similarity = metric_proofs.cosine(models.dual.embed_images(images), models.dual.embed_texts(captions))
    matching = np.diag(similarity)
    mismatched = similarity[~np.eye(len(captions), dtype=bool)].reshape(len(captions), -1)
    assert matching.mean() - mismatched.mean() > 0.2
    # for most scenes the own caption beats the average other caption
    assert (matching > mismatched.mean(axis=1)).mean() > 0.9


def test_clip_t_prefers_the_right_context_and_class_for_a_subject(models):
    # A micro subject in the snow: "a dog in the snow" must beat "a dog on the beach" and "a cat in the snow".
    teal_dog = MICRO_SUBJECTS["teal_dog"]
    rng = np.random.default_rng(5)
    images = [world.render(world.random_scene(rng, instance=teal_dog, context="in the snow")) for _ in range(6)]
    texts = ["a photo of a dog in the snow", "a photo of a dog on the beach", "a photo of a cat in the snow"]
    similarity = metric_proofs.cosine(models.dual.embed_images(images), models.dual.embed_texts(texts)).mean(axis=0)
    assert similarity[0] > similarity[1] and similarity[0] > similarity[2], similarity


def test_the_subjects_class_is_recognised_despite_colours_no_training_instance_had(models, photos):
    images, labels = photos
    classes = list(world.CLASSES)
    similarity = metric_proofs.cosine(
        models.dual.embed_images(images), models.dual.embed_texts([f"a photo of a {name}" for name in classes])
    )
    names = sorted(MICRO_SUBJECTS)
    truth = [classes.index(MICRO_SUBJECTS[names[label]].class_name) for label in labels]
    accuracy = float(np.mean(similarity.argmax(axis=1) == np.asarray(truth)))
    assert accuracy > 0.6  # chance is 1/13
    assert metric_proofs.subject_class_accuracy(models, images, labels)["top1"] == pytest.approx(accuracy)


def test_cmmd_is_smaller_between_two_photo_sets_of_one_subject_than_across_subjects(models):
    first, second = subject_photos("heart_teapot"), subject_photos("star_can")
    rng = np.random.default_rng(0)
    more_teapots = [
        world.render(world.random_scene(rng, instance=MICRO_SUBJECTS["heart_teapot"], context=None)) for _ in range(5)
    ]
    same = cmmd(models.dual.embed_images(more_teapots), models.dual.embed_images(first))
    across = cmmd(models.dual.embed_images(more_teapots), models.dual.embed_images(second))
    assert same < across


def test_embeddings_have_the_shapes_the_metrics_expect(models):
    images = subject_photos("star_can")[:3] + [subject_photos("star_can")[0].resize((128, 128))]
    for embed in (models.identity.embed_images, models.dual.embed_images):
        embeddings = embed(images)
        assert embeddings.shape == (4, EMBED_DIM) and embeddings.dtype == torch.float32
        # a 128 px image is resized to the encoders' input size, so it embeds like its 64 px original
        assert torch.nn.functional.cosine_similarity(embeddings[0], embeddings[3], dim=0) > 0.95
    texts = models.dual.embed_texts(["a photo of a can", "", "a photo of a xyzzy"])  # unknown words are <unk>
    assert texts.shape == (3, EMBED_DIM) and torch.isfinite(texts).all()


# --- LPIPS-style distance -----------------------------------------------------------------------------


def test_micro_lpips_by_hand_from_the_identity_encoders_stages(models):
    images = subject_photos("ringed_vase")[:2] + subject_photos("zigzag_boot")[:1]
    pixels = image_pixels(images)
    # a second code path: run the identity encoder's blocks one by one and apply the formula
    expected = []
    with torch.inference_mode():
        h, layers = pixels, []
        for block in models.identity.tower.blocks:
            h = block(h)
            layers.append(h / torch.linalg.vector_norm(h, dim=1, keepdim=True))
        for a, b in [(0, 1), (0, 2)]:
            per_layer = [((f[a] - f[b]) ** 2).sum(dim=0).mean() for f in layers]
            expected.append(torch.stack(per_layer).mean().item())
        got = models.lpips(pixels[[0, 0]], pixels[[1, 2]])
        assert got.tolist() == pytest.approx(expected, rel=1e-4)
        assert models.lpips(pixels, pixels).abs().max() < 1e-6
        assert models.lpips(pixels[[1]], pixels[[0]]).item() == pytest.approx(got[0].item(), rel=1e-5)


def test_micro_lpips_orders_a_near_copy_a_same_subject_photo_and_another_subject(models, photos):
    images, labels = photos
    figures = metric_proofs.lpips_ladder(models, images, labels)
    assert figures["near_copy"] < 0.5 * figures["same_subject"]
    assert figures["same_subject"] < figures["different_subjects"]


# --- shipping: checksum, version, reproducibility -----------------------------------------------------


def _copy_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        shutil.copy(WEIGHTS_DIR / name, folder / name)
    return folder


def test_damaged_weights_are_one_clear_error(tmp_path):
    folder = _copy_weights(tmp_path)
    load_metric_models(folder)  # the copy itself loads
    blob = bytearray((folder / WEIGHTS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="damaged") as error:
        load_metric_models(folder)
    assert "\n" not in str(error.value)


def test_weights_of_another_version_or_missing_are_refused(tmp_path):
    folder = _copy_weights(tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": "v0"}))
    with pytest.raises(UserError, match="version v0"):
        load_metric_models(folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_metric_models(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match="missing"):
        load_metric_models(folder)


def test_shipped_manifest_describes_the_shipped_file():
    manifest = json.loads((WEIGHTS_DIR / MANIFEST_FILE).read_text())
    assert manifest["bytes"] == (WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size < 8_000_000
    assert manifest["trained_by"] == "scripts/train_micro_metrics.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_micro_metrics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_PLAN = [
    "--identity-instances", "26", "--identity-views", "2", "--identity-steps", "2",
    "--identity-classes-per-batch", "2", "--identity-instances-per-class", "2",
    "--dual-scenes", "40", "--dual-steps", "2", "--dual-batch", "8",
]  # fmt: skip


def test_training_gives_the_same_bytes_twice_and_other_bytes_for_another_seed(tmp_path):
    script = _script()
    outputs = []
    for name, seed in (("first", "0"), ("second", "0"), ("other", "1")):
        folder = tmp_path / name
        plan, _ = script.parse([*TINY_PLAN, "--seed", seed])
        script.save_metric_models(script.train(plan), folder)
        outputs.append((folder / WEIGHTS_FILE).read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    load_metric_models(tmp_path / "first")


def test_identity_training_never_sees_a_micro_subject_or_a_recolouring():
    script = _script()
    assert set(script.RECOLOURING_ATTRIBUTES) <= set(world.MODIFIERS)
    instances, _ = script.identity_instances(script.Plan())
    assert not set(instances) & set(MICRO_SUBJECTS.values())
