"""Whole UNet training steps and sampling, every adapter method interleaved in one run.

    python scripts/bench_step.py                                  # tiny model + SDXL architecture, CPU
    python scripts/bench_step.py --models sdxl --sdxl-resolution 256 --repeats 5
    python scripts/bench_step.py --device cuda --dtype bf16 --sdxl-resolution 1024 --threads 0

Models: the built-in tiny SDXL (`load_pipeline("tiny")`) and the real SDXL base UNet architecture
built from its config with random weights (`sparse_dreambooth.sdxl_architecture`; 10.3 GB in
fp32, its 256 px step fits in 24 GiB). Random weights change no shape and no cost.

Training: one optimizer step as `sparse-db train` runs it (adapter on the 560 attention
projections at the default budget, noise-prediction MSE, backward, AdamW), with gradient
checkpointing off and on. The methods share one UNet: each has its adapters built once and
swapped in before its timed step, and the steps run round-robin in a rotating order, so a slow
spell of a shared machine hits every method alike. Ratios are against LoRA r=1.
`--methods` adds PEFT's WaveFT (`peft-waveft`, trained only: sampling merges our adapters).
Peak memory: per step with `--memory` (the CUDA allocator on GPUs, the profiler on CPU), and the
run's torch.cuda.max_memory_allocated on CUDA or peak resident set on CPU in the JSON.

Sampling: the base model against each adapter merged into the weights. For the tiny model this is
the whole pipeline (text encoders, denoising with classifier-free guidance, VAE decode); for the
SDXL architecture, which has no text encoders or VAE here, the denoising loop (UNet calls on a
batch of 2 for guidance). Merging happens before the timed call.
"""

import argparse
import contextlib
import json
import os
import resource
import tempfile

import torch
from bench_adapters import (
    CLOCKS,
    DTYPES,
    configure_threads,
    default_clock,
    environment,
    interleaved_times,
    peak_memory,
    summary,
)
from torch.nn import functional as F

from sparse_dreambooth.adapters.layer import AdaptedLinear, build_adapters, merge, target_linears, unmerge
from sparse_dreambooth.config import DEFAULT_BUDGET, AdapterConfig

METHODS = ("lora", "waveft", "random-sparse")
PEFT_METHODS = ("peft-waveft",)  # PEFT's own WaveFT layers on the same projections (peft installed)


class AdapterSwitch:
    """One adapter per method on the same UNet, swapped in by replacing the target linears."""

    def __init__(self, unet: torch.nn.Module, methods=METHODS, seed: int = 0):
        self.unet = unet
        self.linears = target_linears(unet, AdapterConfig().targets)
        unet.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, dict[str, torch.nn.Module]] = {}
        for method in methods:
            if method in PEFT_METHODS:
                self.layers[method] = peft_layers(self.linears, generator)
                continue
            adapters = build_adapters(AdapterConfig(method=method), self.linears)
            with torch.no_grad():  # nonzero values, as after some training
                for adapter in adapters.values():
                    for parameter in adapter.parameters():
                        parameter.copy_(1e-3 * torch.randn(parameter.shape, generator=generator))
            self.layers[method] = {
                name: AdaptedLinear(self.linears[name], adapter) for name, adapter in adapters.items()
            }

    def parameters(self, method: str) -> list[torch.nn.Parameter]:
        return [
            parameter
            for layer in self.layers[method].values()
            for parameter in layer.parameters()
            if parameter.requires_grad
        ]

    def _install(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.unet.get_submodule(parent_name), child, module)

    @contextlib.contextmanager
    def using(self, method: str | None, merged: bool = False):
        """The UNet with `method`'s adapters in place (None: the bare base model), then without."""
        self._install(self.linears if method is None else self.layers[method])
        if merged:  # as `sparse-db sample` runs: the delta merged into the plain nn.Linear weights
            merge(self.unet)
            self._install(self.linears)
        try:
            yield
        finally:
            if merged:
                self._install(self.layers[method])
                unmerge(self.unet)
            self._install(self.linears)


