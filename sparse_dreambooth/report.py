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
import textwrap
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_path, write_text

METRICS_FILE = "metrics.json"
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
METHOD_STYLES = {  # colour-blind-safe colours, one marker per method
    "waveft": ("#0072B2", "o"),
    "random-sparse": ("#E69F00", "s"),
    "lora": ("#009E73", "^"),
    "base": ("#555555", "x"),
}
PAPER_BUDGET = 2592  # coefficients per layer = LoRA r=1 averaged over SDXL's attention projections
# nn.Linear weight shapes (out, in) of SDXL's UNet attention projections.
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
        elif (path / "samples" / METRICS_FILE).is_file():
            found.append(path / "samples" / METRICS_FILE)
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


# --- figures -------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _style(label: str):
    return METHOD_STYLES.get(_base_method(label), ("#CC79A7", "D"))


def _log_axis(axis, values, engineering: bool = False) -> None:
    """Log x axis with plain tick labels (1.45M, 25) at the values plotted, nothing in between."""
    from matplotlib.ticker import EngFormatter, FixedLocator, NullLocator, ScalarFormatter

    axis.set_xscale("log")
    ticks = sorted(set(values))
    if len(ticks) > 8:  # too many to label: keep every other one
        ticks = ticks[::2]
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_major_formatter(EngFormatter(sep="", places=2) if engineering else ScalarFormatter())
    axis.tick_params(axis="x", labelrotation=45 if engineering else 0, labelsize=9)


def _present_metrics(rows: list[dict]) -> list[tuple]:
    return [metric for metric in METRICS if any(row.get(metric[0]) is not None for row in rows)]


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


def plot_metrics_vs_parameters(rows: list[dict], path: Path) -> Path | None:
    """One panel per metric; x: trainable parameters (log), one line per method with its
    bootstrap intervals, each point labelled with its budget; the base model as a dashed line."""
    metrics = _present_metrics(rows)
    series = budget_series(rows)
    if not metrics or not series:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.4), squeeze=False)
    base = next((row for row in rows if row["method"] == "base"), None)
    for axis, (name, label, higher, _) in zip(axes[0], metrics, strict=False):
        for method, points in series.items():
            colour, marker = _style(method)
            xs = [row["trainable_parameters"] for row in points if row.get(name) is not None]
            kept = [row for row in points if row.get(name) is not None]
            if not kept:
                continue
            ys = [row[name] for row in kept]
            errors = [
                [y - row[f"{name}_low"] for y, row in zip(ys, kept, strict=False)],
                [row[f"{name}_high"] - y for y, row in zip(ys, kept, strict=False)],
            ]
            scaling = kept[0]["scaling"]
            legend = METHOD_NAMES.get(method, method) + (f" (scaling {scaling})" if scaling != "-" else "")
            axis.errorbar(
                xs, ys, yerr=errors, color=colour, marker=marker, markersize=7, capsize=3, linewidth=1.8, label=legend
            )
            for x, y, row in zip(xs, ys, kept, strict=False):
                axis.annotate(
                    row["budget"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=colour
                )
        if base is not None and base.get(name) is not None:
            axis.axhline(
                base[name],
                color=METHOD_STYLES["base"][0],
                linestyle="--",
                linewidth=1.2,
                label="base model (no adapter)",
            )
        _log_axis(axis, [row["trainable_parameters"] for points in series.values() for row in points], engineering=True)
        axis.set_xlabel("trainable parameters")
        axis.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False, bbox_to_anchor=(0.5, -0.08)
    )
    figure.suptitle("Metric vs parameter budget (mean over subjects, 95% bootstrap interval)")
    figure.tight_layout()
    return _save(figure, path)


def plot_scaling_ablation(rows: list[dict], path: Path) -> Path | None:
    """Metrics against the scaling factor, for every method x budget run at several scalings."""
    ablations: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["scaling"] != "-":
            ablations[(row["method"], row["budget"])].append(row)
    ablations = {
        key: sorted(points, key=lambda row: float(row["scaling"]))
        for key, points in ablations.items()
        if len(points) > 1
    }
    metrics = _present_metrics([row for points in ablations.values() for row in points])
    if not ablations or not metrics:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.4), squeeze=False)
    for axis, (name, label, higher, _) in zip(axes[0], metrics, strict=False):
        for (method, budget), points in ablations.items():
            colour, marker = _style(method)
            kept = [row for row in points if row.get(name) is not None]
            xs, ys = [float(row["scaling"]) for row in kept], [row[name] for row in kept]
            errors = [
                [y - row[f"{name}_low"] for y, row in zip(ys, kept, strict=False)],
                [row[f"{name}_high"] - y for y, row in zip(ys, kept, strict=False)],
            ]
            axis.errorbar(
                xs,
                ys,
                yerr=errors,
                color=colour,
                marker=marker,
                markersize=7,
                capsize=3,
                linewidth=1.8,
                label=f"{METHOD_NAMES.get(method, method)}, budget {budget}",
            )
        _log_axis(axis, [float(row["scaling"]) for points in ablations.values() for row in points])
        axis.set_xlabel("scaling factor")
        axis.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False, bbox_to_anchor=(0.5, -0.08)
    )
    figure.suptitle("Scaling ablation (mean over subjects, 95% bootstrap interval)")
    figure.tight_layout()
    return _save(figure, path)


