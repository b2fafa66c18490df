"""A run's adapter in the files other tools read (the PEFT mapping and the import are in peft.py).

Export a run's adapter.safetensors as:
    diffusers  one safetensors file `StableDiffusionXLPipeline.load_lora_weights` reads as is:
               "unet.<module>.lora_A.weight" (r, in) and "unet.<module>.lora_B.weight" (out, r), with
               alpha / r folded into lora_B (diffusers assumes alpha = r without extra metadata).
               LoRA only; a sparse adapter goes through a rank-`rank` SVD approximation. Adapted
               text encoders go in the same file as "text_encoder.text_model.<module>..." and
               "text_encoder_2.text_model.<module>...", as diffusers' own DreamBooth script saves them.
    peft       a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for
               `PeftModel.from_pretrained(unet, folder)`: LoRA as LoRA, WaveFT as `WaveFTConfig`,
               random-sparse as `WaveFTConfig(use_idwt=False)`. PEFT re-draws the sparse positions
               from the seed, so the export checks, layer by layer, that it would draw ours.
               Adapted text encoders get PEFT folders of their own, OUT/text_encoder and
               OUT/text_encoder_2, for `PeftModel.from_pretrained(pipe.text_encoder, ...)`.
    kohya      kohya-ss / A1111 / ComfyUI names, "lora_unet_<module, dots as underscores>" (and
               "lora_te1_text_model_<module>", "lora_te2_text_model_<module>" for the text encoders):
               LoRA as ".lora_down.weight" (r, in), ".lora_up.weight" (out, r), ".alpha" (scalar);
               a sparse adapter needs a choice: `rank` for an SVD LoRA (scale 1: alpha = rank; the
               error is reported, and is large at low ranks), or `full_diff` for the LyCORIS "full"
               layout, ".diff" (out, in) = the exact weight difference (a dense file: its size is
               announced before writing).
    merged     a diffusers UNet folder (or, with `pipeline`, the whole pipeline) with the adapter
               merged into the weights, for `from_pretrained`; an adapter on the text encoders too
               needs `pipeline`, which merges all three.

Every file is written atomically, with a model card beside it (model_card.py): README.md in a folder
export, NAME.md beside a file export. `import_adapter` (from peft.py) is re-exported here.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from sparse_dreambooth import __version__
from sparse_dreambooth.adapters.io import StoredAdapter, adapter_parts, layer_owner, open_adapter
from sparse_dreambooth.config import CLIP_ATTENTION_TARGETS, ModelSettings, load_config
from sparse_dreambooth.errors import UserError, did_you_mean
from sparse_dreambooth.files import atomic_folder, write_json, write_safetensors
from sparse_dreambooth.methods import method_of
from sparse_dreambooth.model_card import write_export_card
from sparse_dreambooth.peft import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    import_adapter,
    peft_adapter_config,
    peft_files,
    peft_kind,
    peft_wavelets,
    read_peft_adapter,
)
from sparse_dreambooth.runs import ADAPTER_FILE, CONFIG_FILE, MODEL_CARD

FORMATS = ("diffusers", "peft", "kohya", "merged")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# File names fixed by the tools that read them.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
# kohya's prefix of each model's layer names (`io.layer_owner`'s owners).
KOHYA_PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te1_text_model_",
    "text_encoder_2": "lora_te2_text_model_",
}


@dataclasses.dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the file or folder written.
        format: one of FORMATS.
        summary: one line for the user: what was written and how to load it.
        relative_error: for an SVD approximation, ||dW - up @ down||_F / ||dW||_F over all layers
            together (as written, after the dtype cast); None when the export is exact.
        layer_errors: the same per layer.
    """

    path: Path
    format: str
    summary: str
    relative_error: float | None = None
    layer_errors: dict[str, float] = dataclasses.field(default_factory=dict)


def _adapter_file(run) -> Path:
    """A run folder's adapter file (or the file itself when given one)."""
    run = Path(run)
    if run.is_file():
        return run
    if (run / ADAPTER_FILE).is_file():
        return run / ADAPTER_FILE
    if run.is_dir():
        raise UserError(f"{run} has no {ADAPTER_FILE}: pass the --output folder of a finished `sparse-db train` run")
    raise UserError(f"run folder {str(run)!r} does not exist")


