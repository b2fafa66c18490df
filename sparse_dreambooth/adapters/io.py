"""Adapter files: safetensors with the config in the metadata.

Tensors are named "<module name>.<tensor>" (coefficients and int32 positions for sparse methods,
lora_A and lora_B for LoRA); a run with `train_text_encoder` also stores the text encoders' layers,
as "text_encoder.<module name>.<tensor>" and "text_encoder_2.<module name>.<tensor>" (module names
inside each encoder's text model, see text_encoders.py). The positions are stored, not re-drawn
from the seed, so a file loads the same under any torch version. Metadata (all strings, as safetensors requires):
    format, format_version, adapter_config (JSON), layers (JSON name -> [out, in]),
    base_model (its name), base_model_fingerprint (its UNet's, when known),
    sparse_dreambooth_version, plus whatever the caller adds.
"""

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparse_dreambooth import __version__
from sparse_dreambooth.adapters.layer import AdaptedLinear, adapted_layers, adapter_targets, attach
from sparse_dreambooth.adapters.lora import LoraAdapter
from sparse_dreambooth.adapters.sparse import SparseAdapter
from sparse_dreambooth.config import SDXL_TEXT_ENCODERS, AdapterConfig
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import write_safetensors
from sparse_dreambooth.methods import method_of

FORMAT = "sparse-dreambooth-adapter"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class BaseModel:
    """The base model an adapter belongs to (`sparse_dreambooth.model.model_identity` builds it).

    `name` says where it came from, for people and for PEFT's base_model_name_or_path: a Hub
    id@revision, a path, "tiny-sdxl-v1-seed0". `fingerprint` identifies the weights themselves:
    when both files have one, only the fingerprints are compared, so a moved folder or a Hub id
    and its local copy match. Files from before fingerprints are matched by name.
    """

    name: str
    fingerprint: str | None = None

    def same_as(self, stored: "BaseModel") -> bool:
        if self.fingerprint is not None and stored.fingerprint is not None:
            return self.fingerprint == stored.fingerprint
        return self.name == stored.name


