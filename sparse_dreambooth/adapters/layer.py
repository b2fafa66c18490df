"""Attaching adapters to a model's linear layers, and merging them into the base weights.

Every method is an `nn.Module` with the small protocol `methods.Adapter`: delta_weight(),
forward(x), forward_with_base(x, base) (sparse methods fuse the two into one matmul) and
touched_indices().
"""

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn

from sparse_dreambooth.adapters.lora import LoraAdapter
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions
from sparse_dreambooth.config import CLIP_ATTENTION_TARGETS, AdapterConfig
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.methods import Adapter, method_of


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus an adapter; looks like the linear it wraps to the code around it."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.merged = False
        self._unmerge_values: torch.Tensor | None = None

    # diffusers reads these off attention projections (dtype checks, fused projections).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.adapter.forward_with_base(x, self.base)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight; forward then costs what the base layer costs."""
        if self.merged:
            return
        weight = self.base.weight
        touched = self.adapter.touched_indices()
        if touched is not None:
            # Keep the touched originals so unmerge restores the exact bits, not W + d - d.
            self._unmerge_values = weight.view(-1)[touched].clone()
        weight.copy_(_rounded_once(weight, self.adapter.delta_weight(), torch.add))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: bit-exact for sparse adapters, to rounding for LoRA."""
        if not self.merged:
            return
        weight = self.base.weight
        touched = self.adapter.touched_indices()
        if touched is None:
            weight.copy_(_rounded_once(weight, self.adapter.delta_weight(), torch.sub))
        else:
            weight.view(-1)[touched] = self._unmerge_values
            self._unmerge_values = None
        self.merged = False


def _rounded_once(weight: torch.Tensor, delta: torch.Tensor, operation) -> torch.Tensor:
    """weight +/- delta formed in the wider dtype and rounded once to the weight's.

    Casting the (float32) delta to a bf16/fp16 weight first would round twice: once for the delta,
    once for the sum.
    """
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return operation(weight.to(wide), delta.to(wide)).to(weight.dtype)


def matches_target(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The model's nn.Linear modules whose names match any target pattern, in module order."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(matches_target(name, pattern) for pattern in targets)
    }
    if not found:
        raise UserError(f"no linear layer matches targets {targets}; check the module names of your model")
    return found


def build_adapters(
    config: AdapterConfig,
    linears: Mapping[str, nn.Linear],
    positions: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, nn.Module]:
    """One adapter per layer, sized by the config's budget.

    Args:
        positions: stored sparse positions per layer (from an adapter file); when None they are
            drawn from `config.adapter_seed` as PEFT does.
    """
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    method = method_of(config)
    budgets = method.layer_budgets(config, shapes)
    if method.low_rank:
        generator = torch.Generator().manual_seed(config.adapter_seed)
        return {
            name: LoraAdapter(shapes[name], rank, config.alpha or rank, generator, device=linears[name].weight.device)
            for name, rank in budgets.items()
        }
    drawn: dict[tuple, torch.Tensor] = {}  # same seed for every layer: same-shaped layers share a draw
    adapters = {}
    for name, count in budgets.items():
        if positions is not None:
            layer_positions = positions[name]
        else:
            key = (shapes[name], count)
            if key not in drawn:
                drawn[key] = random_positions(shapes[name], count, config.adapter_seed)
            layer_positions = drawn[key].clone()
        adapters[name] = SparseAdapter(
            shapes[name],
            layer_positions.to(linears[name].weight.device),
            config.scaling,
            method.wavelet(config),
            kernel=config.kernel,
        )
    return adapters


def attach(
    model: nn.Module,
    config: AdapterConfig,
    positions: Mapping[str, torch.Tensor] | None = None,
    text_encoders: Mapping[str, nn.Module] | None = None,
) -> dict[str, AdaptedLinear]:
    """Wrap every target linear of `model` (in place) with a fresh adapter; freeze everything else.

    Args:
        positions: stored sparse positions by layer name (see `build_adapters`).
        text_encoders: the encoders `config.train_text_encoder` adapts as well, by the name their
            layers get in an adapter file (`text_encoders.text_encoder_parts` gives SDXL's two);
            ignored when it is off.

    Returns:
        The adapted layers by name (see `adapter_targets`). Only adapter parameters require grad
        afterwards, and they are float32 whatever the base dtype (train them in fp32 under mixed
        precision).
    """
    owners = [model, *((text_encoders or {}).values() if config.train_text_encoder else ())]
    if any(adapted_layers(owner) for owner in owners):
        raise UserError("the model already carries adapters; load it fresh before attaching new ones")
    groups = adapter_targets(model, config, text_encoders)
    for owner in owners:
        owner.requires_grad_(False)
    layers = {}
    for group in groups:
        adapters = build_adapters(config, {name: linear for name, (_, _, linear) in group.items()}, positions)
        for name, (owner, module_name, linear) in group.items():
            layers[name] = AdaptedLinear(linear, adapters[name])
            _replace_module(owner, module_name, layers[name])
    return layers


def adapter_targets(
    model: nn.Module, config: AdapterConfig, text_encoders: Mapping[str, nn.Module] | None = None
) -> list[dict[str, tuple[nn.Module, str, nn.Linear]]]:
    """The linears `config` adapts, as groups that each get a budget of their own, by layer name:
    {name: (the module holding it, its module name there, the linear)}.

    The first group is `model`'s `config.targets`, named by module name. With
    `config.train_text_encoder` a second group holds every text encoder's CLIP_ATTENTION_TARGETS,
    named "<encoder>.<module name>". Budgets are per group (budget.py's rule on each), so the
    UNet's adapters are the same with the encoders adapted or not, and the encoders' layers get
    what the same rule gives on their own shapes.
    """
    groups = [{name: (model, name, linear) for name, linear in target_linears(model, config.targets).items()}]
    if config.train_text_encoder:
        if not text_encoders:
            raise UserError("this adapter also adapts the text encoders: pass them to attach or load it")
        groups.append(text_encoder_targets(text_encoders))
    return groups


def text_encoder_targets(text_encoders: Mapping[str, nn.Module]) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """The text encoders' group of `adapter_targets`: their CLIP_ATTENTION_TARGETS as "<encoder>.<module name>"."""
    return {
        f"{prefix}.{name}": (encoder, name, linear)
        for prefix, encoder in text_encoders.items()
        for name, linear in target_linears(encoder, list(CLIP_ATTENTION_TARGETS)).items()
    }


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def adapted_layers(model: nn.Module, text_encoders: Mapping[str, nn.Module] | None = None) -> dict[str, AdaptedLinear]:
    """The model's adapted layers by the name of the linear they wrap; then the text encoders',
    as "<encoder>.<module name>"."""
    owners = {"": model, **{f"{prefix}.": encoder for prefix, encoder in (text_encoders or {}).items()}}
    return {
        prefix + name: module
        for prefix, owner in owners.items()
        for name, module in owner.named_modules()
        if isinstance(module, AdaptedLinear)
    }


def merge(model: nn.Module) -> None:
    """Merge every adapter into its base weight (for fast sampling)."""
    for layer in adapted_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge` on every adapted layer."""
    for layer in adapted_layers(model).values():
        layer.unmerge()


def trainable_parameter_count(model: nn.Module, text_encoders: Mapping[str, nn.Module] | None = None) -> int:
    """Number of adapter parameters in the model (and the text encoders)."""
    layers = adapted_layers(model, text_encoders).values()
    return sum(p.numel() for layer in layers for p in layer.adapter.parameters())


def unload(model: nn.Module) -> None:
    """Merge every adapter into its base weight and put the plain nn.Linear back in its place.

    Afterwards the model holds no adapter at all (nothing to unmerge): what is left is an ordinary
    model with the merged weights, ready for `save_pretrained`.
    """
    for name, layer in adapted_layers(model).items():
        layer.merge()
        _replace_module(model, name, layer.base)
