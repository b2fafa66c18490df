"""The tiny SDXL, model loading, and SDXL conditioning, checked against diffusers' own code paths."""

import copy
import os

# Read when huggingface_hub is first imported; the fixture below covers the case where another
# test module imported it earlier.
os.environ["HF_HUB_OFFLINE"] = "1"

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import save_file

from sparse_dreambooth import model
from sparse_dreambooth.adapters import BaseModel
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.model import (
    DEFAULT_MODEL,
    TINY_MODEL,
    add_time_ids,
    build_tiny_pipeline,
    cache_dir,
    encode_prompts,
    load_pipeline,
    model_identity,
    tiny_pipeline_path,
)
from sparse_dreambooth.tiny_model import TINY_MODEL_VERSION, VOCABULARY_WORDS

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PROMPTS = [
    "a zjw dog on top of a purple rug in a forest",
    "a cube shaped zjw dog with the Eiffel Tower in the background",
    "a " * 100 + "dog",  # longer than 77 tokens, so truncation is exercised too
]


@pytest.fixture(autouse=True)
def offline_with_private_caches(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # An empty Hub cache, so "not cached" holds on machines that do have SDXL downloaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("SPARSE_DB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """The tiny pipeline as the training loop gets it: built, saved, then loaded from the cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSE_DB_CACHE", str(tmp_path_factory.mktemp("module-cache")))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        pipe = load_pipeline(TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_weights(pipe_a, pipe_b):
    for component in COMPONENTS:
        state_a, state_b = getattr(pipe_a, component).state_dict(), getattr(pipe_b, component).state_dict()
        assert state_a.keys() == state_b.keys(), component
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), f"{component}.{name}"


def test_tiny_pipeline_build_depends_only_on_the_seed():
    rng_state_before = torch.get_rng_state()
    first, second = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state_before), "building must not consume the global RNG"
    assert_same_weights(first, second)

    other_seed = build_tiny_pipeline(seed=1)
    for component in COMPONENTS:
        weights_seed0 = next(getattr(first, component).parameters())
        weights_seed1 = next(getattr(other_seed, component).parameters())
        assert not torch.equal(weights_seed0, weights_seed1), component


def test_tiny_pipeline_is_saved_once_and_reused(monkeypatch):
    path = tiny_pipeline_path()
    assert path == cache_dir() / f"tiny-sdxl-{TINY_MODEL_VERSION}-seed0"
    saved_files = sorted(p for p in path.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in saved_files]
    assert any(p.suffix == ".safetensors" for p in saved_files)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in saved_files)

    def fail_to_build(seed):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(model, "build_tiny_pipeline", fail_to_build)
    assert tiny_pipeline_path() == path
    assert [p.stat().st_mtime_ns for p in saved_files] == mtimes


def test_tiny_pipeline_build_that_loses_the_rename_race_leaves_the_winner(monkeypatch):
    final = cache_dir() / f"tiny-sdxl-{TINY_MODEL_VERSION}-seed0"
    build = model.build_tiny_pipeline

    def build_while_another_rank_finishes_first(seed):
        pipe = build(seed)
        pipe.save_pretrained(final)
        return pipe

    monkeypatch.setattr(model, "build_tiny_pipeline", build_while_another_rank_finishes_first)
    assert tiny_pipeline_path() == final
    assert [p.name for p in cache_dir().iterdir()] == [final.name], "the losing copy must be discarded"
    assert (final / "model_index.json").is_file()


def test_loaded_tiny_pipeline_matches_the_build_and_keeps_its_tokenizers(tiny_pipe):
    built = build_tiny_pipeline(seed=0)
    assert_same_weights(tiny_pipe, built)
    assert tiny_pipe.tokenizer.pad_token == "<|endoftext|>"
    assert tiny_pipe.tokenizer_2.pad_token == "!"
    tokenizer_pairs = [(tiny_pipe.tokenizer, built.tokenizer), (tiny_pipe.tokenizer_2, built.tokenizer_2)]
    for loaded_tokenizer, built_tokenizer in tokenizer_pairs:
        assert loaded_tokenizer.model_max_length == 77
        padded = dict(padding="max_length", max_length=77, truncation=True)
        assert loaded_tokenizer(PROMPTS, **padded).input_ids == built_tokenizer(PROMPTS, **padded).input_ids


