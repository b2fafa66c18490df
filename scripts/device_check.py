"""The device check: every GPU-side claim of the project, measured in one command on one machine.

    scripts/device_check.sh --out device-check               # CUDA: at most 8 minutes
    scripts/device_check.sh --device cpu --out device-check  # the same steps at small sizes

For a CUDA machine with the project and a CUDA torch installed, and no network. Steps, each in
its own process with a time limit (a step that fails or runs out of time is reported, and the
others still run):

1. kernels: the kernel tests (tests/test_kernels.py; on CUDA their `cuda` variants run: fused and
   delta kernels against the reference kernel, fp32 and bf16);
2. adapters: scripts/bench_adapters.py, one layer at SDXL's shapes, every method;
3. step: scripts/bench_step.py, on CUDA the full SDXL architecture (built from its config, no
   download) at 1024 px in bf16 with gradient checkpointing, for LoRA, WaveFT, random-sparse and
   PEFT's WaveFT, with peak memory; on CPU the tiny model;
4. determinism: the tiny model trained three times on the device, twice with
   `--deterministic` and once without; are the adapters the same bytes?

Writes into --out: device_check.json (everything, with each step's own JSON), device_check.md
(the summary tables), and each step's output (*.log).
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from sparse_dreambooth.files import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PARITY_TEST = "test_fused_and_delta_kernels_match_the_reference_kernel"  # in tests/test_kernels.py, per device


def steps(device: str, out: Path) -> dict[str, tuple[list[str], int]]:
    """Each step's command and time limit in seconds: full sizes on CUDA, small ones on CPU."""
    python = sys.executable
    cuda = device == "cuda"
    kernel_tests = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_kernels.py"),
        f"--junitxml={out / 'kernel_tests.xml'}",
    ]
    if not cuda:
        kernel_tests += ["-k", PARITY_TEST]  # the parity tests' CPU variants, as on CUDA
    adapters = [python, str(SCRIPTS / "bench_adapters.py"), "--device", device, "--json", str(out / "adapters.json")]
    adapters += ["--repeats", "10", "--threads", "0"] if cuda else ["--repeats", "2", "--warmup", "1"]
    if not cuda:
        adapters += ["--tokens-scale", "0.05"]
    step = [python, str(SCRIPTS / "bench_step.py"), "--device", device, "--json", str(out / "step.json")]
    step += ["--dtype", "bf16", "--checkpointing", "on", "--sample-repeats", "0", "--methods", "lora", "waveft"]
    step += ["random-sparse", *(["peft-waveft"] if importlib.util.find_spec("peft") else [])]
    if cuda:
        step += ["--models", "sdxl", "--sdxl-resolution", "1024", "--repeats", "3", "--memory", "--threads", "0"]
    else:
        step += ["--models", "tiny", "--tiny-resolution", "32", "--repeats", "1", "--warmup", "0"]
    determinism = [python, str(Path(__file__).resolve()), "--determinism", "--device", device, "--out", str(out)]
    return {
        "kernels": (kernel_tests, 120 if cuda else 60),
        "adapters": (adapters, 90 if cuda else 60),
        "step": (step, 210 if cuda else 90),
        "determinism": (determinism, 60 if cuda else 60),
    }


