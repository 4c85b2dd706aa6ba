"""The live signals of the P/D decider (`conserve.core.pd`) as the router observes them: bookkeeping only, no I/O.

The router's scrape loop (service.py) hands each server's `/metrics` reading to `Signals.scraped`; the turn loop
reports the requests it sends (`start`, `prefilled`, `end`). From these, per server:

- **Speed** (prompt tokens per second) is observed, never configured: a prefill server's = a prefill request's
  prompt tokens / its duration; a decoder's = the tokens it prefilled itself for a turn / that turn's time to first
  token (from the request's send). An EWMA per endpoint (weight `RATE_ALPHA` for the newest sample) of prefills of
  at least `MIN_SAMPLE_TOKENS` (a shorter one times the request's fixed costs more than the server's speed). Until
  a server's first sample: the mean of the servers observed so far (a decoder the decider never chose would
  otherwise keep a guess that may never be tested), else `PRIOR_TOKENS_PER_S`. Both durations include the
  request's own wait and HTTP time, so a busy server reads slower than its compute: the bias is toward the other
  path, and it fades as soon as the server serves an unqueued prompt again.
- **Queued work** (seconds) = (prompt tokens the router sent there that await their prefill + the requests the
  last scrape shows beyond the router's own x the mean prompt the router has seen) / the server's speed. On a
  prefill server every request is prefill work (running + waiting); on a decoder only the waiting ones are (the
  running ones decode), less the router's own still before their first token. The scrape is up to one interval old
  while the router's own count is live: the difference is clamped at 0.
- **Running** on a decoder: the scraped `vllm:num_requests_running` (0 before any scrape), the streams a prefill
  there stalls.

A failed scrape is never reported here, so the last reading stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conserve.core.pd import DecoderLoad, PrefillServerLoad, TurnPrompt
from conserve.exposition import EngineLoad

#: Tokens per second assumed of a server not observed yet: the order of an H100's prefill of an 8B model (vLLM);
#: the first timed request replaces most of it.
PRIOR_TOKENS_PER_S = 10_000.0
#: Mean prompt assumed for requests the router did not send, until it has seen prompts of its own.
PRIOR_MEAN_PROMPT_TOKENS = 1_000.0
#: Weight of the newest sample in the EWMAs (about the last five samples count).
RATE_ALPHA = 0.3
#: Prefills shorter than this are no speed sample.
MIN_SAMPLE_TOKENS = 128


@dataclass
class Ewma:
    """An exponentially weighted mean; `prior` until the first sample."""

    prior: float
    alpha: float = RATE_ALPHA
    value: float | None = None

    def observe(self, sample: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value

    @property
    def mean(self) -> float:
        return self.prior if self.value is None else self.value


@dataclass
class _Server:
    rate: Ewma
    load: EngineLoad | None = None
    in_flight: int = 0  # the router's requests there, until they end
    awaiting: int = 0  # of those, the ones before their prefill is done (response, or first token)
    awaiting_tokens: int = 0  # the prompt tokens those prefill there


@dataclass
class Ticket:
    """One request the router sent to `endpoint`, prefilling `tokens` there."""

    endpoint: str
    tokens: int
    sent_s: float
    awaiting: bool = True
    ended: bool = False


@dataclass
class Signals:
    prior_tokens_per_s: float = PRIOR_TOKENS_PER_S
    mean_prompt: Ewma = field(default_factory=lambda: Ewma(PRIOR_MEAN_PROMPT_TOKENS))
    _servers: dict[str, _Server] = field(default_factory=dict)

    def _server(self, endpoint: str) -> _Server:
        server = self._servers.get(endpoint)
        if server is None:
            server = self._servers[endpoint] = _Server(Ewma(self.prior_tokens_per_s))
        return server

    # ---- observations -------------------------------------------------------------------------------------
    def scraped(self, endpoint: str, load: EngineLoad) -> None:
        self._server(endpoint).load = load

    def prompt_seen(self, tokens: int) -> None:
        self.mean_prompt.observe(float(max(tokens, 1)))

    def start(self, endpoint: str, tokens: int, now_s: float) -> Ticket:
        """A request sent to `endpoint` that prefills `tokens` there (0: its KV comes from a prefill server)."""
        server = self._server(endpoint)
        server.in_flight += 1
        server.awaiting += 1
        server.awaiting_tokens += tokens
        return Ticket(endpoint, tokens, now_s)

    def prefilled(self, ticket: Ticket, now_s: float, *, timed: bool = True) -> None:
        """The request's prefill is done (a prefill server's answer, a decoder's first token); `timed`: its
        duration is a speed sample (its tokens were computed there, from the send)."""
        if not ticket.awaiting or ticket.ended:
            return
        ticket.awaiting = False
        server = self._server(ticket.endpoint)
        server.awaiting = max(server.awaiting - 1, 0)
        server.awaiting_tokens = max(server.awaiting_tokens - ticket.tokens, 0)
        elapsed = now_s - ticket.sent_s
        if timed and ticket.tokens >= MIN_SAMPLE_TOKENS and elapsed > 0:
            server.rate.observe(ticket.tokens / elapsed)

    def end(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or cancelled): no speed sample if its prefill had not finished."""
        if ticket.ended:
            return
        self.prefilled(ticket, ticket.sent_s, timed=False)
        ticket.ended = True
        server = self._server(ticket.endpoint)
        server.in_flight = max(server.in_flight - 1, 0)

    def keep_only(self, endpoints: set[str]) -> None:
        """Forget servers no pool lists any more (their requests in flight keep their entries)."""
        for endpoint in [e for e, s in self._servers.items() if e not in endpoints and s.in_flight == 0]:
            del self._servers[endpoint]

    # ---- what the decider is given --------------------------------------------------------------------------
    def tokens_per_s(self, endpoint: str) -> float:
        observed = self._server(endpoint).rate.value
        if observed is not None:
            return observed
        others = [s.rate.value for s in self._servers.values() if s.rate.value is not None]
        return sum(others) / len(others) if others else self.prior_tokens_per_s

    def queued_s(self, endpoint: str, *, decoder: bool) -> float:
        server = self._server(endpoint)
        load = server.load or EngineLoad()
        if decoder:
            others = max(load.waiting - server.awaiting, 0)
        else:
            others = max(load.running + load.waiting - server.in_flight, 0)
        work = server.awaiting_tokens + others * self.mean_prompt.mean
        return work / max(self.tokens_per_s(endpoint), 1e-9)

    def prefill_server(self, name: str, endpoint: str) -> PrefillServerLoad:
        """A prefill server as the decider sees it (its prefix cache counted as holding nothing of the prompt:
        the router does not know which prompts it still holds)."""
        return PrefillServerLoad(name, self.queued_s(endpoint, decoder=False), self.tokens_per_s(endpoint))

    def decoder(self, name: str, endpoint: str) -> DecoderLoad:
        load = self._server(endpoint).load
        return DecoderLoad(
            name,
            self.queued_s(endpoint, decoder=True),
            self.tokens_per_s(endpoint),
            running=load.running if load is not None else 0,
        )

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per endpoint, what the router knows now (for /conserve/backends)."""
        out: dict[str, dict[str, Any]] = {}
        for endpoint, s in sorted(self._servers.items()):
            out[endpoint] = {
                "tokensPerSecond": round(self.tokens_per_s(endpoint), 1),
                "observed": s.rate.value is not None,
                "running": None if s.load is None else s.load.running,
                "waiting": None if s.load is None else s.load.waiting,
                "kvUsage": None if s.load is None else s.load.kv_usage,
                "inFlight": s.in_flight,
                "awaitingPrefillTokens": s.awaiting_tokens,
            }
        return out


def turn_prompt(prompt_tokens: int, *, context_tokens: int, decoder_holds: bool) -> TurnPrompt:
    """The turn's prompt as the decider weighs it. The pinned decoder holds the conversation's previous context
    (its last turn's prompt and output) when it holds the conversation's KV (its placement generation served the
    last turn); else it holds nothing, and the turn is the conversation's first on that decoder (its first turn,
    the first after a re-placement, or after the operator ended and re-created it)."""
    cached = min(context_tokens, prompt_tokens) if decoder_holds else 0
    return TurnPrompt(max(prompt_tokens, 1), cached, first_turn=not decoder_holds)
