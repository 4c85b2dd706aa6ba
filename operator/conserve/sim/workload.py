"""Workloads for the simulator by name or path: the Mooncake and Azure traces, and the synthetic agentic workload.

The model (turns, conversations, `Workload`) is in `conversations.py` and the agentic workload in `agentic.py`;
both are re-exported here, the module callers import. The trace formats:

- **Mooncake** (`conversation_trace.jsonl`, FAST'25): one JSON object per line with `timestamp` (ms),
  `input_length`, `output_length`, `hash_ids` (one id per 512-token block). Requests are not linked by an id;
  conversations are recovered by prefix containment, as the trace's README says: request B continues request A
  when A's full blocks (its hash_ids minus a last partial block) are a prefix of B's hash_ids. Among the
  earlier requests that match, the one with the longest such prefix is the parent (a trie walk, linear in the
  trace). A match must cover at least two blocks, so the system prompt shared by almost every request (block 0)
  never links two requests. A parent that already has a follow-up (28 such forks in the trace: a regenerated
  answer) does not get a second one: the fork starts a new conversation with its whole prompt as new input.
  A follow-up's reused prefix is min(parent input + parent output, its input) and the rest is new; when the
  follow-up's prompt is shorter than the parent's context (the client cut it) the rest of the old KV is dropped.
  The trace's timestamps are the earliest time each turn can arrive; a follow-up also waits for its previous
  turn to finish (a user answers what they have read).
- **Azure** (`AzureLLMInferenceTrace_conv.csv`, Splitwise, ISCA'24): `TIMESTAMP`, `ContextTokens`,
  `GeneratedTokens`. It has no conversation id and no prefix information, so every request is a single-turn
  conversation (choice documented here; no multi-turn structure is invented for it). Arrival times are
  relative to the first row.
- **Agentic**: see `agentic.py`.

A malformed line is reported with its line number and skipped, or, with `strict=True`, refused
(`TraceError`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from conserve.sim.agentic import AgenticParams, synthesize_agentic
from conserve.sim.conversations import (
    Conversation,
    ParseReport,
    Signals,
    Turn,
    Workload,
    arriving_before,
    scale_load,
)

__all__ = [
    "AZURE_FILE",
    "MOONCAKE_FILE",
    "AgenticParams",
    "Conversation",
    "Signals",
    "TraceError",
    "Turn",
    "Workload",
    "default_trace_dir",
    "load_azure",
    "load_mooncake",
    "load_workload",
    "parse_azure_lines",
    "parse_mooncake_lines",
    "recover_conversations",
    "scale_load",
    "synthesize_agentic",
]

MOONCAKE_BLOCK_TOKENS = 512
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A malformed trace line under strict parsing (or an unreadable trace)."""


