"""Aspect-ratio buckets and the latent cache on disk (issue 14 items 3 and 8), on the tiny model.

Oracles: bucket sizes, assignments and crops worked out by hand, diffusers' own
`StableDiffusionXLPipeline._get_add_time_ids` for the time ids, the VAE called directly for the
latents, and an uninterrupted run without the cache for a resumed run with it.
"""

import math
import random
import subprocess
import sys
import time

import diffusers
import pytest
import torch
from conftest import FAST, run_cli
from PIL import Image
from safetensors.torch import load_file

from sparse_dreambooth.batches import CachedExamples, cache_examples, noisy_batch, pick_bucket, prepare_examples
from sparse_dreambooth.config import merge_settings
from sparse_dreambooth.data import prepare_image
from sparse_dreambooth.data.buckets import SDXL_BUCKETS_1024, bucket_sizes, nearest_bucket
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.latent_cache import LatentCache, encode_latents
from sparse_dreambooth.model import load_pipeline

# --- buckets ------------------------------------------------------------------------------------


def test_the_buckets_are_sdxls_list_at_1024_and_scaled_to_the_grid_below():
    at_1024 = bucket_sizes(1024)
    assert at_1024 == SDXL_BUCKETS_1024 and len(at_1024) == 40
    assert all(side % 64 == 0 for size in at_1024 for side in size)
    assert all(0.9 <= height * width / 1024**2 <= 1 for height, width in at_1024)  # at most 1024^2 pixels
    # 32 px: grid 8, sides x 1/32, halves rounded up, then each size once. By hand:
    # 512x2048 -> 16x64; 576x1792 -> 18x56 -> 16x56; 640x1600 -> 20x50 -> 24x48; 704x1344 -> 22x42 -> 24x40;
    # 768x1280 -> 24x40 (again); 832x1216 -> 26x38 -> 24x40 (again); 896x1152 -> 28x36 -> 32x40 (28/8 = 3.5 up);
    # 960x1024 -> 30x32 -> 32x32; 1024x1024 -> 32x32 (again).
    portrait_half = bucket_sizes(32)[: bucket_sizes(32).index((32, 32)) + 1]
    assert portrait_half == ((16, 64), (16, 56), (24, 48), (24, 40), (32, 40), (32, 32))
    assert bucket_sizes(32)[-1] == (64, 16)


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = bucket_sizes(1024)
    # 600x800 (h x w, 0.75): 896x1152 is |ln(0.7778/0.75)| = 0.0364 away, 832x1152 |ln(0.7222/0.75)| = 0.0377.
    assert math.isclose(abs(math.log(896 / 1152) - math.log(0.75)), 0.0364, abs_tol=1e-4)
    assert nearest_bucket(600, 800, buckets) == (896, 1152)
    assert nearest_bucket(2000, 1000, buckets) == (1408, 704)  # exactly 2:1
    assert nearest_bucket(500, 500, buckets) == (1024, 1024)
    assert nearest_bucket(100, 1000, buckets) == (512, 2048)  # beyond the widest: the widest
    assert nearest_bucket(60, 100, bucket_sizes(64)) == (48, 80)  # exactly 0.6 at 64 px


