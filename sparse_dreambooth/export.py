"""Adapters in and out: the files other tools read, and PEFT adapters brought into a run folder.

Export a run's adapter.safetensors as:
    diffusers  one safetensors file `StableDiffusionXLPipeline.load_lora_weights` reads as is:
               "unet.<module>.lora_A.weight" (r, in) and "unet.<module>.lora_B.weight" (out, r), with
               alpha / r folded into lora_B (diffusers assumes alpha = r without extra metadata).
               LoRA only; a sparse adapter goes through a rank-`rank` SVD approximation.
    peft       a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for
               `PeftModel.from_pretrained(unet, folder)`: LoRA as LoRA, WaveFT as `WaveFTConfig`,
               random-sparse as `WaveFTConfig(use_idwt=False)`. PEFT re-draws the sparse positions
               from the seed, so the export checks, layer by layer, that it would draw ours.
    kohya      kohya-ss / A1111 / ComfyUI names, "lora_unet_<module, dots as underscores>":
               LoRA as ".lora_down.weight" (r, in), ".lora_up.weight" (out, r), ".alpha" (scalar);
               a sparse adapter as the LyCORIS "full" layout, ".diff" (out, in) = the exact weight
               difference, or with `rank` as an SVD LoRA (scale 1: alpha = rank).
    merged     a diffusers UNet folder (or, with `pipeline`, the whole pipeline) with the adapter
               merged into the weights, for `from_pretrained`.

Import (`import_adapter`): a PEFT WaveFT or LoRA adapter folder becomes a run folder (config.yaml,
adapter.safetensors with the positions PEFT draws, run.json naming its origin), so `sparse-db
sample` and `evaluate` work on adapters trained elsewhere.

Only safetensors are read (pickled .bin weights are refused) and every file is written atomically.
"""

import contextlib
import dataclasses
import json
import math
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from sparse_dreambooth import __version__
from sparse_dreambooth.adapters import AdaptedLinear, AdapterConfig, load_adapter, read_adapter, save_adapter, unload
from sparse_dreambooth.adapters.layer import _matches
from sparse_dreambooth.adapters.lora import LoraAdapter
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions
from sparse_dreambooth.config import SECTIONS, ModelSettings, dump_yaml, load_config, merge_settings
from sparse_dreambooth.errors import UserError, did_you_mean
from sparse_dreambooth.files import share_like_open, write_json, write_safetensors, write_text

FORMATS = ("diffusers", "peft", "kohya", "merged")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# File names fixed by the tools that read them.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's module names
KOHYA_UNET_PREFIX = "lora_unet_"
# The run folder layout of train.py (not imported from there: it would pull in the training stack).
RUN_ADAPTER, RUN_CONFIG, RUN_INFO = "adapter.safetensors", "config.yaml", "run.json"


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


# --- our adapter file, without a model -----------------------------------------------------------


@dataclasses.dataclass
class _Adapter:
    config: AdapterConfig
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, int]]  # module name -> (out, in), in module order
    modules: dict[str, nn.Module]  # module name -> LoraAdapter or SparseAdapter holding the file's values
    path: Path


def _adapter_file(run) -> Path:
    """A run folder's adapter file (or the file itself when given one)."""
    run = Path(run)
    if run.is_file():
        return run
    if (run / RUN_ADAPTER).is_file():
        return run / RUN_ADAPTER
    if run.is_dir():
        raise UserError(f"{run} has no {RUN_ADAPTER}: pass the --output folder of a finished `sparse-db train` run")
    raise UserError(f"run folder {str(run)!r} does not exist")


def _read(run) -> _Adapter:
    """Rebuild the file's adapters, layer by layer, as the modules that compute their deltas."""
    path = _adapter_file(run)
    config, tensors, metadata = read_adapter(path)
    shapes = {name: tuple(shape) for name, shape in json.loads(metadata["layers"]).items()}
    modules = {}
    for name, shape in shapes.items():
        try:
            if config.method == "lora":
                lora_a = tensors[f"{name}.lora_A"]
                module = LoraAdapter(shape, lora_a.shape[0], config.alpha or lora_a.shape[0], torch.Generator())
                _set_parameters(module, lora_A=lora_a, lora_B=tensors[f"{name}.lora_B"])
            else:
                wavelet = config.wavelet if config.method == "waveft" else None
                module = SparseAdapter(shape, tensors[f"{name}.positions"].long(), config.scaling, wavelet)
                _set_parameters(module, coefficients=tensors[f"{name}.coefficients"])
        except (KeyError, ValueError) as error:
            raise UserError(
                f"{path}: the tensors of layer {name!r} are missing or mis-shaped ({error}); the file is damaged"
            ) from None
        modules[name] = module
    return _Adapter(config, metadata, shapes, modules, path)


