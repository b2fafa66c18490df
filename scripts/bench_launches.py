"""Kernel launches per training step, counted with torch.profiler on CPU, each method against LoRA.

    python scripts/bench_launches.py                            # SDXL architecture, bf16, 64 px
    python scripts/bench_launches.py --model tiny --dtype fp32 --json out.json      # quick

One training step (forward, backward, AdamW) of a UNet with each method's adapters on the 560
attention projections, profiled on CPU. A launch is an outermost aten operator of the profile
(one kernel or a few on a GPU): views, reshapes, allocations and sparse-tensor construction are
left out, since they launch no GPU kernel. What a step launches does not depend on the device, except for the sparse
methods' SDDMM, which runs once per chunk of tokens: the counts are taken with the chunk budget of
an accelerator (one chunk per layer, as on CUDA) and with CPU's cache-sized chunks.

At one chunk per layer the count does not depend on the resolution either, so the 64 px counts
are those of a 1024 px step. CPU's chunks grow in number with the tokens; their count at
`--at-resolution` (default 1024) is derived from the chunks each layer would split into there.
"""

import argparse
import contextlib
import json
import math
import os
import tempfile
from collections import Counter

import torch
from bench_adapters import DTYPES, environment
from bench_step import AdapterSwitch, training_step, unet_inputs
from torch.profiler import ProfilerActivity, profile

from sparse_dreambooth.adapters import kernels
from sparse_dreambooth.adapters.layer import adapted_layers

METHODS = ("lora", "waveft", "random-sparse")
# Operators that only describe or allocate a tensor: no kernel runs for them on a GPU.
NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::view",
    "aten::_unsafe_view",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::slice",
    "aten::select",
    "aten::unbind",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::narrow",
    "aten::detach",
    "aten::detach_",
    "aten::alias",
    "aten::lift_fresh",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::result_type",
    "aten::values",
    "aten::crow_indices",
    "aten::col_indices",
    "aten::sparse_csr_tensor",
    "aten::_sparse_csr_tensor_unsafe",
    "aten::set_",
    "aten::resize_",
    "aten::contiguous",
    "aten::flatten",
    "aten::unflatten",
    "aten::expand_as",
    "aten::view_as",
    "aten::numpy_T",
    "aten::matrix_H",
    "aten::is_same_size",
    "aten::size",
    "aten::stride",
    "aten::dim",
    "aten::promote_types",
    "aten::sparse_compressed_tensor",
}
# Operators that are no-ops when asked for what a tensor already is (`x.to(x.dtype)`): they launch
# only when they call another operator.
MAYBE_NO_OP = {"aten::to", "aten::type_as"}