def adapter_tensors(model: nn.Module, text_encoders: Mapping[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor of the model (and the text encoders) under its file name (positions as int32)."""
    tensors = {}
    for name, layer in adapted_layers(model, text_encoders).items():
        for key, value in layer.adapter.state_dict().items():
            value = value.detach()
            tensors[f"{name}.{key}"] = value.int() if key == "positions" else value.float()
    return tensors


def save_adapter(
    model: nn.Module,
    path,
    config: AdapterConfig,
    base_model: BaseModel | str = "unknown",
    metadata: dict[str, str] | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
) -> None:
    """Write the model's adapters to a safetensors file, atomically.

    Args:
        config: the config the adapters were attached with.
        base_model: the base model's identity, checked on load; a string is a name alone.
        metadata: extra string fields to store (run settings, say).
        text_encoders: the encoders `attach` was given, whose adapters go in the file too.
    """
    layers = adapted_layers(model, text_encoders)
    if not layers:
        raise UserError("the model has no adapters to save; attach or load one first")
    base_model = BaseModel(base_model) if isinstance(base_model, str) else base_model
    header = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps({name: [layer.out_features, layer.in_features] for name, layer in layers.items()}),
        "base_model": base_model.name,
        **({"base_model_fingerprint": base_model.fingerprint} if base_model.fingerprint else {}),
        "sparse_dreambooth_version": __version__,
    }
    tensors = {name: tensor.contiguous().cpu() for name, tensor in adapter_tensors(model, text_encoders).items()}
    write_safetensors(path, tensors, header)


def read_adapter(path) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: its config, tensors and metadata. Never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a sparse-dreambooth adapter file (no '{FORMAT}' metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has adapter format version {metadata.get('format_version')}; "
            f"this sparse-dreambooth reads version {FORMAT_VERSION}"
        )
    settings = _metadata_json(metadata, "adapter_config", path, dict)
    try:
        config = AdapterConfig(**settings)
    except TypeError as error:  # a key this version does not know
        raise UserError(
            f"{path}: its 'adapter_config' metadata holds an unknown setting ({error}); the file is damaged"
        ) from None
    _metadata_json(metadata, "layers", path, dict)
    return config, tensors, metadata


def _metadata_json(metadata: dict[str, str], key: str, path, kind: type):
    """One JSON value of the file's metadata; damage is a UserError naming the file."""
    try:
        value = json.loads(metadata[key])
    except (KeyError, ValueError) as error:
        reason = "missing" if isinstance(error, KeyError) else f"not valid JSON ({error})"
        raise UserError(f"{path}: its {key!r} metadata is {reason}; the file is damaged") from None
    if not isinstance(value, kind):
        raise UserError(f"{path}: its {key!r} metadata is not a JSON {kind.__name__}; the file is damaged")
    return value


def stored_base_model(metadata: dict[str, str]) -> BaseModel:
    """The base model an adapter file records (name "unknown" if it records none)."""
    return BaseModel(metadata.get("base_model", "unknown"), metadata.get("base_model_fingerprint"))


def check_base_model(path, stored: BaseModel, base_model: BaseModel) -> None:
    """Refuse, in one line that says what to do, an adapter trained on another base model."""
    if base_model.same_as(stored):
        return
    if stored.fingerprint is None and base_model.fingerprint is not None:
        raise UserError(
            f"{path} was trained on base model {stored.name!r}, not {base_model.name!r}; the file predates "
            "weight fingerprints, so only that exact name matches it: pass --model with that value (a moved "
            "folder: move it back to that path)"
        )
    if stored.name == base_model.name:
        raise UserError(
            f"{path} was trained on other weights than the model now at {base_model.name!r} (UNet fingerprints "
            f"{stored.fingerprint} vs {base_model.fingerprint}); load it onto the model it was trained on"
        )
    raise UserError(
        f"{path} was trained on base model {stored.name!r}, not {base_model.name!r}; "
        "load it onto the model it was trained on"
    )


def load_adapter(
    model: nn.Module,
    path,
    base_model: BaseModel | str | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
) -> AdapterConfig:
    """Attach the adapters stored in `path` to `model` (in place) and return their config.

    Args:
        base_model: when given, the file must have been trained on this base model
            (`BaseModel.same_as`; a string is a name alone).
        text_encoders: the encoders, as `attach` takes them; required when the file adapts them.

    Raises:
        UserError: on another base model, missing/extra/mis-shaped tensors or a damaged file,
            naming the tensor.
    """
    config, tensors, metadata = read_adapter(path)
    if base_model is not None:
        expected = BaseModel(base_model) if isinstance(base_model, str) else base_model
        check_base_model(path, stored_base_model(metadata), expected)
    stored_layers = _metadata_json(metadata, "layers", path, dict)
    if config.train_text_encoder and not text_encoders:
        raise UserError(f"{path} also adapts the text encoders: load it onto a whole pipeline")
    linears = {
        name: linear
        for group in adapter_targets(model, config, text_encoders)
        for name, (_, _, linear) in group.items()
    }
    for name, shape in stored_layers.items():
        if name not in linears:
            raise UserError(f"{path}: layer {name!r} is not in this model; the adapter is for another model")
        if [linears[name].out_features, linears[name].in_features] != shape:
            raise UserError(
                f"{path}: layer {name!r} is {shape[0]}x{shape[1]} in the file but "
                f"{linears[name].out_features}x{linears[name].in_features} in this model"
            )
    missing_layers = sorted(set(linears) - set(stored_layers))
    if missing_layers:
        raise UserError(f"{path}: no tensors for layer {missing_layers[0]!r} of this model; the file is incomplete")
    positions = None
    if not method_of(config).low_rank:
        positions = {name: _tensor(tensors, path, f"{name}.positions").long() for name in stored_layers}
    layers = attach(model, config, positions=positions, text_encoders=text_encoders)
    expected = set()
    for name, layer in layers.items():
        state = layer.adapter.state_dict()
        for key, current in state.items():
            tensor_name = f"{name}.{key}"
            expected.add(tensor_name)
            stored = _tensor(tensors, path, tensor_name)
            if stored.shape != current.shape:
                raise UserError(
                    f"{path}: tensor {tensor_name!r} has shape {tuple(stored.shape)}, expected {tuple(current.shape)}"
                )
            state[key] = stored.to(current.dtype)
        layer.adapter.load_state_dict(state)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(f"{path}: unexpected tensor {extra[0]!r}; the file does not match its own config")
    return config


def _tensor(tensors: dict[str, torch.Tensor], path, name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"{path}: tensor {name!r} is missing")
    return tensors[name]


# --- adapters without their model ----------------------------------------------------------------


@dataclass
class StoredAdapter:
    """The contents of an adapter file, as `open_adapter` rebuilds them."""

    config: AdapterConfig
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, int]]  # module name -> (out, in), in module order
    modules: dict[str, nn.Module]  # module name -> LoraAdapter or SparseAdapter holding the file's values
    path: Path


