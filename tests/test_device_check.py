"""scripts/device_check.sh --device cpu: the device check's steps at small sizes, and its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


@pytest.mark.slow
def test_device_check_runs_every_step_on_cpu_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "check"
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(SCRIPT), "--device", "cpu", "--out", str(out)], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["device"] == "cpu"
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(
        ("kernels", "adapters", "step", "determinism"), "passed"
    )
    kernels = report["kernel_tests"]
    assert kernels["failures"] == kernels["errors"] == 0
    assert kernels["parity_cases_run"] and all("cpu" in case for case in kernels["parity_cases_run"])
    assert {"lora", "waveft", "random-sparse"} <= {row["method"] for row in report["adapters"]["rows"]}
    step_methods = {row["method"] for row in report["step"]["rows"] if row["kind"] == "train"}
    assert step_methods == {"lora", "waveft", "random-sparse", "peft-waveft"}
    assert report["step"]["settings"]["dtype"] == "bf16" and report["step"]["settings"]["checkpointing"] == ["on"]
    assert report["step"]["max_rss_bytes"] > 0
    # On CPU the deterministic sum gives index_add_'s bits: the whole run is the same bytes either way.
    assert report["determinism"] == {
        "device": "cpu",
        "deterministic_runs_identical": True,
        "default_equals_deterministic": True,
    }
    summary = (out / "device_check.md").read_text()
    for heading in ("# Device check", "## Kernel tests", "## One layer", "## Training step", "## Determinism"):
        assert heading in summary
