"""PEFT and sparse-dreambooth adapters: the mapping between the two, the checks that an export
loads exactly in PEFT, and the import of a PEFT adapter folder into a run folder.

    ours            PEFT
    lora            LoraConfig: lora_A (r, in), lora_B (out, r), lora_alpha
    waveft          WaveFTConfig: waveft_spectrum (p,), n_frequency(_pattern), wavelet_family
    random-sparse   WaveFTConfig(use_idwt=False)

PEFT does not store sparse positions: it re-draws them from `random_loc_seed`. An export checks
that it would draw ours; an import stores the positions it draws, from then on.
Only safetensors are read (pickled .bin weights are refused).
"""

import dataclasses
import functools
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from sparse_dreambooth import __version__
from sparse_dreambooth.adapters import save_adapter
from sparse_dreambooth.adapters.io import StoredAdapter, set_parameters, weightless_model
from sparse_dreambooth.adapters.layer import matches_target
from sparse_dreambooth.adapters.lora import LoraAdapter
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions
from sparse_dreambooth.config import SECTIONS, AdapterConfig, ModelSettings, dump_yaml, merge_settings
from sparse_dreambooth.errors import UserError, did_you_mean
from sparse_dreambooth.files import write_json, write_text
from sparse_dreambooth.methods import method_of
from sparse_dreambooth.model_card import write_run_card
from sparse_dreambooth.runs import ADAPTER_FILE, CONFIG_FILE, RUN_FILE

# File names and prefixes fixed by PEFT.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's module names


# --- export: our adapter as PEFT's -------------------------------------------------------------


def _pattern_key(pattern_keys, name: str) -> str | None:
    """Which *_pattern key PEFT applies to module `name` (its rule: the first key matching a
    dot-separated suffix, as a regular expression)."""
    return next((key for key in pattern_keys if re.match(rf"(.*\.)?({key})$", name)), None)


def _peft_targets(config: AdapterConfig, names: list[str]) -> list[str]:
    """PEFT's target_modules: the run's own patterns when PEFT reads them as we do (plain names,
    matched as a dot-separated suffix), else every adapted module by its full name."""
    plain = all(not any(char in target for char in "*?[") for target in config.targets)
    if plain and all(any(matches_target(name, target) for target in config.targets) for name in names):
        return list(config.targets)
    return list(names)


def _base_model_fields(adapter: StoredAdapter) -> dict:
    base_model, _, revision = adapter.metadata.get("base_model", "").partition("@")
    return {"base_model_name_or_path": base_model or None, "revision": revision or None}


def peft_adapter_config(adapter: StoredAdapter) -> dict:
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
    if method_of(config).low_rank:
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
                f"layer {name!r}: PEFT's n_frequency_pattern cannot single it out; "
                "export --format merged (exact) or kohya"
            )
    wavelet = method_of(config).wavelet(config) or "db1"
    return {
        **common,
        "peft_type": "WAVEFT",
        "n_frequency": n_frequency,
        "n_frequency_pattern": pattern,
        "proportional_parameters": False,
        "scaling": config.scaling,
        "wavelet_family": "db1" if wavelet == "haar" else wavelet,  # the same filters under PEFT's name
        "use_idwt": method_of(config).wavelet_transform,
        "random_loc_seed": config.adapter_seed,
        "init_weights": True,
    }


# The layer a wavelet is tried on: small, odd rows and unequal sides, so padding, evenness and
# cropping all come into play.
_PROBE_SHAPE, _PROBE_COUNT, _PROBE_SEED = (11, 14), 40, 5


def _peft_reproduces(wavelet: str) -> bool:
    """Whether the installed PEFT's own WaveFT layer gives our delta for `wavelet`, on one small layer.

    PEFT's config accepts names its layer then cannot use (unknown to its filter table, or a filter
    whose shape breaks its transform) and, for some, has other filters than pywt's: only running its
    code tells.
    """
    from peft import WaveFTConfig
    from peft.tuners.waveft.layer import WaveFTLinear

    out_features, in_features = _PROBE_SHAPE
    coefficients = torch.randn(_PROBE_COUNT, generator=torch.Generator().manual_seed(0))
    ours = SparseAdapter(_PROBE_SHAPE, random_positions(_PROBE_SHAPE, _PROBE_COUNT, _PROBE_SEED), 1.0, wavelet)
    try:
        config = WaveFTConfig(
            n_frequency=_PROBE_COUNT, wavelet_family=wavelet, scaling=1.0, random_loc_seed=_PROBE_SEED
        )
        theirs = WaveFTLinear(nn.Linear(in_features, out_features), "default", config, n_frequency=_PROBE_COUNT)
        with torch.no_grad():
            ours.coefficients.copy_(coefficients)
            theirs.waveft_spectrum["default"].copy_(coefficients)
            expected, actual = ours.delta_weight(), theirs.get_delta_weight("default")
    except Exception:  # noqa: BLE001 -- any failure inside PEFT means it cannot load this wavelet
        return False
    return actual.shape == expected.shape and bool(torch.allclose(actual, expected, rtol=0, atol=1e-5))


