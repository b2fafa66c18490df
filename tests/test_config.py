"""The config schema: recipes load, flags override YAML, mistakes name the fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS

from sparse_dreambooth.config import (
    SECTIONS,
    dump_yaml,
    leaf_fields,
    load_config,
    merge_settings,
    read_yaml,
)
from sparse_dreambooth.errors import UserError

RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_every_key_is_unique_so_it_can_be_a_flag():
    keys = [leaf.name for section in SECTIONS.values() for leaf in dataclasses.fields(section)]
    assert len(keys) == len(set(keys)) == len(leaf_fields())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_is_valid_and_round_trips(recipe, tmp_path):
    config = merge_settings(read_yaml(recipe), {"subject": "demo"})
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(config))
    assert load_config(saved) == config


@pytest.mark.parametrize(
    "recipe,method",
    [("sdxl_waveft.yaml", "waveft"), ("sdxl_random_sparse.yaml", "random-sparse"), ("sdxl_lora.yaml", "lora")],
)
def test_paper_recipes_hold_the_papers_setup(recipe, method):
    # Values from the authors' configs (../shared/notes/method-facts.md).
    config = merge_settings(read_yaml(CONFIGS / recipe), {"subject": "dog6"})
    assert config.model.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.model.variant == "fp16"  # the fp16 files: half the download, and bf16 training reads no more
    assert (config.data.resolution, config.data.token, config.data.random_flip) == (1024, "zjw", False)
    train = config.train
    assert (train.steps, train.batch_size, train.grad_accum, train.lr) == (500, 1, 4, 1e-4)
    assert (train.adam_beta1, train.adam_beta2, train.weight_decay) == (0.9, 0.999, 1e-4)
    assert (train.lr_scheduler, train.warmup_steps, train.max_grad_norm) == ("constant", 0, 1.0)
    assert (train.mixed_precision, train.gradient_checkpointing, train.seed) == ("bf16", True, 42)
    adapter = config.adapter
    assert adapter.method == method and adapter.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    if method == "lora":
        assert (adapter.budget_scale, adapter.rank, adapter.alpha) == (1.0, None, None)
    else:
        assert (adapter.budget, adapter.scaling, adapter.adapter_seed) == (2592, 25.0, 777)
    if method == "waveft":
        assert adapter.wavelet == "db1"


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"steps": 7, "lr": 2}, "adapter": {"budget_scale": 2}}))
    config = merge_settings(read_yaml(recipe), {"subject": "demo", "steps": 9, "seed": None})
    assert config.train.steps == 9 and config.train.lr == 2.0 and isinstance(config.train.lr, float)
    assert config.train.seed == 42  # the default, since the flag was not given
    # --budget replaces the recipe's budget_scale: two spellings of one setting.
    config = merge_settings(read_yaml(recipe), {"subject": "demo", "budget": 100})
    assert (config.adapter.budget, config.adapter.budget_scale) == (100, None)


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"trian": {"steps": 1}}, "did you mean 'train'"),
        ({"train": {"stpes": 1}}, "did you mean 'steps'"),
        ({"model": {"steps": 1}}, "belongs in section 'train'"),
        ({"train": {"steps": "many"}}, "steps must be int"),
        ({"train": {"steps": True}}, "steps must be int"),
        ({"data": {"random_flip": "yes"}}, "random_flip must be bool"),
        ({"train": {"mixed_precision": "fp8"}}, "unknown mixed_precision 'fp8'"),
        ({"data": {"resolution": 1001}}, "multiple of 8"),
        ({"train": "fast"}, "must be a mapping"),
    ],
)
def test_config_mistakes_name_the_fix(tree, message):
    with pytest.raises(UserError, match=message):
        merge_settings(tree, {"subject": "demo"})


def test_a_subject_is_required_and_exclusive():
    with pytest.raises(UserError, match="name a subject"):
        merge_settings({}, {})
    with pytest.raises(UserError, match="name a subject"):
        merge_settings({}, {"subject": "demo", "instance_dir": "photos", "class_name": "dog"})
    with pytest.raises(UserError, match="--class-name"):
        merge_settings({}, {"instance_dir": "photos"})


def test_default_output_folder_names_subject_and_method():
    assert merge_settings({}, {"subject": "dog6", "method": "lora"}).output_dir == Path("runs/dog6-lora")


def test_yaml_syntax_errors_keep_what_was_found_and_where(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("adapter:\n  method: waveft\n\tbudget: 3\n")
    with pytest.raises(UserError) as caught:
        read_yaml(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "found character '\\t' that cannot start any token" in message
    assert "line 3, column 1" in message


def test_a_config_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  class_name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text.*save it as UTF-8"):
        read_yaml(path)


@pytest.mark.parametrize(("text", "expected"), [("1e-4", 1e-4), ("1.0e-4", 1e-4), ("2E-3", 2e-3), ("3", 3.0)])
def test_yaml_floats_without_a_dot_are_read_as_floats(tmp_path, text, expected):
    """YAML 1.1 (PyYAML) reads 1e-4 as the string '1e-4'; a float setting accepts it as a number."""
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    config = merge_settings(read_yaml(path), {"subject": "demo"})
    assert config.train.lr == expected and isinstance(config.train.lr, float)


def test_float_settings_still_refuse_words(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError, match="lr must be float"):
        merge_settings(read_yaml(path), {"subject": "demo"})


@pytest.mark.parametrize("kept", [0, -1])
def test_checkpoints_kept_must_be_positive(kept):
    with pytest.raises(UserError, match="checkpoints_kept must be a positive integer"):
        merge_settings(None, {"subject": "demo", "checkpoints_kept": kept})