def run_step(name: str, command: list[str], limit: int, out: Path, environment: dict) -> dict:
    started = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as stream:
        try:
            code = subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT, timeout=limit, env=environment, cwd=ROOT
            ).returncode
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"out of time ({limit} s)"
    seconds = time.perf_counter() - started
    print(f"{name}: {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "command": command, "log": log.name}


def kernel_results(out: Path) -> dict | None:
    path = out / "kernel_tests.xml"
    if not path.is_file():
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    cases = [
        case.get("name")
        for case in suite.iter("testcase")
        if case.find("skipped") is None and case.get("name", "").startswith(PARITY_TEST)
    ]
    return {**counts, "parity_cases_run": cases}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def determinism(device: str, out: Path) -> None:
    """Train the tiny model three times in this process and compare the adapters' tensors."""
    import torch

    from sparse_dreambooth.adapters import read_adapter
    from sparse_dreambooth.config import merge_settings, read_yaml
    from sparse_dreambooth.train import train

    flags = {"subject": "demo", "resolution": 32, "steps": 3, "checkpoint_every": 0}
    runs = {"deterministic 1": True, "deterministic 2": True, "default": False}
    adapters = {}
    for name, deterministic in runs.items():
        folder = out / "determinism" / name.replace(" ", "-")
        settings = {**flags, "deterministic": deterministic, "output": str(folder)}
        train(merge_settings(read_yaml(ROOT / "configs" / "tiny.yaml"), settings), overwrite=True)
        adapters[name] = read_adapter(folder / "adapter.safetensors")[1]

    def same(a: str, b: str) -> bool:
        return adapters[a].keys() == adapters[b].keys() and all(
            torch.equal(adapters[a][key], adapters[b][key]) for key in adapters[a]
        )

    result = {
        "device": device,
        "deterministic_runs_identical": same("deterministic 1", "deterministic 2"),
        "default_equals_deterministic": same("default", "deterministic 1"),
    }
    write_json(out / "determinism.json", result)
    print(json.dumps(result))


def markdown(report: dict) -> str:
    lines = [f"# Device check: {report['machine']}", ""]
    lines += [f"{report['command']}", "", f"torch {report['torch']}, python {report['python']}", ""]
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {step['status']} | {step['seconds']} |" for name, step in report["steps"].items()]
    kernels = report.get("kernel_tests")
    if kernels:
        lines += ["", "## Kernel tests", ""]
        lines += [
            f"{kernels['tests']} tests, {kernels['failures']} failures, {kernels['errors']} errors, "
            f"{kernels['skipped']} skipped; parity cases run: {len(kernels['parity_cases_run'])}"
        ]
    adapters = report.get("adapters")
    if adapters:
        lines += ["", "## One layer (bench_adapters.py)", ""]
        lines += ["| shape | method | ms | × LoRA | peak MiB |", "|---|---|---:|---:|---:|"]
        for row in adapters["rows"]:
            shape = f"{row['in']}→{row['out']} ×{row['tokens']}"
            lines.append(
                f"| {shape} | {row['method']} | {row['median_ms']:.2f} | {row['time_vs_lora']:.2f} | "
                f"{row['peak_bytes'] / 2**20:.1f} |"
            )
    step = report.get("step")
    if step:
        lines += ["", "## Training step (bench_step.py)", ""]
        lines += ["| model | px | method | ms | × LoRA | peak MiB |", "|---|---:|---|---:|---:|---:|"]
        for row in step["rows"]:
            peak = f"{row['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in row else "-"
            lines.append(
                f"| {row['model']} | {row['resolution']} | {row['method']} | {row['median_ms']:.1f} | "
                f"{row['time_vs_lora']:.2f} | {peak} |"
            )
        for key in ("max_memory_allocated_bytes", "max_rss_bytes"):
            if key in step:
                lines += ["", f"{key}: {step[key] / 2**30:.2f} GiB"]
    determinism = report.get("determinism")
    if determinism:
        lines += ["", "## Determinism (tiny model, 3 steps)", ""]
        lines += [
            f"- two `--deterministic` runs give the same adapter bytes: {determinism['deterministic_runs_identical']}",
            f"- a default run gives the same bytes as a deterministic one: "
            f"{determinism['default_equals_deterministic']}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown and logs")
    parser.add_argument("--determinism", action="store_true", help=argparse.SUPPRESS)  # step 4, in its own process
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.determinism:
        determinism(args.device, args.out)
        return

    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        environment.update({"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""})
    started = time.perf_counter()
    plan = steps(args.device, args.out)
    results = {name: run_step(name, command, limit, args.out, environment) for name, (command, limit) in plan.items()}
    machine = platform.processor() or platform.machine()
    step = read_json(args.out / "step.json")
    if step:
        machine = step["environment"]["machine"]
    report = {
        "command": " ".join(["scripts/device_check.sh", *sys.argv[1:]]),
        "device": args.device,
        "machine": machine,
        "python": platform.python_version(),
        "torch": _torch_version(),
        "seconds": round(time.perf_counter() - started, 1),
        "steps": results,
        "kernel_tests": kernel_results(args.out),
        "adapters": read_json(args.out / "adapters.json"),
        "step": step,
        "determinism": read_json(args.out / "determinism.json"),
    }
    write_json(args.out / "device_check.json", report)
    write_text(args.out / "device_check.md", markdown(report))
    print(f"written: {args.out / 'device_check.json'} and {args.out / 'device_check.md'} ({report['seconds']:.0f} s)")
    if any(step["status"] != "passed" for step in results.values()):
        sys.exit(1)


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


if __name__ == "__main__":
    main()