def open_adapter(path) -> StoredAdapter:
    """An adapter file's adapters, rebuilt layer by layer as the modules that compute their deltas,
    without the model they belong to (for export and import, which never load SDXL's weights)."""
    path = Path(path)
    config, tensors, metadata = read_adapter(path)
    shapes = {name: tuple(shape) for name, shape in json.loads(metadata["layers"]).items()}
    modules = {}
    for name, shape in shapes.items():
        try:
            if method_of(config).low_rank:
                lora_a = tensors[f"{name}.lora_A"]
                module = LoraAdapter(shape, lora_a.shape[0], config.alpha or lora_a.shape[0], torch.Generator())
                set_parameters(module, lora_A=lora_a, lora_B=tensors[f"{name}.lora_B"])
            else:
                wavelet = method_of(config).wavelet(config)
                module = SparseAdapter(shape, tensors[f"{name}.positions"].long(), config.scaling, wavelet)
                set_parameters(module, coefficients=tensors[f"{name}.coefficients"])
        except (KeyError, ValueError) as error:
            raise UserError(
                f"{path}: the tensors of layer {name!r} are missing or mis-shaped ({error}); the file is damaged"
            ) from None
        modules[name] = module
    return StoredAdapter(config, metadata, shapes, modules, path)


def layer_owner(name: str) -> tuple[str, str]:
    """An adapter file's layer name split into the model the layer belongs to ("unet",
    "text_encoder" or "text_encoder_2") and its module name inside that model."""
    part, _, module_name = name.partition(".")
    return (part, module_name) if part in SDXL_TEXT_ENCODERS else ("unet", name)


def adapter_parts(adapter: StoredAdapter) -> dict[str, StoredAdapter]:
    """The adapter split by the model its layers belong to: "unet", then "text_encoder" and
    "text_encoder_2" when the file adapts them, each part's layers named as inside that model."""
    owners = {name: layer_owner(name) for name in adapter.shapes}
    parts = {}
    for part in ("unet", *SDXL_TEXT_ENCODERS):
        local = {name: module_name for name, (owner, module_name) in owners.items() if owner == part}
        if local:
            parts[part] = dataclasses.replace(
                adapter,
                shapes={module_name: adapter.shapes[name] for name, module_name in local.items()},
                modules={module_name: adapter.modules[name] for name, module_name in local.items()},
            )
    return parts


def set_parameters(module: nn.Module, **values: torch.Tensor) -> None:
    """Copy values into a fresh adapter's parameters (not load_state_dict: that would make a
    sparse adapter re-derive everything from its positions a second time)."""
    with torch.no_grad():
        for name, value in values.items():
            parameter = getattr(module, name)
            if value.shape != parameter.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(parameter.shape)}")
            parameter.copy_(value)


def weightless_model(modules: dict[str, nn.Module], shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A stand-in model with the adapters at their module names, for `save_adapter`.

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
