"""Progress bars: in place on a terminal, a few plain lines in a file or a pipe (CI logs, `make demo > log`)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import tqdm as tqdm_module
import tqdm.std

from conserve.cli import main
from conserve.progress import progress_bar
from conserve.testkit import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """tqdm's clock, moved by the test; its monitor thread (which reads the real clock) off."""
    fake = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", fake)
    monkeypatch.setattr(tqdm_module.tqdm, "monitor_interval", 0)
    return fake


def _run(stream: IO[str], clock: FakeClock, *, steps: int, step_s: float, **options: Any) -> None:
    with progress_bar(steps, desc="replay", unit="turn", stream=stream, **options) as bar:
        for _ in range(steps):
            clock.advance(step_s)
            bar.update(1)


def test_into_a_file_one_line_per_interval_at_most(clock: FakeClock) -> None:
    out = io.StringIO()
    _run(out, clock, steps=2000, step_s=0.05, log_interval_s=10.0, leave=False)  # 100 s of work
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first frame, one at most every 10 s of the 100 s, the last one
    assert 3 <= len(lines) <= 100 / 10 + 2, lines
    assert lines[0].startswith("replay:")
    assert "0/2000" in lines[0]
    assert "2000/2000" in lines[-1]  # a log says where the run ended, even with leave=False


def test_set_description_without_refresh_adds_no_line(clock: FakeClock) -> None:
    out = io.StringIO()
    with progress_bar(10, stream=out, log_interval_s=10.0) as bar:
        for i in range(10):
            bar.set_description(f"run {i}", refresh=False)
            bar.update(1)
    assert len(out.getvalue().splitlines()) == 2  # first and last frame


@pytest.fixture
def terminal() -> Iterator[tuple[io.TextIOWrapper, int]]:
    main_fd, child_fd = pty.openpty()
    stream = os.fdopen(child_fd, "w")
    try:
        yield stream, main_fd
    finally:
        stream.close()
        os.close(main_fd)


def test_on_a_terminal_the_bar_redraws_in_place(clock: FakeClock, terminal: tuple[io.TextIOWrapper, int]) -> None:
    stream, main_fd = terminal
    assert stream.isatty()
    _run(stream, clock, steps=20, step_s=0.5, leave=False)  # small: the terminal's buffer must not fill
    stream.flush()
    chunks = []
    while select.select([main_fd], [], [], 0.5)[0]:
        chunks.append(os.read(main_fd, 1 << 16))
    text = b"".join(chunks).decode()
    assert text.count("\r") >= 20  # a frame per update (0.5 s apart), each over the last
    assert "20/20" in text
    assert "\n" not in text  # never a new line: the bar stays on one line and is cleared at the end


def test_disabled_writes_nothing(clock: FakeClock) -> None:
    out = io.StringIO()
    _run(out, clock, steps=10, step_s=1.0, enabled=False)
    assert out.getvalue() == ""


def test_simulate_into_a_pipe_logs_lines_not_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * i, "input_length": 600, "output_length": 9, "hash_ids": [0, i]} for i in range(40)]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["simulate", "--workload", str(trace), "--policy", "all"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines(), "a progress line at least"
    assert len(err.splitlines()) <= 10
