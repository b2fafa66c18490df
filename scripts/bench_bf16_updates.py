"""Small updates in bf16: how far bf16 training of a sparse adapter ends up from fp32 training.

    python scripts/bench_bf16_updates.py                       # 640x640, p = 2592, 100 steps, 3 seeds
    python scripts/bench_bf16_updates.py --steps 30 --seeds 1 --tokens 128 --json out.json   # quick

One SDXL-sized projection (640 -> 640, nn.Linear's initialisation, stored in bf16) learns a sparse
teacher update (the same positions, coefficients ~ N(0, 3e-3^2)) by AdamW (lr 1e-4, as the paper)
on fresh bf16 inputs every step, at scaling 1, 5 and 25. Three runs share the data:

- fp32: the bf16 weight's values and the inputs in float32, no autocast: the reference;
- weight: the fused layer under bf16 autocast, as `sparse-db train` runs it: W + delta formed in
  float32 and rounded once into the bf16 weight for the matmul (an entry of the delta below half a
  bf16 step of its weight entry rounds away);
- beside: the matmul on the untouched bf16 weight under autocast, plus x @ delta^T in float32
  (dense ops through autograd), rounded into the bf16 output: the separate fp32 accumulation.

Reported per method and scaling (means over seeds): the coefficients' distance from the fp32 run
(relative L2) after 10 steps and at the end; the share of touched entries whose nonzero delta
rounds away entirely in W + delta (steps 1-5, and the whole run); the delta the weight path's
forward sees against the true one (relative L2 of round(W + delta) - W - delta); and the share of
output entries where x @ delta^T is below half a bf16 step of the base output (what rounding the
output itself loses, for every path, LoRA's included).
"""

import argparse
import json
import statistics

import torch
from torch.nn import functional as F

from sparse_dreambooth.adapters.layer import AdaptedLinear
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions

PATHS = ("fp32", "weight", "beside")
WAVELETS = {"waveft": "db1", "random-sparse": None}


def layer_and_teacher(args, method: str, scaling: float, seed: int, path: str):
    generator = torch.Generator().manual_seed(seed)
    shape = (args.out_features, args.in_features)
    weight = ((torch.rand(shape, generator=generator) * 2 - 1) / args.in_features**0.5).bfloat16()
    base = torch.nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False)
    base.weight.data = weight.float() if path == "fp32" else weight.clone()
    positions = random_positions(shape, args.budget, seed=777)
    adapter = SparseAdapter(shape, positions, scaling, WAVELETS[method])
    teacher = SparseAdapter(shape, positions, 1.0, WAVELETS[method])
    with torch.no_grad():
        teacher.coefficients.copy_(3e-3 * torch.randn(args.budget, generator=generator))
    target_weight = weight.double() + teacher.delta_weight().detach().double()
    return AdaptedLinear(base, adapter), target_weight, generator


@torch.no_grad()
def rounding_losses(layer: AdaptedLinear, x: torch.Tensor) -> tuple[float, float, float]:
    """(touched entries whose update rounds away, error of the delta the weight path sees, output
    entries where the share is below half a bf16 step of the base output)."""
    adapter, weight = layer.adapter, layer.base.weight
    plan = adapter._plan()
    delta = plan.touched_delta(adapter.coefficients)
    original = weight.view(-1).index_select(0, plan.touched)
    seen = (original.float() + delta).bfloat16().float() - original.float()
    moved = delta != 0
    lost = ((seen == 0) & moved).sum().item() / max(1, moved.sum().item())
    error = ((seen - delta).norm() / delta.norm().clamp_min(1e-30)).item()
    base_output = F.linear(x, weight).float()
    share = x.float() @ adapter.delta_weight().t()
    survives = (base_output + share).bfloat16().float() != base_output
    output_lost = ((~survives) & (share != 0)).sum().item() / max(1, (share != 0).sum().item())
    return lost, error, output_lost


def forward(layer: AdaptedLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    if path == "fp32":
        return layer(x.float())
    if path == "weight":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer.base(x)
    share = x.float() @ layer.adapter.delta_weight().t()
    return (base.float() + share).to(base.dtype)


def train(args, method: str, scaling: float, seed: int, path: str) -> dict:
    layer, target_weight, generator = layer_and_teacher(args, method, scaling, seed, path)
    coefficients = layer.adapter.coefficients
    optimizer = torch.optim.AdamW([coefficients], lr=1e-4, weight_decay=1e-4)
    early, losses = None, []
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.in_features, generator=generator).bfloat16()
        target = (x.double() @ target_weight.t()).float()
        if path != "fp32" and step > 0:
            losses.append(rounding_losses(layer, x))
        F.mse_loss(forward(layer, x, path).float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == 10:
            early = coefficients.detach().clone()
    return {"early": early, "final": coefficients.detach().clone(), "losses": losses}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="AdamW steps per run (default: 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (weights, teacher, data) per case (default: 3)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (default: 512)")
    parser.add_argument("--in-features", type=int, default=640)
    parser.add_argument("--out-features", type=int, default=640)
    parser.add_argument("--budget", type=int, default=2592, help="coefficients (default: 2592)")
    parser.add_argument("--scalings", type=float, nargs="+", default=[1.0, 5.0, 25.0])
    parser.add_argument("--methods", nargs="+", choices=sorted(WAVELETS), default=["waveft", "random-sparse"])
    parser.add_argument("--json", default="bench_bf16_updates.json", help="where to write the results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    header = (
        f"{'method':<14} {'scaling':>7} {'path':<7} {'dist@10':>8} {'dist end':>8} {'lost 1-5':>8} "
        f"{'lost all':>8} {'seen err':>8} {'out lost':>8}"
    )
    print(header)
    for method in args.methods:
        for scaling in args.scalings:
            runs = {path: [train(args, method, scaling, seed, path) for seed in range(args.seeds)] for path in PATHS}
            for path in PATHS[1:]:
                pairs = list(zip(runs[path], runs["fp32"], strict=True))
                row = {
                    "method": method,
                    "scaling": scaling,
                    "path": path,
                    "distance_at_10": statistics.mean(relative(run["early"], ref["early"]) for run, ref in pairs),
                    "distance_at_end": statistics.mean(relative(run["final"], ref["final"]) for run, ref in pairs),
                    "lost_steps_1_5": statistics.mean(
                        statistics.mean(loss[0] for loss in run["losses"][:5]) for run in runs[path]
                    ),
                    "lost_all_steps": statistics.mean(
                        statistics.mean(loss[0] for loss in run["losses"]) for run in runs[path]
                    ),
                    "seen_delta_error": statistics.mean(
                        statistics.mean(loss[1] for loss in run["losses"]) for run in runs[path]
                    ),
                    "output_lost": statistics.mean(
                        statistics.mean(loss[2] for loss in run["losses"]) for run in runs[path]
                    ),
                }
                rows.append(row)
                print(
                    f"{method:<14} {scaling:7g} {path:<7} {row['distance_at_10']:8.4f} {row['distance_at_end']:8.4f} "
                    f"{row['lost_steps_1_5']:8.3f} {row['lost_all_steps']:8.3f} {row['seen_delta_error']:8.4f} "
                    f"{row['output_lost']:8.3f}",
                    flush=True,
                )
    with open(args.json, "w") as stream:
        json.dump({"settings": vars(args), "torch": torch.__version__, "rows": rows}, stream, indent=1)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
