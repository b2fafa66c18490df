"""Relative error of a rank-R SVD LoRA of a WaveFT delta at SDXL's attention shapes (README table).

One layer per shape, no model: a db1 WaveFT adapter with p = 2592 coefficients drawn from a normal
distribution (seed 0) and scaling 25, as the paper trains. The best rank-R approximation's error is
sqrt(sum of the squared singular values beyond R / all of them) (Eckart-Young), as export reports.

    python scripts/kohya_svd_error.py
"""

import torch

from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions

SHAPES = [(640, 640), (640, 2048), (1280, 1280), (1280, 2048), (640, 768)]  # (out, in); 640x768 is not SDXL's
RANKS = (1, 4, 16, 64, 256)
COUNT, SCALING, SEED = 2592, 25.0, 777


def relative_errors(shape: tuple[int, int], wavelet: str | None) -> list[float]:
    adapter = SparseAdapter(shape, random_positions(shape, COUNT, SEED), SCALING, wavelet)
    with torch.no_grad():
        adapter.coefficients.copy_(torch.randn(COUNT, generator=torch.Generator().manual_seed(0)))
        energy = torch.linalg.svdvals(adapter.delta_weight().double()).square()
    beyond = energy.sum() - energy.cumsum(0)
    return [(beyond[rank - 1] / energy.sum()).sqrt().item() if rank <= energy.numel() else 0.0 for rank in RANKS]


def main() -> None:
    print("| layer (out x in) | method | " + " | ".join(f"r={rank}" for rank in RANKS) + " |")
    print("|---|---|" + "---|" * len(RANKS))
    for shape in SHAPES:
        for method, wavelet in (("waveft db1", "db1"), ("random-sparse", None)):
            errors = relative_errors(shape, wavelet)
            print(f"| {shape[0]}x{shape[1]} | {method} | " + " | ".join(f"{error:.3f}" for error in errors) + " |")


if __name__ == "__main__":
    main()
