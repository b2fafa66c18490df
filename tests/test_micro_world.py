"""The micro world: its captions are the DreamBooth prompts, its pictures show what they say."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import FIXTURE_DATA
from PIL import Image, ImageOps

from sparse_dreambooth import data
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.micro import world
from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS, PHOTO_COUNT, subject_photos


def _plain_scene(instance, **changes) -> world.Scene:
    scene = world.Scene(
        instance=instance, context=None, attribute=None, facing=1, scale=0.7, x=0.5, ground=0.9, detail_seed=7
    )
    return replace(scene, **changes)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_world_and_subjects_import_without_torch():
    code = "import sys, sparse_dreambooth.micro.world, sparse_dreambooth.micro.subjects; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_captions_are_the_dataset_prompts_with_a_photo_prefix():
    # Oracle: the dataset's own prompts_and_classes.txt, parsed independently of the world's phrase lists.
    _, object_templates, live_templates = data.read_prompts_and_classes(FIXTURE_DATA)
    instances = {kind: world.random_instance(name, np.random.default_rng(0)) for name, kind in world.CLASSES.items()}
    for kind, templates in (("object", object_templates), ("live", live_templates)):
        expected = {template.format(token="zjw", class_name=instances[kind].class_name) for template in templates}
        phrases = world.CONTEXTS if kind == "object" else world.CONTEXTS[:10] + world.OUTFITS
        produced = {world.caption(_plain_scene(instances[kind], context=c), "zjw") for c in phrases}
        produced |= {world.caption(_plain_scene(instances[kind], attribute=m), "zjw") for m in world.MODIFIERS}
        assert {text.removeprefix("a photo of ") for text in produced} == expected
    assert len(world.CONTEXTS) == 20 and len(world.MODIFIERS) == 5 and len(world.OUTFITS) == 10


def test_caption_places_token_modifier_outfit_and_context_as_the_prompts_do():
    dog = world.random_instance("dog", np.random.default_rng(1))
    assert world.caption(_plain_scene(dog, context="on the beach")) == "a photo of a dog on the beach"
    assert world.caption(_plain_scene(dog, context="on the beach"), "zjw") == "a photo of a zjw dog on the beach"
    both = _plain_scene(dog, context="in the snow", attribute="wearing a santa hat")
    assert world.caption(both, "sks") == "a photo of a sks dog wearing a santa hat in the snow"
    assert world.caption(_plain_scene(dog, attribute="cube shaped"), "ohwx") == "a photo of a cube shaped ohwx dog"
    assert world.caption(_plain_scene(dog)) == "a photo of a dog"


def test_classes_use_dataset_class_names_and_kinds():
    classes, _, _ = data.read_prompts_and_classes(FIXTURE_DATA)
    assert set(world.CLASSES) <= set(classes.values())
    assert {name for name, kind in world.CLASSES.items() if kind == "live"} == {"dog", "cat"}


def test_scene_stream_is_deterministic_and_seed_dependent():
    first = list(world.scenes(3, 12))
    assert first == list(world.scenes(3, 12))
    assert first != list(world.scenes(4, 12))
    for scene in first[:4]:
        assert world.render(scene).tobytes() == world.render(scene).tobytes()
    assert world.render(first[0]).size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert world.render(first[0]).mode == "RGB"


def test_stream_covers_the_world_and_never_names_a_rare_token():
    stream = list(world.scenes(0, 3000))
    assert {s.instance.class_name for s in stream} == set(world.CLASSES)
    assert {s.context for s in stream} == set(world.CONTEXTS) | {None}
    assert {s.attribute for s in stream} == set(world.MODIFIERS) | set(world.OUTFITS) | {None}
    assert all(s.attribute not in world.OUTFITS for s in stream if world.CLASSES[s.instance.class_name] == "object")
    words = {word for s in stream for word in world.caption(s).split()}
    assert not words & {"zjw", "sks", "ohwx"}


def test_random_scene_honours_its_arguments_and_rejects_unknown_names():
    rng = np.random.default_rng(5)
    assert world.random_scene(rng, class_name="vase").instance.class_name == "vase"
    assert world.random_scene(rng, context="in the jungle").context == "in the jungle"
    teapot = MICRO_SUBJECTS["heart_teapot"]
    assert world.random_scene(rng, instance=teapot).instance == teapot
    with pytest.raises(ValueError, match="context"):
        world.random_scene(rng, context="on the moon")
    with pytest.raises(KeyError, match="giraffe"):
        world.random_instance("giraffe", rng)


def test_figure_area_grows_with_the_square_of_its_scale():
    # Oracle: geometry. A red figure on a neutral background; count its red pixels at two scales.
    dog = world.random_instance("dog", np.random.default_rng(2))

    def red_area(scale):
        pixels = _pixels(world.render(_plain_scene(dog, attribute="red", scale=scale), size=128))
        return np.sum((pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80))

    ratio = red_area(0.75) / red_area(0.5)
    assert 1.8 < ratio < 2.7, ratio  # (0.75 / 0.5) ** 2 = 2.25, give or take the antialiased rims


def test_facing_left_is_the_mirror_image_of_facing_right():
    # The plain background and the shadow are symmetric, so only the figure's direction changes.
    for class_name in ("dog", "teapot", "boot"):
        item = world.random_instance(class_name, np.random.default_rng(3))
        right = world.render(_plain_scene(item, facing=1), size=128)
        left = world.render(_plain_scene(item, facing=-1), size=128)
        mirrored = _pixels(ImageOps.mirror(right))
        assert np.abs(_pixels(left) - mirrored).mean() < 1.0
        assert np.abs(_pixels(left) - _pixels(right)).mean() > 1.0


def _colour_fraction(image: Image.Image, region: tuple[slice, slice], test) -> float:
    pixels = _pixels(image)[region]
    return float(np.mean(test(pixels[..., 0], pixels[..., 1], pixels[..., 2])))


def test_contexts_show_what_their_words_say():
    # Independent colour checks of a few backgrounds, away from the figure (figure off to one side).
    toy = world.random_instance("can", np.random.default_rng(4))

    def image(context):
        return world.render(_plain_scene(toy, context=context, x=0.8, scale=0.4, detail_seed=11))

    top, bottom_left = (slice(0, 10), slice(None)), (slice(50, 64), slice(0, 24))
    beach = image("on the beach")
    assert _colour_fraction(beach, top, lambda r, g, b: b > r + 40) > 0.9  # sky
    assert _colour_fraction(beach, bottom_left, lambda r, g, b: (r > 200) & (b < 170)) > 0.8  # sand
    assert _colour_fraction(image("in the snow"), bottom_left, lambda r, g, b: np.minimum(r, b) > 225) > 0.9
    jungle = image("in the jungle")
    assert _colour_fraction(jungle, (slice(0, 40), slice(None)), lambda r, g, b: g > r + 30) > 0.8
    assert _colour_fraction(image("on top of pink fabric"), top, lambda r, g, b: (r > 200) & (g < 200)) > 0.9
    rug = image("on top of a purple rug in a forest")
    assert _colour_fraction(rug, (slice(52, 60), slice(8, 30)), lambda r, g, b: (b > g + 40) & (r > g + 30)) > 0.8
    milk = image("floating in an ocean of milk")
    assert _colour_fraction(milk, bottom_left, lambda r, g, b: np.minimum(r, b) > 215) > 0.9
    water = image("floating on top of water")
    assert _colour_fraction(water, bottom_left, lambda r, g, b: b > r + 80) > 0.9


def test_contexts_are_told_apart_at_64_px_by_a_nearest_mean_classifier():
    # A classifier that knows nothing about the drawing code: mean 8x8 thumbnails per context
    # from one stream, nearest mean on another. Legible backgrounds classify well above chance (1/21).
    def thumbnails(seed, count):
        rng = np.random.default_rng(seed)
        contexts = [*world.CONTEXTS, None]
        items = []
        for index in range(count):
            context = contexts[index % len(contexts)]
            scene = (
                world.random_scene(rng, context=context) if context else replace(world.random_scene(rng), context=None)
            )
            thumb = _pixels(world.render(scene).resize((8, 8), Image.Resampling.BOX)).ravel()
            items.append((index % len(contexts), thumb))
        return items

    train, test = thumbnails(10, 21 * 8), thumbnails(11, 21 * 3)
    means = np.stack([np.mean([t for label, t in train if label == k], axis=0) for k in range(21)])
    correct = [np.argmin(np.linalg.norm(means - thumb, axis=1)) == label for label, thumb in test]
    assert np.mean(correct) > 0.85


def test_every_attribute_changes_the_picture_and_each_outfit_differently():
    cat = world.random_instance("cat", np.random.default_rng(6))
    plain = _pixels(world.render(_plain_scene(cat)))
    pictures = {a: _pixels(world.render(_plain_scene(cat, attribute=a))) for a in world.MODIFIERS + world.OUTFITS}
    for attribute, picture in pictures.items():
        assert np.abs(picture - plain).mean() > 0.8, attribute
    outfits = [pictures[o] for o in world.OUTFITS]
    for i in range(len(outfits)):
        for j in range(i):
            assert np.abs(outfits[i] - outfits[j]).mean() > 0.3, (world.OUTFITS[i], world.OUTFITS[j])


def test_random_instances_never_are_micro_subjects():
    rng = np.random.default_rng(8)
    markings = set()
    for index in range(3000):
        item = world.random_instance(list(world.CLASSES)[index % len(world.CLASSES)], rng)
        assert item not in MICRO_SUBJECTS.values()
        markings.add(item.marking)
    assert markings == set(world.RANDOM_MARKINGS)
    assert {item.marking for item in MICRO_SUBJECTS.values()} <= set(world.SUBJECT_MARKINGS)
    assert not set(world.RANDOM_MARKINGS) & set(world.SUBJECT_MARKINGS)


def test_micro_subjects_cover_both_kinds_with_varied_deterministic_photos():
    kinds = {world.CLASSES[item.class_name] for item in MICRO_SUBJECTS.values()}
    assert len(MICRO_SUBJECTS) >= 8 and kinds == {"object", "live"}
    for name in MICRO_SUBJECTS:
        photos = subject_photos(name)
        assert 4 <= len(photos) == PHOTO_COUNT <= 6
        assert all(photo.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) for photo in photos)
        assert [p.tobytes() for p in photos] == [p.tobytes() for p in subject_photos(name)]
        for i in range(len(photos)):
            for j in range(i):
                assert np.abs(_pixels(photos[i]) - _pixels(photos[j])).mean() > 2.0, (name, i, j)


def test_subject_photos_show_the_subjects_marking_colour():
    # The teal dog's yellow stars and teal fur, counted in its photos but absent from random dogs.
    def teal_fraction(image):
        return _colour_fraction(image, (slice(None), slice(None)), lambda r, g, b: (g > r + 80) & (b > r + 70))

    assert min(teal_fraction(photo) for photo in subject_photos("teal_dog")) > 0.03
    rng = np.random.default_rng(9)
    random_dogs = [world.render(world.random_scene(rng, class_name="dog")) for _ in range(40)]
    assert max(teal_fraction(image) for image in random_dogs) < 0.01


def test_unknown_micro_subject_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError, match="did you mean 'teal_dog'"):
        subject_photos("teal_dgo")
