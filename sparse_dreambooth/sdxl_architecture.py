"""The Stable Diffusion XL base UNet's architecture, buildable offline with random weights.

The config below is stabilityai/stable-diffusion-xl-base-1.0's `unet/config.json` (keys that equal
diffusers' defaults left out), written in code so benchmarks and tests can build the real
architecture, 2.57 B parameters and the 560 attention projections adapters attach to, without
downloading anything. Random weights change no shape and no cost.
"""

import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json.
SDXL_UNET_CONFIG = dict(
    sample_size=128,  # latent size: 1024 px
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    # diffusers reads this as heads per block (SDXL: 64-dim heads), as the hub config does.
    attention_head_dim=(5, 10, 20),
    norm_num_groups=32,
    cross_attention_dim=2048,  # penultimate states of both text encoders, 768 + 1280
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    # pooled text embedding (1280) + six 256-dim time ids
    projection_class_embeddings_input_dim=2816,
)


def build_sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """SDXL's base UNet with diffusers' default random initialisation, seeded.

    Args:
        seed: Seed of the weights. Default: 0.
        dtype: Parameter dtype. Default: torch.float32 (about 10.3 GB).
        device: Where to build it; "meta" gives the architecture without memory or time.
            Default: "cpu".

    Returns:
        A `UNet2DConditionModel` in train mode.
    """
    from diffusers import UNet2DConditionModel

    # Built in place on the device: no 10 GB detour through host memory for a GPU.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    # Casting only when asked: diffusers warns about any .to(dtype) of a model.
    return unet.to(dtype=dtype) if dtype != torch.float32 else unet
