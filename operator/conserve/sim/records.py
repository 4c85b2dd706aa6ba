"""What the simulator records and what policies decide: turn records, conversation state, routes, the policy
protocol and the view of the simulator a policy may read.

Policies import this module and `conserve.sim.instances`, never `conserve.sim.engine`: a policy returns a
decision (a `Route`, a `Retain`) that the engine applies, and reads the fleet through `SimView`. The engine
imports no policy (an import-linter contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from conserve.core.llm import ModelShape
from conserve.core.offload import IdleKv
from conserve.core.slo import SloClass
from conserve.sim.conversations import Conversation

if TYPE_CHECKING:
    from conserve.sim.fleet import Fleet
    from conserve.sim.instances import Decoder, PrefillInstance


@dataclass(slots=True)
class TurnRecord:
    conversation: str
    index: int
    arrival_s: float
    input_tokens: int
    new_tokens: int
    output_tokens: int
    user_visible: bool
    decoder: str = ""
    prefill_instance: str = ""  # "" when prefilled on the decoder
    prefill_tokens: int = 0  # tokens computed by prefill for this turn (recomputes included)
    transferred_tokens: int = 0
    #: When the first token reaches the user: after the prefill and the KV transfer to the decoder (a remote
    #: prefill), or after the decoder's own prefill of the turn.
    first_token_s: float = -1.0
    done_s: float = -1.0
    generated_tokens: int = 0
    preemptions: int = 0
    reload_tokens: int = 0  # KV reloaded from host memory over PCIe for this turn
    reload_s: float = 0.0
    loaded_tokens: int = 0  # prefix KV a prefill instance loaded (shared store, or pulled back from a decoder)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def reprefilled_tokens(self) -> int:
        """Tokens prefilled beyond the turn's new ones: KV the conversation had computed before and lost."""
        return max(self.prefill_tokens - self.new_tokens, 0)

    @property
    def tbt_s(self) -> float | None:
        """Mean time between tokens of this turn (None for a one-token answer)."""
        if self.output_tokens <= 1:
            return None
        return (self.done_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class ConvState:
    conv: Conversation
    turns: list[TurnRecord] = field(default_factory=list)
    decoder: str | None = None  # where its KV lives (pinned or cached) after its last turn
    kv_tokens: int = 0  # KV it holds there
    kv_transfers: int = 0
    started_s: float | None = None  # when its first turn was admitted (placement), for pending waits
    finished: bool = False
    #: Why its client was turned away (admission: a queue wait past its budget, a gateway's request TTL); its
    #: waiting turn was never served and no later turn came. "" when it was served.
    refused: str = ""

    @property
    def key(self) -> str:
        return self.conv.key

    @property
    def next_index(self) -> int:
        return len(self.turns)


@dataclass(slots=True)
class Seq:
    """One turn in a decoder: its KV (context) and the decode steps it still needs."""

    state: ConvState
    record: TurnRecord
    context: int
    remaining: int
    admitted_order: int = 0


@dataclass(slots=True)
class LocalJob:
    """A prompt prefilled on the decoder itself (chunked: `done_tokens` of `new_tokens` are prefilled)."""

    seq: Seq
    new_tokens: int
    cached_tokens: int
    recompute: bool = False
    reload_tokens: int = 0  # part of cached_tokens that comes back from host memory first
    done_tokens: int = 0
    reloaded: bool = False

    @property
    def left_tokens(self) -> int:
        return self.new_tokens - self.done_tokens


@dataclass(slots=True)
class PrefillJob:
    """A prompt on a prefill instance (chunked: `done_tokens` of `new_tokens` are prefilled)."""

    seq: Seq
    decoder: str
    new_tokens: int
    cached_tokens: int
    transfer_tokens: int
    load_s: float = 0.0  # loading the cached prefix (shared store, or pulled from a decoder) before the first chunk
    done_tokens: int = 0
    started: bool = False

    @property
    def left_tokens(self) -> int:
        return self.new_tokens - self.done_tokens


# --- decisions the policies return -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteRoute:
    """Prefill on a prefill instance, then move the turn's KV to the decoder.

    The prefill instance computes `new_tokens` over `cached_tokens` it already has; when the fleet gives prefill
    instances a prefix cache or a shared KV store, the engine raises `cached_tokens` to what they hold.
    """

    prefill: str
    decoder: str
    new_tokens: int
    cached_tokens: int = 0
    #: KV of the conversation the prefill instance first pulls back from the decoder holding it (vLLM's
    #: bidirectional transfer), so it computes only what is missing.
    pull_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """Prefill the new tokens on the decoder, which holds the conversation's earlier KV (or recomputes it)."""

    decoder: str


Route = RemoteRoute | LocalRoute
#: What a decoder keeps of a finished turn's KV: pinned (not evictable until released) or prefix cache (LRU).
Retain = Literal["pin", "cache"]


class SimView(Protocol):
    """What a policy may read of the running simulation, and the actions it may ask for: offload or drop an idle
    pinned conversation's KV (the scheduler's lifecycle decisions), start the waiting first turn of a
    conversation placed from the queue, and end a conversation the policy released (its idle timeout)."""

    @property
    def now(self) -> float: ...

    @property
    def host_kv_bytes_per_gpu(self) -> float: ...

    @property
    def fleet(self) -> Fleet: ...

    def stored_tokens(self, key: str) -> int:
        """KV of the conversation in the fleet's shared store (0 without one)."""
        ...

    @property
    def model(self) -> ModelShape: ...

    @property
    def prefill(self) -> Mapping[str, PrefillInstance]: ...

    @property
    def decoders(self) -> Mapping[str, Decoder]: ...

    def idle_candidates(self, decoder: Decoder, gpu_kv: Callable[[str, int], int] | None = None) -> list[IdleKv]: ...

    def offload(self, decoder: Decoder, key: str) -> None: ...

    def drop_pinned(self, decoder: Decoder, key: str) -> None: ...

    def waiting_turn(self, key: str) -> tuple[ConvState, TurnRecord] | None: ...

    def start_placed(self, key: str, route: Route) -> None: ...

    def release_conversation(self, key: str) -> None: ...

    def refuse(self, key: str, reason: str) -> None:
        """Turn the conversation's client away (its waiting turn is answered with HTTP 429): it ends unserved."""
        ...


class Policy(Protocol):
    name: str
    #: Whether this policy's decoders get the fleet's host KV tier.
    host_offload: bool
    #: Whether the policy releases conversations idle past the timeout itself (its scheduler's sweep, every
    #: `sweep_interval_s`); otherwise the simulator's idle checks do, for every policy alike.
    owns_idle_timeout: bool
    sweep_interval_s: float | None

    @property
    def pd_rule(self) -> str:
        """Which P/D rule decides where its turns are prefilled."""
        ...

    def bind(self, sim: SimView, idle_timeout_s: float | None) -> None: ...

    def set_slo(self, slo: SloClass | None) -> None:
        """The conversations' SLO, known to every policy alike (ConServe's pool declares it; a gateway queue's
        request TTL is its TTFET target); None: no SLO (the default runs)."""
        ...

    def sweep(self, now: float) -> object: ...

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None: ...

    def retain(self, state: ConvState, decoder: str) -> Retain: ...

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None: ...

    def release(self, state: ConvState, now: float) -> None: ...

    def kv_offloaded(self, state: ConvState) -> None: ...
