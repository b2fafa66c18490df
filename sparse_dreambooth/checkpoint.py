"""Resumable training state: adapter, optimizer, scheduler, generator and step, with no pickles.

    RUN/checkpoints/step-N/
      adapter.safetensors           the adapter as `adapters.save_adapter` writes it
      training_state.safetensors    optimizer tensors, the generator state, the adapter's EMA (if kept)
      training_state.json           step, parameter groups, optimizer scalars, scheduler, grad scaler

A checkpoint folder is staged and renamed (files.atomic_folder), so a crash mid-write leaves the
previous one.
"""

import json
from pathlib import Path

import torch

from sparse_dreambooth.adapters import BaseModel, save_adapter
from sparse_dreambooth.config import AdapterConfig
from sparse_dreambooth.errors import UserError
from sparse_dreambooth.files import atomic_folder, write_json, write_safetensors
from sparse_dreambooth.runs import ADAPTER_FILE

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def save_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    adapter_config: AdapterConfig,
    base_model: BaseModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generator: torch.Generator,
    step: int,
    scaler=None,
    ema=None,
    text_encoders=None,
) -> None:
    """Write everything `load_checkpoint` needs to continue at `step`.

    `scheduler` is a torch LR scheduler and `scaler` a grad scaler (or None): anything with
    `state_dict()`, whose state is plain JSON. `ema` is the run's `ema.AdapterEMA`, or None.
    `text_encoders`: the adapted encoders (`text_encoders.text_encoder_parts`), or None.
    """
    optimizer_state = optimizer.state_dict()
    tensors = {"generator": generator.get_state(), **(ema.state_tensors() if ema is not None else {})}
    scalars = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with atomic_folder(path) as staging:
        save_adapter(unet, staging / ADAPTER_FILE, adapter_config, base_model=base_model, text_encoders=text_encoders)
        write_safetensors(staging / STATE_TENSORS, tensors)
        write_json(staging / STATE_JSON, meta)


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer, scheduler, generator: torch.Generator, scaler, ema=None
) -> int:
    """Restore what `save_checkpoint` wrote (the adapter is loaded separately); return the step."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / STATE_TENSORS))
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, SafetensorError, ValueError) as error:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({error}); resume from an earlier one") from None
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["optimizer_scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    generator.set_state(tensors["generator"])
    if ema is not None:
        ema.load_state_tensors(tensors)
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return meta["step"]