def test_loaded_tiny_pipeline_generates_64px_images(tiny_pipe):
    assert tiny_pipe.default_sample_size * tiny_pipe.vae_scale_factor == 64
    images = tiny_pipe(prompt="a zjw dog", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_vocabulary_words_are_single_tokens_and_other_text_still_encodes(tiny_pipe):
    for tokenizer in (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2):
        for word in VOCABULARY_WORDS:
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        # Words outside the vocabulary fall back to byte-level pieces instead of an unknown token.
        text = "xylophone quokka, 42!"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == "xylophone quokka , 4 2 !"


def test_tiny_unet_has_sdxl_attention_projections(tiny_pipe):
    blocks = [module for module in tiny_pipe.unet.modules() if isinstance(module, BasicTransformerBlock)]
    assert blocks
    for block in blocks:
        for attention in (block.attn1, block.attn2):
            for projection in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]):
                assert isinstance(projection, torch.nn.Linear)
    names = {name for name, _ in tiny_pipe.unet.named_modules()}
    for attention in ("attn1", "attn2"):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert "down_blocks.1.attentions.0.transformer_blocks.0." + f"{attention}.{projection}" in names


def test_tiny_model_has_sdxl_conditioning_layout(tiny_pipe):
    unet_config = tiny_pipe.unet.config
    assert list(unet_config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet_config.addition_embed_type == "text_time"
    text_dims = tiny_pipe.text_encoder.config.hidden_size, tiny_pipe.text_encoder_2.config.hidden_size
    assert unet_config.cross_attention_dim == sum(text_dims)
    assert tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.vae.config.scaling_factor == 0.13025


def test_encode_prompts_matches_the_pipeline(tiny_pipe):
    prompt_embeds, pooled = encode_prompts(
        [tiny_pipe.tokenizer, tiny_pipe.tokenizer_2], [tiny_pipe.text_encoder, tiny_pipe.text_encoder_2], PROMPTS
    )
    expected_embeds, _, expected_pooled, _ = tiny_pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    assert prompt_embeds.shape == (len(PROMPTS), 77, tiny_pipe.unet.config.cross_attention_dim)
    assert torch.equal(prompt_embeds, expected_embeds)
    assert torch.equal(pooled, expected_pooled)


def test_add_time_ids_matches_the_pipeline(tiny_pipe):
    original_size, crop_top_left, target_size = (768, 1024), (16, 40), (64, 48)
    expected = tiny_pipe._get_add_time_ids(
        original_size,
        crop_top_left,
        target_size,
        dtype=torch.float32,
        text_encoder_projection_dim=tiny_pipe.text_encoder_2.config.projection_dim,
    )
    time_ids = add_time_ids(original_size, crop_top_left, target_size)
    assert time_ids.shape == (6,)
    assert torch.equal(time_ids, expected[0])


def test_uncached_hub_model_offline_is_a_one_line_user_error():
    with pytest.raises(UserError) as error:
        load_pipeline("some-org/not-cached-model")
    message = str(error.value)
    assert "\n" not in message
    assert "some-org/not-cached-model" in message
    assert "--model tiny" in message


@pytest.mark.parametrize("make_model", ["missing folder", "missing.safetensors", "pickle", "folder without pipeline"])
def test_unusable_local_model_is_a_one_line_user_error(tmp_path, make_model):
    path = tmp_path / make_model
    if make_model == "pickle":
        path = tmp_path / "model.ckpt"
        torch.save({"weight": torch.zeros(1)}, path)
    elif make_model == "folder without pipeline":
        path.mkdir()
    with pytest.raises(UserError) as error:
        load_pipeline(str(path))
    assert "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_single_file_without_cached_base_model_configs_is_a_one_line_user_error(tmp_path):
    # Just enough of an SDXL checkpoint for diffusers to recognise it as SDXL base.
    checkpoint = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}, checkpoint)
    with pytest.raises(UserError) as error:
        load_pipeline(str(checkpoint))
    assert "\n" not in str(error.value)
    assert str(checkpoint) in str(error.value)
    assert DEFAULT_MODEL in str(error.value) and "pass --model-config DIR" in str(error.value)


def test_vae_option_replaces_the_pipeline_vae(tiny_pipe):
    pipe = load_pipeline(TINY_MODEL, vae=str(tiny_pipeline_path(seed=1) / "vae"))
    seed1_vae = build_tiny_pipeline(seed=1).vae.state_dict()
    for name, tensor in pipe.vae.state_dict().items():
        assert torch.equal(tensor, seed1_vae[name]), name
    seed0_unet = tiny_pipe.unet.state_dict()
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, seed0_unet[name]), name


