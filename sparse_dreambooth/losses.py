"""The training loss: per-element error (MSE or Huber), optionally weighted per sample by min-SNR-gamma.

min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")
caps the weight of low-noise timesteps, whose easy targets otherwise dominate the gradient. The
paper weighs the squared error of x0 by min(SNR, gamma), with SNR(t) = a_t / (1 - a_t) for the
cumulative alpha a_t. The squared error of an epsilon prediction is SNR times that of x0, and of a
v prediction (SNR + 1) times, so their weights are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
"""

import torch
from torch.nn import functional as F

from sparse_dreambooth.config import TrainSettings


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) of each timestep."""
    alpha_bar = alphas_cumprod.to(torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The min-SNR-gamma weight of each sample's loss, for the UNet's prediction type."""
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def loss_terms(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    settings: TrainSettings,
) -> torch.Tensor:
    """Each element's weighted error, shaped like `prediction`; its mean is the batch's loss.

    A sample's weight multiplies all its elements, so the mean over any rows is the mean of those
    samples' weighted losses (every sample has as many elements).
    """
    if settings.loss == "huber":
        errors = F.huber_loss(prediction, target, reduction="none", delta=settings.huber_delta)
    else:
        errors = F.mse_loss(prediction, target, reduction="none")
    if settings.snr_gamma is None:
        return errors
    weights = min_snr_weights(signal_to_noise(alphas_cumprod, timesteps), settings.snr_gamma, prediction_type)
    return errors * weights.to(errors.device).view(-1, *([1] * (errors.ndim - 1)))