@functools.cache
def _reproducible_wavelets(peft_version: str) -> tuple[str, ...]:
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

    return tuple(name for name in WAVELET_REDUCTIONS if _peft_reproduces(name))


def peft_wavelets() -> tuple[str, ...]:
    """The wavelets the installed PEFT's WaveFT reproduces exactly (probed once per PEFT version)."""
    import peft

    return _reproducible_wavelets(peft.__version__)


def _name_ranges(names) -> str:
    """ "db1-10, sym2-10, coif1-3" for a list of family-and-number names, in order."""
    runs: list[list] = []
    for name in names:
        family, number = re.fullmatch(r"(\D+)(\d+)", name).groups()
        if runs and runs[-1][0] == family and runs[-1][2] == int(number) - 1:
            runs[-1][2] = int(number)
        else:
            runs.append([family, int(number), int(number)])
    return ", ".join(f"{family}{low}" + (f"-{high}" if high > low else "") for family, low, high in runs)


def _check_peft_wavelet(wavelet: str) -> None:
    """Refuse a wavelet the installed PEFT would load wrongly or not at all."""
    try:
        import peft
    except ImportError:
        raise UserError(
            f"the PEFT export checks that PEFT reproduces the {wavelet!r} wavelet, but peft is not installed: "
            "pip install peft, or export --format merged"
        ) from None
    name = "db1" if wavelet == "haar" else wavelet  # the same filters under PEFT's name
    if not _peft_reproduces(name):
        raise UserError(
            f"PEFT {peft.__version__} cannot reproduce the {wavelet!r} wavelet (it reproduces "
            f"{_name_ranges(peft_wavelets())}); export --format merged for an exact result"
        )


def _check_peft_positions(adapter: StoredAdapter) -> None:
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
                "PEFT would load it wrongly; export --format merged (exact) or kohya instead"
            )


def peft_files(adapter: StoredAdapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the weights PEFT saves for the same adapter.

    Raises:
        UserError: PEFT would load the adapter differently (a wavelet it lacks, other positions).
    """
    config, method = adapter.config, method_of(adapter.config)
    if method.wavelet_transform:
        _check_peft_wavelet(config.wavelet)
    if not method.low_rank:
        _check_peft_positions(adapter)
    tensors = {}
    for name, module in adapter.modules.items():
        if method.low_rank:
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float()
        else:
            tensors[f"{PEFT_PREFIX}{name}.waveft_spectrum"] = module.coefficients.detach().float()
    return peft_adapter_config(adapter), tensors


def peft_kind(config: AdapterConfig) -> str:
    """How PEFT names the adapter, e.g. "WaveFT use_idwt=False"."""
    method = method_of(config)
    if method.low_rank:
        return "LoRA"
    return "WaveFT" + ("" if method.wavelet_transform else " use_idwt=False")


# --- import: a PEFT adapter folder as a run folder ----------------------------------------------


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
        set_parameters(module, coefficients=spectrum)
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
        set_parameters(module, lora_A=lora_a, lora_B=lora_b)
        modules[name] = module
    return {"method": "lora", "rank": rank, "alpha": alpha}, modules, notes


def _import_targets(peft_targets, shapes: dict, names: list[str]) -> list[str]:
    """Our targets for the imported layers: PEFT's list when it selects exactly those linears under
    our matching rule, else the layers' full names (a regex target_modules, say)."""
    if isinstance(peft_targets, list) and peft_targets and all(isinstance(t, str) for t in peft_targets):
        plain = not any(char in target for target in peft_targets for char in "*?[")
        if plain and {name for name in shapes if any(matches_target(name, t) for t in peft_targets)} == set(names):
            return sorted(peft_targets)
    return names


def _unet_linear_shapes(model: ModelSettings) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of the model's UNet, in module order, from its config alone."""
    from sparse_dreambooth.model import unet_skeleton

    unet = unet_skeleton(model.model, model.revision, model.model_config)
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
    from sparse_dreambooth.runs import resolve_subject

    unknown = sorted(set(settings) - set(MODEL_AND_DATA_KEYS))
    if unknown:
        raise UserError(f"unknown import setting {unknown[0]!r}{did_you_mean(unknown[0], MODEL_AND_DATA_KEYS)}")
    source, output = Path(source), Path(output)
    if (output / ADAPTER_FILE).exists() and not overwrite:
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
    base_model = model_identity(config.model.model, config.model.revision, config.model.variant)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / CONFIG_FILE, dump_yaml(config))
    save_adapter(
        weightless_model(modules, shapes),
        output / ADAPTER_FILE,
        config.adapter,
        base_model=base_model,
        metadata={
            "run_config": dump_yaml(config),
            "imported_from": json.dumps({"format": "peft", "peft_type": peft_type}),
        },
    )
    write_json(
        output / RUN_FILE,
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
            "base_model": base_model.name,
            "base_model_fingerprint": base_model.fingerprint,
            "trainable_parameters": sum(p.numel() for module in modules.values() for p in module.parameters()),
            "steps": None,
        },
    )
    write_run_card(output)
    return output
