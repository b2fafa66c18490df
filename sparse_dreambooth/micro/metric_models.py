"""The DreamBooth metrics' networks, trained in the micro world instead of downloaded.

Real DINO and CLIP weights cannot be had offline, and they would know nothing of the micro world's
figures anyway. These stand-ins are small CNNs trained by `scripts/train_micro_metrics.py` on
rendered world scenes and ship with the package (`weights/metric_models.safetensors`, checked
against the sha256 in `weights/metric_models.json` when loaded):

- `IdentityEncoder` (stands in for DINO): trained so that renders of the same instance under
  different pose, scale and context embed close and other instances far (InfoNCE). The micro
  subjects are never in its training set, so what it measures on them is generalisation.
- `DualEncoder` (stands in for CLIP, for CLIP-I, CLIP-T and CMMD): an image CNN and a
  bag-of-words caption encoder trained contrastively on (scene, caption) pairs into one space.
- `MicroLPIPS`: LPIPS's recipe on the identity encoder's features, with no learned heads: each
  tapped activation unit-normalised over channels, squared differences summed over channels,
  averaged over space, then averaged over the tapped layers.

Every encoder takes PIL images at any size (resized to `INPUT_SIZE`, bicubic) and returns
float32 (n, EMBED_DIM) embeddings, not normalised: the metric functions in `metrics.py`
normalise them, as they do CLIP's and DINO's. With `models = load_metric_models()`:

    DINO    models.identity.embed_images(images)          CLIP-I, CMMD  models.dual.embed_images(images)
    CLIP-T  models.dual.embed_texts(prompts)              LPIPS         models.lpips (metrics.LPIPS's interface)
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import write_json, write_safetensors
from sparse_dreambooth.micro.world import IMAGE_SIZE

# Bump whenever the architectures or the preprocessing change: weights of another version are refused.
METRIC_MODELS_VERSION = "v1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "metric_models.safetensors"
MANIFEST_FILE = "metric_models.json"

INPUT_SIZE = IMAGE_SIZE
EMBED_DIM = 128
# Channels of the four stages; each stage after the first halves the resolution.
STAGE_CHANNELS = (16, 32, 64, 128)
TEXT_HIDDEN = 256
UNKNOWN_WORD = "<unk>"
START_WORD = "<start>"  # in every bag, so an empty prompt still has an embedding


# --- preprocessing ---------------------------------------------------------------------------------


def image_pixels(images: list[Image.Image]) -> torch.Tensor:
    """(n, 3, INPUT_SIZE, INPUT_SIZE) float32 in [-1, 1]: RGB, resized bicubic when not at size."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (INPUT_SIZE, INPUT_SIZE):
            image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


def caption_words(text: str) -> list[str]:
    """The lower-case words of a caption: 'A photo of a dog, on the beach' -> [a, photo, of, ...]."""
    return re.findall(r"[a-z]+", text.lower())


# --- networks --------------------------------------------------------------------------------------


def _conv(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.SiLU(),
    )


