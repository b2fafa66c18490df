"""Loading Stable Diffusion XL and computing its conditioning.

`load_pipeline` accepts the built-in tiny and micro models, a local diffusers folder, a single
`.safetensors` checkpoint (with `model_config`, a folder of its configs and tokenizers, nothing comes
from the Hub) or a Hugging Face Hub id, and turns every "cannot get this model" failure into a
one-line `UserError`. `model_identity` names the base model an adapter belongs to by its UNet's
config and a fingerprint of its weights, so a moved folder or a local copy of a Hub model is the
same model. `encode_prompts` and `add_time_ids` reproduce what `StableDiffusionXLPipeline` feeds
the UNet, so training sees exactly what sampling will.
"""

import contextlib
import hashlib
import importlib.resources
import json
import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sparse_dreambooth.adapters.io import BaseModel
from sparse_dreambooth.config import DEFAULT_MODEL
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder, cache_dir
from sparse_dreambooth.micro import model as micro_model
from sparse_dreambooth.tiny_model import TINY_MODEL_VERSION, build_tiny_pipeline

TINY_MODEL = "tiny"
MICRO_MODEL = "micro"  # pretrained on the micro world; its weights ship in the package

_ALTERNATIVES = "use `--model tiny` for a smoke run, or a local diffusers folder or .safetensors file"
# Tensor-name prefix of the UNet in an original-layout (A1111/ComfyUI) single file.
SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."

__all__ = [
    "DEFAULT_MODEL",
    "MICRO_MODEL",
    "TINY_MODEL",
    "add_time_ids",
    "build_tiny_pipeline",
    "cache_dir",
    "encode_prompts",
    "load_pipeline",
    "model_identity",
    "tiny_pipeline_path",
]


def _tiny_model_name(seed: int) -> str:
    return f"tiny-sdxl-{TINY_MODEL_VERSION}-seed{seed}"


def tiny_pipeline_path(seed: int = 0) -> Path:
    """Folder holding the tiny pipeline saved in diffusers format, built on first use.

    The pipeline is saved into a temporary folder next to the final one and renamed into place, so
    the final folder is either absent or complete. When several processes (DDP ranks) build at
    once, the first rename wins and the others discard their copy.

    Args:
        seed: Seed of the tiny model's weights. Default: 0.

    Returns:
        `cache_dir() / "tiny-sdxl-<version>-seed<seed>"`.
    """
    final = cache_dir() / _tiny_model_name(seed)
    if (final / "model_index.json").is_file():
        return final
    with atomic_folder(final, replace=False) as staging:
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    if not (final / "model_index.json").is_file():  # the folder was there, but not a finished copy
        raise UserError(f"{final} exists but holds no tiny model; delete it and run again")
    return final


