"""The package as a user installs it: a wheel built from the checkout, installed into a fresh virtual environment,
finds its traces (package data) with no flag, away from any source tree.

No network: the wheel is built without build isolation (setuptools and wheel come with the dev extras) and
installed without dependencies; the new environment borrows the test environment's third-party packages
through a path file, which does not run the checkout's editable-install hook, so `conserve` itself can only
come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRACE_DATA = (
    "conserve/sim/traces/README.md",
    "conserve/sim/traces/mooncake/conversation_trace.jsonl",
    "conserve/sim/traces/mooncake/LICENSE-APACHE",
    "conserve/sim/traces/azure/AzureLLMInferenceTrace_conv.csv",
    "conserve/sim/traces/azure/LICENSE-CC-BY-4.0",
)


def _check(*cmd: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of what the package is made of, so the checkout gets no build/ or egg-info.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "operator", src / "operator", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    _check(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src, cwd=src)
    (found,) = dist.glob("conserve-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh environment holding the wheel."""
    env = tmp_path_factory.mktemp("venv")
    _check(sys.executable, "-m", "venv", "--without-pip", env, cwd=env)
    python = env / "bin" / "python"
    _check(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=env)
    purelib = Path(_check(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=env).strip())
    (purelib / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_holds_the_traces_their_licenses_and_readme(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in TRACE_DATA if n not in names] == []
    shipped = zipfile.ZipFile(wheel).read("conserve/sim/traces/mooncake/conversation_trace.jsonl")
    assert shipped == (REPO / "operator" / TRACE_DATA[1]).read_bytes()


def test_installed_package_finds_its_traces_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = _check(
        installed,
        "-c",
        "import conserve, conserve.sim.workload as w; print(conserve.__file__); print(w.default_trace_dir())",
        cwd=tmp_path,
    ).split()
    prefix = str(installed.parent.parent)
    assert where[0].startswith(prefix), f"conserve imported from {where[0]}, not from the wheel"
    assert where[1].startswith(prefix)


@pytest.mark.parametrize(("command", "workload"), [("simulate", "mooncake"), ("bench", "azure")])
def test_installed_commands_replay_a_shipped_trace_with_no_flag(
    installed: Path, tmp_path: Path, command: str, workload: str
) -> None:
    args = ["--workload", workload, "--duration-s", "30", "--no-progress", "--out", str(tmp_path / "out")]
    out = _check(installed, "-m", "conserve.cli", command, *args, cwd=tmp_path)
    assert f"== {workload} on the tiered fleet (" in out
    assert (tmp_path / "out" / "results.json").is_file()
