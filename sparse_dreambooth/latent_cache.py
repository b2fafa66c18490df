"""VAE latents on disk, so later runs on the same images (a sweep's runs above all) skip the VAE.

One safetensors file per (image variant, VAE), `FOLDER/ab/abcdef....safetensors`, holding the
latent distribution's mean and std exactly as a fresh encode gives them. The key is a sha256 of:
- the pixels the VAE sees: they follow from the image's bytes, the resolution, the bucket, the crop
  and the flip (and whatever else shapes them, such as Pillow's resampler), so no setting that
  changes a latent can be forgotten in the key;
- the VAE's identity: its config and the bytes of every tensor its encoder uses, and their dtype
  (`vae_identity`), so --vae, a fine-tuned VAE or another precision gets its own entries;
- the device type and the torch and diffusers versions, since other kernels round differently.

Runs that share the folder may write the same entry at once: each file is written to a temporary
name and renamed into place (files.write_safetensors), so a reader sees no file or a whole one,
and both writers write the same bytes. A file that cannot be read is encoded and written again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import write_safetensors

SCHEME = "latents-v1"  # changes whenever what is keyed or stored changes
# AutoencoderKL.encode reads only these modules' weights.
ENCODER_MODULES = ("encoder.", "quant_conv.")


def vae_identity(vae) -> str:
    """sha256 of the VAE's config and of every tensor its encoder reads (name, dtype, shape, bytes).

    The whole encoder rather than leading values (as the UNet's fingerprint): a VAE fine-tune may
    move few weights, and a stale latent would go unnoticed. SDXL's encoder is 34M values: 0.14 s
    on a 2-core CPU, once per run.
    """
    digest = hashlib.sha256()
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(ENCODER_MODULES):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """The cached latents of one VAE on one device type, in `folder`."""

    def __init__(self, folder: Path, vae, device: torch.device):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot create the latent cache {self.folder}: {error.strerror or error}; "
                "choose another --latent-cache"
            ) from None
        import diffusers

        self.identity = {
            "scheme": SCHEME,
            "vae": vae_identity(vae),
            "device": torch.device(device).type,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        }

    def key(self, pixels: torch.Tensor) -> str:
        """The entry of these pixels (3, H, W) under this VAE."""
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        pixels = pixels.detach().cpu().contiguous()
        digest.update(f"{pixels.dtype}|{tuple(pixels.shape)}|".encode())
        digest.update(pixels.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (mean, std), or None when the entry is absent or unreadable."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            stored = load_file(str(self.path(key)))
            return stored["mean"], stored["std"]
        except (SafetensorError, OSError, KeyError):
            return None

    def store(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        metadata = {**self.identity, "shape": json.dumps(list(mean.shape))}
        write_safetensors(self.path(key), {"mean": mean.contiguous(), "std": std.contiguous()}, metadata=metadata)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device, cache: LatentCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE latent distribution of one image (3, H, W) as (mean, std), each (1, C, h, w) float32
    on the CPU: from `cache` when it holds them, else encoded (and then stored in `cache`)."""
    key = cache.key(pixels) if cache is not None else None
    if key is not None and (cached := cache.load(key)) is not None:
        return cached
    distribution = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist
    mean, std = distribution.mean.float().cpu(), distribution.std.float().cpu()
    if key is not None:
        cache.store(key, mean, std)
    return mean, std
