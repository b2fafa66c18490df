"""The training loop's pure parts, tested without a UNet."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from torch.nn import functional as F

from sparse_dreambooth.batches import CachedExamples, noisy_batch
from sparse_dreambooth.config import TrainSettings
from sparse_dreambooth.losses import loss_terms


def _examples(count: int = 3) -> CachedExamples:
    generator = torch.Generator().manual_seed(0)
    return CachedExamples(
        latent_mean=torch.randn((count, 4, 8, 8), generator=generator),
        latent_std=torch.rand((count, 4, 8, 8), generator=generator) * 0.1,
        time_ids=torch.randn((count, 6), generator=generator),
        prompt_embeds=torch.zeros((1, 77, 16)),
        pooled_embeds=torch.zeros((1, 8)),
        prompt_index=torch.zeros(count, dtype=torch.long),
    )


def _redraw(examples: CachedExamples, seed: int, global_batch: int, scaling: float):
    """The same draws in the loop's order, so the oracle sees the latents and noise noisy_batch saw."""
    generator = torch.Generator().manual_seed(seed)
    shape = (global_batch, *examples.latent_mean.shape[1:])
    index = torch.randint(len(examples.time_ids), (global_batch,), generator=generator)
    latent_noise = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, 1000, (global_batch,), generator=generator)
    latents = (examples.latent_mean[index] + examples.latent_std[index] * latent_noise) * scaling
    return index, latents, noise, timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_batch_matches_diffusers_forward_process(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    examples, scaling = _examples(), 0.13025
    drawn = noisy_batch(
        examples,
        scheduler.alphas_cumprod,
        prediction_type,
        scaling,
        torch.Generator().manual_seed(7),
        global_batch=5,
        mine=slice(0, 5),
    )
    index, latents, noise, timesteps = _redraw(examples, 7, 5, scaling)
    assert torch.equal(drawn.index, index) and torch.equal(drawn.timesteps, timesteps)
    torch.testing.assert_close(drawn.noisy, scheduler.add_noise(latents, noise, timesteps))
    expected = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    torch.testing.assert_close(drawn.target, expected)


def test_each_process_keeps_its_slice_of_one_global_batch():
    """Two ranks of batch 2 train on exactly the rows one process of batch 4 would draw."""
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    examples = _examples()

    def draw(mine: slice):
        return noisy_batch(examples, alphas, "epsilon", 1.0, torch.Generator().manual_seed(3), 4, mine)

    whole = draw(slice(0, 4))
    ranks = [draw(slice(0, 2)), draw(slice(2, 4))]
    for field in ("index", "timesteps", "noisy", "target"):
        assert torch.equal(torch.cat([getattr(rank, field) for rank in ranks]), getattr(whole, field))
    again = draw(slice(0, 4))
    assert torch.equal(again.noisy, whole.noisy), "the same seed gives the same batch"


# --- the loss and the noise options -------------------------------------------------------------


def _settings(**changes) -> TrainSettings:
    return dataclasses.replace(TrainSettings(), **changes)


def test_the_default_loss_is_torch_mse_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn((3, 4, 8, 8), generator=generator), torch.randn((3, 4, 8, 8), generator=generator)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    terms = loss_terms(prediction, target, torch.tensor([1, 500, 999]), alphas, "epsilon", _settings())
    assert torch.equal(terms.mean(), F.mse_loss(prediction, target))


def test_huber_loss_follows_its_piecewise_formula():
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn((2, 4, 8, 8), generator=generator), torch.zeros((2, 4, 8, 8))
    delta = 0.3
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    terms = loss_terms(
        prediction, target, torch.tensor([3, 7]), alphas, "epsilon", _settings(loss="huber", huber_delta=delta)
    )
    error = prediction.double().abs()
    expected = torch.where(error <= delta, 0.5 * error**2, delta * (error - 0.5 * delta))
    torch.testing.assert_close(terms.double(), expected)
    assert (error > delta).any() and (error <= delta).any(), "both branches are exercised"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_sample_as_computed_from_alphas_cumprod(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 20, 100, 400, 999])
    gamma = 5.0
    # A unit error everywhere: each sample's loss is its weight.
    prediction, target = torch.ones((5, 4, 2, 2)), torch.zeros((5, 4, 2, 2))
    settings = _settings(snr_gamma=gamma)
    terms = loss_terms(prediction, target, timesteps, scheduler.alphas_cumprod, prediction_type, settings)
    # Oracle: SNR = (signal scale / noise scale)^2 from the scheduler's alphas_cumprod, in float64.
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr = (alpha_bar.sqrt() / (1 - alpha_bar).sqrt()) ** 2
    by_hand = [
        min(value, gamma) / (value + 1 if prediction_type == "v_prediction" else value) for value in snr.tolist()
    ]
    torch.testing.assert_close(
        terms.double().mean(dim=(1, 2, 3)), torch.tensor(by_hand, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert terms[0].unique().numel() == 1, "a sample's weight multiplies all its elements"
    if prediction_type == "epsilon":  # high noise (SNR < gamma) keeps weight 1; low noise is capped
        assert by_hand[-1] == 1.0 and by_hand[0] < 0.01
    # The mean over rows is the mean of those samples' weighted losses.
    torch.testing.assert_close(terms[:2].mean().double(), torch.tensor(by_hand[:2], dtype=torch.float64).mean())


def test_noise_offset_adds_a_seeded_constant_per_image_and_channel():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    examples, scaling, offset = _examples(), 0.13025, 0.1

    def draw(noise_offset):
        generator = torch.Generator().manual_seed(7)
        args = (examples, scheduler.alphas_cumprod, "epsilon", scaling, generator, 5, slice(0, 5))
        return noisy_batch(*args, noise_offset=noise_offset), generator

    (plain, _), (offset_batch, _) = draw(0.0), draw(offset)
    index, latents, noise, timesteps = _redraw(examples, 7, 5, scaling)
    generator = torch.Generator().manual_seed(7)
    _redraw_with(generator, examples, 5)
    shift = offset * torch.randn((5, 4, 1, 1), generator=generator)  # drawn last, after the timesteps
    assert torch.equal(offset_batch.index, plain.index) and torch.equal(offset_batch.timesteps, plain.timesteps)
    torch.testing.assert_close(offset_batch.target, noise + shift)
    torch.testing.assert_close(offset_batch.noisy, scheduler.add_noise(latents, noise + shift, timesteps))
    assert torch.equal(plain.target, noise), "off, the draws are today's"


def _redraw_with(generator: torch.Generator, examples: CachedExamples, global_batch: int) -> None:
    """Advance `generator` past noisy_batch's four draws."""
    shape = (global_batch, *examples.latent_mean.shape[1:])
    torch.randint(len(examples.time_ids), (global_batch,), generator=generator)
    torch.randn(shape, generator=generator)
    torch.randn(shape, generator=generator)
    torch.randint(0, 1000, (global_batch,), generator=generator)
