"""Score a folder of samples the way the DreamBooth protocol does.

    sparse-db evaluate --run runs/dog6-waveft              # RUN/samples -> metrics.json + CSV
    sparse-db evaluate --samples DIR --subject dog6        # any folder of prompt_XX_sample_K_seed_S.png

Reading a samples folder (its manifest, subject and run settings) and scoring it: DINO and CLIP-I
against the subject's real images, CLIP-T against the prompt with the rare token removed ("a zjw
dog in the snow" -> "a dog in the snow"), LPIPS diversity over every pair of samples of the same
prompt, and CMMD. The networks and their preprocessing are in metric_models.py; the formulas in
metrics.py.
"""

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparse_dreambooth import data
from sparse_dreambooth.config import TrainConfig, load_config
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import write_json, write_text
from sparse_dreambooth.methods import method_of
from sparse_dreambooth.metric_models import (
    DEFAULT_CLIP,
    DEFAULT_CMMD,
    DEFAULT_DINO,
    DEFAULT_LPIPS,
    MICRO,
    MetricModels,
    convert_lpips_weights,
    load_image,
    load_lpips,
    lpips_cache_file,
    tiny_clip_tokenizer,
    tiny_lpips,
)
from sparse_dreambooth.metrics import (
    CMMD_SCALE,
    CMMD_SIGMA,
    cmmd,
    mean_pairwise_cosine,
    strip_token,
)
from sparse_dreambooth.micro.metric_models import INPUT_SIZE as MICRO_INPUT_SIZE
from sparse_dreambooth.model_card import write_run_card
from sparse_dreambooth.runs import (
    CONFIG_FILE,
    MANIFEST,
    METRICS_FILE,
    PER_IMAGE_FILE,
    RUN_FILE,
    SAMPLE_GLOB,
    SAMPLE_NAME,
    SAMPLES,
    require_run,
    resolve_subject,
)

METRIC_NAMES = ("dino", "clip_i", "clip_t", "clip_t_x100", "lpips_diversity", "cmmd")


@dataclass
class SampleSet:
    """A folder of samples and what it shows."""

    folder: Path
    subject: data.Subject
    token: str
    images: list[dict]  # file, prompt_index, sample_index, seed, prompt
    info: dict  # run, method, budget, scaling, ... (what the report groups by)


def _run_folder(folder: Path, manifest: dict | None) -> Path | None:
    candidates = [Path(manifest["run"])] if manifest and manifest.get("run") else []
    candidates.append(folder.parent)
    return next((path for path in candidates if (path / CONFIG_FILE).is_file()), None)


def _images_by_name(folder: Path, subject: data.Subject, prompts: list[str]) -> list[dict]:
    """The samples of a folder without samples.json, told apart by their file names."""
    images = []
    for path in sorted(folder.glob(SAMPLE_GLOB)):
        match = SAMPLE_NAME.match(path.name)
        if not match:
            continue
        prompt_index, sample_index, seed = (int(group) for group in match.groups())
        if prompt_index >= len(prompts):
            raise UserError(
                f"{path.name}: the {subject.kind} prompt list has {len(prompts)} prompts; add a "
                f"samples.json naming the prompts"
            )
        images.append(
            {
                "file": path.name,
                "prompt_index": prompt_index,
                "sample_index": sample_index,
                "seed": seed,
                "prompt": prompts[prompt_index],
            }
        )
    return images


def _run_info(run: Path | None, config: TrainConfig | None, base: bool) -> dict:
    """What the report groups by: the run's method and budget settings and its parameter count."""
    info: dict = {"run": str(run) if run else None}
    if config is not None and not base:
        adapter = config.adapter
        info.update(
            method=adapter.method,
            budget_scale=adapter.budget_scale,
            budget=adapter.budget,
            rank=adapter.rank,
            allocation=adapter.allocation,
            scaling=method_of(adapter).scaling(adapter),
            wavelet=method_of(adapter).wavelet(adapter),
            steps=config.train.steps,
        )
        run_json = run / RUN_FILE
        info["trainable_parameters"] = (
            json.loads(run_json.read_text()).get("trainable_parameters") if run_json.is_file() else None
        )
    else:
        info.update(method="base" if base else "unknown", trainable_parameters=0 if base else None)
    return info


