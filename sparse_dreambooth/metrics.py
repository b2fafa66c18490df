"""The DreamBooth evaluation metrics as plain functions of embeddings and images.

Nothing here loads a model: `metric_models.py` turns images into embeddings and `evaluate.py` calls these. Every
function is small enough to check by hand (tests/test_eval.py does).

- DINO / CLIP-I: mean pairwise cosine similarity between generated and real-image embeddings.
- CLIP-T: cosine between an image embedding and its prompt's text embedding (the paper quotes x100).
- CMMD (Jayasumana et al., 2024): squared MMD with a Gaussian RBF kernel, sigma 10, on
  L2-normalised CLIP ViT-L/14@336 embeddings, x1000.
- LPIPS (Zhang et al., 2018, v0.1): unit-normalised backbone activations, squared differences
  weighted by learned 1x1 heads, averaged over space, summed over layers. The network is written
  here (AlexNet or VGG16 feature layers in torchvision's layout) because the `lpips` and
  torchmetrics packages need torchvision, which does not import beside every torch build.
- Bootstrap confidence intervals over subjects, from a seeded generator.
"""

import re

import numpy as np
import torch
from torch import nn

__all__ = [
    "CMMD_SCALE",
    "CMMD_SIGMA",
    "LPIPS",
    "bootstrap_ci",
    "cmmd",
    "cosine_matrix",
    "lpips_backbone",
    "mean_pairwise_cosine",
    "mmd2",
    "pairwise_mean",
    "rbf_kernel",
    "strip_token",
]

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


# --- similarities --------------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities between the rows of `a` (n, d) and `b` (m, d), in float64."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(generated: torch.Tensor, real: torch.Tensor) -> tuple[float, torch.Tensor]:
    """DreamBooth's DINO and CLIP-I: the mean cosine over every (generated, real) pair.

    Returns:
        (the mean over all pairs, each generated image's mean over the real images). With the same
        number of real images for every generated one, the first is the mean of the second.
    """
    per_image = cosine_matrix(generated, real).mean(dim=1)
    return per_image.mean().item(), per_image


def pairwise_mean(distances: torch.Tensor) -> float:
    """Mean of a symmetric (n, n) matrix off its diagonal: the mean over the n(n-1)/2 pairs."""
    n = distances.shape[0]
    if n < 2:
        raise ValueError("a pairwise mean needs at least two items")
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=distances.device)
    return distances[off_diagonal].double().mean().item()


def strip_token(prompt: str, token: str) -> str:
    """The prompt without the rare token, as the protocol scores CLIP-T: 'a zjw dog' -> 'a dog'."""
    if not token:
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt).split())


