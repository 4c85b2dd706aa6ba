"""A vLLM server's threads pinned off its own cores are moved back (what vLLM's NIXL worker does to its model
thread, played by a child process that pins one of its threads to another core); free threads stay free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conserve.engine.affinity import confine_group, group_threads, parse_cpu_list
from conserve.engine.server import VllmServer, VllmServerConfig

# Like NixlConnectorWorker on CPU: one thread pins itself (sched_setaffinity(0, ...) acts on the calling thread).
CHILD = """
import os, sys, threading, time
ready = threading.Event()
def pinned():
    os.sched_setaffinity(0, {int(sys.argv[1])})
    ready.set()
    time.sleep(120)
thread = threading.Thread(target=pinned, daemon=True)
thread.start()
ready.wait()
print(threading.get_native_id(), thread.native_id, flush=True)
time.sleep(120)
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int, int, list[int]]]:
    """A process group whose main thread may run anywhere and whose other thread is pinned to the last core."""
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, f"this test needs two cores to pin on, has {cores}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cores[-1])], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        main_tid, pinned_tid = (int(x) for x in proc.stdout.readline().split())
        yield proc, main_tid, pinned_tid, cores
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_thread_pinned_off_the_servers_core_is_moved_onto_it_and_free_threads_stay_free(
    child: tuple[subprocess.Popen[str], int, int, list[int]],
) -> None:
    proc, main_tid, pinned_tid, cores = child
    own = frozenset({cores[0]})
    assert os.sched_getaffinity(pinned_tid) == {cores[-1]}
    assert {main_tid, pinned_tid} <= set(group_threads(proc.pid))

    assert confine_group(proc.pid, own) == 1
    assert os.sched_getaffinity(pinned_tid) == own
    assert os.sched_getaffinity(main_tid) == set(cores)
    assert confine_group(proc.pid, own) == 0  # nothing left to move


def test_a_server_on_auto_cores_is_left_as_vllm_pinned_it(tmp_path: Path) -> None:
    server = VllmServer(
        VllmServerConfig(
            model_dir=tmp_path, served_model_name="m", role="prefill", port=1, side_channel_port=2, work_dir=tmp_path
        )
    )
    assert server.config.cpu_bind == "auto"
    assert server.confine() == 0


def test_core_lists_read_as_vllm_cpu_omp_threads_bind_writes_them() -> None:
    assert parse_cpu_list("1") == frozenset({1})
    assert parse_cpu_list("0-3") == frozenset({0, 1, 2, 3})
    assert parse_cpu_list("0,2-3") == frozenset({0, 2, 3})
    assert parse_cpu_list("auto") is None
    assert parse_cpu_list("all") is None
