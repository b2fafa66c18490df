"""Evaluation, report and sweep: metric math by hand, the commands end to end on tiny models.

The metric models here are tiny random DINO/CLIP networks built from configs in this file and
saved as local folders (nothing comes from the Hub), so the real loading code runs.
"""

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, FAST, FIXTURE_DATA, run_cli
from PIL import Image
from typer.testing import CliRunner

from sparse_dreambooth import metrics
from sparse_dreambooth.cli import app
from sparse_dreambooth.errors import UserError

# --- metric math against hand-computed values --------------------------------------------------------


def test_dino_and_clip_i_are_the_mean_cosine_over_generated_real_pairs():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    mean, per_image = metrics.mean_pairwise_cosine(generated, real)
    half_root2 = 1 / math.sqrt(2)
    # image 1: cos = 1 and 1/sqrt2; image 2: cos = 0 and 1/sqrt2
    assert per_image.tolist() == pytest.approx([(1 + half_root2) / 2, half_root2 / 2])
    assert mean == pytest.approx((1 + 2 * half_root2) / 4)


def test_pairwise_mean_leaves_out_the_diagonal():
    distances = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    assert metrics.pairwise_mean(distances) == pytest.approx(2.0)


def test_clip_t_prompt_loses_only_the_rare_token():
    assert metrics.strip_token("a zjw dog in the jungle", "zjw") == "a dog in the jungle"
    assert metrics.strip_token("a red zjw backpack", "zjw") == "a red backpack"
    assert metrics.strip_token("a zjwx dog", "zjw") == "a zjwx dog"  # not part of another word
    assert metrics.strip_token("a sks dog", "") == "a sks dog"


def test_mmd_with_known_kernel_values():
    # sigma 5: k = exp(-d^2/50). Distances: x pair 5 (e^-.5), y pair 10 (e^-2), cross 0, 10, 5, 5.
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    a, b = math.exp(-0.5), math.exp(-2.0)
    cross = (1 + b + 2 * a) / 4
    assert metrics.rbf_kernel(x, y, sigma=5.0).flatten().tolist() == pytest.approx([1, b, a, a])
    assert metrics.mmd2(x, y, sigma=5.0) == pytest.approx(a + b - 2 * cross)
    assert metrics.mmd2(x, y, sigma=5.0, unbiased=False) == pytest.approx((1 + a) / 2 + (1 + b) / 2 - 2 * cross)


def test_cmmd_normalises_the_embeddings_and_scales_by_1000():
    # After L2 normalisation x = {e1, e2}, y = {e1, -e2}; sigma 10: squared distances 2 -> e^-.01, 4 -> e^-.02.
    x = torch.tensor([[5.0, 0.0], [0.0, 0.5]])
    y = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    k2, k4 = math.exp(-0.01), math.exp(-0.02)
    expected = 1000 * (k2 + k2 - 2 * (1 + k2 + k2 + k4) / 4)
    assert metrics.cmmd(x, y) == pytest.approx(expected)
    assert metrics.cmmd(x, y) == pytest.approx(-1000 * (1 - k2) ** 2 / 2)  # the same, simplified


def test_bootstrap_interval_on_a_fixed_seed():
    # Means of 4 draws from {0,0,0,1}: P(0) = .32 so the 2.5% quantile is 0; P(<=.5) = .949 < .975
    # <= P(<=.75) = .996, so the 97.5% quantile is .75.
    assert metrics.bootstrap_ci([0, 0, 0, 1], seed=0) == (0.25, 0.0, 0.75)
    # Two values: the resampled mean is 0 or 1 with probability 1/4 each.
    assert metrics.bootstrap_ci([0.0, 1.0], seed=3) == (0.5, 0.0, 1.0)
    assert metrics.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    values = np.random.default_rng(1).normal(size=7)
    assert metrics.bootstrap_ci(values, seed=5) == metrics.bootstrap_ci(values, seed=5)
    mean, low, high = metrics.bootstrap_ci(values, n_resamples=4000, seed=5)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([None]))


