"""The training loop's pure parts, tested without a UNet."""

import pytest
import torch
from diffusers import DDPMScheduler

from sparse_dreambooth.batches import CachedExamples, noisy_batch


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
