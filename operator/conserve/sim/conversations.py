"""Conversations, turns and workloads: what the simulator replays (and `conserve load` sends).

A turn carries the whole prompt it sends (`input_tokens`, the conversation's context at that turn), how many of
those tokens are new (not in the KV the conversation already produced), and its output length. Where workloads
come from (traces, the synthetic agentic workload) is in `workload.py` and `agentic.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


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
    load_scale: float = 1.0  # its arrival rate over the trace's (`scale_load`)

    @property
    def turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def arriving_before(conversations: Iterable[Conversation], duration_s: float | None) -> list[Conversation]:
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
    return Workload(workload.name, conversations, workload.report, workload.signals, workload.load_scale * factor)
