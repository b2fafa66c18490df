"""Tables and figures from evaluated runs: what goes into the paper.

    sparse-db report runs/sweeps/paper --out reports/paper

Reads every metrics.json under the given folders (written by `sparse-db evaluate`), groups them
by method x budget x scaling, and for every metric takes the mean over subjects with a 95%
percentile-bootstrap interval (subjects resampled, seeded). Writes:
    report.md, report.csv        the table (and the trainable-parameter count of each row)
    metrics_vs_parameters.png    every metric against trainable parameters, one line per method
    scaling_ablation.png         metrics against the scaling factor (when runs vary it)
    rank_vs_p.png / .csv         rank of a random sparse matrix against p for SDXL's layer shapes
    grids/SUBJECT.png            real images on top, then one row of samples per method
"""

import csv
import io
import json
import math
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import write_text
from sparse_dreambooth.runs import METRICS_FILE, SAMPLES

# (key in metrics.json, label, higher is better, decimals)
METRICS = (
    ("dino", "DINO", True, 3),
    ("clip_i", "CLIP-I", True, 3),
    ("clip_t_x100", "CLIP-T x100", True, 2),
    ("lpips_diversity", "LPIPS diversity", True, 3),
    ("cmmd", "CMMD x1000", False, 3),
)
METHOD_ORDER = ("waveft", "random-sparse", "lora", "base")
METHOD_NAMES = {"waveft": "WaveFT", "random-sparse": "random-sparse (SHiRA)", "lora": "LoRA", "base": "base model"}
SDXL_SHAPES = {
    "640x640 (self-attn q/k/v/out, cross-attn q/out)": (640, 640),
    "640x2048 (cross-attn k/v)": (640, 2048),
    "1280x1280 (self-attn q/k/v/out, cross-attn q/out)": (1280, 1280),
    "1280x2048 (cross-attn k/v)": (1280, 2048),
}


# --- reading ---------------------------------------------------------------------------------------


def find_metrics(paths) -> list[Path]:
    """metrics.json files: given directly, in a samples folder, in RUN/samples, or anywhere below."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / METRICS_FILE).is_file():
            found.append(path / METRICS_FILE)
        elif (path / SAMPLES / METRICS_FILE).is_file():
            found.append(path / SAMPLES / METRICS_FILE)
        elif path.is_dir():
            found.extend(sorted(path.rglob(METRICS_FILE)))
        else:
            raise UserError(f"{path} does not exist; pass run folders, samples folders or metrics.json files")
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique:
        raise UserError(
            f"no {METRICS_FILE} under {', '.join(map(str, paths))}; run `sparse-db evaluate --run RUN` first"
        )
    return unique


def load_records(files) -> list[dict]:
    records = []
    for path in files:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
        if "metrics" not in record or "subject" not in record:
            raise UserError(f"{path} is not a metrics file written by `sparse-db evaluate`")
        record["_dir"] = str(Path(path).parent)
        records.append(record)
    return records


def method_label(record: dict) -> str:
    """The method as the report names it: 'waveft', 'waveft db2', 'random-sparse proportional'."""
    method = record.get("method") or "unknown"
    parts = [method]
    if method == "waveft" and record.get("wavelet") not in (None, "db1", "haar"):
        parts.append(record["wavelet"])
    if record.get("allocation") == "proportional":
        parts.append("proportional")
    return " ".join(parts)


def budget_label(record: dict) -> str:
    if record.get("method") == "base":
        return "-"
    if record.get("budget_scale") is not None:
        return f"{record['budget_scale']:g}x"
    if record.get("rank") is not None:
        return f"r={record['rank']}"
    if record.get("budget") is not None:
        return f"p={record['budget']}"
    return "default"


def scaling_label(record: dict) -> str:
    return "-" if record.get("scaling") is None else f"{record['scaling']:g}"


def group_key(record: dict) -> tuple[str, str, str]:
    return method_label(record), budget_label(record), scaling_label(record)


def _base_method(label: str) -> str:
    return label.split(" ")[0]


# --- the table ---------------------------------------------------------------------------------------


def summarize(records: list[dict], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """One row per (method, budget, scaling): per metric the mean over subjects and its bootstrap
    interval. A subject evaluated more than once counts once, with its mean."""
    from sparse_dreambooth.metrics import bootstrap_ci

    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[group_key(record)][record["subject"]].append(record)
    rows = []
    for key, by_subject in groups.items():
        label, budget, scaling = key
        params = Counter(r.get("trainable_parameters") for rs in by_subject.values() for r in rs)
        if len(params) > 1:
            warnings.warn(
                f"{label} {budget}: runs differ in trainable parameters {sorted(params, key=str)}", stacklevel=2
            )
        row = {
            "method": label,
            "budget": budget,
            "scaling": scaling,
            "trainable_parameters": params.most_common(1)[0][0],
            "subjects": len(by_subject),
            "subject_names": sorted(by_subject),
        }
        for name in ("dino", "clip_i", "clip_t", "clip_t_x100", "lpips_diversity", "cmmd"):
            per_subject = []
            for subject_records in by_subject.values():
                values = [r["metrics"].get(name) for r in subject_records if r["metrics"].get(name) is not None]
                if values:
                    per_subject.append(sum(values) / len(values))
            mean, low, high = bootstrap_ci(per_subject, n_resamples=n_resamples, confidence=confidence, seed=seed)
            row[name] = None if math.isnan(mean) else mean
            row[f"{name}_low"] = None if math.isnan(low) else low
            row[f"{name}_high"] = None if math.isnan(high) else high
        rows.append(row)
    return sorted(rows, key=_row_order)


def _row_order(row: dict):
    base = _base_method(row["method"])
    method_rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    params = row["trainable_parameters"] if row["trainable_parameters"] is not None else -1
    scaling = float(row["scaling"]) if row["scaling"] != "-" else -1.0
    return (method_rank, row["method"], params, scaling)


CSV_COLUMNS = ["method", "budget", "scaling", "trainable_parameters", "subjects"] + [
    f"{name}{suffix}"
    for name in ("dino", "clip_i", "clip_t", "clip_t_x100", "lpips_diversity", "cmmd")
    for suffix in ("", "_low", "_high")
]


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


def table_markdown(rows: list[dict], n_resamples: int, confidence: float, seed: int) -> str:
    header = ["method", "budget", "scaling", "trainable params", "subjects"] + [
        f"{label} {'↑' if higher else '↓'}" for _, label, higher, _ in METRICS
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for row in rows:
        cells = [
            METHOD_NAMES.get(row["method"], row["method"]),
            row["budget"],
            row["scaling"],
            "-" if row["trainable_parameters"] is None else f"{row['trainable_parameters']:,}",
            str(row["subjects"]),
        ]
        for name, _, _, decimals in METRICS:
            if row.get(name) is None:
                cells.append("-")
            else:
                cells.append(
                    f"{row[name]:.{decimals}f} [{row[name + '_low']:.{decimals}f}, {row[name + '_high']:.{decimals}f}]"
                )
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Mean over subjects [{confidence:.0%} percentile-bootstrap interval over subjects, {n_resamples:,} resamples, "
        f"seed {seed}]. Budget: multiple of LoRA r=1's parameter count (x), per-layer coefficients (p) "
        f"or LoRA rank (r). "
        "CLIP-T scores the prompt without the rare token; CMMD is MMD^2 x1000 (RBF sigma 10) against the real images."
    )
    return "\n".join(["# Results", "", note, "", *lines, ""])


def budget_series(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, the rows of its budget sweep: the scaling with the most budgets."""
    by_method: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["method"] != "base" and row["trainable_parameters"]:
            by_method[row["method"]][row["scaling"]].append(row)
    series = {}
    for method, by_scaling in by_method.items():
        scaling = max(by_scaling, key=lambda s: (len(by_scaling[s]), s == "25", s))
        series[method] = sorted(by_scaling[scaling], key=lambda row: row["trainable_parameters"])
    return series