def _photo(path, width: int, height: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_pipe():
    return load_pipeline("tiny")


def test_a_bucketed_image_has_diffusers_sdxl_time_ids_and_its_buckets_latent_size(tmp_path, tiny_pipe):
    # 150 wide x 100 high (h/w 0.667) at 64 px: 56x80 is 0.049 away (ln), 48x80 0.105, 56x72 0.154.
    # Covering 56x80 takes the height to 56: 84x56 (w x h), cropped centrally at left (84 - 80) / 2 = 2.
    photos = tmp_path / "photos"
    photos.mkdir()
    path = _photo(photos / "wide.png", 150, 100)
    config = merge_settings(
        None, {"instance_dir": str(photos), "class_name": "dog", "resolution": 64, "buckets": True, "random_flip": True}
    )
    (plain, flipped) = list(prepare_examples([path], ["a zjw dog"], config))
    assert plain[0].target_size == (56, 80) and plain[0].pixels.shape == (3, 56, 80)
    assert plain[0].crop_top_left == (0, 2) and flipped[0].crop_top_left == (0, 84 - 2 - 80)
    (bucket,) = cache_examples(tiny_pipe, [plain, flipped], torch.device("cpu"))
    assert bucket.latent_mean.shape == (2, 4, 7, 10)  # the VAE's factor 8
    projection = tiny_pipe.text_encoder_2.config.projection_dim
    expected = tiny_pipe._get_add_time_ids((100, 150), (0, 2), (56, 80), torch.float32, projection)
    assert torch.equal(bucket.time_ids, expected.expand(2, -1))  # this crop is symmetric: the flip's left is 2 too


def _examples(count: int, latent_size: tuple[int, int], marker: float) -> CachedExamples:
    """`count` examples of one bucket whose latents and time ids all hold `marker`."""
    latents = torch.full((count, 4, *latent_size), marker)
    return CachedExamples(
        latents, torch.zeros_like(latents), torch.full((count, 6), marker), torch.zeros(1, 77, 8), torch.zeros(1, 4),
        torch.zeros(count, dtype=torch.long),
    )  # fmt: skip


def test_every_batch_holds_one_bucket_drawn_in_proportion_to_its_images_from_the_seed():
    buckets = [_examples(3, (2, 3), 1.0), _examples(1, (3, 2), 2.0)]
    alphas = torch.linspace(0.99, 0.01, 10)

    def batches(seed: int):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(400):
            bucket = buckets[pick_bucket(buckets, generator)]
            yield noisy_batch(bucket, alphas, "epsilon", 1.0, generator, 4, slice(0, 4))

    drawn = list(batches(0))
    for batch in drawn:
        marker = batch.time_ids[0, 0].item()
        assert (batch.time_ids == marker).all()  # every row from one bucket
        assert batch.noisy.shape[2:] == ((2, 3) if marker == 1.0 else (3, 2))
    share_of_first = sum(batch.time_ids[0, 0].item() == 1.0 for batch in drawn) / len(drawn)
    assert abs(share_of_first - 0.75) < 0.07  # 3 of the 4 images
    again = list(batches(0))
    assert all(torch.equal(a.noisy, b.noisy) for a, b in zip(drawn, again, strict=True))
    one = torch.Generator().manual_seed(0)
    pick_bucket(buckets[:1], one)
    assert torch.equal(one.get_state(), torch.Generator().manual_seed(0).get_state())  # one bucket: no draw


def _adapter(path) -> dict:
    return load_file(str(path))


def test_a_bucketed_run_has_one_bucket_per_unet_call_and_resumes_to_the_same_adapter_with_the_cache(
    tmp_path, monkeypatch
):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (width, height) in enumerate([(90, 60), (60, 90), (70, 70), (96, 64)]):
        _photo(photos / f"{index:02d}.png", width, height, seed=index)
    shapes, time_ids, encodes = [], [], []
    forward, encode = diffusers.UNet2DConditionModel.forward, diffusers.AutoencoderKL.encode

    def recording(unet, sample, *args, **kwargs):
        shapes.append(tuple(sample.shape[2:]))
        time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return forward(unet, sample, *args, **kwargs)

    def counting(vae, *args, **kwargs):
        encodes.append(1)
        return encode(vae, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", recording)
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", counting)
    common = [*FAST, "--instance-dir", photos, "--class-name", "toy", "--buckets", "--batch-size", "2"]
    whole, resumed, cache = tmp_path / "whole", tmp_path / "resumed", tmp_path / "latents"
    run_cli("train", *common, "--steps", "4", "--output", whole)
    # At 32 px (w x h): 90x60 -> bucket 24x40 (h x w, latent 3x5), covered by 40x26, cropped at top 1;
    # 96x64 -> 24x40 as well (40x26, top 1); 60x90 -> 40x24, covered by 26x40, left 1; 70x70 -> 32x32.
    time_ids_of_bucket = {
        (3, 5): {(60, 90, 1, 0, 24, 40), (64, 96, 1, 0, 24, 40)},
        (5, 3): {(90, 60, 0, 1, 40, 24)},
        (4, 4): {(70, 70, 0, 0, 32, 32)},
    }
    assert len(shapes) == 4 and len(set(shapes)) > 1
    for shape, ids in zip(shapes, time_ids, strict=True):  # every row of a call: an image of its bucket
        assert {tuple(int(value) for value in row) for row in ids} <= time_ids_of_bucket[shape]

    run_cli("train", *common, "--steps", "2", "--checkpoint-every", "1", "--latent-cache", cache, "--output", resumed)
    assert len(list(cache.glob("*/*.safetensors"))) == 4
    encodes.clear()
    checkpoint = resumed / "checkpoints" / "step-1"
    run_cli("train", *common, "--steps", "4", "--latent-cache", cache, "--output", resumed, "--resume", checkpoint)
    assert not encodes  # every latent came from the cache
    expected, actual = _adapter(whole / "adapter.safetensors"), _adapter(resumed / "adapter.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(actual[key], expected[key]) for key in expected)
    assert max(tensor.abs().max().item() for tensor in expected.values() if tensor.is_floating_point()) > 0


def test_with_prior_preservation_the_class_rows_are_cut_to_the_instance_rows_bucket(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (width, height) in enumerate([(90, 60), (60, 90)]):
        _photo(photos / f"{index:02d}.png", width, height, seed=index)
    calls = []
    forward = diffusers.UNet2DConditionModel.forward

    def recording(unet, sample, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not the rendering of the class images
            calls.append((tuple(sample.shape[2:]), kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return forward(unet, sample, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", recording)
    prior = ["--with-prior-preservation", "--num-class-images", "2", "--class-data-dir", tmp_path / "classes"]
    common = [*FAST, "--instance-dir", photos, "--class-name", "toy", "--buckets", *prior, "--steps", "4"]
    run_cli("train", *common, "--output", tmp_path / "run")
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    # The class images are 32x32 renders. Cut to 24x40 (h x w) they cover it at 40x40, cropped at top
    # (40 - 24) / 2 = 8; to 40x24 at left 8. The photos' time ids are those of the test above.
    expected = {
        (3, 5): [(60, 90, 1, 0, 24, 40), (32, 32, 8, 0, 24, 40)],
        (5, 3): [(90, 60, 0, 1, 40, 24), (32, 32, 0, 8, 40, 24)],
    }
    assert len(calls) == 4 and {shape for shape, _ in calls} == set(expected)
    for shape, time_ids in calls:  # one instance row, then one class row
        assert [tuple(int(value) for value in row) for row in time_ids] == expected[shape]


def test_the_train_help_lists_both_options():
    output = run_cli("train", "--help")
    assert "--buckets" in output and "--latent-cache" in output


# --- the latent cache ---------------------------------------------------------------------------


def test_a_cache_hit_gives_exactly_the_latents_a_fresh_encode_gives(tmp_path, tiny_pipe, monkeypatch):
    pixels = prepare_image(_photo(tmp_path / "photo.png", 48, 40), 32).pixels
    with torch.no_grad():
        fresh = tiny_pipe.vae.encode(pixels[None]).latent_dist
    first = encode_latents(tiny_pipe.vae, pixels, "cpu", LatentCache(tmp_path / "cache", tiny_pipe.vae, "cpu"))
    monkeypatch.setattr(tiny_pipe.vae, "encode", None)  # a hit must not encode
    hit = encode_latents(tiny_pipe.vae, pixels, "cpu", LatentCache(tmp_path / "cache", tiny_pipe.vae, "cpu"))
    for mean, std in (first, hit):
        assert torch.equal(mean, fresh.mean) and torch.equal(std, fresh.std)


def test_a_damaged_entry_is_encoded_again_and_an_unusable_folder_is_one_line(tmp_path, tiny_pipe):
    pixels = prepare_image(_photo(tmp_path / "photo.png", 40, 40), 32).pixels
    cache = LatentCache(tmp_path / "cache", tiny_pipe.vae, "cpu")
    fresh = encode_latents(tiny_pipe.vae, pixels, "cpu", None)
    entry = cache.path(cache.key(pixels))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"\x08" + b"\x00" * 20)  # what a disk error might leave (not our writes: they are atomic)
    for mean, std in (encode_latents(tiny_pipe.vae, pixels, "cpu", cache), cache.load(cache.key(pixels))):
        assert torch.equal(mean, fresh[0]) and torch.equal(std, fresh[1])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot create the latent cache .*a-file.*--latent-cache"):
        LatentCache(tmp_path / "a-file", tiny_pipe.vae, "cpu")


def test_the_key_changes_with_flip_resolution_bucket_crop_and_the_vaes_encoder(tmp_path, tiny_pipe):
    path = _photo(tmp_path / "photo.png", 64, 48)
    cache = LatentCache(tmp_path / "cache", tiny_pipe.vae, "cpu")
    variants = {
        "plain": prepare_image(path, 32),
        "flip": prepare_image(path, 32, flip=True),
        "resolution": prepare_image(path, 40),
        "bucket": prepare_image(path, 32, buckets=bucket_sizes(32)),
        "crop": prepare_image(path, 32, center_crop=False, rng=random.Random(1)),
    }
    keys = {name: cache.key(image.pixels) for name, image in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert LatentCache(tmp_path / "cache", tiny_pipe.vae, "cpu").key(variants["plain"].pixels) == keys["plain"]
    vae = load_pipeline("tiny").vae
    with torch.no_grad():
        vae.decoder.conv_out.bias += 1  # the decoder does not shape a latent: same entries
        assert LatentCache(tmp_path / "cache", vae, "cpu").key(variants["plain"].pixels) == keys["plain"]
        vae.encoder.conv_in.bias[0] += 1e-6
    assert LatentCache(tmp_path / "cache", vae, "cpu").key(variants["plain"].pixels) != keys["plain"]


class WeightlessVAE(torch.nn.Module):
    """Enough of a VAE for a cache that is only written and read, never asked to encode."""

    config = {}


WRITER = f"""
import sys, torch
from sparse_dreambooth.latent_cache import LatentCache
{__import__("inspect").getsource(WeightlessVAE)}
cache = LatentCache(sys.argv[1], WeightlessVAE(), "cpu")
mean = torch.arange(4 * 64 * 64, dtype=torch.float32).reshape(1, 4, 64, 64)
print("ready", flush=True)
for _ in range(40):
    cache.store("ab" * 32, mean, mean + 1)
"""


def test_two_concurrent_writers_leave_a_whole_entry_and_a_reader_never_sees_half_of_one(tmp_path):
    folder = tmp_path / "cache"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    reader = LatentCache(folder, WeightlessVAE(), "cpu")
    path, reads = reader.path("ab" * 32), 0
    expected = torch.arange(4 * 64 * 64, dtype=torch.float32).reshape(1, 4, 64, 64)
    while any(writer.poll() is None for writer in writers):
        if path.exists():
            loaded = reader.load("ab" * 32)
            assert loaded is not None, "a reader saw a half-written entry"
            mean, std = loaded
            assert torch.equal(mean, expected) and torch.equal(std, expected + 1)
            reads += 1
        time.sleep(0.001)
    assert all(writer.wait() == 0 for writer in writers)
    assert reads > 0 and torch.equal(reader.load("ab" * 32)[0], expected)
    assert sorted(entry.name for entry in path.parent.iterdir()) == [path.name]  # no temporaries left
