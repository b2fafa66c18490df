"""An exponential moving average of the adapter weights, kept beside the trained ones.

After every optimizer step: average = decay * average + (1 - decay) * weight, starting from the
initial weights. The average is written as adapter-ema.safetensors (the same format as
adapter.safetensors, so every command that reads an adapter reads it) and kept in checkpoints, so
a resumed run continues the same average.
"""

import contextlib

import torch


class AdapterEMA:
    """The moving average of `parameters` (fp32 copies, on the parameters' device)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.averages = [parameter.detach().float().clone() for parameter in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        for average, parameter in zip(self.averages, self.parameters, strict=True):
            average.mul_(self.decay).add_(parameter.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The parameters hold the averages inside the block (to save or render them), then their own
        values again, bit for bit."""
        trained = [parameter.detach().clone() for parameter in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.averages, strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, trained, strict=True):
                    parameter.copy_(value)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averages under checkpoint names, in parameter order."""
        return {f"ema.{index}": average.detach().cpu() for index, average in enumerate(self.averages)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for index, average in enumerate(self.averages):
            average.copy_(tensors[f"ema.{index}"])