class TraceFormatError(TraceError):
    """A whole file is not in the expected format (no usable header, or not one usable line); `detail` says how,
    without the path, so a caller that chose the format can say why it did."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.detail = detail


def _open_trace(path: Path, newline: str | None = None) -> TextIO:
    """The trace opened for reading; a missing file is a `TraceError` that names it."""
    if not path.exists():
        raise TraceError(f"{path}: file not found")
    if not path.is_file():
        raise TraceError(f"{path}: not a file")
    return path.open(encoding="utf-8", errors="replace", newline=newline)


def _refuse_unusable(report: ParseReport | None) -> None:
    """A trace without one usable request replays nothing: say so rather than report statistics of nothing."""
    if report is None:
        return
    if not report.skipped:
        raise TraceFormatError(report.path, "it holds no request")
    line_no, why = report.skipped[0]
    raise TraceFormatError(
        report.path, f"none of its {len(report.skipped)} non-empty line(s) is a usable request (line {line_no}: {why})"
    )


def _bad(report: ParseReport, line_no: int, why: str, strict: bool) -> None:
    if strict:
        raise TraceError(f"{report.path}:{line_no}: {why}")
    report.skipped.append((line_no, why))


# --- Mooncake ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    line_no: int
    timestamp_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]


def _nonneg_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def parse_mooncake_lines(
    lines: Iterable[str], *, path: str = "<mooncake>", strict: bool = False
) -> tuple[list[_Request], ParseReport]:
    report = ParseReport(path)
    requests: list[_Request] = []
    for line_no, raw in enumerate(lines, start=1):
        report.lines = line_no
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            _bad(report, line_no, f"not JSON ({exc.msg})", strict)
            continue
        if not isinstance(obj, dict):
            _bad(report, line_no, "not a JSON object", strict)
            continue
        ts = obj.get("timestamp")
        inp = _nonneg_int(obj.get("input_length"))
        out = _nonneg_int(obj.get("output_length"))
        hashes = obj.get("hash_ids")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or ts < 0 or not math.isfinite(ts):
            _bad(report, line_no, "timestamp missing or not a non-negative number", strict)
            continue
        if inp is None or inp == 0 or out is None:
            _bad(report, line_no, "input_length/output_length missing or not a positive/non-negative integer", strict)
            continue
        if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
            _bad(report, line_no, "hash_ids missing or not a list of integers", strict)
            continue
        requests.append(_Request(line_no, float(ts) / 1000.0, inp, max(out, 1), tuple(hashes)))
    requests.sort(key=lambda r: (r.timestamp_s, r.line_no))
    return requests, report


def recover_conversations(requests: Sequence[_Request], *, name_prefix: str = "mc") -> list[Conversation]:
    """Link requests into conversations by prefix containment (see the module docstring)."""
    parent = _link_follow_ups(requests)
    chains: dict[int, list[int]] = {}
    root_of: list[int] = [0] * len(requests)
    for i, p in enumerate(parent):
        root_of[i] = i if p is None else root_of[p]
        chains.setdefault(root_of[i], []).append(i)
    return [
        Conversation(f"{name_prefix}-{root:05d}", requests[root].timestamp_s, _chain_turns(requests, chains[root]))
        for root in sorted(chains, key=lambda r: (requests[r].timestamp_s, r))
    ]


def _link_follow_ups(requests: Sequence[_Request]) -> list[int | None]:
    """Each request's parent (the earlier request it continues), or None: a trie walk over the hash ids."""
    end = -1  # trie key marking "a request's full-block prefix ends here" (hash ids are non-negative)
    trie: dict[int, object] = {}
    parent: list[int | None] = [None] * len(requests)
    has_child: set[int] = set()
    for i, req in enumerate(requests):
        node: dict[int, object] = trie
        best: int | None = None
        for depth, h in enumerate(req.hash_ids, start=1):
            child = node.get(h)
            if not isinstance(child, dict):
                break
            node = child
            found = node.get(end)
            if depth >= 2 and isinstance(found, int) and found not in has_child:
                best = found
        if best is not None:
            parent[i] = best
            has_child.add(best)
        full = len(req.hash_ids) - (1 if req.input_tokens % MOONCAKE_BLOCK_TOKENS else 0)
        if full >= 2:
            node = trie
            for h in req.hash_ids[:full]:
                nxt = node.setdefault(h, {})
                assert isinstance(nxt, dict)
                node = nxt
            node[end] = i
    return parent


def _chain_turns(requests: Sequence[_Request], chain: Sequence[int]) -> tuple[Turn, ...]:
    """The turns of one conversation: a follow-up reuses what its previous turn's context holds of its prompt."""
    turns: list[Turn] = []
    prev: _Request | None = None
    for i in chain:
        req = requests[i]
        if prev is None:
            turns.append(Turn(req.input_tokens, req.input_tokens, req.output_tokens, req.timestamp_s))
        else:
            reused = min(prev.input_tokens + prev.output_tokens, req.input_tokens - 1)
            turns.append(Turn(req.input_tokens, req.input_tokens - reused, req.output_tokens, req.timestamp_s))
        prev = req
    return tuple(turns)


def load_mooncake(path: Path, *, strict: bool = False, duration_s: float | None = None) -> Workload:
    with _open_trace(path) as f:
        requests, report = parse_mooncake_lines(f, path=str(path), strict=strict)
    if not requests:
        _refuse_unusable(report)
    conversations = recover_conversations(requests)
    return Workload("mooncake", tuple(arriving_before(conversations, duration_s)), report)


# --- Azure -------------------------------------------------------------------------------------------------


