"""Bytes DDP broadcasts per training step, run by test_train.py under two gloo processes.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_broadcast_probe.py OUT.json

A small model with WaveFT adapters (whose positions and kernel plans are its only buffers) is
prepared twice, as `sparse-db train` prepares the UNet and as plain `accelerator.prepare` does, and
trained for a few steps while every `_broadcast_coalesced` call (how DDP sends buffers) is counted.
Rank 0 writes {preparation: {bytes_per_step, buffer_bytes}} to OUT.json.
"""

import json
import sys

import torch
import torch.distributed
from accelerate import Accelerator

from sparse_dreambooth.adapters import attach
from sparse_dreambooth.config import AdapterConfig
from sparse_dreambooth.train import prepare_for_training

STEPS = 3


def main(output: str) -> None:
    accelerator = Accelerator()
    sent: list[int] = []
    broadcast = torch.distributed._broadcast_coalesced

    def counted(group, tensors, buffer_size, source=0):
        sent.append(sum(tensor.numel() * tensor.element_size() for tensor in tensors))
        return broadcast(group, tensors, buffer_size, source)

    torch.distributed._broadcast_coalesced = counted
    preparations = {
        "sparse-db train": prepare_for_training,
        "accelerate default": lambda accelerator, model, optimizer: accelerator.prepare(model, optimizer),
    }
    results = {}
    for name, prepare in preparations.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
        attach(model, AdapterConfig(method="waveft", budget=64, targets=["0", "2"]))
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        model, optimizer = prepare(accelerator, model, torch.optim.AdamW(trainable, lr=1e-3))
        sent.clear()  # DDP syncs everything once when it wraps the model; count the steps only
        generator = torch.Generator().manual_seed(accelerator.process_index)
        for _ in range(STEPS):
            loss = model(torch.randn(4, 32, generator=generator)).square().mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        buffers = accelerator.unwrap_model(model).buffers()
        results[name] = {
            "bytes_per_step": sum(sent) / STEPS,
            "buffer_bytes": sum(buffer.numel() * buffer.element_size() for buffer in buffers),
        }
    if accelerator.is_main_process:
        with open(output, "w") as stream:
            json.dump(results, stream)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