def test_lpips_distance_by_hand():
    network = metrics.LPIPS("alex")
    with torch.no_grad():
        network.lins[0].copy_(torch.zeros_like(network.lins[0]))
        network.lins[0][0, :2] = torch.tensor([2.0, 3.0]).view(2, 1, 1)
    # One layer, 2 channels, 1x2 positions: squared differences (1, 0) and (0, 1) per channel.
    a = [torch.zeros(1, 64, 1, 2)]
    b = [torch.zeros(1, 64, 1, 2)]
    a[0][0, 0, 0, 0] = 1.0
    b[0][0, 1, 0, 1] = 1.0
    # position 0: 2*1 + 3*0 = 2; position 1: 2*0 + 3*1 = 3; spatial mean 2.5
    assert network.distance(a, b).item() == pytest.approx(2.5)


def test_lpips_features_are_unit_normalised_and_the_distance_is_a_semimetric():
    from sparse_dreambooth.evaluate import tiny_lpips

    network = tiny_lpips()
    x, y = torch.rand(2, 3, 40, 40) * 2 - 1, torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        for feature in network.tapped(x):
            norms = feature.square().sum(dim=1).sqrt()
            assert torch.allclose(norms[norms > 1e-6], torch.ones(()), atol=1e-4)
        assert torch.allclose(network(x, x), torch.zeros(2), atol=1e-7)
        assert torch.allclose(network(x, y), network(y, x))
        assert (network(x, y) > 0).all()


