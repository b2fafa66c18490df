"""What an adapter is: method, budget and method hyperparameters, checked on construction."""

from dataclasses import asdict, dataclass, field
from typing import Optional

from sparse_dreambooth.errors import UserError, did_you_mean

METHODS = ("waveft", "random-sparse", "lora")
ALLOCATIONS = ("uniform", "proportional")
SDXL_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# LoRA r=1 over SDXL's 560 UNet attention projections has 1,451,520 parameters: 2592 per layer.
DEFAULT_BUDGET = 2592


def discrete_wavelets() -> list[str]:
    """Every discrete wavelet pywt knows (haar, db1-38, sym2-20, coif1-17, bior*, rbio*, dmey)."""
    import pywt

    return pywt.wavelist(kind="discrete")


@dataclass
class AdapterConfig:
    """An adapter on a model's linear layers.

    Args:
        method: "waveft" (sparse coefficients behind a one-level inverse 2D DWT), "random-sparse"
            (the same coefficients without the transform: SHiRA) or "lora". Default: "waveft".
        budget: trainable parameters per adapted layer. Default: 2592 (LoRA r=1 averaged over
            SDXL's attention projections) when neither `budget` nor `budget_scale` is given.
        budget_scale: total budget as a multiple of the LoRA r=1 parameter count of the targeted
            layers (the paper compares 0.8, 0.9, 1, 1.5, 2 and 3). Exclusive with `budget`.
        allocation: "uniform" (same count per layer) or "proportional" (to the layer's out*in,
            total kept exact). Sparse methods only.
        cap_budget: cap a per-layer budget at what the layer holds (with a warning) instead of
            failing. Tiny models have small layers.
        scaling: multiplier of the sparse delta (PEFT's WaveFT default 25).
        wavelet: any discrete pywt wavelet name; WaveFT only.
        rank: LoRA rank; when None it is the rank nearest the budget.
        alpha: LoRA alpha; when None it equals the rank (scale 1, as the paper's r=1, alpha=1).
        seed: seeds every random choice of the adapter: sparse positions (PEFT's
            random_loc_seed, same for every layer) and LoRA's A init.
        targets: module-name patterns: a name matches when it equals the pattern, ends with
            "." + pattern, or matches it as a shell glob.
    """

    method: str = "waveft"
    budget: Optional[int] = None
    budget_scale: Optional[float] = None
    allocation: str = "uniform"
    cap_budget: bool = False
    scaling: float = 25.0
    wavelet: str = "db1"
    rank: Optional[int] = None
    alpha: Optional[float] = None
    seed: int = 777
    targets: list[str] = field(default_factory=lambda: list(SDXL_ATTENTION_TARGETS))

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        if self.method not in METHODS:
            raise UserError(
                f"unknown adapter method {self.method!r}{did_you_mean(self.method, METHODS)}; "
                f"choose one of {', '.join(METHODS)}"
            )
        if self.method == "waveft" and self.wavelet not in discrete_wavelets():
            raise UserError(
                f"unknown wavelet {self.wavelet!r}{did_you_mean(self.wavelet, discrete_wavelets())}; "
                "use a discrete pywt wavelet such as db1, db4, sym8, coif3 or bior2.2"
            )
        if self.budget is not None and self.budget_scale is not None:
            raise UserError("give either budget (per layer) or budget_scale (x LoRA r=1), not both")
        if self.budget is not None and self.budget <= 0:
            raise UserError(f"budget must be a positive number of parameters per layer, got {self.budget}")
        if self.budget_scale is not None and self.budget_scale <= 0:
            raise UserError(f"budget_scale must be positive, got {self.budget_scale}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(
                f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}"
            )
        if self.method == "lora" and self.allocation != "uniform":
            raise UserError("LoRA uses one rank for every layer: set allocation to uniform")
        if self.rank is not None and self.method != "lora":
            raise UserError(f"rank is a LoRA setting; {self.method} takes budget or budget_scale")
        if self.rank is not None and self.rank <= 0:
            raise UserError(f"rank must be a positive integer, got {self.rank}")
        if not self.targets:
            raise UserError("targets is empty: name at least one module pattern, e.g. to_q")

    def to_dict(self) -> dict:
        return asdict(self)