def test_missing_vae_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="VAE"):
        load_pipeline(TINY_MODEL, vae=str(tmp_path / "no-vae"))


def test_model_identity_names(tmp_path, monkeypatch):
    tiny = model_identity(TINY_MODEL)
    assert tiny.name == f"tiny-sdxl-{TINY_MODEL_VERSION}-seed0" and tiny.fingerprint.startswith("unet-v1:")
    # Not in the (empty) Hub cache: known by name alone.
    assert model_identity(DEFAULT_MODEL) == BaseModel(f"{DEFAULT_MODEL}@main")
    assert model_identity("some-org/model", revision="abc123") == BaseModel("some-org/model@abc123")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-sdxl").mkdir()
    assert model_identity("local-sdxl") == BaseModel(str(tmp_path.resolve() / "local-sdxl"))


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SPARSE_DB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "sparse-dreambooth"


# --- rendering: explicit autocast for the UNet, fp32 for the VAE ---------------------------------


def _render_arguments(seeds=(42, 43)) -> dict:
    return dict(
        prompt=["a zjw dog on a rug", "a red cube"][: len(seeds)],
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        num_inference_steps=30,
        guidance_scale=7.5,
        height=64,
        width=64,
    )


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


@pytest.fixture(scope="module")
def evaluation_pipes(tmp_path_factory):
    """The tiny pipeline with the evaluation sampler: all fp32, and as training holds it under bf16
    (UNet and text encoders bf16, VAE fp32), with no Accelerate wrapper on the UNet."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSE_DB_CACHE", str(tmp_path_factory.mktemp("render-cache")))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        pipes = {dtype: load_pipeline(TINY_MODEL, torch_dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    for pipe in pipes.values():
        pipe.vae.to(torch.float32)
        pipe.scheduler = model.evaluation_scheduler(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    assert "_original_forward" not in vars(pipes[torch.bfloat16].unet), "the UNet must not carry Accelerate's wrapper"
    return pipes


def test_render_images_in_fp32_is_the_pipeline_call_byte_for_byte(evaluation_pipes):
    from sparse_dreambooth.sample import render_images

    pipe = evaluation_pipes[torch.float32]
    rendered, called = render_images(pipe, **_render_arguments()), pipe(**_render_arguments()).images
    assert np.array_equal(_pixels(rendered), _pixels(called))


def test_a_bf16_unet_renders_without_accelerates_wrapper_close_to_fp32(evaluation_pipes):
    from sparse_dreambooth.sample import render_images

    bf16 = evaluation_pipes[torch.bfloat16]
    with pytest.raises(RuntimeError, match="BFloat16"):  # the plain call feeds bf16 latents to the fp32 VAE
        bf16(**_render_arguments(seeds=(42,)))
    reference = _pixels(render_images(evaluation_pipes[torch.float32], **_render_arguments()))
    rendered = _pixels(render_images(bf16, **_render_arguments()))
    other_seeds = _pixels(render_images(evaluation_pipes[torch.float32], **_render_arguments(seeds=(7, 8))))
    # Measured: 0.36 grey levels of 255 on average from bf16 rounding; other seeds differ by ~32.
    assert np.abs(rendered - reference).mean() < 2.0
    assert np.abs(other_seeds - reference).mean() > 10 * np.abs(rendered - reference).mean()


def test_validation_renders_a_bf16_adapted_unet_close_to_fp32(evaluation_pipes, tmp_path):
    from PIL import Image

    from sparse_dreambooth.adapters import attach
    from sparse_dreambooth.config import merge_settings
    from sparse_dreambooth.train import render_validation

    config = merge_settings({"model": {"model": "tiny"}}, {"subject": "demo", "resolution": 64, "budget": 64})
    images = {}
    for dtype, pipe in evaluation_pipes.items():
        unet = copy.deepcopy(pipe.unet)
        for layer in attach(unet, config.adapter).values():  # a trained-looking adapter, the same in both
            with torch.no_grad():
                for parameter in layer.adapter.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)) * 0.01)
        path = tmp_path / f"{dtype}.png"
        render_validation(pipe, unet, "a zjw toy", config, path)
        images[dtype] = np.asarray(Image.open(path), dtype=np.float64)
        assert unet.training, "validation hands the UNet back in train mode"
    assert np.abs(images[torch.bfloat16] - images[torch.float32]).mean() < 2.0