def read_samples(
    folder,
    subject: str | None = None,
    data_root: str | None = None,
    instance_dir: str | None = None,
    class_name: str | None = None,
    token: str | None = None,
) -> SampleSet:
    """What is in a samples folder: its manifest (or the file names), subject and run settings.

    The subject and token come from the arguments, else from the run's config.yaml (found through
    samples.json's "run" or the folder's parent).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"samples folder {folder} does not exist; render it with `sparse-db sample --run RUN`")
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    run = _run_folder(folder, manifest)
    config = load_config(run / CONFIG_FILE) if run else None
    if subject is not None or instance_dir is not None:
        found = data.find_subject(subject, data_root, instance_dir, class_name)
    elif config is not None:
        found = resolve_subject(config)
    else:
        raise UserError(
            f"{folder} belongs to no run folder; name its subject with --subject NAME (or --instance-dir "
            f"DIR --class-name C)"
        )
    token = token or (config.data.token if config else "zjw")

    if manifest is not None:
        images = [
            {key: entry[key] for key in ("file", "prompt_index", "sample_index", "seed", "prompt")}
            for entry in manifest["images"]
        ]
    else:
        images = _images_by_name(folder, found, data.evaluation_prompts(found, token))
    if not images:
        raise UserError(
            f"no samples (prompt_XX_sample_K_seed_S.png) in {folder}; render them with `sparse-db sample --run RUN`"
        )
    missing = [entry["file"] for entry in images if not (folder / entry["file"]).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(images)} samples are missing in {folder} (first: {missing[0]}); "
            f"finish `sparse-db sample` first"
        )

    base = manifest is not None and manifest.get("adapter") is None
    return SampleSet(folder, found, token, images, _run_info(run, config, base))


def evaluate_samples(samples: SampleSet, models: MetricModels, output=None, cmmd_unbiased: bool = True) -> dict:
    """Score one samples folder; write metrics.json and the per-image CSV; return the metrics."""
    images = [load_image(samples.folder / entry["file"]) for entry in samples.images]
    real_images = samples.subject.image_paths
    real = models.real_embeddings(samples.subject)

    dino_mean, dino_per_image = mean_pairwise_cosine(models.dino_embeddings(images), real["dino"])
    clip_images = models.clip_image_embeddings(images)
    clip_i_mean, clip_i_per_image = mean_pairwise_cosine(clip_images, real["clip"])
    clip_prompts = [strip_token(entry["prompt"], samples.token) for entry in samples.images]
    unique_prompts = list(dict.fromkeys(clip_prompts))
    text = models.clip_text_embeddings(unique_prompts)
    text_rows = text[[unique_prompts.index(prompt) for prompt in clip_prompts]]
    clip_t_per_image = torch.nn.functional.cosine_similarity(clip_images.double(), text_rows.double(), dim=-1)

    by_prompt: dict[int, list[int]] = defaultdict(list)
    for index, entry in enumerate(samples.images):
        by_prompt[entry["prompt_index"]].append(index)
    lpips_per_image, lpips_per_prompt = _lpips_diversity(models, images, by_prompt)
    scored_prompts = [value for value in lpips_per_prompt.values() if value is not None]

    cmmd_value = None
    if models.cmmd is not None:
        if cmmd_unbiased and (len(images) < 2 or len(real_images) < 2):
            raise UserError(
                "the unbiased CMMD needs at least two generated and two real images; pass --cmmd none to skip it"
            )
        cmmd_value = cmmd(models.cmmd_embeddings(images), real["cmmd"], unbiased=cmmd_unbiased)

    clip_t_mean = clip_t_per_image.mean().item()
    metrics = {
        "dino": dino_mean,
        "clip_i": clip_i_mean,
        "clip_t": clip_t_mean,
        "clip_t_x100": 100.0 * clip_t_mean,
        "lpips_diversity": float(np.mean(scored_prompts)) if scored_prompts else None,
        "cmmd": cmmd_value,
    }
    rows = []
    for index, entry in enumerate(samples.images):
        rows.append(
            {
                **entry,
                "clip_prompt": clip_prompts[index],
                "dino": dino_per_image[index].item(),
                "clip_i": clip_i_per_image[index].item(),
                "clip_t": clip_t_per_image[index].item(),
                "clip_t_x100": 100.0 * clip_t_per_image[index].item(),
                "lpips_diversity": lpips_per_image[index],
            }
        )
    per_prompt = [
        {
            "prompt_index": prompt_index,
            "prompt": samples.images[members[0]]["prompt"],
            "samples": len(members),
            "dino": float(np.mean([rows[i]["dino"] for i in members])),
            "clip_i": float(np.mean([rows[i]["clip_i"] for i in members])),
            "clip_t": float(np.mean([rows[i]["clip_t"] for i in members])),
            "lpips_diversity": lpips_per_prompt[prompt_index],
        }
        for prompt_index, members in sorted(by_prompt.items())
    ]
    result = {
        "subject": samples.subject.name,
        "class": samples.subject.class_name,
        "kind": samples.subject.kind,
        "token": samples.token,
        **samples.info,
        "samples": str(samples.folder),
        "num_images": len(images),
        "num_prompts": len(by_prompt),
        "real_images": [str(path) for path in real_images],
        "metrics": metrics,
        "models": models.names,
        "protocol": _protocol(models, cmmd_unbiased),
        "per_prompt": per_prompt,
    }
    output = Path(output or samples.folder)
    write_json(output / METRICS_FILE, result)
    write_text(output / PER_IMAGE_FILE, _csv(rows))
    if samples.info["run"] is not None:
        write_run_card(Path(samples.info["run"]))  # the card shows the run's metrics
    return result


def _lpips_diversity(
    models: MetricModels, images: list[Image.Image], by_prompt: dict[int, list[int]]
) -> tuple[list[float | None], dict[int, float | None]]:
    """Mean LPIPS of each image to the other samples of its prompt, and per prompt over all pairs."""
    per_image: list[float | None] = [None] * len(images)
    per_prompt: dict[int, float | None] = {}
    for prompt_index, members in by_prompt.items():
        per_prompt[prompt_index] = None
        if models.lpips is None or len(members) < 2:
            continue
        matrix = models.lpips_matrix([images[index] for index in members])
        n = len(members)
        for row, index in enumerate(members):
            per_image[index] = matrix[row].sum().item() / (n - 1)
        per_prompt[prompt_index] = matrix.sum().item() / (n * (n - 1))
    return per_image, per_prompt


def _protocol(models: MetricModels, cmmd_unbiased: bool) -> dict[str, str]:
    """How each metric was computed, stored beside the numbers."""
    dino = "CLS embeddings; resize 256 bicubic, centre crop 224"
    if models.names["dino"] == MICRO:
        dino = f"micro identity-encoder embeddings; whole image resized bicubic to {MICRO_INPUT_SIZE}"
    return {
        "dino": f"mean cosine over (generated, real) pairs of {dino}",
        "clip_i": "mean cosine over (generated, real) pairs of projected CLIP image embeddings",
        "clip_t": "mean cosine between each image and its prompt without the rare token; clip_t_x100 = 100 x clip_t",
        "lpips_diversity": "mean LPIPS over pairs of samples of the same prompt, averaged over prompts; images at "
        + (
            f"{models.lpips_resolution}x{models.lpips_resolution}" if models.lpips_resolution else "their rendered size"
        ),
        "cmmd": f"{'unbiased' if cmmd_unbiased else 'biased (V-statistic)'} MMD^2, "
        f"Gaussian RBF sigma {CMMD_SIGMA:g}, "
        f"L2-normalised embeddings, x{CMMD_SCALE:g}",
    }


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def samples_of_run(run) -> Path:
    run = Path(run)
    require_run(run)
    folder = run / SAMPLES
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{run} has no samples yet; render them with `sparse-db sample --run {run}`")
    return folder


def evaluate(
    runs: list | None = None,
    samples: list | None = None,
    models: MetricModels | None = None,
    subject: str | None = None,
    data_root: str | None = None,
    instance_dir: str | None = None,
    class_name: str | None = None,
    token: str | None = None,
    cmmd_unbiased: bool = True,
    **model_names,
) -> list[dict]:
    """Evaluate run folders (their samples/) and samples folders with one set of models."""
    folders = [samples_of_run(run) for run in runs or []] + [Path(folder) for folder in samples or []]
    if not folders:
        raise UserError("nothing to evaluate: pass --run RUN or --samples DIR")
    sets = [
        read_samples(
            folder, subject=subject, data_root=data_root, instance_dir=instance_dir, class_name=class_name, token=token
        )
        for folder in folders
    ]  # every folder is checked before any model loads
    models = models or MetricModels.load(**model_names)
    return [evaluate_samples(sample_set, models, cmmd_unbiased=cmmd_unbiased) for sample_set in sets]


__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_CMMD",
    "DEFAULT_DINO",
    "DEFAULT_LPIPS",
    "METRIC_NAMES",
    "MetricModels",
    "SampleSet",
    "convert_lpips_weights",
    "evaluate",
    "evaluate_samples",
    "load_image",
    "load_lpips",
    "lpips_cache_file",
    "read_samples",
    "tiny_clip_tokenizer",
    "tiny_lpips",
]
