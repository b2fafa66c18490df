"""The metric networks of the DreamBooth protocol: loading, preprocessing, embeddings.

The models are loaded once (`MetricModels`) and reused for every folder; each model sees
batches of images on the GPU when there is one. Preprocessing follows the protocols:
- DINO ViT-S/16: shorter side resized to 256 (bicubic), centre crop 224, ImageNet mean/std; the
  CLS token of the last layer. (For other input sizes: resize size*256/224, crop size.)
- CLIP (CLIP-I, CLIP-T): shorter side to the model's input size (bicubic), centre crop, CLIP
  mean/std; projected image and text embeddings.
- CMMD: the whole image resized to the model's square input (bicubic, no crop) as
  google-research/cmmd does, CLIP mean/std; projected embeddings, L2-normalised.
- LPIPS: images in [-1, 1]; the network is `metrics.LPIPS` (AlexNet, LPIPS v0.1 heads) from a
  safetensors file.

Model names: a Hub id, a local folder, "tiny" (small random models built here, for smoke runs
and tests), "micro" (the encoders trained in the micro world and shipped with the package, see
`micro/metric_models.py`; they take PIL images and do their own preprocessing) or, for CMMD and
LPIPS, "none" to skip that metric. A preset (`METRIC_MODEL_PRESETS`) names all four at once:
"paper" the protocol's networks, "micro" the micro ones.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparse_dreambooth import data
from sparse_dreambooth.data.images import upright_rgb
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import cache_dir, write_safetensors
from sparse_dreambooth.metrics import (
    LPIPS,
)
from sparse_dreambooth.micro.metric_models import DualEncoder, IdentityEncoder, MicroLPIPS, load_metric_models

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_CMMD = "openai/clip-vit-large-patch14-336"
DEFAULT_LPIPS = "alex"
TINY = "tiny"
MICRO = "micro"
SKIP = "none"
METRIC_MODEL_PRESETS = {
    "paper": {"dino": DEFAULT_DINO, "clip": DEFAULT_CLIP, "cmmd": DEFAULT_CMMD, "lpips": DEFAULT_LPIPS},
    MICRO: {"dino": MICRO, "clip": MICRO, "cmmd": MICRO, "lpips": MICRO},
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --- preprocessing ---------------------------------------------------------------------------------


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's Resize(resize, bicubic) then CenterCrop(crop), on a PIL image."""
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, Image.Resampling.BICUBIC)
    top = int(round((size[1] - crop) / 2.0))
    left = int(round((size[0] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def dino_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    return normalize(to_tensor(resize_center_crop(image, round(size * 256 / 224), size)), IMAGENET_MEAN, IMAGENET_STD)


def clip_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    return normalize(to_tensor(resize_center_crop(image, size, size)), CLIP_MEAN, CLIP_STD)


def cmmd_pixels(image: Image.Image, size: int = 336) -> torch.Tensor:
    pixels = torch.nn.functional.interpolate(
        to_tensor(image)[None], size=(size, size), mode="bicubic", align_corners=False
    )
    return normalize(pixels[0], CLIP_MEAN, CLIP_STD)


def lpips_pixels(image: Image.Image, size: int | None = None) -> torch.Tensor:
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return to_tensor(image) * 2.0 - 1.0


# --- models ---------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_dino(seed: int = 0):
    """A random ViT with DINO ViT-S/16's structure (CLS token, no pooler), 32x32 input."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return _seeded(seed, lambda: ViTModel(config, add_pooling_layer=False)).eval()


def tiny_clip_tokenizer():
    from sparse_dreambooth.tiny_model import _build_tokenizers

    return _build_tokenizers()[0]


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A random CLIP (text and vision towers, projections) and a tokenizer that knows every
    DreamBooth prompt word; built from configs, nothing downloaded."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    return _seeded(seed, lambda: CLIPModel(config)).eval(), tokenizer


def tiny_lpips(seed: int = 0) -> LPIPS:
    """LPIPS's AlexNet with random weights and non-negative random heads."""

    def build():
        network = LPIPS("alex")
        for parameter in network.features.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
        for lin in network.lins:
            lin.data = torch.rand(lin.shape) * 0.1
        return network

    return _seeded(seed, build)


def lpips_cache_file(net: str) -> Path:
    return cache_dir() / "lpips" / f"{net}-v0.1.safetensors"


def _hub_or_local(name: str) -> str:
    """A local folder's expanded path, else the name as a Hub id."""
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def load_lpips(name: str) -> LPIPS:
    """LPIPS from a safetensors file (or a folder / Hub repo holding one); 'alex' or 'vgg' mean the
    file `scripts/convert_lpips.py` writes into the cache; 'tiny' a random network."""
    from safetensors import safe_open

    if name == TINY:
        return tiny_lpips()
    if name in ("alex", "vgg"):
        path = lpips_cache_file(name)
        if not path.is_file():
            raise FileNotFoundError(f"no converted weights at {path}")
    else:
        path = Path(name).expanduser()
        if not path.exists():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, allow_patterns=["*.safetensors"]))
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(f"{name} must hold exactly one .safetensors file, found {len(files)}")
            path = files[0]
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    net = metadata.get("net") or ("vgg" if "features.28.weight" in tensors else "alex")
    network = LPIPS(net)
    try:
        network.load_lpips_state(tensors)
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not hold LPIPS {net} weights ({_first_line(error)})") from None
    return network


def convert_lpips_weights(backbone: dict, heads: dict, output, net: str = "alex") -> Path:
    """Write LPIPS weights as one safetensors file from two state dicts: torchvision's AlexNet or
    VGG16 (`features.N.*`; or a full LPIPS state dict, `net.sliceK.N.*`) and the five LPIPS v0.1
    heads (`linK.model.1.weight` as in the lpips package's weights/v0.1/{net}.pth, or `linK.weight`).

    Reading .pth files is left to scripts/convert_lpips.py: nothing in this package deserialises them.
    """
    tensors = {}
    for name, tensor in {**backbone, **heads}.items():
        name = name.removeprefix("module.")
        slice_match = re.match(r"^net\.slice\d+\.(\d+\.(weight|bias))$", name)
        head_match = re.match(r"^(lin\d)\.(model\.1\.)?weight$", name)
        if name.startswith("features."):
            tensors[name] = tensor
        elif slice_match:
            tensors[f"features.{slice_match.group(1)}"] = tensor
        elif head_match:
            tensors[f"{head_match.group(1)}.weight"] = tensor
    network = LPIPS(net)
    try:
        network.load_lpips_state(tensors)
    except (KeyError, RuntimeError) as error:
        raise UserError(f"these are not LPIPS {net} weights: {_first_line(error)}") from None
    output = Path(output)
    write_safetensors(output, network.lpips_state_dict(), metadata={"net": net, "lpips_version": "0.1"})
    return output


def load_image(path) -> Image.Image:
    return upright_rgb(Path(path))  # EXIF orientation, 16-bit and transparency handled


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class MetricModels:
    """The metric networks, loaded once; `None` where a metric is skipped."""

    dino: object
    clip: object
    clip_tokenizer: object
    cmmd: object
    lpips: LPIPS | MicroLPIPS | None
    names: dict
    device: torch.device
    batch_size: int = 16
    lpips_resolution: int | None = None
    target: str | None = None  # where `sparse-db sweep` moves the models while evaluating
    _real_cache: dict = field(default_factory=dict, repr=False)

    def to(self, device) -> "MetricModels":
        """Move every model (between evaluations, e.g. off the GPU while a sweep trains)."""
        self.device = _device(device)
        for model in (self.dino, self.clip, self.cmmd, self.lpips):
            if model is not None:
                model.to(self.device)
        return self

    @classmethod
    def load(
        cls,
        metric_models: str = "paper",
        dino: str | None = None,
        clip: str | None = None,
        cmmd: str | None = None,
        lpips: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        lpips_resolution: int | None = None,
    ) -> "MetricModels":
        """Load every model; if any cannot be had, one UserError names them all and the fix.

        Args:
            metric_models: The preset ("paper" or "micro") giving each model not named by the
                arguments after it.
        """
        if metric_models not in METRIC_MODEL_PRESETS:
            raise UserError(f"--metric-models must be one of {', '.join(METRIC_MODEL_PRESETS)}, got {metric_models!r}")
        preset = METRIC_MODEL_PRESETS[metric_models]
        dino, clip = dino or preset["dino"], clip or preset["clip"]
        cmmd, lpips = cmmd or preset["cmmd"], lpips or preset["lpips"]
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        failures = []
        # The micro encoders ship in one file: read it once whichever roles use it.
        micro_models = load_metric_models() if MICRO in (dino, clip, cmmd, lpips) else None

        def attempt(role: str, name: str, load):
            try:
                return load()
            except (OSError, ValueError, KeyError, FileNotFoundError) as error:
                failures.append((role, name, error))
                return None

        if dino == SKIP or clip == SKIP:
            raise UserError(
                "DINO and CLIP are the protocol's core metrics and cannot be skipped; only --cmmd and "
                "--lpips take 'none'"
            )
        dino_model = micro_models.identity if dino == MICRO else attempt("DINO", dino, lambda: _load_dino(dino))
        clip_pair = (micro_models.dual, None) if clip == MICRO else attempt("CLIP", clip, lambda: _load_clip(clip))
        cmmd_model = None
        if cmmd != SKIP:
            if cmmd == clip and clip_pair is not None:
                cmmd_model = clip_pair[0]
            elif cmmd == MICRO:
                cmmd_model = micro_models.dual
            else:
                cmmd_model = attempt("CMMD", cmmd, lambda: _load_cmmd(cmmd))
        lpips_model = None
        if lpips == MICRO:
            lpips_model = micro_models.lpips
        elif lpips != SKIP:
            lpips_model = attempt("LPIPS", lpips, lambda: load_lpips(lpips))
        if failures:
            listed = "; ".join(f"{role} {name!r} ({_first_line(error)})" for role, name, error in failures)
            hub_ids = ", ".join(
                f"`hf download {name}`" for role, name, _ in failures if role != "LPIPS" and not Path(name).exists()
            )
            lpips_hint = (
                f" For LPIPS run `python "
                f"scripts/convert_lpips.py{' --net ' + lpips if lpips in ('alex', 'vgg') else ''}` once with"
                " network access, or pass --lpips FILE.safetensors."
                if any(role == "LPIPS" for role, _, _ in failures)
                else ""
            )
            raise UserError(
                f"cannot load the metric models: {listed}. Download them once where the Hugging Face Hub is reachable"
                + (f" ({hub_ids}) and copy the HF cache here," if hub_ids else "")
                + " or pass local folders with --dino/--clip/--cmmd ('tiny' for a smoke run, 'micro' "
                "for the micro world's, 'none' skips CMMD or LPIPS)." + lpips_hint
            )
        target = _device(device)
        clip_model, tokenizer = clip_pair
        for model in (dino_model, clip_model, cmmd_model, lpips_model):
            if model is not None:
                model.to(target)
        return cls(
            dino=dino_model,
            clip=clip_model,
            clip_tokenizer=tokenizer,
            cmmd=cmmd_model,
            lpips=lpips_model,
            names={
                "dino": dino,
                "clip": clip,
                "cmmd": None if cmmd == SKIP else cmmd,
                "lpips": None if lpips == SKIP else lpips,
            },
            device=target,
            batch_size=batch_size,
            lpips_resolution=lpips_resolution,
        )

    # --- embeddings ---------------------------------------------------------------------------

    def _batched(self, images: list[Image.Image], prepare, embed) -> torch.Tensor:
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = torch.stack([prepare(image) for image in images[start : start + self.batch_size]])
                outputs.append(embed(pixels.to(self.device)).float().cpu())
        return torch.cat(outputs)

    def dino_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        if isinstance(self.dino, IdentityEncoder):
            return self.dino.embed_images(images, self.batch_size)
        size = self.dino.config.image_size
        return self._batched(
            images, lambda im: dino_pixels(im, size), lambda x: self.dino(pixel_values=x).last_hidden_state[:, 0]
        )

    def clip_image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        if isinstance(self.clip, DualEncoder):
            return self.clip.embed_images(images, self.batch_size)
        size = self.clip.config.vision_config.image_size
        return self._batched(images, lambda im: clip_pixels(im, size), lambda x: _clip_image_embed(self.clip, x))

    def clip_text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(self.clip, DualEncoder):
            return self.clip.embed_texts(prompts, self.batch_size)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                tokens = self.clip_tokenizer(
                    prompts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=77,
                    return_tensors="pt",
                )
                text = self.clip.text_model(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
                outputs.append(self.clip.text_projection(text.pooler_output).float().cpu())
        return torch.cat(outputs)

    def cmmd_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        if isinstance(self.cmmd, DualEncoder):
            return self.cmmd.embed_images(images, self.batch_size)
        config = self.cmmd.config
        size = (config.vision_config if hasattr(config, "vision_config") else config).image_size
        return self._batched(images, lambda im: cmmd_pixels(im, size), lambda x: _clip_image_embed(self.cmmd, x))

    def real_embeddings(self, subject: data.Subject) -> dict[str, torch.Tensor]:
        """Embeddings of the subject's real images per model ("dino", "clip", "cmmd"), computed
        once per subject."""
        key = tuple(str(path) for path in subject.image_paths)
        if key not in self._real_cache:
            images = [load_image(path) for path in subject.image_paths]
            embeddings = {"dino": self.dino_embeddings(images), "clip": self.clip_image_embeddings(images)}
            if self.cmmd is not None:
                embeddings["cmmd"] = self.cmmd_embeddings(images)
            self._real_cache[key] = embeddings
        return self._real_cache[key]

    def lpips_matrix(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, n) LPIPS distances between images (each featurised once)."""
        with torch.inference_mode():
            features = [
                self.lpips.tapped(lpips_pixels(image, self.lpips_resolution)[None].to(self.device)) for image in images
            ]
            n = len(images)
            matrix = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(i + 1, n):
                    matrix[i, j] = matrix[j, i] = self.lpips.distance(features[i], features[j]).item()
        return matrix


def _clip_image_embed(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings from a CLIPModel or a CLIPVisionModelWithProjection."""
    if hasattr(model, "visual_projection"):
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return model(pixel_values=pixels).image_embeds


def _load_dino(name: str):
    if name == TINY:
        return tiny_dino()
    from transformers import AutoConfig, AutoModel, ViTModel

    name = _hub_or_local(name)
    config = AutoConfig.from_pretrained(name)
    if config.model_type == "vit":  # DINO v1 checkpoints have no pooler; the CLS token is the embedding
        return ViTModel.from_pretrained(name, add_pooling_layer=False).eval()
    return AutoModel.from_pretrained(name).eval()


def _load_clip(name: str):
    if name == TINY:
        return tiny_clip()
    from transformers import AutoTokenizer, CLIPModel

    name = _hub_or_local(name)
    return CLIPModel.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


def _load_cmmd(name: str):
    if name == TINY:
        return tiny_clip(seed=1, image_size=48)[0]
    from transformers import CLIPVisionModelWithProjection

    name = _hub_or_local(name)
    return CLIPVisionModelWithProjection.from_pretrained(name).eval()


# --- samples ---------------------------------------------------------------------------------------
