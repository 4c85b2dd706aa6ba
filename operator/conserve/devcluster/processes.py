"""The control plane's processes: each started in a session (process group) of its own, recorded by pid and start
time (so a pid the OS has since given to someone else is told apart), and stopped with everything it spawned.

Linux only: liveness and process groups are read from /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    log: str
    cmd: list[str] = field(default_factory=list)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def alive(rec: ProcessRecord) -> bool:
    stat = _proc_stat(rec.pid)
    # A zombie is dead: with no init to reap it (some containers), it stays in /proc.
    return stat is not None and stat[0] != "Z" and stat[2] == rec.start_ticks


def foreign(rec: ProcessRecord) -> bool:
    """Whether the recorded pid now belongs to another process (ours is long gone)."""
    stat = _proc_stat(rec.pid)
    return stat is not None and stat[2] != rec.start_ticks


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask for SIGKILL when the parent dies (Linux prctl).
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def spawn(
    name: str, cmd: Sequence[str], *, log_path: Path, cwd: Path, die_with_parent: bool
) -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
    """Start `cmd` in a new session, its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    stat = _proc_stat(proc.pid)
    return ProcessRecord(name, proc.pid, stat[2] if stat else 0, str(log_path), list(cmd)), proc


def terminate(rec: ProcessRecord, popen: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL it if anything of it is still alive after `timeout_s`.

    `popen`: the Popen of a process this one started (polled, so it does not linger as a zombie), or None."""
    if foreign(rec):
        return  # our process is long gone and its pid now belongs to someone else
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not alive(rec) and not group_members(rec.pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)
    time.sleep(0.1)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a component's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
