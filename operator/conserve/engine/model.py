"""The tiny local model's cache folder: built once by ``tinymodel.py`` with the engine's Python, then reused."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from conserve.devcluster.build import cache_dir
from conserve.engine import tinymodel
from conserve.engine.install import engine_python

TINY_MODEL_NAME = "tiny-llama"


def model_dir() -> Path:
    return cache_dir() / "engine" / "models" / f"{TINY_MODEL_NAME}-v{tinymodel.MODEL_VERSION}"


def ensure_model() -> Path:
    """The tiny model's folder, built now if missing (a few seconds)."""
    target = model_dir()
    if (target / "conserve-model.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        subprocess.run(
            [str(engine_python()), tinymodel.__file__, str(staging)],
            check=True,
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        if target.exists():  # another process built it meanwhile
            shutil.rmtree(staging)
        else:
            staging.chmod(0o755)  # mkdtemp made it private; the servers may run as another user
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