def load_pipeline(
    model: str,
    *,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    model_config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> StableDiffusionXLPipeline:
    """Loads an SDXL pipeline; only safetensors weights are read, never pickles.

    Args:
        model: `"tiny"` for the built-in tiny model, `"micro"` for the pretrained micro model, a
            local diffusers folder, a local `.safetensors` checkpoint (A1111/ComfyUI layout), or a Hugging Face Hub id.
        vae: Optional replacement `AutoencoderKL`, as a Hub id or a local folder (e.g.
            `madebyollin/sdxl-vae-fp16-fix`, whose VAE does not overflow in fp16). Default: None.
        revision: Hub branch, tag or commit; ignored for the tiny and local models.
            Default: None (main).
        variant: Weight file variant such as `"fp16"`, for diffusers folders and Hub ids (a single
            file has one set of weights: ignored there). Default: None.
        model_config: For a single file only: a local folder with the pipeline's model_index.json,
            the components' config.json and the tokenizer and scheduler files (a diffusers folder
            of the same architecture, weights optional), read instead of the Hub. Default: None.
        torch_dtype: dtype of every component, including the VAE. Default: torch.float32.

    Returns:
        The pipeline on the CPU.

    Raises:
        UserError: The model or VAE is not available: a missing local path, a file that is not
            `.safetensors`, a folder that is not a diffusers pipeline, or a Hub id that is not in
            the local cache when the Hub is unreachable or `HF_HUB_OFFLINE=1`, or a
            `model_config` that is not a config folder or is given for a model that is not a
            single file.
    """
    local_path = None if model in (TINY_MODEL, MICRO_MODEL) else _local_path(model)
    if local_path is not None:
        _check_local_model(local_path)  # before the VAE, so a typo fails fast
    config_folder = _model_config_folder(model_config, local_path)
    components = {"vae": _load_vae(vae, torch_dtype)} if vae is not None else {}
    if model == MICRO_MODEL:
        return micro_model.load_micro_pipeline(torch_dtype, **components)
    if model == TINY_MODEL:
        return StableDiffusionXLPipeline.from_pretrained(
            tiny_pipeline_path(), dtype=torch_dtype, use_safetensors=True, **components
        )
    if local_path is None:
        return _load_from_hub(model, revision, variant, torch_dtype, components)
    if local_path.is_dir():
        return _load_local_folder(local_path, variant, torch_dtype, components)
    return _load_single_file(local_path, config_folder, torch_dtype, components)


def load_base_pipeline(settings, torch_dtype: torch.dtype):
    """The pipeline that `settings` (a config's `ModelSettings`) names, in `torch_dtype`, with the
    VAE kept in fp32: SDXL's VAE overflows in fp16, and sampling decodes in fp32 anyway."""
    pipe = load_pipeline(
        settings.model,
        vae=settings.vae,
        revision=settings.revision,
        variant=settings.variant,
        model_config=settings.model_config,
        torch_dtype=torch_dtype,
    )
    if torch_dtype != torch.float32:
        pipe.vae.to(torch.float32)
    return pipe


def evaluation_scheduler(scheduler_config):
    """The sampler the paper's authors used: DPM-Solver++ of order 2, from the model's schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)


def unet_skeleton(model: str, revision: str | None = None, model_config: str | None = None) -> torch.nn.Module:
    """The model's UNet built from its config on the meta device: its layer names and shapes,
    no weights, in about a second. Lets a run check its adapter budget before loading anything.

    A single file's UNet config is read from `model_config`, else from the Hub cache's copy of the
    base model diffusers recognises in the file's tensor names (what `load_pipeline` would use).

    Raises:
        UserError: The model is not available (as `load_pipeline`).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if model == MICRO_MODEL:
        with init_empty_weights():
            return UNet2DConditionModel(**micro_model.unet_config())
    local_path = None if model == TINY_MODEL else _local_path(model)
    if local_path is not None:
        _check_local_model(local_path)
    config_folder = _model_config_folder(model_config, local_path)
    if model == TINY_MODEL:
        source = tiny_pipeline_path()
    elif config_folder is not None:
        source = config_folder
    elif local_path is not None and local_path.is_file():
        source = _recognised_base_model(local_path)
    else:
        source = local_path or model
    try:
        config = UNet2DConditionModel.load_config(
            source, subfolder="unet", revision=revision if local_path is None else None
        )
    except OSError as error:
        if local_path is not None and local_path.is_file():
            raise _single_file_needs_configs(local_path, source) from error
        raise UserError(
            f"cannot read the UNet config of '{model}' (not cached and the Hub is unreachable); {_ALTERNATIVES}"
        ) from error
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def _check_local_model(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model path {path} does not exist; {_ALTERNATIVES}")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (it has no model_index.json)")
    if path.is_file() and path.suffix != ".safetensors":
        raise UserError(
            f"{path} is not a .safetensors file; pickle checkpoints (.ckpt, .bin) are not loaded "
            "because they can run code"
        )


def _model_config_folder(model_config: str | None, local_path: Path | None) -> Path | None:
    """The checked `model_config` folder: only a single file takes one."""
    if model_config is None:
        return None
    if local_path is None or not local_path.is_file():
        raise UserError(
            "--model-config is for a single .safetensors checkpoint; a diffusers folder or Hub id has its own configs"
        )
    folder = Path(model_config).expanduser().resolve()
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"--model-config {folder} is not a diffusers config folder (it has no model_index.json); pass a "
            "diffusers SDXL folder, or a copy of one with only its config, tokenizer and scheduler files"
        )
    return folder


