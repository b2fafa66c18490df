"""Files and folders the project writes carry the modes a plain open()/mkdir() would give them.

The oracle is the umask rule itself (0o666 / 0o777 minus the umask), applied to everything found
under the run, export and cache folders after real CLI commands in a subprocess with that umask.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Runs in a fresh interpreter so the umask (process-wide, and read once by the package) is the test's.
SCRIPT = """
import os, sys
os.umask(int(sys.argv[1], 8))
from typer.testing import CliRunner
from sparse_dreambooth.cli import app
root = sys.argv[2]
def run(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
run("train", "--config", sys.argv[3], "--resolution", "32", "--subject", "demo", "--method", "waveft",
    "--steps", "2", "--checkpoint-every", "1", "--validate-every", "2", "--output", root + "/run")
run("sample", "--run", root + "/run", "--num-steps", "2", "--seeds", "42", "--prompt", "a zjw toy")
for name in ("diffusers", "peft", "kohya", "merged"):
    out = root + "/export/" + name + (".safetensors" if name == "kohya" else "")
    rank = ["--rank", "1"] if name in ("diffusers", "kohya") else []
    run("export", "--run", root + "/run", "--format", name, "--out", out, *rank)
"""


def modes_under(folder: Path) -> dict[str, int]:
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            if not path.is_symlink() and name != ".lock":
                found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_written_has_the_mode_open_would_give(tmp_path, umask):
    cache = tmp_path / "cache"
    environment = {**os.environ, "SPARSE_DB_CACHE": str(cache)}
    command = [sys.executable, "-c", SCRIPT, oct(umask)[2:], str(tmp_path), str(CONFIGS / "tiny.yaml")]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = modes_under(tmp_path / "run") | modes_under(tmp_path / "export") | modes_under(cache)
    kinds = {Path(name).suffix for name in found}
    assert {".safetensors", ".json", ".yaml", ".png"} <= kinds, kinds
    assert any("checkpoint" in name for name in found), "the run kept a checkpoint folder"
    wrong = {}
    for name, mode in found.items():
        is_folder = Path(tmp_path / "run" / name).is_dir() or Path(tmp_path / "export" / name).is_dir()
        is_folder = is_folder or Path(cache / name).is_dir()
        expected = (0o777 if is_folder else 0o666) & ~umask
        if mode != expected:
            wrong[name] = oct(mode)
    assert not wrong, f"expected {oct(0o666 & ~umask)} files / {oct(0o777 & ~umask)} folders: {wrong}"