def structural_rank(rows, cols, shape: tuple[int, int]) -> int:
    """Size of a maximum matching between the rows and columns holding non-zeros (Hopcroft-Karp).

    This is the rank a sparse matrix with these non-zero positions has for almost every choice of
    values (with continuous random values, with probability 1), and costs O(p sqrt(m)) instead of
    an SVD.
    """
    m, n = shape
    adjacency: list[list[int]] = [[] for _ in range(m)]
    for r, c in zip(rows, cols, strict=False):
        adjacency[int(r)].append(int(c))
    match_row, match_col = [-1] * m, [-1] * n
    for r in range(m):  # greedy start
        for c in adjacency[r]:
            if match_col[c] == -1:
                match_row[r], match_col[c] = c, r
                break
    while True:
        layer = [-1] * m
        queue = [r for r in range(m) if match_row[r] == -1 and adjacency[r]]
        for r in queue:
            layer[r] = 0
        free_column_reached, head = False, 0
        while head < len(queue):
            r = queue[head]
            head += 1
            for c in adjacency[r]:
                owner = match_col[c]
                if owner == -1:
                    free_column_reached = True
                elif layer[owner] == -1:
                    layer[owner] = layer[r] + 1
                    queue.append(owner)
        if not free_column_reached:
            break
        cursor = [0] * m
        for start in range(m):
            if match_row[start] != -1 or layer[start] != 0:
                continue
            stack, path = [start], []
            while stack:
                r = stack[-1]
                if cursor[r] < len(adjacency[r]):
                    c = adjacency[r][cursor[r]]
                    cursor[r] += 1
                    owner = match_col[c]
                    if owner == -1:
                        path.append(c)
                        for row, column in zip(stack, path, strict=False):
                            match_row[row], match_col[column] = column, row
                        break
                    if layer[owner] == layer[r] + 1:
                        stack.append(owner)
                        path.append(c)
                else:
                    layer[r] = -2  # dead end for this phase
                    stack.pop()
                    if path:
                        path.pop()
    return sum(1 for c in match_row if c != -1)


def rank_curve(shape: tuple[int, int], counts: list[int], seed: int = 777) -> list[int]:
    """Rank of the random sparse matrix with p non-zeros at the adapters' seeded positions, per p.

    Positions for a larger p extend those of a smaller one (a prefix of one permutation), so the
    rank never falls with p; once full, it stays full.
    """
    from sparse_dreambooth.adapters.sparse import random_positions

    full = min(shape)
    ranks = []
    for count in counts:
        if ranks and ranks[-1] == full:
            ranks.append(full)
            continue
        positions = random_positions(shape, min(count, shape[0] * shape[1]), seed)
        ranks.append(structural_rank(positions[0].tolist(), positions[1].tolist(), shape))
    return ranks


def default_counts(shapes) -> list[int]:
    largest = max(m * n for m, n in shapes)
    counts = sorted({round(PAPER_BUDGET * 2 ** (k / 2)) for k in range(-12, 15)})
    return [count for count in counts if count <= largest]