class ConvTower(nn.Module):
    """A small CNN: a full-resolution stem, then three stages that halve the resolution.

    `stages(x)` gives each stage's output (the LPIPS taps); `forward` pools the last one (mean and
    max over space, concatenated) and projects it to EMBED_DIM.
    """

    def __init__(self):
        super().__init__()
        layers = [_conv(3, STAGE_CHANNELS[0], 1)]
        for channels_in, channels_out in zip(STAGE_CHANNELS, STAGE_CHANNELS[1:], strict=False):
            layers.append(nn.Sequential(_conv(channels_in, channels_out, 2), _conv(channels_out, channels_out, 1)))
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(2 * STAGE_CHANNELS[-1], EMBED_DIM)

    def stages(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        h = pixels
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        return outputs

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        last = self.stages(pixels)[-1]
        pooled = torch.cat([last.mean(dim=(-2, -1)), last.amax(dim=(-2, -1))], dim=-1)
        return self.head(pooled)


class _ImageEmbedder(nn.Module):
    """`embed_images`: PIL images in, (n, EMBED_DIM) float32 out, in batches, without gradients."""

    tower: ConvTower

    def embed_images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        device = next(self.parameters()).device
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = image_pixels(images[start : start + batch_size]).to(device)
                outputs.append(self.tower(pixels).float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0, EMBED_DIM)


class IdentityEncoder(_ImageEmbedder):
    """The DINO stand-in: embeddings of which instance an image shows."""

    def __init__(self):
        super().__init__()
        self.tower = ConvTower()


class TextEncoder(nn.Module):
    """Mean of word embeddings (a bag of words over a fixed vocabulary), then a two-layer MLP.

    Word order is lost, which the world's captions can afford: their words name the class, the
    context and the modifier, and no two captions differ by order alone.
    """

    def __init__(self, vocabulary: list[str]):
        super().__init__()
        if vocabulary[:2] != [UNKNOWN_WORD, START_WORD]:
            raise ValueError(f"a vocabulary starts with {UNKNOWN_WORD} and {START_WORD}")
        self.vocabulary = list(vocabulary)
        self.index = {word: position for position, word in enumerate(self.vocabulary)}
        self.words = nn.EmbeddingBag(len(self.vocabulary), EMBED_DIM, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(EMBED_DIM, TEXT_HIDDEN), nn.GELU(), nn.Linear(TEXT_HIDDEN, EMBED_DIM))

    def token_bags(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(word ids, bag offsets) for nn.EmbeddingBag; unknown words map to <unk>."""
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            ids.append(self.index[START_WORD])
            ids.extend(self.index.get(word, self.index[UNKNOWN_WORD]) for word in caption_words(text))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = self.token_bags(texts)
        device = self.words.weight.device
        return self.mlp(self.words(ids.to(device), offsets.to(device)))


class DualEncoder(_ImageEmbedder):
    """The CLIP stand-in: images and captions in one space (cosine = how well they match)."""

    def __init__(self, vocabulary: list[str]):
        super().__init__()
        self.tower = ConvTower()
        self.text = TextEncoder(vocabulary)

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                outputs.append(self.text(texts[start : start + batch_size]).float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0, EMBED_DIM)


class MicroLPIPS(nn.Module):
    """LPIPS-style distance from the identity encoder's stage outputs, unweighted.

    Has `metrics.LPIPS`'s interface (`tapped` once per image, `distance` between tapped features,
    `forward(x, y)`), so code that computes LPIPS diversity takes either.
    """

    def __init__(self, identity: IdentityEncoder):
        super().__init__()
        self.identity = identity

    def tapped(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output for images in [-1, 1] (N, 3, H, W), unit-normalised over channels."""
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = nn.functional.interpolate(
                images, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True
            )
        return [h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10) for h in self.identity.tower.stages(images)]

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of the spatial mean of the channel-summed squared differences (N,)."""
        per_layer = [(fa - fb).square().sum(dim=1).mean(dim=(-2, -1)) for fa, fb in zip(a, b, strict=True)]
        return torch.stack(per_layer).mean(dim=0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.tapped(x), self.tapped(y))


# --- the shipped set -------------------------------------------------------------------------------


@dataclass
class MicroMetricModels:
    """The three micro metric networks, in eval mode."""

    identity: IdentityEncoder
    dual: DualEncoder

    def __post_init__(self):
        self.lpips = MicroLPIPS(self.identity)
        for model in (self.identity, self.dual):
            model.requires_grad_(False).eval()

    def to(self, device) -> "MicroMetricModels":
        self.identity.to(device)
        self.dual.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"identity.{name}": value for name, value in self.identity.state_dict().items()}
        tensors.update({f"dual.{name}": value for name, value in self.dual.state_dict().items()})
        return {name: value.detach().contiguous() for name, value in tensors.items()}


def save_metric_models(models: MicroMetricModels, folder=WEIGHTS_DIR, provenance: dict | None = None) -> Path:
    """Write the weights (safetensors, same bytes for the same weights) and the manifest beside them
    that records their version and sha256; return the weights file."""
    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    metadata = {"version": METRIC_MODELS_VERSION, "vocabulary": json.dumps(models.dual.text.vocabulary)}
    write_safetensors(path, models.state_dict(), metadata=metadata)
    manifest = {
        "version": METRIC_MODELS_VERSION,
        "file": WEIGHTS_FILE,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        **(provenance or {}),
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return path


def load_metric_models(folder=WEIGHTS_DIR, device: str | torch.device = "cpu") -> MicroMetricModels:
    """The micro metric models from `folder` (default: the weights shipped in the package).

    Raises:
        UserError: the weights are missing, of another version, or damaged (checksum mismatch).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    manifest_path, path = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
    fix = "reinstall sparse-dreambooth, or retrain them with `python scripts/train_micro_metrics.py`"
    if not manifest_path.is_file() or not path.is_file():
        raise UserError(f"the micro metric models are missing from {folder}; {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_sha, version = manifest["sha256"], manifest["version"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest_path} is damaged (not a metric models manifest); {fix}") from None
    if version != METRIC_MODELS_VERSION:
        raise UserError(
            f"the micro metric models in {folder} are version {version}, this code needs {METRIC_MODELS_VERSION}; {fix}"
        )
    if _sha256(path) != expected_sha:
        raise UserError(f"{path} is damaged (its sha256 does not match {manifest_path.name}); {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            vocabulary = json.loads((handle.metadata() or {})["vocabulary"])
        identity, dual = IdentityEncoder(), DualEncoder(vocabulary)
        identity.load_state_dict(_prefixed(tensors, "identity."))
        dual.load_state_dict(_prefixed(tensors, "dual."))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UserError(
            f"{path} does not hold micro metric models {METRIC_MODELS_VERSION} ({first_line}); {fix}"
        ) from None
    return MicroMetricModels(identity, dual).to(device)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
