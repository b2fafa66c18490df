"""LoRA: delta = (alpha / r) * B @ A, initialised as diffusers' SDXL DreamBooth script does
through PEFT (init_lora_weights="gaussian": A ~ N(0, 1/r), B = 0), so training starts at W0."""

import torch
from torch import nn
from torch.nn import functional as F


class LoraAdapter(nn.Module):
    """Low-rank delta of an (out x in) weight.

    Args:
        shape: (out_features, in_features).
        rank: r.
        alpha: scale numerator; the delta is multiplied by alpha / r.
        generator: seeds A's initialisation.
    """

    def __init__(self, shape: tuple[int, int], rank: int, alpha: float, generator: torch.Generator, device=None):
        super().__init__()
        out_features, in_features = shape
        self.shape = tuple(shape)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        initial_a = torch.randn(rank, in_features, generator=generator) / rank
        self.lora_A = nn.Parameter(initial_a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def touched_indices(self) -> None:
        """LoRA changes every entry: unmerge subtracts the delta (exact to rounding only)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return (F.linear(hidden, self.lora_B) * self.scale).to(x.dtype)

    def forward_with_base(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """base(x) + self(x): the low-rank path stays separate, so it never forms the (out x in) delta."""
        return base(x) + self(x)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}, alpha={self.alpha}"
