"""Loading Stable Diffusion XL and computing its conditioning.

`load_pipeline` accepts the built-in tiny and micro models, a local diffusers folder, a single
`.safetensors` checkpoint or a Hugging Face Hub id, and turns every "cannot get this model" failure into a
one-line `UserError`. `encode_prompts` and `add_time_ids` reproduce what
`StableDiffusionXLPipeline` feeds the UNet, so training sees exactly what sampling will.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sparse_dreambooth.config import DEFAULT_MODEL
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder, cache_dir
from sparse_dreambooth.micro import model as micro_model
from sparse_dreambooth.tiny_model import TINY_MODEL_VERSION, build_tiny_pipeline

TINY_MODEL = "tiny"
MICRO_MODEL = "micro"  # pretrained on the micro world; its weights ship in the package

_ALTERNATIVES = "use `--model tiny` for a smoke run, or a local diffusers folder or .safetensors file"

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
        variant: Weight file variant such as `"fp16"`, for diffusers folders and Hub ids.
            Default: None.
        torch_dtype: dtype of every component, including the VAE. Default: torch.float32.

    Returns:
        The pipeline on the CPU.

    Raises:
        UserError: The model or VAE is not available: a missing local path, a file that is not
            `.safetensors`, a folder that is not a diffusers pipeline, or a Hub id that is not in
            the local cache when the Hub is unreachable or `HF_HUB_OFFLINE=1`.
    """
    local_path = None if model in (TINY_MODEL, MICRO_MODEL) else _local_path(model)
    if local_path is not None:
        _check_local_model(local_path)  # before the VAE, so a typo fails fast
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
    return _load_single_file(local_path, torch_dtype, components)


def evaluation_scheduler(scheduler_config):
    """The sampler the paper's authors used: DPM-Solver++ of order 2, from the model's schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)


def unet_skeleton(model: str, revision: str | None = None) -> torch.nn.Module | None:
    """The model's UNet built from its config on the meta device: its layer names and shapes,
    no weights, in about a second. Lets a run check its adapter budget before loading anything.

    Returns:
        None for a single-file checkpoint, whose config is only known once it is loaded.

    Raises:
        UserError: The model is not available (as `load_pipeline`).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if model == MICRO_MODEL:
        with init_empty_weights():
            return UNet2DConditionModel(**micro_model.unet_config())
    if model == TINY_MODEL:
        source = tiny_pipeline_path()
    else:
        local_path = _local_path(model)
        if local_path is not None:
            _check_local_model(local_path)
            if not local_path.is_dir():
                return None
        source = local_path or model
    try:
        config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
    except OSError as error:
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


def _load_single_file(path: Path, torch_dtype: torch.dtype, components: dict) -> StableDiffusionXLPipeline:
    try:
        return StableDiffusionXLPipeline.from_single_file(path, dtype=torch_dtype, **components)
    except OSError as error:
        # The file holds weights only: diffusers takes the configs and tokenizers of the base model
        # it recognises in the checkpoint from the Hugging Face cache, or downloads them.
        raise UserError(
            f"cannot load {path}: diffusers needs the configs of its base model ({DEFAULT_MODEL} for SDXL) "
            "in the Hugging Face cache and could not download them; load that model once while online, "
            "or pass a diffusers folder instead"
        ) from error


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


def model_identity(model: str, revision: str | None = None) -> str:
    """A short name of the base model, recorded in adapter files to catch a base-model mismatch.

    Args:
        model: The same value given to `load_pipeline`.
        revision: The same revision given to `load_pipeline`. Default: None (main).

    Returns:
        `"tiny-sdxl-<version>-seed0"` for the tiny model, `"micro-sdxl-<version>"` for the micro
        one, the absolute path for local models, and `"<hub id>@<revision>"` for Hub models.
    """
    if model == TINY_MODEL:
        return _tiny_model_name(seed=0)
    if model == MICRO_MODEL:
        return f"micro-sdxl-{micro_model.MICRO_MODEL_VERSION}"
    local_path = _local_path(model)
    if local_path is not None:
        return str(local_path)
    return f"{model}@{revision or 'main'}"


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
