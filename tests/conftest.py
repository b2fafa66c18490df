"""Set-up shared by every test, and the helpers the test files have in common.

Test files import the helpers by name (`from conftest import FAST, run_cli`); pytest puts this
folder on the import path.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach the Hub; the tiny model and demo subject are built into a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread in this process and every subprocess a test starts (set before torch is imported):
# the tiny model gains nothing from two, a busy machine makes OpenMP spin-waits very slow, and
# runs compared bit for bit across processes then share one reduction order.
os.environ["OMP_NUM_THREADS"] = "1"

from typer.testing import CliRunner  # noqa: E402  (after the environment above)

from sparse_dreambooth import data  # noqa: E402
from sparse_dreambooth.cli import app  # noqa: E402
from sparse_dreambooth.errors import UserError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The tiny recipe at its smallest: 32 px, no checkpoints. Tests add --steps and --subject.
FAST = ["--config", str(CONFIGS / "tiny.yaml"), "--resolution", "32", "--checkpoint-every", "0"]

# Three real DreamBooth subjects (two objects, one live), downscaled to 128 px, laid out as the
# dataset is and committed with their credits (fixtures/dreambooth/CREDITS.md), so every test that
# needs real photos runs on a fresh clone.
FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "dreambooth"
FIXTURE_SUBJECTS = ("backpack", "bear_plushie", "dog6")


def _find_whole_dataset() -> tuple[Path, str | None]:
    """Where the package itself would look for the dataset ($SPARSE_DB_DATA, else the default data
    root), and why the whole dataset is not there (None when it is)."""
    root = data.resolve_data_root(None)
    where = (
        f"$SPARSE_DB_DATA={root}" if os.environ.get("SPARSE_DB_DATA") else f"{root} (default; $SPARSE_DB_DATA unset)"
    )
    try:
        classes, _, _ = data.read_prompts_and_classes(root)
    except UserError:
        return root, f"needs the whole DreamBooth dataset, not found at {where}; set SPARSE_DB_DATA to its folder"
    missing = [name for name in sorted(classes) if not (root / name).is_dir()]
    if missing:
        return root, f"needs the whole DreamBooth dataset; {where} lacks {len(missing)} subjects ({missing[0]}, ...)"
    return root, None


WHOLE_DATASET, WHOLE_DATASET_MISSING = _find_whole_dataset()
# Found once; no other test may depend on the environment's data root, so it goes.
os.environ.pop("SPARSE_DB_DATA", None)


@pytest.fixture(scope="session")
def whole_dataset() -> Path:
    """The full 30-subject dataset; a test asking for it skips, saying why, where it is not found."""
    if WHOLE_DATASET_MISSING:
        pytest.skip(WHOLE_DATASET_MISSING)
    return WHOLE_DATASET


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sparse-db-cache")
    previous = os.environ.get("SPARSE_DB_CACHE")
    os.environ["SPARSE_DB_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SPARSE_DB_CACHE", None)
    else:
        os.environ["SPARSE_DB_CACHE"] = previous


# --- running the CLI ----------------------------------------------------------------------------


def run_cli(*args) -> str:
    """`sparse-db ARGS` in this process; it must succeed. Returns what it printed."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def cli_error(*args) -> str:
    """`sparse-db ARGS` in this process; it must fail with a UserError, whose message is returned."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert isinstance(result.exception, UserError), result.output
    return str(result.exception)


def run_subprocess(*args, cache: Path, wait=True):
    """`sparse-db ARGS` in a subprocess with its own model cache: the entry point a user runs,
    with its exit code and its stderr. With wait=False, the running Popen (stdout/stderr piped)."""
    environment = {**os.environ, "SPARSE_DB_CACHE": str(cache)}
    command = [sys.executable, "-m", "sparse_dreambooth", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def assert_user_error(result, *fragments, cache: Path | None = None):
    """Exit 2, one line naming the fix, no traceback; and (given the cache) no model was built."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sparse-db: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if cache is not None:
        assert not list(cache.glob("tiny-sdxl-*")), "a model was loaded before the input was checked"


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def launch(*args: str, processes: int = 2, script: Path | None = None) -> None:
    """The CLI (or `script`) under `accelerate launch` with two gloo processes on the CPU; it must succeed."""
    program = [str(script)] if script is not None else ["-m", "sparse_dreambooth"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_port=0",  # a free port: never meet another job's rendezvous on the default 29500
        *program,
        *args,
    ]
    # PYTHONFAULTHANDLER: if the launch hangs, SIGABRT makes every process print each thread's stack,
    # so a failure says where it stuck instead of only that it timed out.
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for pid in _descendants(process.pid):  # the workers, each in a session of its own
            os.kill(pid, signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # the launcher itself is stuck
            process.send_signal(signal.SIGABRT)
            _, stderr = process.communicate()
        pytest.fail(f"launch hung; stacks at SIGABRT:\n{stderr[-12000:]}")
    assert process.returncode == 0, stderr[-3000:]
