"""Forward + backward of one adapted layer at SDXL's real shapes, every method interleaved in one run.

    python scripts/bench_adapters.py                          # CPU, fp32, a few minutes
    python scripts/bench_adapters.py --repeats 50 --dtype bf16 --json bench_adapters_bf16.json
    python scripts/bench_adapters.py --device cuda --threads 0

Shapes are SDXL at 1024 px, batch 1: self-attention 640->640 over 4096 tokens and 1280->1280
over 1024, cross-attention keys/values 2048->640 and 2048->1280 over the 77 text tokens. As in
SDXL training, the hidden states entering a self-attention projection require grad (every
method pays grad_input there) and the text states entering the cross-attention keys and values
do not (the frozen layer is then a forward alone); `--input-grad always` makes every input
require grad.

Methods: a frozen nn.Linear; LoRA r=1; our WaveFT (db1) and random-sparse at p coefficients
(default 2592, LoRA r=1's average budget on SDXL); PEFT's WaveFT and its use_idwt=False
random-sparse, when peft is installed. Repeats run the methods round-robin in a rotating order,
so a slow spell of a shared machine hits every method alike; we report medians and ratios.
Peak memory is what a forward + backward allocates above what it starts with (CUDA allocator
statistics on GPUs, the profiler's allocation events on CPU).

On a CPU shared with other jobs, several threads per op mostly measure the neighbours: the
default is one thread (--threads 0 keeps torch's default).
"""

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from sparse_dreambooth.adapters.layer import AdaptedLinear
from sparse_dreambooth.adapters.lora import LoraAdapter
from sparse_dreambooth.adapters.sparse import SparseAdapter, random_positions

# (in_features, out_features, tokens, input requires grad in SDXL training) of SDXL's attention
# projections at 1024 px.
SDXL_SHAPES = ((640, 640, 4096, True), (1280, 1280, 1024, True), (2048, 640, 77, False), (2048, 1280, 77, False))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALING = 25.0
OURS = ("waveft", "random-sparse")


# --- measurement (shared with bench_step.py) ---------------------------------------------------


def configure_threads(threads: int, device: torch.device) -> int:
    """Use `threads` CPU threads (0: torch's default); returns the count in use."""
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def default_clock(device: torch.device) -> str:
    # On a shared CPU, wall time mostly measures when the neighbours run; the process's CPU time
    # does not count the time it waits for a core. A GPU call is timed by the wall clock.
    return "cpu" if device.type == "cpu" else "wall"