def test_lpips_weights_convert_from_torchvision_and_the_lpips_wheel(tmp_path):
    """scripts/convert_lpips.py: a torchvision .pth + the heads (.pth or inside the lpips wheel)."""
    import importlib.util

    from sparse_dreambooth.evaluate import load_lpips

    spec = importlib.util.spec_from_file_location(
        "convert_lpips", Path(__file__).resolve().parents[1] / "scripts" / "convert_lpips.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    backbone, _ = metrics.lpips_backbone("alex")
    torch.manual_seed(0)
    state = {f"features.{name}": value for name, value in backbone.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision's classifier is ignored
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(state, tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex.pth")
    with zipfile.ZipFile(
        tmp_path / "lpips-0.1.4-py3-none-any.whl", "w"
    ) as wheel:  # heads as the lpips wheel ships them
        wheel.write(tmp_path / "alex.pth", "lpips/weights/v0.1/alex.pth")
    expected = metrics.LPIPS("alex")
    expected.features.load_state_dict(backbone.state_dict())
    for k, lin in enumerate(expected.lins):
        lin.data = heads[f"lin{k}.model.1.weight"]
    x, y = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    for source in ("alex.pth", "lpips-0.1.4-py3-none-any.whl"):
        out = tmp_path / f"{source}.safetensors"
        script.main(["--backbone", str(tmp_path / "alexnet.pth"), "--heads", str(tmp_path / source), "--out", str(out)])
        with torch.no_grad():
            assert torch.equal(load_lpips(str(out))(x, y), expected(x, y))
    with pytest.raises(UserError, match="not LPIPS alex weights"):
        script.main(
            [
                "--backbone",
                str(tmp_path / "alex.pth"),
                "--heads",
                str(tmp_path / "alex.pth"),
                "--out",
                str(tmp_path / "bad.safetensors"),
            ]
        )


@pytest.mark.parametrize("shape", [(12, 20), (16, 16), (30, 8)])
def test_structural_rank_is_the_rank_of_a_random_sparse_matrix(shape):
    from sparse_dreambooth.adapters.sparse import random_positions
    from sparse_dreambooth.metrics import rank_curve, structural_rank

    counts = [1, 4, 9, 15, 24, 40, 70, 120]
    ranks = rank_curve(shape, counts, seed=3)
    assert ranks == sorted(ranks) and ranks[-1] <= min(shape)
    for count, rank in zip(counts, ranks, strict=False):
        positions = random_positions(shape, min(count, shape[0] * shape[1]), 3)
        matrix = torch.zeros(shape, dtype=torch.float64)
        matrix[positions[0], positions[1]] = torch.randn(
            positions.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(count)
        )
        assert (
            rank
            == torch.linalg.matrix_rank(matrix).item()
            == structural_rank(positions[0].tolist(), positions[1].tolist(), shape)
        )


# --- evaluate, end to end on tiny models built from configs here --------------------------------------


def _save_tiny_metric_models(folder: Path) -> dict[str, str]:
    """DINO (ViT), CLIP (with tokenizer) and CMMD's CLIP vision tower, random, from configs."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from sparse_dreambooth.evaluate import tiny_clip_tokenizer, tiny_lpips
    from sparse_dreambooth.files import write_safetensors

    torch.manual_seed(0)
    dino = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
        ),
        add_pooling_layer=False,
    )
    dino.save_pretrained(folder / "dino")
    tokenizer = tiny_clip_tokenizer()
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                image_size=32,
                patch_size=8,
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
            ),
            projection_dim=12,
        )
    )
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=48,
            patch_size=16,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=12,
        )
    ).save_pretrained(folder / "cmmd")
    write_safetensors(folder / "lpips.safetensors", tiny_lpips(seed=3).lpips_state_dict(), metadata={"net": "alex"})
    return {
        "--dino": str(folder / "dino"),
        "--clip": str(folder / "clip"),
        "--cmmd": str(folder / "cmmd"),
        "--lpips": str(folder / "lpips.safetensors"),
    }


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    from sparse_dreambooth.data import evaluation_prompts, get_subject

    folder = tmp_path_factory.mktemp("evaluate")
    models = _save_tiny_metric_models(folder / "models")
    run = folder / "run"
    run_cli("train", *FAST, "--subject", "demo", "--steps", "1", "--output", str(run))
    prompts = evaluation_prompts(get_subject(None, "demo"))[:2]
    run_cli(
        "sample",
        "--run",
        str(run),
        "--num-steps",
        "1",
        "--seeds",
        "42,43,44",
        *(a for p in prompts for a in ("--prompt", p)),
    )
    flags = [item for pair in models.items() for item in pair]
    run_cli("evaluate", "--run", str(run), *flags)
    return run, models, flags


@pytest.mark.slow
def test_evaluate_writes_metrics_and_a_per_image_csv(evaluated_run):
    import csv

    run, _, _ = evaluated_run
    result = json.loads((run / "samples" / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "samples" / "metrics_per_image.csv").open()))
    assert result["subject"] == "demo" and result["method"] == "waveft" and result["budget_scale"] == 1.0
    assert result["num_images"] == 6 and result["num_prompts"] == 2 and len(rows) == 6
    assert result["trainable_parameters"] == json.loads((run / "run.json").read_text())["trainable_parameters"]
    values = result["metrics"]
    assert set(values) == {"dino", "clip_i", "clip_t", "clip_t_x100", "lpips_diversity", "cmmd"}
    assert all(isinstance(value, float) and math.isfinite(value) for value in values.values())
    assert values["dino"] == pytest.approx(np.mean([float(row["dino"]) for row in rows]))
    assert values["clip_t_x100"] == pytest.approx(100 * values["clip_t"])
    # LPIPS diversity: the per-prompt mean over the 3 pairs; each image's value is its mean over 2 partners.
    per_prompt = [entry["lpips_diversity"] for entry in result["per_prompt"]]
    assert values["lpips_diversity"] == pytest.approx(np.mean(per_prompt))
    first = [float(row["lpips_diversity"]) for row in rows if row["prompt_index"] == "0"]
    assert np.mean(first) == pytest.approx(per_prompt[0])
    assert rows[0]["prompt"] == "a zjw toy in the jungle" and rows[0]["clip_prompt"] == "a toy in the jungle"


@pytest.mark.slow
def test_clip_t_and_dino_match_a_direct_computation(evaluated_run):
    """Recompute two per-image values straight from the saved models, by the protocol."""
    import csv

    from transformers import AutoTokenizer, CLIPModel, ViTModel

    from sparse_dreambooth.data import get_subject

    run, models, _ = evaluated_run
    rows = list(csv.DictReader((run / "samples" / "metrics_per_image.csv").open()))
    image = Image.open(run / "samples" / rows[0]["file"]).convert("RGB")

    clip = CLIPModel.from_pretrained(models["--clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(models["--clip"])(["a toy in the jungle"], return_tensors="pt")
    # CLIP: resize the shorter side to 32 (bicubic), centre crop 32, CLIP mean/std.
    pixels = torch.from_numpy(
        np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ).permute(2, 0, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        text = clip.text_projection(clip.text_model(**tokens).pooler_output)
        picture = clip.visual_projection(
            clip.vision_model(pixel_values=((pixels - mean[:, None, None]) / std[:, None, None])[None]).pooler_output
        )
    assert float(rows[0]["clip_t"]) == pytest.approx(torch.cosine_similarity(text, picture).item(), abs=1e-5)

    # DINO: resize to round(32 * 256/224) = 37, centre crop 32, ImageNet mean/std, CLS token.
    dino = ViTModel.from_pretrained(models["--dino"], add_pooling_layer=False).eval()

    def dino_embedding(img):
        w, h = img.size
        size = (37, int(37 * h / w)) if w <= h else (int(37 * w / h), 37)
        img = img.resize(size, Image.Resampling.BICUBIC)
        top, left = int(round((size[1] - 32) / 2)), int(round((size[0] - 32) / 2))
        x = torch.from_numpy(np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255).permute(
            2, 0, 1
        )
        x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
            :, None, None
        ]
        with torch.no_grad():
            return dino(pixel_values=x[None]).last_hidden_state[0, 0]

    generated = dino_embedding(image)
    real = [dino_embedding(Image.open(path).convert("RGB")) for path in get_subject(None, "demo").image_paths]
    expected = np.mean([torch.cosine_similarity(generated, r, dim=0).item() for r in real])
    assert float(rows[0]["dino"]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_samples_folder_without_manifest_scores_the_same(evaluated_run, tmp_path):
    run, _, flags = evaluated_run
    loose = tmp_path / "loose"
    loose.mkdir()
    for png in (run / "samples").glob("*.png"):
        shutil.copy(png, loose / png.name)
    run_cli("evaluate", "--samples", str(loose), "--subject", "demo", *flags)
    ours = json.loads((loose / "metrics.json").read_text())
    theirs = json.loads((run / "samples" / "metrics.json").read_text())
    assert ours["method"] == "unknown" and ours["num_images"] == 6
    assert ours["metrics"] == pytest.approx(theirs["metrics"])


@pytest.mark.slow
def test_evaluate_offline_without_the_models_is_one_clear_error(evaluated_run):
    run, _, _ = evaluated_run
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    message = str(result.exception)
    assert "\n" not in message
    for needle in (
        "facebook/dino-vits16",
        "openai/clip-vit-base-patch32",
        "openai/clip-vit-large-patch14-336",
        "hf download",
        "convert_lpips.py",
    ):
        assert needle in message


def test_evaluate_refuses_what_it_cannot_score(tmp_path):
    for args, needle in [
        (["evaluate"], "nothing to evaluate"),
        (["evaluate", "--samples", str(tmp_path / "missing"), "--subject", "demo"], "does not exist"),
        (["evaluate", "--samples", str(tmp_path), "--subject", "demo"], "no samples"),
        (
            ["evaluate", "--samples", str(tmp_path), "--instance-dir", str(tmp_path)],
            "--instance-dir needs --class-name",
        ),
        (["evaluate", "--run", str(tmp_path)], "not a run folder"),
    ]:
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, UserError) and needle in str(result.exception), (args, result.output)


# --- report from fabricated metrics files ------------------------------------------------------------


def _fabricate(
    folder: Path,
    subject: str,
    method: str,
    budget_scale,
    scaling,
    params: int,
    dino: float,
    cmmd: float,
    real: list[Path],
):
    samples = folder / subject / f"{method}_{budget_scale}_{scaling}" / "samples"
    samples.mkdir(parents=True)
    colour = (int(dino * 255) % 256, 90, 160)
    for prompt in range(3):
        for k in range(2):
            Image.new("RGB", (24, 24), colour).save(samples / f"prompt_{prompt:02d}_sample_{k}_seed_{42 + k}.png")
    record = {
        "subject": subject,
        "method": method,
        "budget_scale": budget_scale,
        "budget": None,
        "rank": None,
        "scaling": scaling,
        "wavelet": "db1" if method == "waveft" else None,
        "allocation": "uniform",
        "trainable_parameters": params,
        "real_images": [str(path) for path in real],
        "metrics": {
            "dino": dino,
            "clip_i": 0.7,
            "clip_t": 0.3,
            "clip_t_x100": 30.0,
            "lpips_diversity": 0.4,
            "cmmd": cmmd,
        },
        "per_prompt": [{"prompt_index": i, "prompt": f"a zjw toy number {i}"} for i in range(3)],
    }
    (samples / "metrics.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    real = []
    for index in range(2):
        real.append(folder / f"real{index}.png")
        Image.new("RGB", (30, 20), (200, 40 * index, 0)).save(real[-1])
    runs = folder / "runs"
    for subject, offset in (("cat", 0.0), ("dog", 1.0)):
        _fabricate(runs, subject, "waveft", 1.0, 25.0, 1000, 0.0 + offset, 1.0, real)  # DINO 0 and 1
        _fabricate(runs, subject, "waveft", 2.0, 25.0, 2000, 0.6, 0.5 + offset, real)
        _fabricate(runs, subject, "waveft", 1.0, 5.0, 1000, 0.3, 2.0, real)
        _fabricate(runs, subject, "lora", 1.0, None, 1100, 0.5, 1.5, real)
    return folder


@pytest.mark.slow
def test_report_table_has_the_right_numbers(report_folder):
    import csv

    out = report_folder / "out"
    run_cli(
        "report", str(report_folder / "runs"), "--out", str(out), "--rank-shapes", "16x24,32x32", "--resamples", "4000"
    )
    rows = {(row["method"], row["budget"], row["scaling"]): row for row in csv.DictReader((out / "report.csv").open())}
    assert set(rows) == {("waveft", "1x", "25"), ("waveft", "2x", "25"), ("waveft", "1x", "5"), ("lora", "1x", "-")}
    one = rows[("waveft", "1x", "25")]
    # DINO 0 and 1 over two subjects: mean .5; a resampled mean is 0 or 1 with probability 1/4 each.
    assert (float(one["dino"]), float(one["dino_low"]), float(one["dino_high"])) == (0.5, 0.0, 1.0)
    assert one["trainable_parameters"] == "1000" and one["subjects"] == "2"
    two = rows[("waveft", "2x", "25")]
    assert float(two["dino"]) == pytest.approx(0.6) and float(two["dino_low"]) == pytest.approx(0.6)
    assert float(two["cmmd"]) == pytest.approx(1.0)
    assert rows[("lora", "1x", "-")]["trainable_parameters"] == "1100"
    markdown = (out / "report.md").read_text()
    assert "| WaveFT | 1x | 25 | 1,000 | 2 | 0.500 [0.000, 1.000] |" in markdown
    assert markdown.index("| WaveFT |") < markdown.index("| LoRA |")


@pytest.mark.slow
def test_report_plots_and_grids_are_pngs_that_open(report_folder):
    out = report_folder / "plots"
    run_cli("report", str(report_folder / "runs"), "--out", str(out), "--rank-shapes", "16x24", "--resamples", "500")
    for name in (
        "metrics_vs_parameters.png",
        "scaling_ablation.png",
        "rank_vs_p.png",
        "grids/cat.png",
        "grids/dog.png",
    ):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200, name
    rank = (out / "rank_vs_p.csv").read_text().splitlines()
    assert rank[0] == "shape,out,in,p,sparse_rank,lora_rank_same_parameters" and rank[-1].startswith("16x24,16,24,")


def test_report_counts_a_subject_evaluated_twice_once_with_its_mean(report_folder):
    from sparse_dreambooth.report import group_key, load_records, summarize

    records = load_records(sorted((report_folder / "runs").rglob("metrics.json")))
    first = records[0]
    again = dict(first, metrics=dict(first["metrics"], dino=first["metrics"]["dino"] + 0.2))
    row = next(
        row
        for row in summarize(records + [again], n_resamples=100)
        if (row["method"], row["budget"], row["scaling"]) == group_key(first)
    )
    others = [
        r["metrics"]["dino"] for r in records if group_key(r) == group_key(first) and r["subject"] != first["subject"]
    ]
    assert row["subjects"] == 2
    assert row["dino"] == pytest.approx((first["metrics"]["dino"] + 0.1 + others[0]) / 2)


def test_report_without_metrics_says_how_to_get_them(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, UserError) and "sparse-db evaluate" in str(result.exception)


# --- sweep ---------------------------------------------------------------------------------------------


def _write_sweep(folder: Path, body: str) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(
        body.replace("OUTPUT", str(folder / "runs")).replace("CONFIGS", str(CONFIGS)).replace("DATA", str(FIXTURE_DATA))
    )
    return path


GRID = """
config: CONFIGS/tiny.yaml
output: OUTPUT
subjects: [demo, dog6]
settings: {resolution: 32, steps: 2, data_root: DATA}
grid:
  - {method: [waveft, random-sparse], budget_scale: [1.0, 2.0]}
  - {method: [lora], budget_scale: [1, 2]}
  - {method: [waveft, lora], budget_scale: [1.0], scaling: [5.0, 25.0]}
"""


def test_sweep_plans_every_job_once_with_stable_names(tmp_path):
    from sparse_dreambooth.sweep import load_sweep, plan

    jobs = plan(load_sweep(_write_sweep(tmp_path, GRID)))
    names = [job.key for job in jobs]
    per_subject = [
        "lora_x1",
        "lora_x2",
        "random-sparse_x1_s25",
        "random-sparse_x2_s25",
        "waveft_x1_s25",
        "waveft_x1_s5",
        "waveft_x2_s25",
    ]
    # waveft 1x s25 and lora 1x come from two grid entries each: one job; LoRA ignores scaling.
    assert names == [f"{subject}/{name}" for subject in ("demo", "dog6") for name in per_subject]
    job = jobs[per_subject.index("waveft_x1_s5")]
    assert job.config.adapter.scaling == 5.0 and job.config.adapter.budget_scale == 1.0
    assert job.config.data.resolution == 32 and job.output == tmp_path / "runs" / "demo" / "waveft_x1_s5"
    assert jobs[0].config.adapter.method == "lora" and jobs[0].config.adapter.scaling == 25.0


def test_sweep_shards_are_disjoint_and_complete(tmp_path):
    from sparse_dreambooth.sweep import load_sweep, parse_shard, plan, shard

    jobs = [job.key for job in plan(load_sweep(_write_sweep(tmp_path, GRID)))]
    for count in (1, 2, 3, 5, 14, 20):
        shards = [
            [job.key for job in shard(plan(load_sweep(tmp_path / "sweep.yaml")), index, count)]
            for index in range(count)
        ]
        assert sorted(key for part in shards for key in part) == sorted(jobs)
        assert sum(len(part) for part in shards) == len(jobs)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert parse_shard("3/40") == (3, 40)
    for bad in ("40/40", "-1/4", "1-4", "1/0"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_sweep_dry_run_skips_finished_stages_and_resumes_unfinished_training(tmp_path):
    from sparse_dreambooth import sample, sweep

    path = _write_sweep(tmp_path, GRID)
    runs = tmp_path / "runs" / "demo"
    (runs / "lora_x1").mkdir(parents=True)
    (runs / "lora_x1" / "adapter.safetensors").write_bytes(b"")  # finished
    (runs / "lora_x2" / "checkpoints" / "step-1").mkdir(parents=True)  # interrupted
    out = run_cli("sweep", str(path), "--dry-run", "--shard", "0/1")
    lines = out.splitlines()
    trains = [line for line in lines if line.startswith("sparse-db train")]
    outputs = [line.split("--output ")[1].split(" ")[0] for line in trains]
    assert len(trains) == 13 and str(runs / "lora_x1") not in outputs
    resumed = [line for line, output in zip(trains, outputs, strict=False) if output == str(runs / "lora_x2")]
    assert len(resumed) == 1 and resumed[0].endswith("--resume latest")
    assert "# demo/lora_x1: train done, sample new, evaluate new" in lines
    assert lines[-1].startswith("sparse-db report " + str(tmp_path / "runs"))
    assert sweep.EVALUATION_SEEDS == sample.EVALUATION_SEEDS


def test_sweep_rejects_bad_grids(tmp_path):
    from sparse_dreambooth.sweep import load_sweep

    for body, needle in [
        ("output: o\nsubjects: [demo]\ngrid: [{methd: [lora]}]", "did you mean 'method'"),
        ("output: o\nsubjects: [demo]\ngrid: [{subject: [demo]}]", "set by the sweep"),
        ("output: o\nsubjects: [demo]\nsample: {seed: [1]}", "unknown key 'seed'"),
        ("subjects: [demo]", "set 'output'"),
        ("output: o\ngrid: [{method: [lora]}]", "list the subjects"),
    ]:
        (tmp_path / "bad.yaml").write_text(body)
        with pytest.raises(UserError, match=needle):
            load_sweep(tmp_path / "bad.yaml")


@pytest.mark.slow
def test_sweep_runs_train_sample_evaluate_report_and_resumes(tmp_path):
    path = _write_sweep(
        tmp_path,
        """
config: CONFIGS/tiny.yaml
output: OUTPUT
subjects: [demo, dog6]
settings: {resolution: 32, steps: 2, checkpoint_every: 1, data_root: DATA}
grid:
  - {method: [waveft, lora], budget_scale: [1.0]}
sample: {seeds: [42, 43], num_steps: 1, prompts: 2}
evaluate: {dino: tiny, clip: tiny, cmmd: tiny, lpips: tiny}
report: {rank_shapes: none, resamples: 200}
""",
    )
    out = run_cli("sweep", str(path))
    runs = tmp_path / "runs"
    for subject in ("demo", "dog6"):
        for name in ("waveft_x1", "lora_x1"):
            result = json.loads((runs / subject / name / "samples" / "metrics.json").read_text())
            assert result["num_images"] == 4 and result["models"]["dino"] == "tiny"
    report = (runs / "report" / "report.md").read_text()
    assert "| WaveFT | 1x | 25 |" in report and "| LoRA | 1x | - |" in report
    assert "train" in out

    # Everything finished: nothing runs again. An interrupted run resumes from its checkpoint.
    # Its old samples and scores belong to the lost adapter: rendered and scored again.
    (runs / "dog6" / "lora_x1" / "adapter.safetensors").unlink()
    again = run_cli("sweep", str(path), "--no-report")
    assert [line for line in again.splitlines() if line.startswith("[")] == [
        "[dog6/lora_x1] train (resuming)",
        "[dog6/lora_x1] removing samples of the previous adapter",
        "[dog6/lora_x1] sample",
        "[dog6/lora_x1] evaluate",
    ]
    assert json.loads((runs / "dog6" / "lora_x1" / "run.json").read_text())["steps"] == 2


def test_sweep_stops_before_any_training_when_a_metric_model_is_missing(tmp_path):
    path = _write_sweep(tmp_path, "config: CONFIGS/tiny.yaml\noutput: OUTPUT\nsubjects: [demo]\n")
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert isinstance(result.exception, UserError) and "facebook/dino-vits16" in str(result.exception)
    assert not (tmp_path / "runs").exists()
    # Training can still go ahead alone (e.g. on a cluster without the metric models).
    out = run_cli("sweep", str(path), "--dry-run", "--until", "train")
    assert [line.split()[1] for line in out.splitlines() if line.startswith("sparse-db")] == ["train"]


# ---------------------------------------------------------------------------------------------
# The micro metric models (--metric-models micro)


def _micro_samples(folder: Path, subject_name: str, seed: int) -> list[str]:
    """Render a micro subject into the first three evaluation prompts' contexts, as a loose samples
    folder (two images per prompt); return the prompts' contexts."""
    import dataclasses

    from sparse_dreambooth.micro.subjects import MICRO_SUBJECTS
    from sparse_dreambooth.micro.world import random_scene, render

    folder.mkdir()
    rng = np.random.default_rng(seed)
    contexts = ["in the jungle", "in the snow", "on the beach"]  # prompts 0-2 of both lists
    for prompt_index, context in enumerate(contexts):
        for sample_index in range(2):
            scene = random_scene(rng, instance=MICRO_SUBJECTS[subject_name], context=context)
            render(dataclasses.replace(scene, attribute=None)).save(
                folder / f"prompt_{prompt_index:02d}_sample_{sample_index}_seed_{sample_index}.png"
            )
    return contexts


def test_micro_metric_models_score_by_a_direct_computation_and_tell_subjects_apart(monkeypatch, tmp_path):
    import csv

    from sparse_dreambooth.data import get_subject
    from sparse_dreambooth.micro.metric_models import load_metric_models

    monkeypatch.setenv("SPARSE_DB_CACHE", str(tmp_path / "cache"))
    _micro_samples(tmp_path / "same", "teal_dog", seed=1)
    contexts = _micro_samples(tmp_path / "other", "mint_dog", seed=1)
    for folder in ("same", "other"):
        run_cli(
            "evaluate", "--samples", str(tmp_path / folder), "--subject", "micro/teal_dog", "--metric-models", "micro"
        )
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert same["models"] == {"dino": "micro", "clip": "micro", "cmmd": "micro", "lpips": "micro"}

    # One image's DINO, CLIP-I and CLIP-T straight from the encoders: cosines averaged over the real photos.
    models = load_metric_models()
    rows = list(csv.DictReader((tmp_path / "same" / "metrics_per_image.csv").open()))
    image = Image.open(tmp_path / "same" / rows[0]["file"]).convert("RGB")
    real = [Image.open(path).convert("RGB") for path in get_subject(None, "micro/teal_dog").image_paths]

    def mean_cosine(one: torch.Tensor, many: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(one, many).mean().item()

    assert float(rows[0]["dino"]) == pytest.approx(
        mean_cosine(models.identity.embed_images([image]), models.identity.embed_images(real)), abs=1e-5
    )
    assert float(rows[0]["clip_i"]) == pytest.approx(
        mean_cosine(models.dual.embed_images([image]), models.dual.embed_images(real)), abs=1e-5
    )
    assert rows[0]["clip_prompt"] == f"a dog {contexts[0]}"
    assert float(rows[0]["clip_t"]) == pytest.approx(
        mean_cosine(models.dual.embed_images([image]), models.dual.embed_texts([rows[0]["clip_prompt"]])), abs=1e-5
    )
    # They mean something: the subject itself scores above another dog on identity, both match their prompts.
    assert same["metrics"]["dino"] > other["metrics"]["dino"] + 0.1, (same["metrics"], other["metrics"])
    assert same["metrics"]["clip_i"] > other["metrics"]["clip_i"], (same["metrics"], other["metrics"])
    assert same["metrics"]["lpips_diversity"] > 0 and same["metrics"]["cmmd"] < other["metrics"]["cmmd"]
