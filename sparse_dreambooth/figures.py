"""The report's figures: metrics against trainable parameters, the scaling ablation, the rank of
random sparse matrices against p, and per-subject image grids (matplotlib, imported on use).
"""

import csv
import io
import re
import textwrap
from collections import defaultdict
from pathlib import Path

from sparse_dreambooth.files import atomic_path, write_text
from sparse_dreambooth.metrics import rank_curve
from sparse_dreambooth.report import METHOD_NAMES, METRICS, _base_method, budget_series, group_key
from sparse_dreambooth.runs import prompt_samples_glob

METHOD_STYLES = {  # colour-blind-safe colours, one marker per method
    "waveft": ("#0072B2", "o"),
    "random-sparse": ("#E69F00", "s"),
    "lora": ("#009E73", "^"),
    "base": ("#555555", "x"),
}
PAPER_BUDGET = 2592  # coefficients per layer = LoRA r=1 averaged over SDXL's attention projections
# nn.Linear weight shapes (out, in) of SDXL's UNet attention projections.


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
        folder.glob(prompt_samples_glob(prompt_index)),
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