def launches(step) -> Counter:
    """Operators of one profiled call of `step` that launch work, by name: the outermost aten
    operators (what a kernel implements; the operators one calls inside are its own business),
    less those that only view or allocate."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    counts = Counter()
    for event in profiler.events():
        if not event.name.startswith("aten::") or event.name in NO_KERNEL:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None and (event.name not in MAYBE_NO_OP or event.cpu_children):
            counts[event.name] += 1
    return counts


def layer_tokens(unet, method: str, switch: AdapterSwitch, step) -> dict[str, int]:
    """Tokens each adapted layer sees in one forward (batch x sequence), by layer name."""
    tokens = {}

    def record(name: str):
        def hook(module, args) -> None:
            tokens.setdefault(name, args[0].numel() // args[0].shape[-1])

        return hook

    with switch.using(method):
        hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in adapted_layers(unet).items()]
        try:
            with torch.no_grad():
                step()
        finally:
            for hook in hooks:
                hook.remove()
    return tokens


# Cross-attention keys and values read the text states, whose length does not grow with the image.
TEXT_INPUTS = ("attn2.to_k", "attn2.to_v")


def sddmm_chunks(unet, tokens: dict[str, int], scale: float, budget: int) -> int:
    """SDDMM chunks of one backward with `budget` elements per chunk, the image tokens times `scale`."""
    total = 0
    for name, layer in adapted_layers(unet).items():
        plan = layer.adapter._plan()
        count = tokens[name] if name.endswith(TEXT_INPUTS) else round(tokens[name] * scale)
        per_chunk = max(1, budget // (plan.rows.slots + plan.cols.slots))
        total += math.ceil(count / per_chunk)
    return total


@contextlib.contextmanager
def chunk_budget(elements: int):
    """Run the kernels on CPU with another SDDMM chunk budget."""
    saved = kernels.SDDMM_CHUNK_ELEMENTS["cpu"]
    kernels.SDDMM_CHUNK_ELEMENTS["cpu"] = elements
    try:
        yield
    finally:
        kernels.SDDMM_CHUNK_ELEMENTS["cpu"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights (half: under autocast)")
    parser.add_argument("--resolution", type=int, default=64, help="pixels of the profiled step (default: 64)")
    parser.add_argument("--at-resolution", type=int, default=1024, help="resolution of the derived CPU-chunk counts")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default="bench_launches.json", help="where to write the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype, device = DTYPES[args.dtype], torch.device("cpu")
    if args.model == "tiny":
        from sparse_dreambooth.model import load_pipeline

        os.environ.setdefault("SPARSE_DB_CACHE", os.path.join(tempfile.gettempdir(), "sparse-db-bench-cache"))
        unet = load_pipeline("tiny", torch_dtype=dtype).unet
    else:
        from sparse_dreambooth.sdxl_architecture import build_sdxl_unet

        unet = build_sdxl_unet(dtype=dtype)
    switch = AdapterSwitch(unet)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    batch = unet_inputs(unet.config, 1, args.resolution, device, dtype)
    steps = {method: training_step(unet, switch, method, batch, dtype, device) for method in METHODS}
    scale = (args.at_resolution / args.resolution) ** 2

    rows = []
    for method in METHODS:
        with switch.using(method):
            steps[method]()  # warm-up: plans, optimizer state
            with chunk_budget(kernels.ACCELERATOR_CHUNK_ELEMENTS):  # one chunk per layer, as on CUDA
                one_chunk = launches(steps[method])
        row = {"method": method, "launches": sum(one_chunk.values()), "top_ops": one_chunk.most_common(8)}
        if method != "lora":
            # One token per chunk: how many launches each further chunk adds (the filtering and the
            # sampled product), then CPU's cache-sized chunks counted at the target resolution.
            with switch.using(method), chunk_budget(1):
                per_token = launches(steps[method])
            tokens = layer_tokens(unet, method, switch, lambda: unet(timestep=batch[1], **batch[0]))
            layers = len(tokens)
            with switch.using(method):
                token_chunks = sddmm_chunks(unet, tokens, 1.0, 1)
                chunks_there = sddmm_chunks(unet, tokens, scale, kernels.SDDMM_CHUNK_ELEMENTS["cpu"])
            per_chunk = (sum(per_token.values()) - row["launches"]) / (token_chunks - layers)
            row.update(
                {
                    "sddmm_calls": one_chunk["aten::sparse_sampled_addmm"],
                    "launches_per_extra_chunk": per_chunk,
                    f"sddmm_calls_cpu_chunks_at_{args.at_resolution}px": chunks_there,
                    f"launches_cpu_chunks_at_{args.at_resolution}px": round(
                        row["launches"] + per_chunk * (chunks_there - layers)
                    ),
                }
            )
        rows.append(row)
        print(json.dumps({key: value for key, value in row.items() if key != "top_ops"}), flush=True)
    lora = rows[0]["launches"]
    for row in rows:
        row["vs_lora"] = row["launches"] / lora
    print(f"\n{'method':<14} {'launches/step':>13} {'x LoRA':>7}")
    for row in rows:
        print(f"{row['method']:<14} {row['launches']:13d} {row['vs_lora']:7.2f}")
    result = {"environment": environment(device, torch.get_num_threads()), "settings": vars(args), "rows": rows}
    with open(args.json, "w") as stream:
        json.dump(result, stream, indent=1)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
