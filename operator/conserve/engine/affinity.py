"""Keep every thread of a vLLM server that is pinned to a core on the server's own cores (Linux).

`VLLM_CPU_OMP_THREADS_BIND` pins the compute (OpenMP) threads, the worker's main thread among them: with one core,
that thread runs the model. vLLM's NIXL worker (NixlConnectorWorker on CPU) then calls ``sched_setaffinity(0,
...)`` from that main thread, pinning it to the last core of each NUMA node whatever that variable says (to keep KV
loads off the compute cores); threads it starts afterwards inherit that core. On a small host the prefill server's
model thread thus runs on the last core, the decoder's own, beside the decoder's model thread and its spinning UCX
progress thread, while the prefill server's core holds little but its own spinning thread. Measured on 2 cores
(issue 23; `conserve demo --engine vllm` and the same stack with more conversations): a fresh 2,850-token prefill
took 1.0-1.5 s (median of 6-8 per run) against 0.2-0.5 s once confined; and while a finished prefill's blocks
waited for the decoder's pull, the prefill server's engine loop (which steps about every millisecond then) took
most of the decoder's core: the decoder's first token 7-24 s late, its thread runnable but on the CPU for 1 s of
24. (A prefill server alone on the host is faster unconfined, 0.12 against 0.21 s for 800 words: its model thread
then has the other core to itself.)

`confine_group` moves the threads pinned outside the server's cores back onto them; threads left free to run
anywhere (the API server, the engine core) stay free.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROC = Path("/proc")


def parse_cpu_list(spec: str) -> frozenset[int] | None:
    """A core list as VLLM_CPU_OMP_THREADS_BIND takes it ("1", "0-3", "0,2"); None for "auto" or "all"."""
    if spec.strip() in ("", "auto", "all"):
        return None
    cores: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return frozenset(cores)


def group_threads(pgid: int, proc: Path = PROC) -> list[int]:
    """Thread ids of every process in process group ``pgid`` (those that exit meanwhile are skipped)."""
    tids: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the command name (which may hold spaces or parentheses): state, ppid, pgrp, ...
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            tids.extend(int(task.name) for task in (entry / "task").iterdir())
        except (OSError, ValueError, IndexError):
            continue
    return tids


def confine_group(pgid: int, cores: frozenset[int]) -> int:
    """Pin onto ``cores`` every thread of the group that is pinned elsewhere (its allowed cores are neither all
    of this host's nor within ``cores``); returns how many moved."""
    everywhere = os.sched_getaffinity(0) | cores
    moved = 0
    for tid in group_threads(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            allowed = os.sched_getaffinity(tid)
            if allowed <= cores or allowed >= everywhere:
                continue
            os.sched_setaffinity(tid, cores)
            moved += 1
    return moved
