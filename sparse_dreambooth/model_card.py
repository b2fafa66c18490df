"""The model card: README.md in a run folder and beside every export of it.

It says what the adapter is (base model, method, budget, steps, seed, prompt, the loss and optimizer
options), how well it did (the metrics, once `sparse-db evaluate` has scored its samples; evaluate
rewrites the card) and under which terms its training images came (the licence line). Everything is
read from the run's own files (config.yaml, run.json, samples*/metrics.json), so the card never
disagrees with them. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparse_dreambooth import __version__, runs
from sparse_dreambooth.config import CLIP_ATTENTION_TARGETS, TrainConfig, load_config
from sparse_dreambooth.files import write_text

DREAMBOOTH_LICENCE = "the DreamBooth dataset (Ruiz et al. 2023, https://github.com/google/dreambooth), CC BY 4.0"
CREDITS_FILE = "references_and_licenses.txt"  # the dataset's list of photographers, one entry per subject
# The metrics of metrics.json shown on the card, in this order, with what is better.
CARD_METRICS = {
    "dino": "DINO (higher is better)",
    "clip_i": "CLIP-I (higher)",
    "clip_t_x100": "CLIP-T x100 (higher)",
    "lpips_diversity": "LPIPS diversity (higher)",
    "cmmd": "CMMD (lower)",
}


def dataset_credit(credits_text: str, subject: str) -> str | None:
    """The subject's entry in the dataset's references_and_licenses.txt: `name: who` on one line, or
    `name:` followed by a `(credit: URL)` line. None when the subject is not listed."""
    lines = credits_text.splitlines()
    for index, line in enumerate(lines):
        name, colon, rest = line.partition(":")
        if colon and name.strip() == subject:
            following = lines[index + 1].strip() if index + 1 < len(lines) else ""
            return rest.strip() or following.strip("()").strip() or None
    return None


def licence_line(config: TrainConfig) -> str:
    """Under which terms the run's training images came."""
    data = config.data
    if data.instance_dir is not None:
        return (
            f"your own photos ({data.instance_dir}): they are under their owner's terms; state them here "
            "before sharing this adapter"
        )
    from sparse_dreambooth import data as datasets

    if data.subject == datasets.DEMO_SUBJECT or data.subject.startswith(datasets.MICRO_PREFIX):
        return "procedural: the micro subjects are drawn by sparse-dreambooth's own code, no photographs are involved"
    credits = datasets.resolve_data_root(data.data_root) / CREDITS_FILE
    credit = dataset_credit(credits.read_text(encoding="utf-8"), data.subject) if credits.is_file() else None
    return f"{DREAMBOOTH_LICENCE}; {data.subject}: {credit or f'photographers credited in its {CREDITS_FILE}'}"


def _method_line(config: TrainConfig) -> str:
    from sparse_dreambooth.methods import method_of

    adapter = config.adapter
    method = method_of(adapter)
    details = [f"wavelet {method.wavelet(adapter)}"] if method.wavelet(adapter) else []
    if method.scaling(adapter) is not None:
        details.append(f"scaling {method.scaling(adapter):g}")
    if adapter.rank is not None:
        details.append(f"rank {adapter.rank}")
    if adapter.alpha is not None:
        details.append(f"alpha {adapter.alpha:g}")
    return adapter.method + (f" ({', '.join(details)})" if details else "")


def _budget_line(config: TrainConfig, record: dict) -> str:
    adapter = config.adapter
    count = record.get("trainable_parameters")
    stated = (
        f"budget_scale {adapter.budget_scale:g} (x LoRA r=1 on the same layers)"
        if adapter.budget_scale is not None
        else f"budget {adapter.budget} per layer"
        if adapter.budget is not None
        else "the default budget (LoRA r=1 per layer)"
    )
    return (f"{count:,} trainable parameters, " if count is not None else "") + f"{stated}, {adapter.allocation}"


def _training_line(config: TrainConfig, record: dict) -> str:
    train = config.train
    processes = record.get("processes", 1)
    options = [f"{train.optimizer} lr {train.lr:g}", f"{train.lr_scheduler} schedule", f"{train.loss} loss"]
    if train.loss == "huber":
        options[-1] += f" (delta {train.huber_delta:g})"
    if train.snr_gamma is not None:
        options.append(f"min-SNR gamma {train.snr_gamma:g}")
    if train.noise_offset:
        options.append(f"noise offset {train.noise_offset:g}")
    if train.ema_decay is not None:
        options.append(f"EMA decay {train.ema_decay:g}")
    batch = f"batch {train.batch_size} x {train.grad_accum} accumulation x {processes} process(es)"
    precision = "fp32" if train.mixed_precision == "no" else f"{train.mixed_precision} mixed precision"
    return f"{record.get('steps', train.steps)} steps, {batch}; {', '.join(options)}; {precision}"


