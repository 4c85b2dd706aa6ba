"""Progress bars that suit where the output goes.

On a terminal a bar redraws in place (tqdm's usual carriage-return frames, several a second). Into a file or a
pipe (CI logs, `make demo > log`) those frames would pile up as one endless line of carriage returns, so there
each frame becomes a line of its own, and frames come at most once every `LOG_INTERVAL_S` seconds (plus the
first and the last), which keeps a log readable whatever the run's length.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL_S = 10.0


class _LineWriter:
    """A stream for tqdm that writes each frame as one line (no carriage returns, no blank-padding frames)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int | None,
    *,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    stream: IO[str] | None = None,
    log_interval_s: float = LOG_INTERVAL_S,
    **options: Any,
) -> tqdm[Any]:
    """A tqdm bar on `stream` (default stderr): in place on a terminal, one line per `log_interval_s` elsewhere.

    `options` go to tqdm (for example `smoothing`); on a terminal `leave` is honoured, elsewhere the last frame
    is always kept (a log should say where the run ended).
    """
    out = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True)
    if is_terminal(out):
        return tqdm(total=total, desc=desc, unit=unit, file=out, **options)
    options.pop("leave", None)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_LineWriter(out),
        mininterval=log_interval_s,
        # tqdm's monitor thread would lower the interval towards maxinterval: keep them equal.
        maxinterval=log_interval_s,
        ascii=True,
        ncols=100,
        leave=True,
        dynamic_ncols=False,
        **options,
    )
