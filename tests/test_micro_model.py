"""`--model micro`: the shipped pretrained weights load, are intact, and follow the prompt."""

import fnmatch
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.micro import model as micro
from sparse_dreambooth.micro import world
from sparse_dreambooth.model import MICRO_MODEL, evaluation_scheduler, load_pipeline, model_identity, unet_skeleton

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(MICRO_MODEL)
    pipe.scheduler = evaluation_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, prompts, seed=42, steps=12):
    images = pipe(
        prompt=prompts,
        generator=[torch.Generator().manual_seed(seed) for _ in prompts],
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=64,
        width=64,
    ).images
    return [np.asarray(image, dtype=np.float64) for image in images]


def test_shipped_weights_match_their_checksum_size_and_package_data():
    path = Path(str(micro.weights_path()))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == micro.WEIGHTS_SHA256
    assert path.stat().st_size <= 25 * 1024 * 1024
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    package_data = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(f"micro/{micro.WEIGHTS_FILE}", pattern) for pattern in package_data["sparse_dreambooth"])


def test_a_damaged_weights_file_is_a_one_line_user_error(tmp_path, monkeypatch):
    damaged = tmp_path / micro.WEIGHTS_FILE
    shutil.copy(str(micro.weights_path()), damaged)
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    damaged.write_bytes(bytes(blob))
    monkeypatch.setattr(micro, "weights_path", lambda: damaged)
    with pytest.raises(UserError, match="damaged") as raised:
        load_pipeline(MICRO_MODEL)
    assert "\n" not in str(raised.value)
    monkeypatch.setattr(micro, "weights_path", lambda: tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="missing"):
        load_pipeline(MICRO_MODEL)


def test_micro_pipeline_has_sdxl_conditioning_and_the_skeletons_layers(pipe):
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert (
        pipe.unet.config.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.vae_scale_factor == 4 and pipe.default_sample_size * pipe.vae_scale_factor == world.IMAGE_SIZE
    assert pipe.scheduler.config.prediction_type == "epsilon"
    skeleton = {name: tuple(p.shape) for name, p in unet_skeleton(MICRO_MODEL).named_parameters()}
    assert skeleton == {name: tuple(p.shape) for name, p in pipe.unet.named_parameters()}
    assert any(name.endswith("attn2.to_k.weight") for name in skeleton)  # the layers adapters attach to
    identity = model_identity(MICRO_MODEL)
    assert identity.name == f"micro-sdxl-{micro.MICRO_MODEL_VERSION}" and identity.fingerprint.startswith("unet-v1:")


def test_every_caption_word_and_rare_token_is_a_single_token(pipe):
    words = {"zjw", "sks", "ohwx"} | {w for s in world.scenes(0, 2000) for w in world.caption(s).lower().split()}
    for phrase in world.CONTEXTS + world.OUTFITS + world.MODIFIERS + list(world.CLASSES):
        words |= set(phrase.lower().split())
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert {word: len(tokenizer.tokenize(word)) for word in words} == dict.fromkeys(words, 1)


def test_base_samples_follow_the_prompt(pipe):
    # The random tiny model gives the same picture for any prompt with one seed; this one must not,
    # and the same prompt and seed must give the same picture again.
    beach, snow, again = _sample(
        pipe, ["a photo of a dog on the beach", "a photo of a dog in the snow", "a photo of a dog on the beach"]
    )
    assert np.array_equal(beach, again)
    assert np.abs(beach - snow).mean() > 10