def interleaved_times(
    cases: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device,
    clock: str,
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every case, cases run round-robin with the starting case rotating.

    Args:
        contexts: per case, a context entered around each of its calls but outside the timing
            (to swap a model's adapters in, say).
    """
    sync, now = synchronizer(device), CLOCKS[clock]
    contexts = contexts or {}
    names = list(cases)
    times = {name: [] for name in names}
    for repeat in range(-warmup, repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            with contexts.get(name, contextlib.nullcontext)():
                sync()
                started = now()
                cases[name]()
                sync()
                elapsed = now() - started
            if repeat >= 0:
                times[name].append(elapsed)
    return times


def peak_memory(call: Callable[[], None], device: torch.device) -> int:
    """Bytes `call` allocates at its peak above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles in milliseconds."""
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {"median_ms": 1e3 * statistics.median(seconds), "p25_ms": 1e3 * quartiles[0], "p75_ms": 1e3 * quartiles[2]}


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return f"{len(names)} x {names[0]}" if names else platform.processor() or platform.machine()


def environment(device: torch.device, threads: int) -> dict:
    info = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": threads,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


# --- the layer ---------------------------------------------------------------------------------


def frozen_linear(in_features: int, out_features: int, dtype, device, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features).to(device, dtype)
    return linear.requires_grad_(False)


def build_layer(method: str, in_features: int, out_features: int, budget: int, dtype, device) -> nn.Module:
    """One SDXL-sized projection with `method` attached, adapter values random (not zero)."""
    base = frozen_linear(in_features, out_features, dtype, device, seed=0)
    shape = (out_features, in_features)
    generator = torch.Generator().manual_seed(1)
    if method == "frozen":
        return base
    if method == "lora":
        adapter = LoraAdapter(shape, rank=1, alpha=1.0, generator=generator, device=device)
        with torch.no_grad():
            adapter.lora_B.copy_(torch.randn(out_features, 1, generator=generator))
        return AdaptedLinear(base, adapter)
    if method in OURS:
        wavelet = "db1" if method == "waveft" else None
        positions = random_positions(shape, budget, seed=777).to(device)
        adapter = SparseAdapter(shape, positions, SCALING, wavelet)
        with torch.no_grad():
            adapter.coefficients.copy_(torch.randn(budget, generator=generator) * 1e-3)
        return AdaptedLinear(base, adapter)
    return peft_layer(method, base, budget)


def peft_layer(method: str, base: nn.Linear, budget: int) -> nn.Module:
    from peft import WaveFTConfig, get_peft_model

    holder = nn.Module()
    holder.proj = base
    config = WaveFTConfig(
        n_frequency=budget,
        scaling=SCALING,
        wavelet_family="db1",
        use_idwt=method == "peft-waveft",
        random_loc_seed=777,
        target_modules=["proj"],
    )
    layer = get_peft_model(holder, config).base_model.model.proj
    with torch.no_grad():
        spectrum = layer.waveft_spectrum["default"]
        spectrum.copy_(torch.randn(spectrum.shape, generator=torch.Generator().manual_seed(1)) * 1e-3)
    return layer


def methods() -> list[str]:
    found = ["frozen", "lora", *OURS]
    try:
        import peft  # noqa: F401

        found += ["peft-waveft", "peft-random-sparse"]
    except ImportError:
        print("peft is not installed: PEFT's WaveFT is left out", file=sys.stderr)
    return found


def training_call(layer: nn.Module, x: torch.Tensor, grad_output: torch.Tensor, dtype) -> Callable[[], None]:
    """One forward + backward, as a training step runs it (autocast for half precision)."""
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    autocast = dtype != torch.float32

    def call() -> None:
        x.grad = None
        for parameter in trainable:
            parameter.grad = None
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            output = layer(x)
        if output.requires_grad:  # a frozen layer on an input without grad has no backward
            output.backward(grad_output.to(output.dtype))

    return call


def bench_shape(in_features, out_features, tokens, input_grad, args, device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, in_features, generator=generator).to(device, dtype).requires_grad_(input_grad)
    grad_output = torch.randn(1, tokens, out_features, generator=generator).to(device, dtype)
    calls = {
        method: training_call(
            build_layer(method, in_features, out_features, args.budget, dtype, device), x, grad_output, dtype
        )
        for method in methods()
    }
    times = interleaved_times(calls, args.repeats, args.warmup, device, args.clock)
    rows = []
    for method, call in calls.items():
        rows.append(
            {
                "in": in_features,
                "out": out_features,
                "tokens": tokens,
                "input_grad": input_grad,
                "method": method,
                **summary(times[method]),
                "peak_bytes": peak_memory(call, device),
            }
        )
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        for reference in ("frozen", "lora", "peft-waveft"):
            if reference in by_method:
                row[f"time_vs_{reference}"] = row["median_ms"] / by_method[reference]["median_ms"]
        row["peak_vs_lora"] = row["peak_bytes"] / by_method["lora"]["peak_bytes"]
    return rows


def shape_label(row: dict) -> str:
    return f"{row['in']}->{row['out']} x{row['tokens']}" + ("" if row["input_grad"] else " no-dx")


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'shape':<24} {'method':<19} {'median ms':>9} {'x frozen':>8} {'x LoRA':>7} {'x PEFT':>7} "
        f"{'peak MiB':>9} {'peak/LoRA':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = shape_label(row)
        peft_ratio = f"{row['time_vs_peft-waveft']:7.2f}" if "time_vs_peft-waveft" in row else f"{'-':>7}"
        print(
            f"{shape:<24} {row['method']:<19} {row['median_ms']:9.2f} {row['time_vs_frozen']:8.2f} "
            f"{row['time_vs_lora']:7.2f} "
            f"{peft_ratio} {row['peak_bytes'] / 2**20:9.2f} {row['peak_vs_lora']:9.2f}"
        )


def check_targets(rows: list[dict]) -> list[str]:
    """Per shape: ours <= 1.0x LoRA time, <= 0.45x PEFT WaveFT time, peak memory <= LoRA's."""
    verdicts = []
    for row in rows:
        if row["method"] not in OURS:
            continue
        checks = [("time <= 1.0x LoRA", row["time_vs_lora"] <= 1.0), ("peak <= LoRA", row["peak_vs_lora"] <= 1.0)]
        if "time_vs_peft-waveft" in row:
            checks.append(("time <= 0.45x PEFT", row["time_vs_peft-waveft"] <= 0.45))
        shape = shape_label(row)
        verdicts += [f"{shape} {row['method']}: {name}: {'met' if ok else 'MISSED'}" for name, ok in checks]
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations (half: under autocast)"
    )
    parser.add_argument("--budget", type=int, default=2592, help="sparse coefficients per layer (default: 2592)")
    parser.add_argument("--repeats", type=int, default=25, help="timed calls per method and shape (default: 25)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per method first (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 0 keeps torch's default (default: 1)")
    parser.add_argument(
        "--input-grad",
        choices=("sdxl", "always"),
        default="sdxl",
        help="which inputs require grad (default: as in SDXL)",
    )
    parser.add_argument("--tokens-scale", type=float, default=1.0, help="multiply every token count (quick runs: 0.25)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), help="wall or process CPU time (default: cpu on CPU, wall on GPU)"
    )
    parser.add_argument(
        "--json", default="bench_adapters.json", help="where to write the results (default: %(default)s)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    args.clock = args.clock or default_clock(device)
    threads = configure_threads(args.threads, device)
    rows = []
    for in_features, out_features, tokens, input_grad in SDXL_SHAPES:
        tokens = max(1, round(tokens * args.tokens_scale))
        rows += bench_shape(in_features, out_features, tokens, input_grad or args.input_grad == "always", args, device)
    print_table(rows)
    verdicts = check_targets(rows)
    print("\n".join(["", "targets:", *verdicts]))
    result = {"environment": environment(device, threads), "settings": vars(args), "rows": rows, "targets": verdicts}
    with open(args.json, "w") as stream:
        json.dump(result, stream, indent=1)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