# --- CMMD ----------------------------------------------------------------------------------------


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA) -> torch.Tensor:
    """Gaussian RBF kernel matrix k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), in float64."""
    squared = torch.cdist(x.double(), y.double()).square()
    return torch.exp(-squared / (2.0 * sigma**2))


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy between the samples `x` (m, d) and `y` (n, d).

    unbiased (the U-statistic): the within-set means leave out the diagonal k(x_i, x_i) = 1,
        mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j).
    biased (the V-statistic of google-research/cmmd's code): every mean over the full matrix.
    """
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = rbf_kernel(x, x, sigma), rbf_kernel(y, y, sigma), rbf_kernel(x, y, sigma)
    if not unbiased:
        return (k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()).item()
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least two samples per set, got {m} and {n}")
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (within_x + within_y - 2.0 * k_xy.mean()).item()


def cmmd(
    generated: torch.Tensor,
    real: torch.Tensor,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    unbiased: bool = True,
) -> float:
    """CMMD x `scale` between two sets of CLIP embeddings, L2-normalised first."""
    generated = torch.nn.functional.normalize(generated.double(), dim=-1)
    real = torch.nn.functional.normalize(real.double(), dim=-1)
    return scale * mmd2(generated, real, sigma=sigma, unbiased=unbiased)


# --- bootstrap ------------------------------------------------------------------------------------


def bootstrap_ci(
    values, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of the mean.

    Resamples the values with replacement `n_resamples` times (indices drawn at once from
    numpy's default_rng(seed)) and takes the (1-confidence)/2 and (1+confidence)/2 quantiles of the
    resampled means (numpy's default linear interpolation).

    Returns:
        (mean, low, high); NaN for all three when there are no finite values.
    """
    values = np.asarray([value for value in values if value is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


# --- LPIPS ------------------------------------------------------------------------------------------

# torchvision's `features` layouts and the ReLU after which LPIPS taps each of its five layers.
_BACKBONES = {
    "alex": {
        "layers": [
            ("conv", 3, 64, 11, 4, 2),
            ("relu",),
            ("pool",),
            ("conv", 64, 192, 5, 1, 2),
            ("relu",),
            ("pool",),
            ("conv", 192, 384, 3, 1, 1),
            ("relu",),
            ("conv", 384, 256, 3, 1, 1),
            ("relu",),
            ("conv", 256, 256, 3, 1, 1),
            ("relu",),
        ],
        "taps": (1, 4, 7, 9, 11),
    },
    "vgg": {
        "layers": [
            ("conv", 3, 64, 3, 1, 1),
            ("relu",),
            ("conv", 64, 64, 3, 1, 1),
            ("relu",),
            ("pool2",),
            ("conv", 64, 128, 3, 1, 1),
            ("relu",),
            ("conv", 128, 128, 3, 1, 1),
            ("relu",),
            ("pool2",),
            ("conv", 128, 256, 3, 1, 1),
            ("relu",),
            ("conv", 256, 256, 3, 1, 1),
            ("relu",),
            ("conv", 256, 256, 3, 1, 1),
            ("relu",),
            ("pool2",),
            ("conv", 256, 512, 3, 1, 1),
            ("relu",),
            ("conv", 512, 512, 3, 1, 1),
            ("relu",),
            ("conv", 512, 512, 3, 1, 1),
            ("relu",),
            ("pool2",),
            ("conv", 512, 512, 3, 1, 1),
            ("relu",),
            ("conv", 512, 512, 3, 1, 1),
            ("relu",),
            ("conv", 512, 512, 3, 1, 1),
            ("relu",),
        ],
        "taps": (3, 8, 15, 22, 29),
    },
}
# LPIPS's fixed input scaling, applied to images in [-1, 1].
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def lpips_backbone(net: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    """torchvision's AlexNet or VGG16 `features` (up to the last tapped ReLU), and the tap indices.

    Module indices match torchvision's, so its `features.N.weight` keys load as they are.
    """
    if net not in _BACKBONES:
        raise ValueError(f"LPIPS backbone must be one of {', '.join(_BACKBONES)}, got {net!r}")
    modules = []
    for spec in _BACKBONES[net]["layers"]:
        if spec[0] == "conv":
            _, c_in, c_out, kernel, stride, padding = spec
            modules.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
        elif spec[0] == "relu":
            modules.append(nn.ReLU())
        elif spec[0] == "pool":
            modules.append(nn.MaxPool2d(kernel_size=3, stride=2))
        else:
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*modules), _BACKBONES[net]["taps"]


class LPIPS(nn.Module):
    """LPIPS distance: `features(x)` once per image, then `distance` between feature sets.

    Args:
        net: "alex" (the LPIPS default) or "vgg".

    State dict: `features.N.weight/bias` (torchvision's layout) and `lin{k}.weight` (1, C_k, 1, 1).
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = net
        self.features, self.taps = lpips_backbone(net)
        channels = [self.features[tap - 1].out_channels for tap in self.taps]
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def tapped(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations, each unit-normalised over channels (eps 1e-10 as LPIPS)."""
        h = (images - self.shift) / self.scale
        outputs = []
        for index, module in enumerate(self.features):
            h = module(h)
            if index in self.taps:
                outputs.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
            if index == self.taps[-1]:
                break
        return outputs

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between tapped features (batches broadcast): sum over layers of the spatial mean
        of the head-weighted squared differences."""
        total = 0.0
        for lin, fa, fb in zip(self.lins, a, b, strict=False):
            total = total + ((fa - fb).square() * lin).sum(dim=1).mean(dim=(-2, -1))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS between image batches in [-1, 1], (N, 3, H, W) each -> (N,)."""
        return self.distance(self.tapped(x), self.tapped(y))

    def load_lpips_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load `features.N.*` and `lin{k}.weight` tensors (the layout `lpips_state_dict` writes)."""
        state = {}
        for index, lin in enumerate(self.lins):
            state[f"lins.{index}"] = tensors[f"lin{index}.weight"].reshape(lin.shape)
        for name, tensor in tensors.items():
            if name.startswith("features."):
                state[name] = tensor
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [name for name in missing if name not in ("shift", "scale")]
        if missing or unexpected:
            raise KeyError(
                f"LPIPS weights do not match the {self.net} network: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    def lpips_state_dict(self) -> dict[str, torch.Tensor]:
        """`features.N.*` (torchvision's names) and `lin{k}.weight`, ready for safetensors."""
        tensors = {name: value.detach().contiguous() for name, value in self.features.state_dict().items()}
        tensors = {f"features.{name}": value for name, value in tensors.items()}
        for index, lin in enumerate(self.lins):
            tensors[f"lin{index}.weight"] = lin.detach().contiguous()
        return tensors


# --- rank of a random sparse matrix ------------------------------------------------------------


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
