"""Adapters on SDXL's two text encoders (`adapter.train_text_encoder`, off by default).

With it the run's method also adapts the q/k/v/out projections of every self-attention layer of
both CLIP encoders. What changes:

- Names. An encoder's layers are named inside its text model, "encoder.layers.0.self_attn.q_proj":
  transformers 5 folds CLIPTextModel's `text_model` into the model itself while
  CLIPTextModelWithProjection keeps one, and naming inside it gives one name under any version.
  An adapter file prefixes them with the pipeline's name of the encoder ("text_encoder.",
  "text_encoder_2."; adapters/io.py); the exports write diffusers' and kohya's names (export.py).
- Budget. The encoders' layers are a group with a budget of its own, by the rule the UNet's
  layers follow (budget.py): `budget` values per layer, or `budget_scale` x LoRA r=1 on the
  encoders' layers; LoRA takes `rank`, or the one rank nearest that budget. The UNet's adapters
  are therefore the same whether the encoders are adapted or not.
- Conditioning. Prompt embeddings no longer come from the cache: each micro-batch encodes its
  rows' prompts through the adapted encoders, with gradients. Every bucket's examples carry the
  prompt table (`CachedExamples.prompts`); the latents still come from the cached examples (and
  the latent cache on disk, which holds latents only).
- Processes. The encoders are not wrapped in DDP, so their adapters' gradients are averaged over
  the processes by hand before each optimizer step, as DDP averages the UNet's.
"""

import dataclasses

import torch
from torch import nn

from sparse_dreambooth.adapters import adapted_layers, load_adapter, unload
from sparse_dreambooth.adapters.layer import text_encoder_targets
from sparse_dreambooth.batches import CachedExamples, NoisyBatch
from sparse_dreambooth.config import SDXL_TEXT_ENCODERS, AdapterConfig
from sparse_dreambooth.methods import method_of
from sparse_dreambooth.model import encode_prompts


def text_encoder_parts(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by pipeline name, each as the text model its layers are named in."""
    return {name: getattr(getattr(pipe, name), "text_model", getattr(pipe, name)) for name in SDXL_TEXT_ENCODERS}


def merge_adapter(pipe, path, base_model) -> None:
    """Load the adapter file onto the pipeline, the UNet and (when the file adapts them) both text
    encoders, and merge it into their weights: they hold plain `nn.Linear` layers again, so the
    pipeline costs what the base costs. Merged in the pipeline's dtype, with one rounding.

    Args:
        base_model: the base model's identity, checked against the file's (`load_adapter`).
    """
    text_encoders = text_encoder_parts(pipe)
    load_adapter(pipe.unet, path, base_model=base_model, text_encoders=text_encoders)
    for adapted in (pipe.unet, *text_encoders.values()):
        unload(adapted)


def check_encoders_fit(text_encoders: dict[str, nn.Module], config: AdapterConfig) -> None:
    """Fail on a budget the encoders' layers cannot hold, as soon as they are loaded: before class
    images are rendered and examples cached. (`train.check_adapter_fits` checks the UNet's before
    any model loads.)"""
    group = text_encoder_targets(text_encoders)
    method_of(config).layer_budgets(
        config, {name: (linear.out_features, linear.in_features) for name, (_, _, linear) in group.items()}
    )


def prepare_for_adapters(pipe, gradient_checkpointing: bool) -> None:
    """Freeze both encoders whole (the projection outside the text model too) and put them in train
    mode, with gradient checkpointing if the run uses it; call before the adapters are attached."""
    for name in SDXL_TEXT_ENCODERS:
        encoder = getattr(pipe, name)
        encoder.requires_grad_(False)
        encoder.train()
        if gradient_checkpointing:
            # Non-reentrant: the reentrant kind passes no gradient when the inputs (frozen embeddings) need
            # none. transformers 5 renamed the method and deprecated the old name, which 4.x alone has.
            settings = {"use_reentrant": False}
            if hasattr(encoder, "activation_checkpointing_enable"):
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def adapter_parameters(text_encoders: dict[str, nn.Module]) -> list[nn.Parameter]:
    """The encoders' adapter parameters, in layer order."""
    return [
        parameter
        for encoder in text_encoders.values()
        for layer in adapted_layers(encoder).values()
        for parameter in layer.adapter.parameters()
    ]


def with_encoded_prompts(pipe, examples: CachedExamples, drawn: NoisyBatch) -> NoisyBatch:
    """`drawn` with the embeddings of its rows' prompts computed now by the (adapted) encoders,
    keeping their graph so the loss reaches the encoders' adapters."""
    prompts = [examples.prompts[row] for row in examples.prompt_index[drawn.index].tolist()]
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    prompt_embeds, pooled_embeds = encode_prompts.__wrapped__(tokenizers, encoders, prompts)  # without its no_grad
    return dataclasses.replace(drawn, prompt_embeds=prompt_embeds, pooled_embeds=pooled_embeds)


def average_gradients(parameters: list[nn.Parameter], accelerator) -> None:
    """Each parameter's gradient replaced by its mean over the processes (one all-reduce)."""
    if accelerator.num_processes == 1:
        return
    # The first encoder's last layer feeds nothing SDXL reads: no gradient, on every process alike.
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    averaged = accelerator.reduce(torch.cat([gradient.reshape(-1) for gradient in gradients]), reduction="mean")
    for gradient, values in zip(gradients, averaged.split([gradient.numel() for gradient in gradients]), strict=True):
        gradient.copy_(values.view_as(gradient))