def peft_layers(linears: dict[str, torch.nn.Linear], generator: torch.Generator) -> dict[str, torch.nn.Module]:
    """PEFT's WaveFT (db1, p = 2592, scaling 25, seed 777: our defaults) around each linear."""
    from peft import WaveFTConfig, get_peft_model

    config = AdapterConfig()
    layers = {}
    for name, linear in linears.items():
        holder = torch.nn.Module()
        holder.proj = linear
        peft_config = WaveFTConfig(
            n_frequency=config.budget or DEFAULT_BUDGET,
            scaling=config.scaling,
            wavelet_family=config.wavelet,
            random_loc_seed=config.adapter_seed,
            target_modules=["proj"],
        )
        layer = get_peft_model(holder, peft_config).base_model.model.proj
        with torch.no_grad():
            spectrum = layer.waveft_spectrum["default"]
            spectrum.copy_(1e-3 * torch.randn(spectrum.shape, generator=generator))
        layers[name] = layer
    return layers


def unet_inputs(config, batch: int, resolution: int, device, dtype, seed: int = 0):
    """Random inputs shaped as an SDXL-style UNet with `config` receives them at `resolution` px."""
    generator = torch.Generator().manual_seed(seed)
    latent = resolution // 8
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    sample = torch.randn(batch, config.in_channels, latent, latent, generator=generator)
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    target = torch.randn(sample.shape, generator=generator)
    inputs = dict(
        sample=sample.to(device, dtype),
        encoder_hidden_states=text.to(device, dtype),
        added_cond_kwargs={
            "text_embeds": pooled.to(device, dtype),
            "time_ids": time_ids.repeat(batch, 1).to(device, dtype),
        },
    )
    return inputs, timesteps.to(device), target.to(device)


def training_step(unet, switch: AdapterSwitch, method: str, batch, dtype, device):
    """One optimizer step of the noise-prediction loss, as the training loop runs it."""
    inputs, timesteps, target = batch
    optimizer = torch.optim.AdamW(switch.parameters(method), lr=1e-4, weight_decay=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(timestep=timesteps, **inputs).sample
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def denoising_loop(unet, batch, steps: int):
    """`steps` guided UNet calls (a batch of 2), what sampling costs without text encoders or VAE."""
    inputs, timesteps, _ = batch
    text = torch.cat([inputs["encoder_hidden_states"]] * 2)
    added = {key: torch.cat([value] * 2) for key, value in inputs["added_cond_kwargs"].items()}

    @torch.inference_mode()
    def sample() -> None:
        latents = inputs["sample"]
        for _ in range(steps):
            noise = unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), text, added_cond_kwargs=added).sample
            latents = latents - 0.1 * noise.chunk(2)[0]

    return sample


