"""The micro SDXL: Stable Diffusion XL's architecture at micro-world size, pretrained on the micro world.

Every module has SDXL's names and conditioning (two CLIP text encoders whose penultimate states are
concatenated, the pooled embedding plus six time ids as the `text_time` addition embedding, a VAE
with SDXL's scaling convention, SDXL's noise schedule), so adapters attach and training runs exactly
as on the real model. Sizes fit 64 px images: the VAE downsamples 4x to 16x16x4 latents.

The weights are trained once by `scripts/pretrain_micro.py` and ship in this package as one fp16
safetensors file; loading checks its sha256, so a damaged install fails with one clear line. The
text encoders were pretrained with the UNet; DreamBooth training keeps them frozen, as on SDXL.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json

import torch

from sparse_dreambooth.errors import UserError

MICRO_MODEL_VERSION = "v2"
WEIGHTS_FILE = f"micro-sdxl-{MICRO_MODEL_VERSION}.safetensors"
# sha256 of WEIGHTS_FILE as scripts/pretrain_micro.py wrote it; a different file is not these weights.
WEIGHTS_SHA256 = "ef8665d71976012e42fe632d4bd57117e967bbd136aa08662800064f03718c65"

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_ENCODER_DIM = 64
TEXT_ENCODER_2_DIM = 128
ADDITION_TIME_EMBED_DIM = 16
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def unet_config() -> dict:
    # SDXL's block layout (no attention at full latent resolution, cross-attention below it) with
    # 32-dim heads, one transformer layer and one resnet per block: sized so pretraining sees 128k
    # samples in 38 min on one CPU core (a 16M-parameter variant managed a third as many).
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        attention_head_dim=(1, 2, 4),  # diffusers reads SDXL's attention_head_dim as heads per block
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=16,
        use_linear_projection=True,
        cross_attention_dim=TEXT_ENCODER_DIM + TEXT_ENCODER_2_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_ENCODER_2_DIM + 6 * ADDITION_TIME_EMBED_DIM,
    )


def vae_config(scaling_factor: float = 1.0) -> dict:
    # Three blocks: 4x downsampling, 64 px -> 16x16x4 latents. The scaling factor (1 / latent std)
    # is measured after the VAE is trained, as SDXL's 0.13025 was.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def scheduler_config() -> dict:
    from sparse_dreambooth.tiny_model import _scheduler_config

    return _scheduler_config()  # SDXL base's, epsilon prediction


def build_micro_pipeline(seed: int = 0, scaling_factor: float = 1.0):
    """The micro pipeline with seeded random weights (what pretraining starts from).

    Args:
        seed: Seed of every component's initialisation. Default: 0.
        scaling_factor: The VAE's latent scaling factor. Default: 1.0.

    Returns:
        A `StableDiffusionXLPipeline` whose default resolution is 64 px.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sparse_dreambooth.tiny_model import _build_tokenizers, _text_encoder_config

    tokenizer, tokenizer_2 = _build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(scaling_factor))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, TEXT_ENCODER_DIM, "quick_gelu"))
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(tokenizer_2, TEXT_ENCODER_2_DIM, "gelu"))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config()),
        add_watermarker=False,
    )


def vocabulary_sha256() -> str:
    """Checksum of the tokenizers' vocabulary: the text encoders' embeddings are indexed by it."""
    from sparse_dreambooth.tiny_model import _build_tokenizers

    tokenizer, _ = _build_tokenizers()
    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()


def weights_path():
    """The shipped weights file (a path inside the installed package)."""
    return importlib.resources.files("sparse_dreambooth.micro") / WEIGHTS_FILE


def read_weights(path=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The micro model's tensors and metadata, after checking the file's sha256.

    Raises:
        UserError: The file is missing, damaged or from another version of the package.
    """
    from safetensors.torch import load

    path = path or weights_path()
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"the micro model's weights {path} are missing ({error.strerror}); reinstall the package"
        ) from error
    if hashlib.sha256(blob).hexdigest() != WEIGHTS_SHA256:
        raise UserError(f"the micro model's weights {path} are damaged (sha256 mismatch); reinstall the package")
    header_length = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + header_length]).get("__metadata__", {})
    return load(blob), metadata


def load_micro_pipeline(torch_dtype: torch.dtype = torch.float32, vae=None):
    """The pretrained micro pipeline on the CPU.

    Args:
        torch_dtype: dtype of every component. Default: torch.float32 (the file holds fp16).
        vae: Optional replacement `AutoencoderKL`. Default: None (the micro VAE).

    Raises:
        UserError: The weights file is missing or damaged, or does not fit this package's tokenizer.
    """
    tensors, metadata = read_weights()
    if metadata.get("version") != MICRO_MODEL_VERSION or metadata.get("vocabulary_sha256") != vocabulary_sha256():
        raise UserError(
            f"the micro model's weights are version {metadata.get('version')!r} for another vocabulary, "
            f"not {MICRO_MODEL_VERSION!r}; reinstall the package"
        )
    pipe = build_micro_pipeline(scaling_factor=float(metadata["vae_scaling_factor"]))
    for name in COMPONENTS:
        prefix = f"{name}."
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        getattr(pipe, name).load_state_dict(state, strict=True)
        getattr(pipe, name).eval()  # as from_pretrained leaves a model
    if vae is not None:
        pipe = type(pipe)(**{**pipe.components, "vae": vae})
    return pipe.to(dtype=torch_dtype) if torch_dtype != torch.float32 else pipe