def _parse_azure_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits; datetime takes at most six.
    head, _, frac = text.strip().partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def parse_azure_lines(lines: Iterable[str], *, path: str = "<azure>", strict: bool = False) -> Workload:
    report = ParseReport(path)
    reader = csv.reader(lines)
    header: list[str] | None = None
    rows: list[tuple[float, int, int, int]] = []
    for line_no, row in enumerate(reader, start=1):
        report.lines = line_no
        if header is None:
            header = [c.strip() for c in row]
            missing = [c for c in AZURE_COLUMNS if c not in header]
            if missing:
                raise TraceFormatError(
                    path,
                    f"its first line lacks the column(s) {', '.join(missing)} "
                    f"(it has: {', '.join(header) or 'nothing'}; an Azure trace has {', '.join(AZURE_COLUMNS)})",
                )
            continue
        if not row or all(not c.strip() for c in row):
            continue
        try:
            record = dict(zip(header, row, strict=True))
            ts = _parse_azure_time(record["TIMESTAMP"])
            ctx = int(record["ContextTokens"])
            gen = int(record["GeneratedTokens"])
        except (ValueError, KeyError) as exc:
            _bad(report, line_no, f"bad row ({exc})", strict)
            continue
        if ctx <= 0 or gen < 0:
            _bad(report, line_no, "ContextTokens must be positive and GeneratedTokens non-negative", strict)
            continue
        rows.append((ts, line_no, ctx, max(gen, 1)))
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    conversations = tuple(
        Conversation(f"az-{line_no:05d}", ts - t0, (Turn(ctx, ctx, gen, ts - t0),)) for ts, line_no, ctx, gen in rows
    )
    return Workload("azure", conversations, report)


def load_azure(path: Path, *, strict: bool = False, duration_s: float | None = None) -> Workload:
    with _open_trace(path, newline="") as f:
        workload = parse_azure_lines(f, path=str(path), strict=strict)
    if not workload.conversations:
        _refuse_unusable(workload.report)
    return Workload(workload.name, tuple(arriving_before(workload.conversations, duration_s)), workload.report)


# --- by name or path ---------------------------------------------------------------------------------------


def default_trace_dir() -> Path:
    """The traces shipped with the package (`conserve/sim/traces`, package data: the same folder in a source
    checkout and in an installed wheel; its README says where each trace comes from). `--trace-dir` replaces it."""
    return Path(__file__).resolve().with_name("traces")


MOONCAKE_FILE = "mooncake/conversation_trace.jsonl"
AZURE_FILE = "azure/AzureLLMInferenceTrace_conv.csv"


def load_workload(
    spec: str,
    *,
    seed: int = 0,
    duration_s: float | None = None,
    strict: bool = False,
    trace_dir: Path | None = None,
    load_scale: float = 1.0,
) -> Workload:
    """`mooncake`, `azure`, `agentic`, or a path to a trace file (.jsonl: Mooncake format, .csv: Azure format).

    `duration_s` keeps what arrives in the first seconds of the workload; `load_scale` then compresses arrivals
    (`scale_load`), so the same conversations arrive faster.
    """
    return scale_load(
        _load_workload(spec, seed=seed, duration_s=duration_s, strict=strict, trace_dir=trace_dir), load_scale
    )


def _load_workload(spec: str, *, seed: int, duration_s: float | None, strict: bool, trace_dir: Path | None) -> Workload:
    base = trace_dir or default_trace_dir()
    if spec == "mooncake":
        return load_mooncake(base / MOONCAKE_FILE, strict=strict, duration_s=duration_s)
    if spec == "azure":
        return load_azure(base / AZURE_FILE, strict=strict, duration_s=duration_s)
    if spec == "agentic":
        return synthesize_agentic(seed, duration_s if duration_s is not None else 3600.0)
    path = Path(spec)
    if not path.exists():
        if path.suffix or len(path.parts) > 1:
            raise TraceError(f"{path}: file not found")
        raise TraceError(f"unknown workload {spec!r}: not mooncake, azure or agentic, and {path}: file not found")
    # The format follows the name: there is no reliable way to tell a CSV from JSON lines by a damaged first line.
    as_azure = path.suffix.lower() == ".csv"
    why = "its name ends in .csv" if as_azure else "its name does not end in .csv"
    try:
        loaded = (load_azure if as_azure else load_mooncake)(path, strict=strict, duration_s=duration_s)
    except TraceFormatError as exc:
        kind = "an Azure trace (CSV)" if as_azure else "a Mooncake trace (JSON lines)"
        raise TraceError(f"{path}: read as {kind} because {why}; {exc.detail}") from exc
    return Workload(path.stem, loaded.conversations, loaded.report)  # named after the file