# --- the command ---------------------------------------------------------------------------------------


def parse_shapes(text: str | None) -> dict[str, tuple[int, int]]:
    """'sdxl' (default), 'none', or 'OUTxIN,OUTxIN,...'."""
    if text is None or text == "sdxl":
        return dict(SDXL_SHAPES)
    if text == "none":
        return {}
    shapes = {}
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not match:
            raise UserError(f"--rank-shapes takes 'sdxl', 'none' or OUTxIN,OUTxIN,... (e.g. 640x2048), got {item!r}")
        shapes[f"{match.group(1)}x{match.group(2)}"] = (int(match.group(1)), int(match.group(2)))
    return shapes


def report(
    paths,
    out,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    rank_shapes: str | None = "sdxl",
    grid_budget: str | None = None,
    grid_prompts: list[int] | None = None,
    grid_columns: int = 4,
) -> dict[str, object]:
    """Write the table, the plots and the grids for the evaluated runs under `paths`; return
    {what: path}."""
    if n_resamples <= 0 or not 0 < confidence < 1:
        raise UserError("--resamples must be positive and --confidence between 0 and 1 (e.g. 0.95)")
    out = Path(out)
    records = load_records(find_metrics(paths))
    rows = summarize(records, n_resamples=n_resamples, confidence=confidence, seed=seed)
    outputs: dict[str, object] = {"records": len(records), "rows": rows}
    write_text(out / "report.csv", table_csv(rows))
    write_text(out / "report.md", table_markdown(rows, n_resamples, confidence, seed))
    outputs["table"] = out / "report.md"
    outputs["csv"] = out / "report.csv"
    from sparse_dreambooth.figures import image_grids, plot_metrics_vs_parameters, plot_rank, plot_scaling_ablation

    outputs["metrics_vs_parameters"] = plot_metrics_vs_parameters(rows, out / "metrics_vs_parameters.png")
    outputs["scaling_ablation"] = plot_scaling_ablation(rows, out / "scaling_ablation.png")
    shapes = parse_shapes(rank_shapes)
    outputs["rank"] = plot_rank(shapes, out / "rank_vs_p.png", out / "rank_vs_p.csv") if shapes else None
    outputs["grids"] = image_grids(
        records, rows, out / "grids", budget=grid_budget, prompts=grid_prompts, columns=grid_columns
    )
    return outputs