def _metrics_section(run: Path | None) -> list[str]:
    found = []
    for folder, weights in ((runs.SAMPLES, "adapter"), (runs.EMA_SAMPLES, "EMA adapter")):
        path = run / folder / runs.METRICS_FILE if run is not None else None
        if path is not None and path.is_file():
            found.append((weights, json.loads(path.read_text())))
    if not found:
        return ["Not evaluated yet: `sparse-db sample --run RUN`, then `sparse-db evaluate --run RUN`."]
    lines = ["| weights | images | " + " | ".join(CARD_METRICS.values()) + " |", "|---" * (len(CARD_METRICS) + 2) + "|"]
    for weights, result in found:
        values = [result["metrics"].get(key) for key in CARD_METRICS]
        cells = ["-" if value is None else f"{value:.4f}" for value in values]
        lines.append(f"| {weights} | {result['num_images']} | " + " | ".join(cells) + " |")
    models = found[0][1].get("models") or {}
    lines += ["", "Metric models: " + ", ".join(f"{key} {value}" for key, value in models.items() if value)]
    return lines


def model_card(config: TrainConfig, record: dict, run: Path | None = None, weights: str | None = None) -> str:
    """The card's text. `record` is run.json (or {} when there is none), `run` the folder whose
    samples' metrics to show, `weights` which weights an export holds (None: the trained ones)."""
    subject = config.data.subject or Path(config.data.instance_dir).name
    base_model = record.get("base_model", config.model.model)
    class_name = (record.get("subject") or {}).get("class") or config.data.class_name
    fields = {
        "base model": base_model,
        "method": _method_line(config),
        "budget": _budget_line(config, record),
        "target layers": ", ".join(config.adapter.targets)
        + ("; both text encoders' " + ", ".join(CLIP_ATTENTION_TARGETS) if config.adapter.train_text_encoder else ""),
        "training": _training_line(config, record),
        "seed": f"{config.train.seed} (adapter seed {config.adapter.adapter_seed})",
    }
    if origin := record.get("origin"):  # `sparse-db import`: trained elsewhere, with settings unknown here
        fields["training"] = f"imported from a {origin['format']} {origin['peft_type']} adapter, {origin['source']}"
        fields["seed"] = "unknown (trained elsewhere)"
    fields |= {
        "resolution": f"{config.data.resolution} px",
        "instance prompt": f"a {config.data.token} {class_name}" if class_name else "-",
        "weights": weights or "as trained",
    }
    lines = [
        f"# {subject}: a {config.adapter.method} DreamBooth adapter for {base_model}",
        "",
        f"Trained with sparse-dreambooth {record.get('sparse_dreambooth', __version__)}; "
        "the run's full settings are in its config.yaml.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in fields.items()),
        "",
        "## Metrics",
        "",
        *_metrics_section(run),
        "",
        "## Training data",
        "",
        f"Licence: {licence_line(config)}.",
        "",
    ]
    return "\n".join(lines)


def _utf8(text: str) -> str:
    """The card is UTF-8 text: a path that is not (a folder name in another encoding, kept by Python
    as surrogates) is written with escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_run_card(run: Path) -> Path | None:
    """RUN/README.md from the run's files; None (and nothing written) for a run that has not finished."""
    run = Path(run)
    if not (run / runs.RUN_FILE).is_file() or not (run / runs.CONFIG_FILE).is_file():
        return None
    record = json.loads((run / runs.RUN_FILE).read_text())
    path = run / runs.MODEL_CARD
    write_text(path, _utf8(model_card(load_config(run / runs.CONFIG_FILE), record, run)))
    return path


def write_export_card(path: Path, config: TrainConfig, run: Path | None, weights: str | None, export: str) -> None:
    """The card of an export at `path`, with a closing section on what the export holds."""
    run_file = run / runs.RUN_FILE if run is not None else None
    record = json.loads(run_file.read_text()) if run_file is not None and run_file.is_file() else {}
    text = model_card(config, record, run, weights) + f"\n## This export\n\n{export}\n"
    write_text(path, _utf8(text))
