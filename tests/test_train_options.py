"""Issue 14's training options on the tiny model: EMA, optimizers, trackers and the model card.

The loss and noise options are tested without a UNet in test_train_loop.py. Here every check has a
second code path: the EMA is recomputed by hand from the weights the checkpoints recorded, a resumed
run is compared with an uninterrupted one, and the card's fields with run.json and metrics.json.
"""

import json
import shutil
import sys

import pytest
import torch
from conftest import CONFIGS, FAST, FIXTURE_DATA, assert_user_error, cli_error, run_cli, run_subprocess

from sparse_dreambooth import adapters
from sparse_dreambooth.adapters.io import adapter_tensors
from sparse_dreambooth.config import TrainSettings, merge_settings
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.model import load_pipeline
from sparse_dreambooth.model_card import dataset_credit, licence_line
from sparse_dreambooth.optimizers import check_optimizer

EMA_DECAY = 0.5  # far from 1, so four steps move the average well away from the initial weights


def _tensors(path) -> dict[str, torch.Tensor]:
    return adapters.read_adapter(path)[1]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 4-step LoRA run keeping an EMA, with a checkpoint (the raw weights) after every step."""
    run = tmp_path_factory.mktemp("ema") / "run"
    run_cli(
        "train",
        *FAST,
        "--subject",
        "demo",
        "--method",
        "lora",
        "--steps",
        "4",
        "--checkpoint-every",
        "1",
        "--checkpoints-kept",
        "10",
        "--ema-decay",
        str(EMA_DECAY),
        "--output",
        run,
    )
    return run


# --- EMA ------------------------------------------------------------------------------------------


def test_the_ema_adapter_is_the_moving_average_of_the_weights_after_each_step(ema_run):
    config, final, _ = adapters.read_adapter(ema_run / "adapter.safetensors")
    # Step 0: the adapter as attached (LoRA's seeded init), on a fresh model; steps 1-3 from the
    # checkpoints; step 4 is the finished adapter.
    unet = load_pipeline("tiny").unet
    adapters.attach(unet, config)
    weights = [adapter_tensors(unet)]
    weights += [_tensors(ema_run / "checkpoints" / f"step-{step}" / "adapter.safetensors") for step in (1, 2, 3)]
    weights.append(final)
    average = {name: tensor.double() for name, tensor in weights[0].items()}
    for step_weights in weights[1:]:
        average = {
            name: EMA_DECAY * value + (1 - EMA_DECAY) * step_weights[name].double() for name, value in average.items()
        }
    ema = _tensors(ema_run / "adapter-ema.safetensors")
    assert ema.keys() == final.keys()
    for name, tensor in ema.items():
        torch.testing.assert_close(tensor.double(), average[name], rtol=1e-6, atol=1e-9)
    moved = max((final[name] - ema[name]).abs().max().item() for name in final)
    assert moved > 1e-5, "the average lags the trained weights"
    # The file is an adapter like any other: it loads onto a fresh model.
    adapters.load_adapter(load_pipeline("tiny").unet, ema_run / "adapter-ema.safetensors")


def test_sample_ema_renders_the_moving_average(ema_run, tmp_path):
    common = ["--num-steps", "2", "--seeds", "42", "--prompt", "a zjw toy"]
    run_cli("sample", "--run", ema_run, "--ema", *common)
    ema_samples = ema_run / "samples-ema"
    manifest = json.loads((ema_samples / "samples.json").read_text())
    assert manifest["adapter"] == "adapter-ema.safetensors"
    # Second path: a copy of the run whose adapter.safetensors *is* the average, sampled plainly.
    copy = tmp_path / "copy"
    shutil.copytree(ema_run, copy, ignore=shutil.ignore_patterns("checkpoints", "samples*"))
    shutil.copy(copy / "adapter-ema.safetensors", copy / "adapter.safetensors")
    run_cli("sample", "--run", copy, *common)
    name = manifest["images"][0]["file"]
    assert (ema_samples / name).read_bytes() == (copy / "samples" / name).read_bytes()
    run_cli("sample", "--run", ema_run, *common, "--output", tmp_path / "raw")
    assert (tmp_path / "raw" / name).read_bytes() != (ema_samples / name).read_bytes()


def test_sample_ema_without_an_ema_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", run)
    assert "trained without --ema-decay" in cli_error("sample", "--run", run, "--ema")
    assert not (run / "adapter-ema.safetensors").exists()


# --- optimizers and resume ------------------------------------------------------------------------

# A state key only that optimizer's parameter groups hold: proof of which one ran.
OPTIMIZER_MARKS = {"adamw": "amsgrad", "prodigy": "d_numerator", "adafactor": "decay_rate"}


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_MARKS))
def test_each_optimizer_trains_and_resumes_bit_for_bit_with_its_ema(tmp_path, optimizer):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    lr = "1.0" if optimizer == "prodigy" else "1e-2"
    common = [*FAST, "--subject", "demo", "--optimizer", optimizer, "--lr", lr, "--ema-decay", "0.7", "--noise-offset"]
    common += ["0.1", "--snr-gamma", "5", "--checkpoint-every", "2"]
    run_cli("train", *common, "--steps", "4", "--output", whole)
    run_cli("train", *common, "--steps", "2", "--checkpoint-every", "1", "--output", resumed)
    checkpoint = resumed / "checkpoints" / "step-1"
    groups = json.loads((checkpoint / "training_state.json").read_text())["param_groups"]
    assert OPTIMIZER_MARKS[optimizer] in groups[0]
    run_cli("train", *common, "--steps", "4", "--output", resumed, "--resume", checkpoint)
    for name in ("adapter.safetensors", "adapter-ema.safetensors"):
        expected, actual = _tensors(whole / name), _tensors(resumed / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name
    trained = _tensors(whole / "adapter.safetensors")
    assert max(tensor.abs().max().item() for tensor in trained.values() if tensor.is_floating_point()) > 0


@pytest.mark.slow
def test_adamw8bit_on_the_cpu_is_one_line_and_exit_2(tmp_path):
    run = tmp_path / "run"
    args = ["train", *FAST, "--subject", "demo", "--steps", "1", "--optimizer", "adamw8bit", "--output", run]
    result = run_subprocess(*args, cache=tmp_path / "cache")
    assert_user_error(result, "adamw8bit", "CUDA GPUs only", "--optimizer adamw")
    assert not (run / "adapter.safetensors").exists()


def test_an_optimizer_or_tracker_whose_package_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    for module in ("prodigyopt", "bitsandbytes", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    train = ["train", *FAST, "--subject", "demo", "--steps", "1", "--output", tmp_path / "run"]
    assert "pip install 'sparse-dreambooth[prodigy]'" in cli_error(*train, "--optimizer", "prodigy", "--lr", "1")
    assert "pip install 'sparse-dreambooth[wandb]'" in cli_error(*train, "--report-to", "wandb")
    # bitsandbytes is only looked for on a CUDA device (on the CPU the device is the error).
    settings = TrainSettings(optimizer="adamw8bit")
    with pytest.raises(UserError, match=r"pip install 'sparse-dreambooth\[bnb\]'"):
        check_optimizer(settings, torch.device("cuda"))
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_report_to_none_writes_no_logs(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--report-to", "none", "--output", run)
    assert (run / "adapter.safetensors").is_file() and not (run / "logs").exists()


# --- the model card -------------------------------------------------------------------------------


def _card_fields(path) -> dict[str, str]:
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[1].strip() for cells in rows if len(cells) == 2}


def test_the_run_card_states_model_method_budget_steps_seed_and_licence(ema_run):
    record = json.loads((ema_run / "run.json").read_text())
    card = (ema_run / "README.md").read_text()
    fields = _card_fields(ema_run / "README.md")
    assert fields["base model"] == record["base_model"]
    assert fields["method"].startswith("lora")
    assert fields["budget"].startswith(f"{record['trainable_parameters']:,} trainable parameters, budget_scale 1")
    assert fields["training"].startswith("4 steps, batch 1 x 1 accumulation x 1 process(es); adamw lr 0.01")
    assert f"EMA decay {EMA_DECAY:g}" in fields["training"]
    assert fields["seed"].startswith("42 ") and fields["instance prompt"] == "a zjw toy"
    assert "Licence: procedural" in card and "Not evaluated yet" in card


def test_the_licence_line_of_a_dreambooth_subject_credits_its_photographers(tmp_path):
    config = merge_settings(None, {"subject": "dog6", "data_root": str(FIXTURE_DATA)})
    assert "CC BY 4.0" in licence_line(config) and "references_and_licenses.txt" in licence_line(config)
    # The dataset's file lists a subject as `name: who`, or `name:` then a `(credit: URL)` line.
    credits = "dog5: \n(credit: https://unsplash.com/@a)\n00: x\n\ndog6: \n(credit: https://unsplash.com/@b)\n"
    credits += "00: https://unsplash.com/photos/y\n\nduck_toy: Photos taken by C\n"
    assert dataset_credit(credits, "dog6") == "credit: https://unsplash.com/@b"
    assert dataset_credit(credits, "duck_toy") == "Photos taken by C"
    assert dataset_credit(credits, "dog") is None
    root = tmp_path / "dreambooth"
    shutil.copytree(FIXTURE_DATA, root)
    (root / "references_and_licenses.txt").write_text(credits)
    config = merge_settings(None, {"subject": "dog6", "data_root": str(root)})
    assert licence_line(config).endswith("dog6: credit: https://unsplash.com/@b")
    own = merge_settings(None, {"instance_dir": str(root / "dog6"), "class_name": "dog"})
    assert "your own photos" in licence_line(own)


@pytest.mark.slow
def test_evaluate_puts_the_metrics_on_the_card_and_every_export_has_one(ema_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ema_run, run, ignore=shutil.ignore_patterns("checkpoints", "samples*"))
    run_cli("sample", "--run", run, "--num-steps", "2", "--seeds", "42,43", "--prompt", "a zjw toy")
    run_cli("evaluate", "--run", run, "--dino", "tiny", "--clip", "tiny", "--cmmd", "tiny", "--lpips", "tiny")
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    row = next(line for line in (run / "README.md").read_text().splitlines() if line.startswith("| adapter |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    expected = [metrics["metrics"][key] for key in ("dino", "clip_i", "clip_t_x100", "lpips_diversity", "cmmd")]
    assert cells[1] == str(metrics["num_images"])
    assert cells[2:] == [f"{value:.4f}" for value in expected]

    run_cli("export", "--run", run, "--format", "peft", "--out", tmp_path / "peft")
    run_cli(
        "export", "--run", run / "adapter-ema.safetensors", "--format", "kohya", "--out", tmp_path / "ema.safetensors"
    )
    peft_card, kohya_card = tmp_path / "peft" / "README.md", tmp_path / "ema.md"
    assert _card_fields(peft_card)["base model"] == _card_fields(run / "README.md")["base model"]
    assert "## This export\n\npeft: wrote" in peft_card.read_text() and "| adapter |" in peft_card.read_text()
    assert _card_fields(kohya_card)["weights"] == f"EMA, decay {EMA_DECAY}"
    assert "Licence: procedural" in kohya_card.read_text()


# --- sweeping the options -------------------------------------------------------------------------


def test_a_sweep_axis_with_null_runs_the_default_and_names_it_none(tmp_path):
    from sparse_dreambooth import sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"config: {CONFIGS / 'micro.yaml'}\noutput: {tmp_path / 'out'}\nsubjects: [micro/teal_dog]\n"
        "grid:\n  - method: [waveft, lora]\n    snr_gamma: [null, 5.0]\n"
    )
    jobs = sweep.plan(sweep.load_sweep(path))
    assert [job.name for job in jobs] == [
        "lora_snr_gamma-5",
        "lora_snr_gamma-none",
        "waveft_snr_gamma-5",
        "waveft_snr_gamma-none",
    ]
    assert [job.config.train.snr_gamma for job in jobs] == [5.0, None, 5.0, None]
    for job in jobs:
        train_command = sweep.commands(sweep.load_sweep(path), job, until="train")[0]
        assert "None" not in train_command
        assert ("--snr-gamma" in train_command) == (job.config.train.snr_gamma is not None)


def test_an_imported_run_has_a_card_that_does_not_invent_its_training(ema_run, tmp_path):
    run_cli("export", "--run", ema_run, "--format", "peft", "--out", tmp_path / "peft")
    run = tmp_path / "imported"
    run_cli("import", tmp_path / "peft", "--output", run, "--model", "tiny", "--subject", "demo", "--resolution", "32")
    fields = _card_fields(run / "README.md")
    assert fields["training"] == f"imported from a peft LORA adapter, {(tmp_path / 'peft').resolve()}"
    assert fields["seed"].startswith("unknown")
    assert fields["base model"] == json.loads((run / "run.json").read_text())["base_model"]
