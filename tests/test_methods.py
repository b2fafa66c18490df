"""The method table: one row per method the config accepts, and its config keys are the ones that matter."""

import pytest
import torch
from torch import nn

from sparse_dreambooth.adapters.layer import build_adapters
from sparse_dreambooth.config import METHODS as CONFIG_METHODS
from sparse_dreambooth.config import AdapterConfig
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.methods import METHOD_SPECIFIC_KEYS, METHODS

# A value for each method-specific key that differs from its default.
CHANGED = {"scaling": 3.0, "wavelet": "db2", "allocation": "proportional", "cap_budget": True, "rank": 2, "alpha": 5.0}


def test_the_table_has_a_row_per_method_and_knows_every_key():
    assert tuple(METHODS) == tuple(CONFIG_METHODS)
    assert set(CHANGED) == METHOD_SPECIFIC_KEYS


def _deltas(config: AdapterConfig) -> dict[str, torch.Tensor]:
    linears = {"small": nn.Linear(12, 8), "large": nn.Linear(16, 24)}
    adapters = build_adapters(config, linears)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters.values():
            for parameter in adapter.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return {name: adapter.delta_weight() for name, adapter in adapters.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_keys_a_method_ignores_do_not_change_what_it_builds_and_its_keys_do(method):
    base = AdapterConfig(method=method, budget=20, targets=["small", "large"])
    reference = _deltas(base)
    for key in sorted(METHOD_SPECIFIC_KEYS):
        try:
            changed = AdapterConfig(**{**base.to_dict(), key: CHANGED[key]})
        except UserError:
            assert key in METHODS[method].ignored_keys, f"{method} refuses its own key {key}"
            continue
        deltas = _deltas(changed)
        same = all(
            deltas[name].shape == reference[name].shape and torch.equal(deltas[name], reference[name])
            for name in reference
        )
        if key in METHODS[method].ignored_keys:
            assert same, f"{method} ignores {key}, yet changing it changed the adapter"
        elif key != "cap_budget":  # only matters for a budget larger than a layer
            assert not same, f"{method} reads {key}, yet changing it changed nothing"