# --- writing ----------------------------------------------------------------------------------


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


def _write_file(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out must name a .safetensors file for this format")
    write_safetensors(out, {name: tensor.contiguous() for name, tensor in tensors.items()}, metadata)


def _provenance(adapter: StoredAdapter) -> dict[str, str]:
    """Metadata every exported file carries: where it came from."""
    return {
        "sparse_dreambooth_version": __version__,
        "sparse_dreambooth_adapter_config": adapter.metadata["adapter_config"],
        "sparse_dreambooth_base_model": adapter.metadata.get("base_model", "unknown"),
    }


# --- low-rank approximation ---------------------------------------------------------------------


def _low_rank(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """down (r, in) and up (out, r) with up @ down the best rank-r approximation of delta.

    The singular values are split evenly (sqrt into each factor) so both factors have similar
    magnitudes in fp16. Returns the squared Frobenius norms of the residual, measured on the factors
    as written (after the dtype cast), and of delta.
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to(dtype)
    down = (root[:, None] * vh[:r]).to(dtype)
    residual = delta.float() - up.float() @ down.float()
    return down, up, residual.square().sum().item(), delta.float().square().sum().item()


def _lora_factors(adapter: StoredAdapter, rank: int | None, dtype: torch.dtype, what: str):
    """Per layer (down, up, alpha) for a LoRA-shaped export, and the approximation errors.

    LoRA adapters go out as they are (rank must be None); sparse adapters need `rank`.
    """
    if method_of(adapter.config).low_rank:
        if rank is not None:
            raise UserError("--rank is for approximating sparse adapters; a LoRA adapter is exported at its own rank")
        factors = {
            name: (module.lora_A.detach().to(dtype), module.lora_B.detach().to(dtype), float(module.alpha))
            for name, module in adapter.modules.items()
        }
        return factors, None, {}
    if rank is None:
        raise UserError(
            f"{what} reads LoRA only: pass --rank R for a rank-R SVD approximation of this {adapter.config.method} "
            "adapter, or export --format peft, kohya --full-diff (exact) or merged"
        )
    if rank <= 0:
        raise UserError(f"--rank must be a positive integer, got {rank}")
    factors, layer_errors, residual_total, norm_total = {}, {}, 0.0, 0.0
    with torch.no_grad():
        for name, module in adapter.modules.items():
            down, up, residual, norm = _low_rank(module.delta_weight(), rank, dtype)
            factors[name] = (down, up, float(down.shape[0]))  # alpha = rank: scale 1
            layer_errors[name] = math.sqrt(residual / norm) if norm > 0 else 0.0
            residual_total, norm_total = residual_total + residual, norm_total + norm
    overall = math.sqrt(residual_total / norm_total) if norm_total > 0 else 0.0
    return factors, overall, layer_errors


def _error_note(overall: float | None, layer_errors: dict[str, float], rank: int | None) -> str:
    if overall is None:
        return ""
    worst = max(layer_errors, key=layer_errors.get)
    return (
        f"; rank-{rank} SVD approximation: relative error {overall:.4f} overall, "
        f"worst {layer_errors[worst]:.4f} in {worst}"
    )


# --- the formats --------------------------------------------------------------------------------


def _export_diffusers(
    adapter: StoredAdapter, out: Path, rank: int | None, dtype: torch.dtype, overwrite: bool
) -> ExportResult:
    factors, overall, layer_errors = _lora_factors(adapter, rank, dtype, "diffusers' load_lora_weights")
    tensors = {}
    for name, (down, up, alpha) in factors.items():
        scale = alpha / down.shape[0]
        key = diffusers_key(name)
        tensors[f"{key}.lora_A.weight"] = down
        # Without alpha metadata diffusers uses scale 1 per layer; fold ours into B (exact when it is 1).
        tensors[f"{key}.lora_B.weight"] = up if scale == 1 else (up.float() * scale).to(dtype)
    target = out if out.suffix == ".safetensors" else out / DIFFUSERS_WEIGHT_NAME
    _check_destination(target, overwrite)
    _write_file(target, tensors, {"format": "pt", **_provenance(adapter)})
    summary = (
        f"wrote {target} (diffusers LoRA, {len(factors)} layers{_error_note(overall, layer_errors, rank)}); "
        f"load it with pipe.load_lora_weights({str(out)!r})"
    )
    return ExportResult(target, "diffusers", summary, overall, layer_errors)


def _kohya_choice(adapter: StoredAdapter, rank: int | None, full_diff: bool) -> None:
    """A sparse adapter has no exact LoRA form: the user picks an approximation or a dense file."""
    if method_of(adapter.config).low_rank:
        if full_diff:
            raise UserError("--full-diff is for sparse adapters; a LoRA adapter is exported exactly as LoRA")
        return
    if rank is not None and full_diff:
        raise UserError("--rank and --full-diff are two ways to export a sparse adapter to kohya; pass one")
    if rank is None and not full_diff:
        raise UserError(
            f"kohya has no exact small form of a {adapter.config.method} adapter: pass --rank R for an SVD LoRA "
            "(its error is reported; at rank 64 it is about 0.8 on SDXL) or --full-diff for exact dense weight "
            "differences (about 1.9 GB in fp16 on SDXL); --format peft or merged are exact"
        )


def full_diff_bytes(adapter: StoredAdapter, dtype: torch.dtype) -> int:
    """The tensor bytes of a kohya full-diff file: one dense (out, in) matrix per adapted layer."""
    return sum(math.prod(shape) for shape in adapter.shapes.values()) * dtype.itemsize


def _export_kohya(
    adapter: StoredAdapter,
    out: Path,
    rank: int | None,
    full_diff: bool,
    dtype: torch.dtype,
    overwrite: bool,
    notify: Callable[[str], None],
) -> ExportResult:
    _kohya_choice(adapter, rank, full_diff)
    if out.suffix != ".safetensors":
        raise UserError(
            f"--out {out}: kohya/A1111/ComfyUI read single .safetensors files; name one, e.g. {out.name}.safetensors"
        )
    _check_destination(out, overwrite)
    metadata = {**_provenance(adapter)}
    tensors = {}
    overall, layer_errors = None, {}
    if method_of(adapter.config).low_rank or rank is not None:
        factors, overall, layer_errors = _lora_factors(adapter, rank, dtype, "kohya")
        for name, (down, up, alpha) in factors.items():
            key = kohya_key(name)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
        ranks = sorted({down.shape[0] for down, _, _ in factors.values()})
        metadata.update(ss_network_module="networks.lora", ss_network_dim=str(ranks[-1]))
        kind = f"LoRA rank {ranks[-1]}"
    else:
        size = full_diff_bytes(adapter, dtype)
        notify(f"writing {out}: {len(adapter.modules)} dense weight differences, {size / 1e6:,.1f} MB")
        with torch.no_grad():
            for name, module in adapter.modules.items():
                tensors[f"{kohya_key(name)}.diff"] = module.delta_weight().to(dtype)
        metadata.update(ss_network_module="lycoris.kohya", ss_network_args=json.dumps({"algo": "full"}))
        kind = f"LyCORIS full weight differences, {size / 1e6:,.1f} MB"
    _write_file(out, tensors, metadata)
    summary = (
        f"wrote {out} (kohya/A1111/ComfyUI, {kind}, {len(adapter.modules)} layers"
        f"{_error_note(overall, layer_errors, rank)}); put it in ComfyUI's models/loras or A1111's models/Lora"
    )
    return ExportResult(out, "kohya", summary, overall, layer_errors)


def diffusers_key(name: str) -> str:
    """diffusers' name of an adapted layer: "unet.<module>" for the UNet, "text_encoder.text_model.<module>"
    and "text_encoder_2.text_model.<module>" for the encoders (diffusers drops "text_model." again for a
    transformers CLIPTextModel that has none)."""
    part, module_name = layer_owner(name)
    return f"unet.{name}" if part == "unet" else f"{part}.text_model.{module_name}"


def kohya_key(name: str) -> str:
    """kohya's name of an adapted layer: "lora_unet_" + the diffusers module name with dots as
    underscores; "lora_te1_text_model_" and "lora_te2_text_model_" + the same for the encoders'."""
    part, module_name = layer_owner(name)
    return KOHYA_PREFIXES[part] + module_name.replace(".", "_")


def _export_peft(adapter: StoredAdapter, out: Path, overwrite: bool) -> ExportResult:
    parts = adapter_parts(adapter)
    # The UNet's adapter at the top, as without the text encoders; theirs in subfolders named like
    # the pipeline's components.
    folders = {"": peft_files(parts.pop("unet"))}
    for encoder, part in parts.items():
        folders[encoder] = peft_files(_peft_text_encoder(part, encoder))
    _check_destination(out, overwrite)
    with atomic_folder(out) as staging:
        for folder, (adapter_config, tensors) in folders.items():
            (staging / folder).mkdir(exist_ok=True)
            write_json(staging / folder / PEFT_CONFIG_NAME, adapter_config)
            write_safetensors(staging / folder / PEFT_WEIGHTS_NAME, tensors, {"format": "pt", **_provenance(adapter)})
    encoders = "".join(
        f", PeftModel.from_pretrained(pipe.{encoder}, {str(out / encoder)!r})" for encoder in folders if encoder
    )
    summary = (
        f"wrote {out} (PEFT {peft_kind(adapter.config)} adapter, {len(adapter.modules)} layers); "
        f"load it with PeftModel.from_pretrained(pipe.unet, {str(out)!r}){encoders}"
    )
    return ExportResult(out, "peft", summary)


# transformers' class of each SDXL text encoder.
_TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


@functools.cache
def _nests_text_model(class_name: str) -> bool:
    """Whether the installed transformers keeps this CLIP class's layers under `text_model` (4.x;
    5.x still does for CLIPTextModelWithProjection but not for CLIPTextModel). PEFT names weights
    by the installed model's module names, so its files must too. Checked on a one-layer model."""
    import transformers

    config = transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, projection_dim=8
    )
    return hasattr(getattr(transformers, class_name)(config), "text_model")


def _peft_text_encoder(part: StoredAdapter, encoder: str) -> StoredAdapter:
    """A text encoder's part of the adapter as PEFT sees that encoder: its layers by the installed
    model's module names, and the CLIP projections as targets."""
    prefix = "text_model." if _nests_text_model(_TEXT_ENCODER_CLASSES[encoder]) else ""
    return dataclasses.replace(
        part,
        config=dataclasses.replace(part.config, targets=list(CLIP_ATTENTION_TARGETS)),
        shapes={prefix + name: shape for name, shape in part.shapes.items()},
        modules={prefix + name: module for name, module in part.modules.items()},
    )


def _run_folder(run: Path) -> Path | None:
    """The run folder an export reads: `run` itself, or the folder of the adapter file given."""
    folder = run if run.is_dir() else run.parent
    return folder if (folder / CONFIG_FILE).is_file() else None


def _run_model_settings(adapter: StoredAdapter, run: Path) -> ModelSettings:
    """The base model a run trained on: its config.yaml, else the run config stored in the file."""
    if (folder := _run_folder(run)) is not None:
        return load_config(folder / CONFIG_FILE).model
    if "run_config" in adapter.metadata:
        import yaml

        return ModelSettings(**(yaml.safe_load(adapter.metadata["run_config"]).get("model") or {}))
    raise UserError(
        f"cannot tell which base model {adapter.path} belongs to: export --format merged from its run folder "
        f"(with {CONFIG_FILE})"
    )


def _export_merged(
    adapter: StoredAdapter, run: Path, out: Path, dtype: torch.dtype, pipeline: bool, overwrite: bool
) -> ExportResult:
    from sparse_dreambooth.model import load_base_pipeline, model_identity
    from sparse_dreambooth.text_encoders import merge_adapter

    if adapter.config.train_text_encoder and not pipeline:
        raise UserError(
            "this adapter also adapts the text encoders, which a UNet folder leaves out: export --format merged "
            "--pipeline for the whole pipeline with all three merged"
        )
    _check_destination(out, overwrite)
    model = _run_model_settings(adapter, run)
    pipe = load_base_pipeline(model, torch.float32)
    merge_adapter(pipe, adapter.path, model_identity(model.model, model.revision, model.variant))  # fp32, then cast
    saved = pipe if pipeline else pipe.unet
    if dtype != torch.float32:
        saved.to(dtype)
    with atomic_folder(out) as staging:
        saved.save_pretrained(staging, safe_serialization=True)
    what, loader = ("SDXL pipeline", "StableDiffusionXLPipeline") if pipeline else ("UNet", "UNet2DConditionModel")
    summary = f"wrote {out} (diffusers {what}, adapter merged); load it with {loader}.from_pretrained({str(out)!r})"
    return ExportResult(out, "merged", summary)


def export_adapter(
    run,
    format: str,
    out,
    *,
    rank: int | None = None,
    full_diff: bool = False,
    dtype: str = "fp32",
    pipeline: bool = False,
    overwrite: bool = False,
    notify: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Write a run's adapter in another tool's format.

    Args:
        run: a run folder (or its adapter.safetensors).
        format: "diffusers" (a .safetensors file, or a folder that gets pytorch_lora_weights.safetensors),
            "peft" (a folder), "kohya" (a .safetensors file) or "merged" (a folder).
        out: where to write.
        rank: for diffusers and kohya, export a sparse adapter as its best rank-`rank` approximation
            (SVD per layer; the error is reported).
        full_diff: for kohya, export a sparse adapter as exact dense weight differences. A sparse
            adapter needs `rank` or `full_diff` for kohya.
        dtype: "fp32", "fp16" or "bf16" for the diffusers, kohya and merged weights. Default fp32.
        pipeline: for merged, write the whole SDXL pipeline instead of the UNet alone.
        overwrite: replace `out` if it exists.
        notify: told what is about to be written when that is large (a full-diff file's size).

    Raises:
        UserError: unknown format or dtype, a sparse adapter for a LoRA-only format without rank, an
            adapter PEFT cannot reproduce exactly, or an existing `out` without overwrite.
    """
    if format not in FORMATS:
        raise UserError(
            f"unknown export format {format!r}{did_you_mean(format, FORMATS)}; choose one of {', '.join(FORMATS)}"
        )
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if rank is not None and format not in ("diffusers", "kohya"):
        raise UserError(f"--rank applies to --format diffusers or kohya, not {format}")
    if full_diff and format != "kohya":
        raise UserError(f"--full-diff applies to --format kohya, not {format}")
    if pipeline and format != "merged":
        raise UserError("--pipeline applies to --format merged")
    run, out = Path(run), Path(out)
    adapter = open_adapter(_adapter_file(run))
    if format == "diffusers":
        result = _export_diffusers(adapter, out, rank, DTYPES[dtype], overwrite)
    elif format == "kohya":
        result = _export_kohya(adapter, out, rank, full_diff, DTYPES[dtype], overwrite, notify)
    elif format == "peft":
        result = _export_peft(adapter, out, overwrite)
    else:
        result = _export_merged(adapter, run, out, DTYPES[dtype], pipeline, overwrite)
    _write_card(adapter, run, out, result)
    return result


def _write_card(adapter: StoredAdapter, run: Path, out: Path, result: ExportResult) -> None:
    """The model card of the export: from the run folder, else from the run settings stored in the
    adapter file; an adapter without either (one brought in by `sparse-db import`) gets none."""
    from sparse_dreambooth.config import merge_settings

    folder = _run_folder(run)
    if folder is not None:
        config = load_config(folder / CONFIG_FILE)
    elif "run_config" in adapter.metadata:
        import yaml

        config = merge_settings(yaml.safe_load(adapter.metadata["run_config"]), {})
    else:
        return
    # A folder export gets README.md; a file export NAME.md beside it, never a README.md it might clobber.
    card = out / MODEL_CARD if out.is_dir() else out.with_suffix(".md")
    weights = adapter.metadata.get("weights")
    write_export_card(card, config, folder, weights, f"{result.format}: {result.summary}")


__all__ = [
    "DTYPES",
    "FORMATS",
    "ExportResult",
    "export_adapter",
    "full_diff_bytes",
    "diffusers_key",
    "import_adapter",
    "kohya_key",
    "peft_adapter_config",
    "peft_wavelets",
    "read_peft_adapter",
]