def pipeline_call(pipe, resolution: int, steps: int):
    def sample() -> None:
        pipe(
            "a photo of a dog",
            negative_prompt="blurry",
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    return sample


def load_model(model: str, device, dtype):
    """(unet, pipeline or None, resolution default) for "tiny" or "sdxl"."""
    if model == "tiny":
        from sparse_dreambooth.model import load_pipeline

        os.environ.setdefault("SPARSE_DB_CACHE", os.path.join(tempfile.gettempdir(), "sparse-db-bench-cache"))
        pipe = load_pipeline("tiny", torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe.unet, pipe
    from sparse_dreambooth.sdxl_architecture import build_sdxl_unet

    return build_sdxl_unet(dtype=dtype, device=device), None


def bench_model(model: str, resolution: int, args, device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    unet, pipe = load_model(model, device, dtype)
    methods = args.methods
    switch = AdapterSwitch(unet, methods)
    batch = unet_inputs(unet.config, 1, resolution, device, dtype)
    rows = []
    for checkpointing in args.checkpointing:
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet.train()
        steps = {method: training_step(unet, switch, method, batch, dtype, device) for method in methods}
        contexts = {method: (lambda method=method: switch.using(method)) for method in methods}
        times = interleaved_times(steps, args.repeats, args.warmup, device, args.clock, contexts)
        for method in methods:
            row = {
                "model": model,
                "resolution": resolution,
                "kind": "train",
                "checkpointing": checkpointing,
                "method": method,
            }
            row.update(summary(times[method]))
            if args.memory:
                with switch.using(method):
                    row["peak_bytes"] = peak_memory(steps[method], device)
            rows.append(row)
        print(f"{model} {resolution}px training, checkpointing {'on' if checkpointing else 'off'}: done", flush=True)
    unet.disable_gradient_checkpointing()
    unet.eval()
    if not args.sample_repeats:
        return rows
    merged = [method for method in methods if method not in PEFT_METHODS]  # merge() knows our layers only
    sample = (
        pipeline_call(pipe, resolution, args.sample_steps)
        if pipe is not None
        else denoising_loop(unet, batch, args.sample_steps)
    )
    cases = ["base", *(f"{method} merged" for method in merged)]
    contexts = {"base": lambda: switch.using(None)}
    contexts.update(
        {f"{method} merged": (lambda method=method: switch.using(method, merged=True)) for method in merged}
    )
    times = interleaved_times(dict.fromkeys(cases, sample), args.sample_repeats, 1, device, args.clock, contexts)
    for case in cases:
        rows.append(
            {"model": model, "resolution": resolution, "kind": "sample", "method": case, **summary(times[case])}
        )
    print(f"{model} {resolution}px sampling: done", flush=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    def key(row):
        return (row["model"], row["resolution"], row["kind"], row.get("checkpointing"))

    references = {}
    for row in rows:
        if row["method"] in ("lora", "base"):
            references[key(row)] = row["median_ms"]
    for row in rows:
        name = "time_vs_lora" if row["kind"] == "train" else "time_vs_base"
        row[name] = row["median_ms"] / references[key(row)]


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<6} {'px':>5} {'what':<22} {'method':<15} {'median ms':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["kind"] == "train":
            what, ratio = f"train, ckpt {'on' if row['checkpointing'] else 'off'}", row["time_vs_lora"]
        else:
            what, ratio = "sample", row["time_vs_base"]
        print(
            f"{row['model']:<6} {row['resolution']:>5} {what:<22} {row['method']:<15} "
            f"{row['median_ms']:11.1f} {ratio:6.3f}"
        )


def check_targets(rows: list[dict]) -> list[str]:
    """SDXL-architecture step: WaveFT / LoRA <= 1.0; sampling merged / base <= 1.02."""
    verdicts = []
    for row in rows:
        if row["kind"] == "train" and row["method"] not in ("lora", *PEFT_METHODS):
            ok = row["time_vs_lora"] <= 1.0
            what = f"train ckpt {'on' if row['checkpointing'] else 'off'}"
            verdicts.append(
                f"{row['model']} {row['resolution']}px {what} {row['method']} / LoRA <= 1.0: "
                f"{'met' if ok else 'MISSED'}"
            )
        if row["kind"] == "sample" and row["method"] != "base":
            ok = row["time_vs_base"] <= 1.02
            verdicts.append(
                f"{row['model']} {row['resolution']}px sample {row['method']} / base <= 1.02: "
                f"{'met' if ok else 'MISSED'}"
            )
    return verdicts


def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("tiny", "sdxl"), default=["tiny", "sdxl"])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS + PEFT_METHODS,
        default=list(METHODS),
        help="methods to train (default: %(default)s; lora first, the reference of the ratios)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights; half precision trains under autocast"
    )
    parser.add_argument("--tiny-resolution", type=int, default=64, help="default: 64")
    parser.add_argument("--sdxl-resolution", type=int, default=128, help="default: 128 (256 fits 24 GiB in fp32)")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        type=on_off,
        default=[False, True],
        metavar="{off,on}",
        help="gradient checkpointing modes to run (default: off on)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per method and mode (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first (default: 1)")
    parser.add_argument("--sample-steps", type=int, default=2, help="denoising steps per sampling call (default: 2)")
    parser.add_argument(
        "--sample-repeats", type=int, default=5, help="timed sampling calls per case, 0 for none (default: 5)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 0 keeps torch's default (default: 1)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), help="wall or process CPU time (default: cpu on CPU, wall on GPU)"
    )
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, help="peak memory per step (default: on GPUs only)"
    )
    parser.add_argument("--json", default="bench_step.json", help="where to write the results (default: %(default)s)")
    args = parser.parse_args()
    if "lora" not in args.methods:
        parser.error("--methods must include lora: the ratios are against it")

    device = torch.device(args.device)
    args.clock = args.clock or default_clock(device)
    args.memory = device.type == "cuda" if args.memory is None else args.memory
    threads = configure_threads(args.threads, device)
    rows = []
    for model in args.models:
        resolution = args.tiny_resolution if model == "tiny" else args.sdxl_resolution
        rows += bench_model(model, resolution, args, device)
    add_ratios(rows)
    print()
    print_table(rows)
    verdicts = check_targets(rows)
    print("\n".join(["", "targets:", *verdicts]))
    settings = {**vars(args), "checkpointing": ["on" if mode else "off" for mode in args.checkpointing]}
    result = {"environment": environment(device, threads), "settings": settings, "rows": rows, "targets": verdicts}
    if device.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    else:  # the process's peak resident set: the model, every method's adapters and the steps
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(args.json, "w") as stream:
        json.dump(result, stream, indent=1)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