def _recognised_base_model(path: Path) -> str:
    """The Hub id of the base model diffusers recognises from a single file's tensor names (SDXL
    base for an SDXL checkpoint), read from the header alone."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # names and shapes are all diffusers looks at
            header = {name: torch.empty(handle.get_slice(name).get_shape(), device="meta") for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from None
    return fetch_diffusers_config(header)["pretrained_model_name_or_path"]


def _single_file_needs_configs(path: Path, base_model: str) -> UserError:
    return UserError(
        f"cannot load {path} offline: a single file holds weights only, and the configs and tokenizers of its "
        f"base model ({base_model}) are not in the Hugging Face cache; pass --model-config DIR, a local diffusers "
        "folder of that model (configs and tokenizers are enough)"
    )


def _local_path(name: str) -> Path | None:
    """The filesystem path `name` refers to, or None when it can only be a Hub id."""
    path = Path(name).expanduser()
    if path.exists() or name.endswith(".safetensors") or not _is_hub_id(name):
        return path.resolve()
    return None


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _load_from_hub(
    model: str, revision: str | None, variant: str | None, torch_dtype: torch.dtype, components: dict
) -> StableDiffusionXLPipeline:
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            model, revision=revision, variant=variant, dtype=torch_dtype, use_safetensors=True, **components
        )
    except OSError as error:
        # diffusers reports "not cached", "offline", "no such repo" and "no safetensors" all as OSError.
        raise UserError(
            f"cannot load model '{model}': it is not a local folder, not fully in the Hugging Face cache, "
            f"and could not be downloaded (offline, Hub unreachable, or no safetensors weights); {_ALTERNATIVES}"
        ) from error


def _load_local_folder(
    path: Path, variant: str | None, torch_dtype: torch.dtype, components: dict
) -> StableDiffusionXLPipeline:
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            path, variant=variant, dtype=torch_dtype, use_safetensors=True, **components
        )
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"cannot load the diffusers folder {path}: {reason}") from error


def _load_single_file(
    path: Path, config_folder: Path | None, torch_dtype: torch.dtype, components: dict
) -> StableDiffusionXLPipeline:
    if config_folder is not None:  # everything but the weights from the folder: no Hub at all
        try:
            return StableDiffusionXLPipeline.from_single_file(
                path, config=str(config_folder), local_files_only=True, dtype=torch_dtype, **components
            )
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"cannot load {path} with the configs of {config_folder}: {reason}") from error
    try:
        return StableDiffusionXLPipeline.from_single_file(path, dtype=torch_dtype, **components)
    except OSError as error:
        # The file holds weights only: diffusers takes the configs and tokenizers of the base model
        # it recognises in the checkpoint from the Hugging Face cache, or downloads them.
        raise _single_file_needs_configs(path, _recognised_base_model(path)) from error


def _load_vae(vae: str, torch_dtype: torch.dtype) -> AutoencoderKL:
    local_path = _local_path(vae)
    if local_path is None:
        try:
            return AutoencoderKL.from_pretrained(vae, dtype=torch_dtype, use_safetensors=True)
        except OSError as error:
            raise UserError(
                f"cannot load VAE '{vae}': it is not a local folder, not in the Hugging Face cache, and could "
                "not be downloaded (offline or Hub unreachable); drop --vae or pass a local AutoencoderKL folder"
            ) from error
    if not local_path.is_dir():
        raise UserError(f"VAE folder {local_path} does not exist (expected a diffusers AutoencoderKL folder)")
    try:
        return AutoencoderKL.from_pretrained(local_path, dtype=torch_dtype, use_safetensors=True)
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"cannot load the VAE folder {local_path}: {reason}") from error


def model_identity(model: str, revision: str | None = None, variant: str | None = None) -> BaseModel:
    """The base model an adapter is trained on, recorded in its file and checked on load.

    Args:
        model: The same value given to `load_pipeline`.
        revision: The same revision given to `load_pipeline`. Default: None (main).
        variant: The same variant given to `load_pipeline`. Default: None.

    Returns:
        Its `name`: `"tiny-sdxl-<version>-seed0"` for the tiny model, `"micro-sdxl-<version>"` for
        the micro one, the absolute path for local models, `"<hub id>@<revision>"` for Hub models.
        Its `fingerprint` (see `unet_fingerprint`): the same wherever the files are and whatever
        name reaches them; None only for a Hub model whose UNet is not in the local cache.
    """
    if model == TINY_MODEL:
        name = _tiny_model_name(seed=0)
    elif model == MICRO_MODEL:
        name = f"micro-sdxl-{micro_model.MICRO_MODEL_VERSION}"
    elif (local_path := _local_path(model)) is not None:
        name = str(local_path)
    else:
        name = f"{model}@{revision or 'main'}"
    return BaseModel(name, _unet_fingerprint_of(model, revision, variant))


# --- the UNet's fingerprint ------------------------------------------------------------------------

FINGERPRINT_SCHEME = "unet-v1"  # changes whenever what is hashed changes
FINGERPRINT_ELEMENTS = 256  # leading values read from each tensor
_UNET_WEIGHTS = re.compile(r"diffusion_pytorch_model(\.(?P<variant>\w+))?(-\d+-of-\d+)?\.safetensors")


def unet_fingerprint(config: dict | None, files: list[Path], prefix: str = "") -> str:
    """`"unet-v1:<sha256>"` over the UNet's architecture config, every tensor's name and shape, and
    the first `FINGERPRINT_ELEMENTS` values of each tensor.

    Only those values are read, straight from the safetensors files: 0.9 MB of SDXL's 5.1 GB fp16
    UNet (1,680 tensors), in 0.05 s once the file is in the page cache.
    They are hashed as fp16, the way fp16 variant files are cast from fp32 ones, so a model's fp32
    and fp16 files give one fingerprint.

    Args:
        config: The UNet's config.json; keys starting with "_" (diffusers' version, the class,
            the path it was loaded from) are left out. None for a single file, whose tensor
            names and shapes already pin the architecture.
        files: The safetensors files holding the UNet (one, or the shards).
        prefix: Only tensors whose names start with it, named without it (a single file's UNet).
    """
    from safetensors import SafetensorError, safe_open

    digest = hashlib.sha256()
    if config is not None:
        architecture = {key: value for key, value in config.items() if not key.startswith("_")}
        digest.update(json.dumps(architecture, sort_keys=True).encode())
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as error:
                raise UserError(f"cannot read the UNet weights {file}: {error}; the file may be truncated") from None
            handles.update({name: handle for name in handle.keys() if name.startswith(prefix)})
        for name in sorted(handles):
            tensor_slice = handles[name].get_slice(name)
            shape = list(tensor_slice.get_shape())
            if shape:
                values = _leading_values(tensor_slice, shape, FINGERPRINT_ELEMENTS)
            else:  # a scalar cannot be sliced
                values = handles[name].get_tensor(name).reshape(1)
            digest.update(json.dumps([name.removeprefix(prefix), shape]).encode())
            digest.update(values.to(torch.float16).numpy().tobytes())
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def _leading_values(tensor_slice, shape: list[int], count: int) -> torch.Tensor:
    """The first `count` values of a tensor in memory order, reading one contiguous run of at most
    `count` plus one trailing row: index 0 on leading dimensions while the rest holds enough."""
    index = []
    for dimension in range(len(shape)):
        trailing = math.prod(shape[dimension + 1 :])
        if trailing >= count and dimension < len(shape) - 1:
            index.append(slice(0, 1))
            continue
        index.append(slice(0, math.ceil(count / trailing)))
        break
    return tensor_slice[tuple(index)].reshape(-1)[:count]


def _unet_fingerprint_of(model: str, revision: str | None, variant: str | None) -> str | None:
    if model == MICRO_MODEL:
        with importlib.resources.as_file(micro_model.weights_path()) as path:
            return unet_fingerprint(micro_model.unet_config(), [path], prefix="unet.")
    if model == TINY_MODEL:
        return _folder_fingerprint(tiny_pipeline_path(), variant)
    local_path = _local_path(model)
    if local_path is not None:
        if local_path.is_file():
            return unet_fingerprint(None, [local_path], prefix=SINGLE_FILE_UNET_PREFIX)
        return _folder_fingerprint(local_path, variant)  # None for a path that holds no UNet
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the cached snapshot only: load_pipeline has just filled it, and import must not download 10 GB
        snapshot = snapshot_download(model, revision=revision, allow_patterns=["unet/*"], local_files_only=True)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None
    return _folder_fingerprint(Path(snapshot), variant)


def _folder_fingerprint(folder: Path, variant: str | None) -> str | None:
    """A diffusers folder's UNet fingerprint, from the variant's weight files when it has them
    (diffusers loads the plain ones otherwise); None when the folder has no UNet weights."""
    unet = folder / "unet"
    if not (unet / "config.json").is_file():
        return None
    by_variant: dict[str | None, list[Path]] = {}
    for file in sorted(unet.iterdir()):
        if match := _UNET_WEIGHTS.fullmatch(file.name):
            by_variant.setdefault(match["variant"], []).append(file)
    files = by_variant.get(variant) or by_variant.get(None)
    if not files:
        return None
    return unet_fingerprint(json.loads((unet / "config.json").read_text()), files)


@torch.no_grad()
def encode_prompts(tokenizers, text_encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it.

    Gradients are off: the text encoders stay frozen in this project, and cached embeddings should
    not hold on to their graphs.

    Args:
        tokenizers: SDXL's two tokenizers, `[pipe.tokenizer, pipe.tokenizer_2]`.
        text_encoders: The matching encoders, `[pipe.text_encoder, pipe.text_encoder_2]`.
        prompts: One prompt per batch item; the same text goes to both encoders.

    Returns:
        `prompt_embeds` of shape (batch, 77, D1 + D2): each encoder's penultimate hidden states,
        concatenated; and `pooled_prompt_embeds` of shape (batch, D2): the projected end-of-text
        embedding of the second encoder.
    """
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        token_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = text_encoder(token_ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
    pooled = output.text_embeds  # only the last encoder (CLIPTextModelWithProjection) has a projection
    return torch.cat(hidden_states, dim=-1), pooled


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's size-and-crop conditioning for one image.

    Args:
        original_size: (height, width) of the image before resizing and cropping.
        crop_top_left: (top, left) pixel offset of the crop in the resized image.
        target_size: (height, width) of the image the model sees.

    Returns:
        A float32 tensor of shape (6,): original_size + crop_top_left + target_size.
    """
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
