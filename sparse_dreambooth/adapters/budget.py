"""Parameter budgets: how many trainable values each adapted layer gets.

Budgets are comparable across methods: `budget_scale` s means s times the parameters of LoRA r=1
on the same layers, sum(out + in). A sparse method spreads that total uniformly or in proportion
to out*in; LoRA takes the single rank whose total is nearest.
"""

import warnings

from sparse_dreambooth.config import DEFAULT_BUDGET, AdapterConfig
from sparse_dreambooth.errors import UserError

Shapes = dict[str, tuple[int, int]]


def lora_r1_count(shapes: Shapes) -> int:
    """Parameters of LoRA r=1 on these layers."""
    return sum(out_features + in_features for out_features, in_features in shapes.values())


def total_budget(config: AdapterConfig, shapes: Shapes) -> int:
    """The run's total trainable-parameter target."""
    if config.budget_scale is not None:
        return round(config.budget_scale * lora_r1_count(shapes))
    return (config.budget or DEFAULT_BUDGET) * len(shapes)


def _proportional(total: int, shapes: Shapes) -> dict[str, int]:
    """PEFT's `proportional_parameters=True` split: each layer gets round(out*in / sum(out*in) * total),
    and at least 1.

    Same arithmetic as PEFT (float share, then Python's round), so the counts are PEFT's layer for
    layer. The sum is near `total`, not equal to it: rounding is per layer, and the floor of one
    coefficient adds to small layers' shares.
    """
    all_sizes = sum(out_features * in_features for out_features, in_features in shapes.values())
    return {
        name: max(1, round(out_features * in_features / all_sizes * total))
        for name, (out_features, in_features) in shapes.items()
    }


def _capped(counts: dict[str, int], limits: dict[str, int], config: AdapterConfig, unit: str) -> dict[str, int]:
    over = {name: count for name, count in counts.items() if count > limits[name]}
    if not over:
        return counts
    name = next(iter(over))
    if not config.cap_budget:
        raise UserError(
            f"a budget of {over[name]} {unit} does not fit layer {name!r}, which holds at most {limits[name]}; "
            "lower budget/budget_scale, or set cap_budget to cap it per layer"
        )
    warnings.warn(f"budget capped on {len(over)} layer(s) that hold fewer {unit} (first: {name!r})", stacklevel=3)
    return {name: min(count, limits[name]) for name, count in counts.items()}


def sparse_budgets(config: AdapterConfig, shapes: Shapes) -> dict[str, int]:
    """Coefficients per layer for WaveFT and random-sparse."""
    if config.allocation == "proportional":
        counts = _proportional(total_budget(config, shapes), shapes)
    elif config.budget_scale is not None:
        per_layer = max(1, round(total_budget(config, shapes) / len(shapes)))
        counts = dict.fromkeys(shapes, per_layer)
    else:
        counts = dict.fromkeys(shapes, config.budget or DEFAULT_BUDGET)
    limits = {name: out_features * in_features for name, (out_features, in_features) in shapes.items()}
    return _capped(counts, limits, config, "coefficients")


def lora_ranks(config: AdapterConfig, shapes: Shapes) -> dict[str, int]:
    """LoRA rank per layer: `rank` if given, else the one rank whose total is nearest the budget."""
    rank = config.rank or max(1, round(total_budget(config, shapes) / lora_r1_count(shapes)))
    limits = {name: min(shape) for name, shape in shapes.items()}
    return _capped(dict.fromkeys(shapes, rank), limits, config, "ranks")
