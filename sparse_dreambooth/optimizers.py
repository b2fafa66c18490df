"""The optimizers `--optimizer` names, each built from the same train settings.

    adamw      torch.optim.AdamW (the paper's; default)
    prodigy    Prodigy (Mishchenko and Defazio 2024), which estimates its own step size: --lr is a
               multiplier of that estimate, so 1.0. Needs `pip install 'sparse-dreambooth[prodigy]'`.
    adafactor  transformers' Adafactor with a fixed --lr (no relative step, no parameter scaling),
               factored second moments and no first moment; ignores the adam_* settings.
    adamw8bit  bitsandbytes' AdamW8bit, whose 8-bit optimizer states need a CUDA GPU: it fails on the
               CPU. Needs `pip install 'sparse-dreambooth[bnb]'`.

Each optional package is checked before any model loads (`check_optimizer`), with one line that
says how to install it.
"""

import importlib
import warnings

import torch

from sparse_dreambooth.config import TrainSettings
from sparse_dreambooth.errors import UserError

# optimizer -> (module it needs, the pip extra that installs it); AdamW and Adafactor need no extra.
OPTIONAL_PACKAGES = {"prodigy": ("prodigyopt", "prodigy"), "adamw8bit": ("bitsandbytes", "bnb")}


def _module(optimizer: str):
    name, extra = OPTIONAL_PACKAGES[optimizer]
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(
            f"--optimizer {optimizer} needs the {name} package: pip install 'sparse-dreambooth[{extra}]'"
        ) from None


def check_optimizer(settings: TrainSettings, device: torch.device) -> None:
    """Fail now, in one line, if the optimizer cannot run here; warn about a Prodigy lr far from 1."""
    if settings.optimizer == "adamw8bit" and device.type != "cuda":
        raise UserError(
            f"--optimizer adamw8bit (bitsandbytes' 8-bit AdamW) runs on CUDA GPUs only, not on {device.type}; "
            "use --optimizer adamw or adafactor here"
        )
    if settings.optimizer in OPTIONAL_PACKAGES:
        _module(settings.optimizer)
    if settings.optimizer == "prodigy" and not 0.1 <= settings.lr <= 10:
        warnings.warn(
            f"Prodigy estimates its own step size and multiplies it by --lr ({settings.lr:g}); 1.0 is usual",
            stacklevel=2,
        )


def build_optimizer(parameters: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer `settings.optimizer` names, over `parameters`."""
    betas = (settings.adam_beta1, settings.adam_beta2)
    if settings.optimizer == "prodigy":
        return _module("prodigy").Prodigy(
            parameters, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay, eps=settings.adam_epsilon
        )
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if settings.optimizer == "adamw8bit":
        return _module("adamw8bit").optim.AdamW8bit(
            parameters, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay, eps=settings.adam_epsilon
        )
    return torch.optim.AdamW(
        parameters, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay, eps=settings.adam_epsilon
    )
