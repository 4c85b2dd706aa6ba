"""Workloads for the simulator: conversations made of turns.

A turn carries the whole prompt it sends (`input_tokens`, the conversation's context at that turn), how many of
those tokens are new (not in the KV the conversation already produced), and its output length. Three sources:

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
- **Agentic** (synthetic, seeded): conversations arrive as a Poisson process. Each starts with a system/task
  prompt, runs several tool-call turns (the model emits a tool call; the tool runs for a while; its result is
  appended to the context), then produces its first user-visible answer, then the user may ask follow-ups after
  a think time. The context grows with every turn. Distribution parameters are in `AgenticParams`; they are
  chosen to describe a typical coding/search agent (a few thousand tokens of instructions, 2-6 tool calls of
  one to a few hundred tokens each, tool outputs of several hundred to a few thousand tokens, tool latencies of
  seconds, user think times of tens of seconds), not fitted to any trace and not tuned to any result.

A malformed line is reported with its line number and skipped, or, with `strict=True`, refused
(`TraceError`).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

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


@dataclass(frozen=True, slots=True)
class Turn:
    input_tokens: int  # the whole prompt of this turn (context so far plus new tokens)
    new_tokens: int  # tokens of the prompt not produced by the conversation's earlier turns
    output_tokens: int
    #: Earliest arrival, seconds from the start of the workload (trace timestamp); None: only `think_s` counts.
    not_before_s: float | None = None
    #: Time after the previous turn finished before this one arrives (tool latency, user think time).
    think_s: float = 0.0
    #: Whether this turn's output is shown to the user (False: a tool call of an agent).
    user_visible: bool = True

    @property
    def reused_tokens(self) -> int:
        return self.input_tokens - self.new_tokens


@dataclass(frozen=True, slots=True)
class Conversation:
    key: str
    arrival_s: float
    turns: tuple[Turn, ...]

    @property
    def first_visible_turn(self) -> int:
        """Index of the first user-visible turn (the last turn when none is marked visible)."""
        return next((i for i, t in enumerate(self.turns) if t.user_visible), len(self.turns) - 1)

    @property
    def final_context_tokens(self) -> int:
        last = self.turns[-1]
        return last.input_tokens + last.output_tokens


@dataclass(slots=True)
class ParseReport:
    path: str
    lines: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


@dataclass(frozen=True, slots=True)
class Signals:
    """What the workload tells the serving system besides the prompts (the same for every policy).

    `end_of_conversation`: the client says when a conversation is over (the agentic workload: an agent knows
    when its task is done, as the Conversation API's `spec.completed` lets it say). Mooncake and Azure traces
    carry no such signal: a conversation there ends, for every policy, when it has been idle for the idle
    timeout.
    """

    end_of_conversation: bool = False

    def as_dict(self) -> dict[str, bool]:
        return {"end_of_conversation": self.end_of_conversation}


NO_SIGNALS = Signals()


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]
    report: ParseReport | None = None
    signals: Signals = NO_SIGNALS

    @property
    def turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


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
    chains: dict[int, list[int]] = {}
    root_of: list[int] = [0] * len(requests)
    for i, p in enumerate(parent):
        root_of[i] = i if p is None else root_of[p]
        chains.setdefault(root_of[i], []).append(i)
    conversations: list[Conversation] = []
    for root in sorted(chains, key=lambda r: (requests[r].timestamp_s, r)):
        turns: list[Turn] = []
        prev: _Request | None = None
        for i in chains[root]:
            req = requests[i]
            if prev is None:
                turns.append(Turn(req.input_tokens, req.input_tokens, req.output_tokens, req.timestamp_s))
            else:
                reused = min(prev.input_tokens + prev.output_tokens, req.input_tokens - 1)
                turns.append(Turn(req.input_tokens, req.input_tokens - reused, req.output_tokens, req.timestamp_s))
            prev = req
        conversations.append(Conversation(f"{name_prefix}-{root:05d}", requests[root].timestamp_s, tuple(turns)))
    return conversations


def load_mooncake(path: Path, *, strict: bool = False, duration_s: float | None = None) -> Workload:
    with _open_trace(path) as f:
        requests, report = parse_mooncake_lines(f, path=str(path), strict=strict)
    if not requests:
        _refuse_unusable(report)
    conversations = recover_conversations(requests)
    return Workload("mooncake", tuple(_clip(conversations, duration_s)), report)


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
    return Workload(workload.name, tuple(_clip(workload.conversations, duration_s)), workload.report)


# --- agentic (synthetic) -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgenticParams:
    """Distributions of the synthetic agentic workload (log-normal by median and sigma of the log).

    Where each value comes from (none is fitted to a trace, none was changed after seeing a result):
    - `conversations_per_s` = 2.0: the load level. At the first value (0.5/s) the default fleet's decoders held
      1.4% of their KV capacity and ran batches of a few sequences, far below how a provisioned fleet runs;
      2/s is the lowest round rate at which decode batches reach tens of sequences. `--load-scale` and
      `--sweep-load` move it (2x is 4/s).
    - System/task prompt 3,000 tokens (sigma 0.5): the order of published coding-agent system prompts with
      tool schemas (a few thousand tokens). A convention.
    - 2-6 tool calls of ~120 output tokens (a JSON function call), tool results ~800 tokens (sigma 1.0: a file
      excerpt, a search page; long-tailed), tool latency ~1.5 s (sigma 0.8: a shell command or an HTTP call).
      Conventions describing a coding/search agent.
    - Answers ~350 tokens, up to 3 follow-ups of ~60-token user messages after ~30 s of reading/thinking
      (sigma 0.8): conventions for interactive chat, of the order of the Mooncake trace's output lengths.
    - Contexts stop growing at 120,000 tokens (below Llama-3's 128k window).
    - The workload carries an end-of-conversation signal: an agent knows when its task is done.
    No public agentic trace with tool-call turns was available to this benchmark offline; when one is, it can
    be replayed as a Mooncake-format file (`--workload PATH`).
    """

    conversations_per_s: float = 2.0
    system_prompt_median_tokens: float = 3000.0
    system_prompt_sigma: float = 0.5
    tool_turns_min: int = 2
    tool_turns_max: int = 6
    tool_call_output_median_tokens: float = 120.0
    tool_call_output_sigma: float = 0.6
    tool_result_median_tokens: float = 800.0
    tool_result_sigma: float = 1.0
    tool_latency_median_s: float = 1.5
    tool_latency_sigma: float = 0.8
    answer_output_median_tokens: float = 350.0
    answer_output_sigma: float = 0.7
    followups_max: int = 3
    user_think_median_s: float = 30.0
    user_think_sigma: float = 0.8
    user_message_median_tokens: float = 60.0
    user_message_sigma: float = 0.8
    max_context_tokens: int = 120_000


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int = 1) -> int:
    return max(low, round(rng.lognormvariate(math.log(median), sigma)))


def synthesize_agentic(seed: int, duration_s: float, params: AgenticParams | None = None) -> Workload:
    p = params or AgenticParams()
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    t = 0.0
    index = 0
    while True:
        t += rng.expovariate(p.conversations_per_s)
        if t >= duration_s:
            break
        turns: list[Turn] = []
        context = _lognormal_int(rng, p.system_prompt_median_tokens, p.system_prompt_sigma, 64)
        new = context
        think = 0.0
        for _ in range(rng.randint(p.tool_turns_min, p.tool_turns_max)):
            out = _lognormal_int(rng, p.tool_call_output_median_tokens, p.tool_call_output_sigma, 8)
            turns.append(Turn(context, new, out, None if turns else t, think, user_visible=False))
            result = _lognormal_int(rng, p.tool_result_median_tokens, p.tool_result_sigma, 16)
            context, new = context + out + result, result
            think = rng.lognormvariate(math.log(p.tool_latency_median_s), p.tool_latency_sigma)
        for _ in range(1 + rng.randint(0, p.followups_max)):
            if context >= p.max_context_tokens:
                break
            out = _lognormal_int(rng, p.answer_output_median_tokens, p.answer_output_sigma, 8)
            turns.append(Turn(context, new, out, None, think, user_visible=True))
            message = _lognormal_int(rng, p.user_message_median_tokens, p.user_message_sigma, 4)
            context, new = context + out + message, message
            think = rng.lognormvariate(math.log(p.user_think_median_s), p.user_think_sigma)
        conversations.append(Conversation(f"ag-{index:05d}", t, tuple(turns)))
        index += 1
    return Workload("agentic", tuple(conversations), signals=Signals(end_of_conversation=True))


def _clip(conversations: Iterable[Conversation], duration_s: float | None) -> list[Conversation]:
    """Keep what arrives before `duration_s`: conversations, and of a trace's turns those stamped before it."""
    if duration_s is None:
        return list(conversations)
    kept: list[Conversation] = []
    for c in conversations:
        if c.arrival_s >= duration_s:
            continue
        turns = tuple(t for t in c.turns if t.not_before_s is None or t.not_before_s < duration_s)
        kept.append(Conversation(c.key, c.arrival_s, turns))
    return kept


def scale_load(workload: Workload, factor: float) -> Workload:
    """The same conversations arriving `factor` times as fast: arrival times and trace timestamps divided by
    `factor`; think times and tool latencies (set by people and tools, not by the load) unchanged."""
    if factor <= 0:
        raise ValueError("load factor must be positive")
    if factor == 1.0:
        return workload

    def turn(t: Turn) -> Turn:
        at = None if t.not_before_s is None else t.not_before_s / factor
        return Turn(t.input_tokens, t.new_tokens, t.output_tokens, at, t.think_s, t.user_visible)

    conversations = tuple(
        Conversation(c.key, c.arrival_s / factor, tuple(turn(t) for t in c.turns)) for c in workload.conversations
    )
    return Workload(workload.name, conversations, workload.report, workload.signals)


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