def plot_rank(shapes: dict[str, tuple[int, int]], png: Path, csv_path: Path, seed: int = 777) -> Path:
    """Rank vs p for each shape; LoRA's rank at the same parameter count for comparison."""
    counts = default_counts(shapes.values())
    curves = {label: rank_curve(shape, counts, seed) for label, shape in shapes.items()}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["shape", "out", "in", "p", "sparse_rank", "lora_rank_same_parameters"])
    for label, shape in shapes.items():
        for count, rank in zip(counts, curves[label], strict=False):
            writer.writerow([label.split(" ")[0], shape[0], shape[1], count, rank, count // sum(shape)])
    write_text(csv_path, buffer.getvalue())

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    colours = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
    markers = ["o", "s", "^", "D", "v", "P"]
    for index, (label, shape) in enumerate(shapes.items()):
        colour, marker = colours[index % len(colours)], markers[index % len(markers)]
        axis.plot(
            counts,
            curves[label],
            color=colour,
            marker=marker,
            markersize=4,
            linewidth=1.8,
            label=f"random sparse, {label}",
        )
        lora = [(count, count // sum(shape)) for count in counts if count // sum(shape) >= 1]
        if lora:
            axis.plot(
                *zip(*lora, strict=False),
                color=colour,
                linestyle=":",
                linewidth=1.6,
                label=f"LoRA, same parameters, {shape[0]}x{shape[1]}",
            )
    axis.axvline(PAPER_BUDGET, color="#555555", linestyle="--", linewidth=1)
    axis.text(PAPER_BUDGET * 1.08, 12, f"p = {PAPER_BUDGET}\n(= LoRA r=1 on SDXL)", fontsize=8, color="#333333")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_ylim(0.9, max(min(shape) for shape in shapes.values()) * 2.5)
    axis.set_xlabel("p = trainable parameters of the layer (non-zero coefficients)")
    axis.set_ylabel("rank of the weight update")
    axis.set_title(
        "Rank of a random sparse update vs p (solid) and of LoRA with as many parameters (dotted)\n"
        "WaveFT (db1) has the rank of its sparse coefficients: the inverse DWT is invertible",
        fontsize=10,
    )
    figure.tight_layout()
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return _save(figure, png)


def _thumbnail(path: Path, size: int):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.size
    side = min(width, height)
    image = image.crop(
        ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    )
    return image.resize((size, size), 3)


def _sample_file(folder: Path, prompt_index: int) -> Path | None:
    found = sorted(
        folder.glob(f"prompt_{prompt_index:02d}_sample_*_seed_*.png"),
        key=lambda p: int(re.findall(r"sample_(\d+)", p.name)[0]),
    )
    return found[0] if found else None


def grid_rows(records: list[dict], rows: list[dict], budget: str | None = None) -> list[tuple[str, str, str]]:
    """Which (method, budget, scaling) groups get a grid row: per method one, at `budget` (default
    '1x' when present, else the method's smallest) and the scaling of its budget sweep."""
    series = budget_series(rows)
    chosen = []
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        if method == "base":
            chosen.append(("base", "-", "-"))
            continue
        candidates = series.get(method) or [row for row in rows if row["method"] == method]
        wanted = budget or ("1x" if any(row["budget"] == "1x" for row in candidates) else None)
        pick = next((row for row in candidates if row["budget"] == wanted), None) if wanted else candidates[0]
        if pick is not None:
            chosen.append((pick["method"], pick["budget"], pick["scaling"]))
    return chosen


def image_grids(
    records: list[dict],
    rows: list[dict],
    folder: Path,
    budget: str | None = None,
    prompts: list[int] | None = None,
    columns: int = 4,
    thumbnail: int = 256,
) -> list[Path]:
    """Per subject: its real images on top, then one row of samples per method; columns are
    prompts (the first sample of each)."""
    chosen = grid_rows(records, rows, budget)
    by_subject: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for record in records:
        by_subject[record["subject"]][group_key(record)] = record
    plt = _pyplot()
    written = []
    for subject, groups in sorted(by_subject.items()):
        shown = [(key, groups[key]) for key in chosen if key in groups]
        if not shown:
            continue
        first = shown[0][1]
        prompt_texts = {entry["prompt_index"]: entry["prompt"] for entry in first.get("per_prompt", [])}
        available = sorted(prompt_texts)
        if prompts:
            picked = [index for index in prompts if index in prompt_texts]
        else:
            step = max(1, len(available) // columns)
            picked = available[::step][:columns]
        ncols = max(len(picked), 1)
        real = [Path(path) for path in first.get("real_images", []) if Path(path).is_file()][:ncols]
        nrows = len(shown) + 1
        figure, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols + 1.6, 2.3 * nrows + 0.6), squeeze=False)
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
            axis.grid(False)
            for spine in axis.spines.values():
                spine.set_visible(False)
        for column, path in enumerate(real):
            axes[0][column].imshow(_thumbnail(path, thumbnail))
        axes[0][0].set_ylabel(f"real images\n({subject})", fontsize=10)
        for row_index, (key, record) in enumerate(shown, start=1):
            method, budget_text, scaling = key
            name = METHOD_NAMES.get(method, method)
            label = (
                name if method == "base" else f"{name}\n{budget_text}" + (f", s={scaling}" if scaling != "-" else "")
            )
            axes[row_index][0].set_ylabel(label, fontsize=10)
            for column, prompt_index in enumerate(picked):
                sample = _sample_file(Path(record["_dir"]), prompt_index)
                if sample is not None:
                    axes[row_index][column].imshow(_thumbnail(sample, thumbnail))
                if row_index == 1:
                    axes[row_index][column].set_title(
                        "\n".join(textwrap.wrap(prompt_texts[prompt_index], 24)), fontsize=9
                    )
        figure.tight_layout()
        written.append(_save(figure, folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', subject)}.png"))
    return written


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
    outputs["metrics_vs_parameters"] = plot_metrics_vs_parameters(rows, out / "metrics_vs_parameters.png")
    outputs["scaling_ablation"] = plot_scaling_ablation(rows, out / "scaling_ablation.png")
    shapes = parse_shapes(rank_shapes)
    outputs["rank"] = plot_rank(shapes, out / "rank_vs_p.png", out / "rank_vs_p.csv") if shapes else None
    outputs["grids"] = image_grids(
        records, rows, out / "grids", budget=grid_budget, prompts=grid_prompts, columns=grid_columns
    )
    return outputs