def _set_parameters(module: nn.Module, **values: torch.Tensor) -> None:
    """Copy values into a fresh adapter's parameters (not load_state_dict: that would make a
    sparse adapter re-derive everything from its positions a second time)."""
    with torch.no_grad():
        for name, value in values.items():
            parameter = getattr(module, name)
            if value.shape != parameter.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(parameter.shape)}")
            parameter.copy_(value)


def _holder(modules: dict[str, nn.Module], shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A weightless stand-in model with the adapters at their module names, for `save_adapter`.

    Base linears live on the meta device: SDXL's attention weights are never allocated.
    """
    root = nn.Module()
    for name, module in modules.items():
        *parents, leaf = name.split(".")
        parent = root
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        out_features, in_features = shapes[name]
        base = nn.Linear(in_features, out_features, bias=False, device="meta")
        parent.add_module(leaf, AdaptedLinear(base, module))
    return root


# --- writing ----------------------------------------------------------------------------------


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


@contextlib.contextmanager
def _staged_folder(out: Path):
    """Yield an empty folder beside `out` that replaces `out` once the block succeeds.

    A crash leaves the previous `out` (or nothing), never a half-written folder.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_file(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out must name a .safetensors file for this format")
    write_safetensors(out, {name: tensor.contiguous() for name, tensor in tensors.items()}, metadata)


def _provenance(adapter: _Adapter) -> dict[str, str]:
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


def _lora_factors(adapter: _Adapter, rank: int | None, dtype: torch.dtype, what: str):
    """Per layer (down, up, alpha) for a LoRA-shaped export, and the approximation errors.

    LoRA adapters go out as they are (rank must be None); sparse adapters need `rank`.
    """
    if adapter.config.method == "lora":
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
            "adapter, or export --format peft, kohya (exact full diffs) or merged"
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
    adapter: _Adapter, out: Path, rank: int | None, dtype: torch.dtype, overwrite: bool
) -> ExportResult:
    factors, overall, layer_errors = _lora_factors(adapter, rank, dtype, "diffusers' load_lora_weights")
    tensors = {}
    for name, (down, up, alpha) in factors.items():
        scale = alpha / down.shape[0]
        tensors[f"unet.{name}.lora_A.weight"] = down
        # Without alpha metadata diffusers uses scale 1 per layer; fold ours into B (exact when it is 1).
        tensors[f"unet.{name}.lora_B.weight"] = up if scale == 1 else (up.float() * scale).to(dtype)
    target = out if out.suffix == ".safetensors" else out / DIFFUSERS_WEIGHT_NAME
    _check_destination(target, overwrite)
    _write_file(target, tensors, {"format": "pt", **_provenance(adapter)})
    summary = (
        f"wrote {target} (diffusers LoRA, {len(factors)} layers{_error_note(overall, layer_errors, rank)}); "
        f"load it with pipe.load_lora_weights({str(out)!r})"
    )
    return ExportResult(target, "diffusers", summary, overall, layer_errors)


def _export_kohya(adapter: _Adapter, out: Path, rank: int | None, dtype: torch.dtype, overwrite: bool) -> ExportResult:
    if out.suffix != ".safetensors":
        raise UserError(
            f"--out {out}: kohya/A1111/ComfyUI read single .safetensors files; name one, e.g. {out.name}.safetensors"
        )
    _check_destination(out, overwrite)
    metadata = {**_provenance(adapter)}
    tensors = {}
    overall, layer_errors = None, {}
    if adapter.config.method == "lora" or rank is not None:
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
        with torch.no_grad():
            for name, module in adapter.modules.items():
                tensors[f"{kohya_key(name)}.diff"] = module.delta_weight().to(dtype)
        metadata.update(ss_network_module="lycoris.kohya", ss_network_args=json.dumps({"algo": "full"}))
        kind = "LyCORIS full weight differences"
    _write_file(out, tensors, metadata)
    summary = (
        f"wrote {out} (kohya/A1111/ComfyUI, {kind}, {len(adapter.modules)} layers"
        f"{_error_note(overall, layer_errors, rank)}); put it in ComfyUI's models/loras or A1111's models/Lora"
    )
    return ExportResult(out, "kohya", summary, overall, layer_errors)


def kohya_key(module_name: str) -> str:
    """kohya's name of a UNet module: "lora_unet_" + the diffusers module name with dots as underscores."""
    return KOHYA_UNET_PREFIX + module_name.replace(".", "_")


def _pattern_key(pattern_keys, name: str) -> str | None:
    """Which *_pattern key PEFT applies to module `name` (its rule: the first key matching a
    dot-separated suffix, as a regular expression)."""
    return next((key for key in pattern_keys if re.match(rf"(.*\.)?({key})$", name)), None)


def _peft_targets(config: AdapterConfig, names: list[str]) -> list[str]:
    """PEFT's target_modules: the run's own patterns when PEFT reads them as we do (plain names,
    matched as a dot-separated suffix), else every adapted module by its full name."""
    plain = all(not any(char in target for char in "*?[") for target in config.targets)
    if plain and all(any(_matches(name, target) for target in config.targets) for name in names):
        return list(config.targets)
    return list(names)


def _base_model_fields(adapter: _Adapter) -> dict:
    base_model, _, revision = adapter.metadata.get("base_model", "").partition("@")
    return {"base_model_name_or_path": base_model or None, "revision": revision or None}


def peft_adapter_config(adapter: _Adapter) -> dict:
    """The adapter_config.json PEFT writes for the same adapter (fields of its LoraConfig/WaveFTConfig)."""
    config, names = adapter.config, list(adapter.modules)
    common = {
        **_base_model_fields(adapter),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "exclude_modules": None,
        "target_modules": _peft_targets(config, names),
        "task_type": None,
    }
    if config.method == "lora":
        ranks = {module.rank for module in adapter.modules.values()}
        alphas = {module.alpha for module in adapter.modules.values()}
        assert len(ranks) == len(alphas) == 1, "our LoRA has one rank and alpha for every layer"
        return {
            **common,
            "peft_type": "LORA",
            "r": ranks.pop(),
            "lora_alpha": alphas.pop(),
            "lora_dropout": 0.0,
            "init_lora_weights": "gaussian",
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
    counts = {name: module.coefficients.numel() for name, module in adapter.modules.items()}
    n_frequency = Counter(counts.values()).most_common(1)[0][0]
    pattern = {name: count for name, count in counts.items() if count != n_frequency}
    for name, count in counts.items():  # PEFT resolves patterns by regex: make sure each lands
        key = _pattern_key(pattern, name)
        if (pattern[key] if key else n_frequency) != count:
            raise UserError(
                f"layer {name!r}: PEFT's n_frequency_pattern cannot single it out; export --format kohya or merged"
            )
    wavelet = config.wavelet if config.method == "waveft" else "db1"
    return {
        **common,
        "peft_type": "WAVEFT",
        "n_frequency": n_frequency,
        "n_frequency_pattern": pattern,
        "proportional_parameters": False,
        "scaling": config.scaling,
        "wavelet_family": "db1" if wavelet == "haar" else wavelet,  # the same filters under PEFT's name
        "use_idwt": config.method == "waveft",
        "random_loc_seed": config.adapter_seed,
        "init_weights": True,
    }


def peft_wavelets() -> set[str]:
    """Wavelets PEFT's WaveFT implements: Daubechies, symlets and coiflets."""
    import pywt

    return {*pywt.wavelist("db"), *pywt.wavelist("sym"), *pywt.wavelist("coif"), "haar"}


def _check_peft_positions(adapter: _Adapter) -> None:
    """PEFT does not store positions: it re-draws them from the seed. Refuse if it would draw others."""
    config = adapter.config
    drawn: dict[tuple, torch.Tensor] = {}  # one seed for every layer: same shape and count, same draw
    for name, module in adapter.modules.items():
        key = (adapter.shapes[name], module.coefficients.numel())
        if key not in drawn:
            drawn[key] = random_positions(*key, config.adapter_seed)
        if not torch.equal(module.positions.cpu(), drawn[key]):
            raise UserError(
                f"layer {name!r}: its stored positions are not the ones PEFT draws from seed {config.adapter_seed} "
                f"under torch {torch.__version__} (the adapter was made with another torch or other positions), so "
                "PEFT would load it wrongly; export --format kohya or merged instead"
            )


def _export_peft(adapter: _Adapter, out: Path, overwrite: bool) -> ExportResult:
    config = adapter.config
    if config.method == "waveft" and config.wavelet not in peft_wavelets():
        raise UserError(
            f"PEFT's WaveFT has no {config.wavelet!r} wavelet (it has db1-38, sym2-20, coif1-17); "
            "export --format kohya or merged instead"
        )
    if config.method != "lora":
        _check_peft_positions(adapter)
    adapter_config = peft_adapter_config(adapter)
    tensors = {}
    for name, module in adapter.modules.items():
        if config.method == "lora":
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float()
        else:
            tensors[f"{PEFT_PREFIX}{name}.waveft_spectrum"] = module.coefficients.detach().float()
    _check_destination(out, overwrite)
    with _staged_folder(out) as staging:
        write_json(staging / PEFT_CONFIG_NAME, adapter_config)
        write_safetensors(staging / PEFT_WEIGHTS_NAME, tensors, {"format": "pt", **_provenance(adapter)})
    kind = "LoRA" if config.method == "lora" else f"WaveFT{'' if config.method == 'waveft' else ' use_idwt=False'}"
    summary = (
        f"wrote {out} (PEFT {kind} adapter, {len(adapter.modules)} layers); "
        f"load it with PeftModel.from_pretrained(pipe.unet, {str(out)!r})"
    )
    return ExportResult(out, "peft", summary)


def _run_model_settings(adapter: _Adapter, run: Path) -> ModelSettings:
    """The base model a run trained on: its config.yaml, else the run config stored in the file."""
    config_file = run / RUN_CONFIG if run.is_dir() else run.parent / RUN_CONFIG
    if config_file.is_file():
        return load_config(config_file).model
    if "run_config" in adapter.metadata:
        import yaml

        return ModelSettings(**(yaml.safe_load(adapter.metadata["run_config"]).get("model") or {}))
    raise UserError(
        f"cannot tell which base model {adapter.path} belongs to: export --format merged from its run folder "
        f"(with {RUN_CONFIG})"
    )


def _export_merged(
    adapter: _Adapter, run: Path, out: Path, dtype: torch.dtype, pipeline: bool, overwrite: bool
) -> ExportResult:
    from sparse_dreambooth.model import load_pipeline, model_identity

    _check_destination(out, overwrite)
    model = _run_model_settings(adapter, run)
    pipe = load_pipeline(
        model.model, vae=model.vae, revision=model.revision, variant=model.variant, torch_dtype=torch.float32
    )
    load_adapter(pipe.unet, adapter.path, base_model=model_identity(model.model, model.revision))
    unload(pipe.unet)  # merged in fp32, then cast: one rounding
    saved = pipe if pipeline else pipe.unet
    if dtype != torch.float32:
        saved.to(dtype)
    with _staged_folder(out) as staging:
        saved.save_pretrained(staging, safe_serialization=True)
        share_like_open(staging)
    what, loader = ("SDXL pipeline", "StableDiffusionXLPipeline") if pipeline else ("UNet", "UNet2DConditionModel")
    summary = f"wrote {out} (diffusers {what}, adapter merged); load it with {loader}.from_pretrained({str(out)!r})"
    return ExportResult(out, "merged", summary)


def export_adapter(
    run,
    format: str,
    out,
    *,
    rank: int | None = None,
    dtype: str = "fp32",
    pipeline: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write a run's adapter in another tool's format.

    Args:
        run: a run folder (or its adapter.safetensors).
        format: "diffusers" (a .safetensors file, or a folder that gets pytorch_lora_weights.safetensors),
            "peft" (a folder), "kohya" (a .safetensors file) or "merged" (a folder).
        out: where to write.
        rank: for diffusers and kohya, export a sparse adapter as its best rank-`rank` approximation
            (SVD per layer; the error is reported). Without it kohya writes exact full diffs.
        dtype: "fp32", "fp16" or "bf16" for the diffusers, kohya and merged weights. Default fp32.
        pipeline: for merged, write the whole SDXL pipeline instead of the UNet alone.
        overwrite: replace `out` if it exists.

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
    if pipeline and format != "merged":
        raise UserError("--pipeline applies to --format merged")
    run, out = Path(run), Path(out)
    adapter = _read(run)
    if format == "diffusers":
        return _export_diffusers(adapter, out, rank, DTYPES[dtype], overwrite)
    if format == "kohya":
        return _export_kohya(adapter, out, rank, DTYPES[dtype], overwrite)
    if format == "peft":
        return _export_peft(adapter, out, overwrite)
    return _export_merged(adapter, run, out, DTYPES[dtype], pipeline, overwrite)


# --- import ---------------------------------------------------------------------------------------


def read_peft_adapter(source) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config and weights (module name -> {tensor suffix -> tensor})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = Path(source)
    if not (source / PEFT_CONFIG_NAME).is_file():
        raise UserError(
            f"{source} is not a PEFT adapter folder (no {PEFT_CONFIG_NAME}); pass the folder save_pretrained wrote"
        )
    weights = source / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        if (source / PEFT_PICKLED_WEIGHTS_NAME).is_file():
            raise UserError(
                f"{source} holds pickled weights ({PEFT_PICKLED_WEIGHTS_NAME}), which sparse-db never "
                f"loads (they can run "
                "code); re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        raise UserError(f"{source} has no {PEFT_WEIGHTS_NAME}")
    try:
        peft_config = json.loads((source / PEFT_CONFIG_NAME).read_text())
        tensors = load_file(str(weights))
    except json.JSONDecodeError as error:
        raise UserError(f"{source / PEFT_CONFIG_NAME} is not valid JSON ({error})") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{weights} is not a readable safetensors file ({error}); it may be truncated") from None
    if not isinstance(peft_config, dict):
        raise UserError(f"{source / PEFT_CONFIG_NAME} must hold a JSON object")
    return peft_config, {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in tensors.items()}


def _split_keys(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], source
) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((suffix for suffix in suffixes if key.endswith("." + suffix)), None)
        if suffix is None:
            hint = " (DoRA is not supported)" if "lora_magnitude_vector" in key else ""
            expected = " or ".join(f"*.{suffix}" for suffix in suffixes)
            raise UserError(f"{source}: tensor {key!r} is not one this import understands{hint}; expected {expected}")
        layers.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
    if not layers:
        raise UserError(f"{source}: the adapter holds no tensors")
    return layers


def _refuse_unsupported(peft_config: dict, source, checks: dict[str, str]) -> None:
    """PEFT options that train something besides the adapted linears' deltas: refused, with the fix."""
    for key, fix in checks.items():
        value = peft_config.get(key)
        if value not in (None, False, "none", [], {}):
            raise UserError(f"{source}: {key}={value!r} is not supported by this import; {fix}")


def _check_layers(layers: dict, shapes: dict, source, model: str) -> None:
    for name in layers:
        if name not in shapes:
            raise UserError(
                f"{source}: {name!r} is not a linear layer of the {model} UNet; import adapters trained on "
                "this model's UNet (text-encoder adapters are not supported)"
            )


def _import_waveft(peft_config: dict, tensors, shapes, source, model: str) -> tuple[dict, dict[str, nn.Module], dict]:
    _refuse_unsupported(peft_config, source, {"bias": "train without bias", "modules_to_save": "train without it"})
    layers = _split_keys(tensors, ("waveft_spectrum",), source)
    _check_layers(layers, shapes, source, model)
    use_idwt = bool(peft_config.get("use_idwt", True))
    wavelet = peft_config.get("wavelet_family", "db1") if use_idwt else "db1"
    seed = int(peft_config.get("random_loc_seed", 777))
    scaling = float(peft_config.get("scaling", 25.0))
    modules, counts = {}, {}
    for name, layer in layers.items():
        spectrum = layer["waveft_spectrum"]
        counts[name] = spectrum.numel()
        if spectrum.dim() != 1 or spectrum.numel() > math.prod(shapes[name]):
            raise UserError(
                f"{source}: layer {name!r} has {spectrum.numel()} coefficients; it holds at most "
                f"{math.prod(shapes[name])}"
            )
        positions = random_positions(shapes[name], counts[name], seed)  # what PEFT draws, stored from now on
        module = SparseAdapter(shapes[name], positions, scaling, wavelet if use_idwt else None)
        _set_parameters(module, coefficients=spectrum)
        modules[name] = module
    # The nominal per-layer budget; the per-layer counts themselves are in the stored positions.
    n_frequency = int(peft_config.get("n_frequency", max(counts.values())))
    budget = n_frequency if all(n_frequency <= math.prod(shapes[name]) for name in layers) else min(counts.values())
    adapter = {
        "method": "waveft" if use_idwt else "random-sparse",
        "budget": budget,
        "scaling": scaling,
        "wavelet": wavelet,
        "adapter_seed": seed,
    }
    notes = {
        "coefficients_per_layer": "uniform" if len(set(counts.values())) == 1 else "per layer, as in the PEFT adapter"
    }
    return adapter, modules, notes


def _lora_scale(peft_config: dict, name: str, rank: int) -> float:
    alpha = peft_config.get("lora_alpha", 8)
    key = _pattern_key(list(peft_config.get("alpha_pattern") or {}), name)
    if key is not None:
        alpha = peft_config["alpha_pattern"][key]
    return alpha / math.sqrt(rank) if peft_config.get("use_rslora") else alpha / rank


def _import_lora(peft_config: dict, tensors, shapes, source, model: str) -> tuple[dict, dict[str, nn.Module], dict]:
    _refuse_unsupported(
        peft_config,
        source,
        {
            "bias": "train without bias",
            "use_dora": "DoRA adapters have no sparse-db equivalent",
            "lora_bias": "train without lora_bias",
            "modules_to_save": "train without it",
        },
    )
    layers = _split_keys(tensors, ("lora_A.weight", "lora_B.weight"), source)
    _check_layers(layers, shapes, source, model)
    factors = {}
    for name, layer in layers.items():
        if set(layer) != {"lora_A.weight", "lora_B.weight"}:
            raise UserError(f"{source}: layer {name!r} lacks lora_A or lora_B")
        lora_a, lora_b = layer["lora_A.weight"].float(), layer["lora_B.weight"].float()
        out_features, in_features = shapes[name]
        if lora_a.dim() != 2 or lora_b.shape != (out_features, lora_a.shape[0]) or lora_a.shape[1] != in_features:
            raise UserError(
                f"{source}: layer {name!r} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, "
                f"which do not fit its {out_features}x{in_features} weight; the adapter is for another model"
            )
        factors[name] = (lora_a, lora_b, _lora_scale(peft_config, name, lora_a.shape[0]))
    ranks = {lora_a.shape[0] for lora_a, _, _ in factors.values()}
    scales = {scale for _, _, scale in factors.values()}
    rank = max(ranks)
    if any(rank > min(shapes[name]) for name in layers):
        raise UserError(
            f"{source}: rank {rank} exceeds a layer's smaller side; sparse-db's LoRA needs rank <= min(out, in)"
        )
    if len(ranks) == 1 and len(scales) == 1:
        alpha, notes = scales.pop() * rank, {}
    else:
        # One rank and alpha for all layers here: pad to the largest rank with zeros (exact) and fold
        # each layer's own scale into B, leaving alpha = rank (scale 1).
        padded = {}
        for name, (lora_a, lora_b, scale) in factors.items():
            extra = rank - lora_a.shape[0]
            padded[name] = (
                torch.cat([lora_a, lora_a.new_zeros(extra, lora_a.shape[1])]),
                torch.cat([lora_b * scale, lora_b.new_zeros(lora_b.shape[0], extra)], dim=1),
                1.0,
            )
        factors, alpha = padded, float(rank)
        notes = {"lora_scales": "per-layer ranks/alphas: padded to one rank with zeros, scales folded into lora_B"}
    modules = {}
    for name, (lora_a, lora_b, _) in factors.items():
        module = LoraAdapter(shapes[name], rank, alpha, torch.Generator())
        _set_parameters(module, lora_A=lora_a, lora_B=lora_b)
        modules[name] = module
    return {"method": "lora", "rank": rank, "alpha": alpha}, modules, notes


def _import_targets(peft_targets, shapes: dict, names: list[str]) -> list[str]:
    """Our targets for the imported layers: PEFT's list when it selects exactly those linears under
    our matching rule, else the layers' full names (a regex target_modules, say)."""
    if isinstance(peft_targets, list) and peft_targets and all(isinstance(t, str) for t in peft_targets):
        plain = not any(char in target for target in peft_targets for char in "*?[")
        if plain and {name for name in shapes if any(_matches(name, t) for t in peft_targets)} == set(names):
            return sorted(peft_targets)
    return names


def _unet_linear_shapes(model: ModelSettings) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of the model's UNet, in module order, without loading weights
    when the model has a config to read (everything but a single-file checkpoint)."""
    from sparse_dreambooth.model import load_pipeline, unet_skeleton

    unet = unet_skeleton(model.model, model.revision)
    if unet is None:
        unet = load_pipeline(model.model, vae=model.vae, revision=model.revision, variant=model.variant).unet
    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear)
    }


# The settings an imported run takes from the user: its base model and its subject.
MODEL_AND_DATA_KEYS = tuple(
    leaf.name for section in ("model", "data") for leaf in dataclasses.fields(SECTIONS[section])
)


def import_adapter(source, output, *, overwrite: bool = False, **settings) -> Path:
    """Bring a PEFT WaveFT or LoRA adapter (a save_pretrained folder) into a new run folder.

    Args:
        source: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        output: the run folder to create: config.yaml, adapter.safetensors, run.json.
        overwrite: replace an adapter already in `output`.
        settings: the run's model and data settings, as the train flags name them: model, vae,
            revision, variant, subject, data_root, instance_dir, class_name, token, resolution...
            (a subject is required, as for training: sampling renders its prompts).

    Returns:
        The run folder; `sparse-db sample --run` and `evaluate` read it like a trained run.

    Raises:
        UserError: an unsupported or pickled adapter, layers the base model does not have, a bad
            subject, or an existing run without overwrite.
    """
    from sparse_dreambooth.model import model_identity
    from sparse_dreambooth.train import resolve_subject

    unknown = sorted(set(settings) - set(MODEL_AND_DATA_KEYS))
    if unknown:
        raise UserError(f"unknown import setting {unknown[0]!r}{did_you_mean(unknown[0], MODEL_AND_DATA_KEYS)}")
    source, output = Path(source), Path(output)
    if (output / RUN_ADAPTER).exists() and not overwrite:
        raise UserError(f"{output} already holds an adapter; pass --overwrite to replace it or choose another --output")
    base = merge_settings(None, {**settings, "output": str(output)})  # checks model and data settings early
    peft_config, tensors = read_peft_adapter(source)
    peft_type = peft_config.get("peft_type")
    if peft_type not in ("WAVEFT", "LORA"):
        raise UserError(f"{source} is a PEFT {peft_type} adapter; sparse-db imports WAVEFT and LORA adapters")
    subject = resolve_subject(base)
    shapes = _unet_linear_shapes(base.model)
    importer = _import_waveft if peft_type == "WAVEFT" else _import_lora
    adapter_settings, modules, notes = importer(peft_config, tensors, shapes, source, base.model.model)
    names = [name for name in shapes if name in modules]  # module order, as attach lists them
    modules = {name: modules[name] for name in names}
    targets = _import_targets(peft_config.get("target_modules"), shapes, names)
    config = merge_settings(None, {**settings, **adapter_settings, "targets": targets, "output": str(output)})
    base_model = model_identity(config.model.model, config.model.revision)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / RUN_CONFIG, dump_yaml(config))
    save_adapter(
        _holder(modules, shapes),
        output / RUN_ADAPTER,
        config.adapter,
        base_model=base_model,
        metadata={
            "run_config": dump_yaml(config),
            "imported_from": json.dumps({"format": "peft", "peft_type": peft_type}),
        },
    )
    write_json(
        output / RUN_INFO,
        {
            "sparse_dreambooth": __version__,
            "origin": {
                "format": "peft",
                "peft_type": peft_type,
                "source": str(source.resolve()),
                "peft_version": peft_config.get("peft_version"),
                "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
                **notes,
            },
            "subject": {
                "name": subject.name,
                "class": subject.class_name,
                "kind": subject.kind,
                "images": len(subject.image_paths),
            },
            "base_model": base_model,
            "trainable_parameters": sum(p.numel() for module in modules.values() for p in module.parameters()),
            "steps": None,
        },
    )
    return output


__all__ = [
    "DTYPES",
    "FORMATS",
    "ExportResult",
    "export_adapter",
    "import_adapter",
    "kohya_key",
    "peft_adapter_config",
    "read_peft_adapter",
]
