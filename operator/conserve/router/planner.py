"""Where a turn goes: the servers of `policy.plan_turn`, with the P/D decider's choice of where its prompt is
prefilled (`conserve.core.pd.decide`, the pool's `spec.prefillDecider`) on the router's live signals
(conserve.router.signals). No I/O: the caller brings the pool's servers and the conversation's state.

- Conversation mode: the decider is asked per turn for the placement's decoder, with what that decoder holds of
  the prompt (the conversation's previous context when it served the last turn on this placement generation, else
  nothing). A first turn is asked before its placement exists (`first_choice`), so that a prefill on the pool can
  start at once; that choice then stands for the turn, unless the decoder the conversation will likely get would
  prefill it sooner: then it is decided once the placement names the decoder.
- Per-turn mode (the baselines): the least-loaded prefill server and decoder, no decider.
Each decision is logged at debug level with its estimates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from conserve.core.pd import PdChoice, PdSettings, TurnPrompt, decide, decide_before_placement
from conserve.router.policy import Backend, LoadBook, Mode, Placement, TurnPlan, backend_named, plan_turn
from conserve.router.signals import Signals, turn_prompt
from conserve.router.turns import ConversationState

log = logging.getLogger(__name__)


class Planner:
    def __init__(self, settings: Callable[[str], PdSettings], signals: Signals, book: LoadBook) -> None:
        """`settings`: a pool's decider settings, by pool name (the control plane's cache of its spec)."""
        self.settings = settings
        self.signals = signals
        self.book = book

    def decide(
        self, pool: str, prompt: TurnPrompt, prefills: Sequence[Backend], decoder: Backend | None, conv_id: str
    ) -> PdChoice:
        """The decider on the live signals (`decoder` None: not known yet)."""
        servers = [self.signals.prefill_server(p.name, p.endpoint) for p in prefills if p.endpoint]
        target = self.signals.decoder(decoder.name, decoder.endpoint) if decoder is not None else None
        choice = decide(self.settings(pool), prompt, servers, target)
        log.debug(
            "turn of %s: prefill on %s (%s; %d tokens, decoder holds %d; pool %.4f s, decoder %.4f s, stall %.4f s; "
            "servers %s; decoder %s)",
            conv_id, choice.server or "the decoder", choice.reason, prompt.prompt_tokens, prompt.decoder_cached_tokens,
            choice.pool_s, choice.decoder_s, choice.stall_s, servers, target,
        )  # fmt: skip
        return choice

    def first_choice(
        self, pool: str, prefills: Sequence[Backend], decoders: Sequence[Backend], conv_id: str, prompt_tokens: int
    ) -> tuple[PdChoice | None, Backend | None]:
        """A first turn before its placement (`conserve.core.pd.decide_before_placement`): the choice and the
        prefill server to start on at once; (choice, None) for the decoder whatever it is (a short prompt);
        (None, None) when the likely decoder (running fewest streams) would prefill it sooner: the turn is decided
        once its placement names the decoder."""
        prompt = turn_prompt(prompt_tokens, context_tokens=0, decoder_holds=False)
        servers = [self.signals.prefill_server(p.name, p.endpoint) for p in prefills if p.endpoint]
        ready = [d for d in decoders if d.endpoint]
        loads = [self.signals.decoder(d.name, d.endpoint) for d in ready]
        likely = min(loads, key=lambda d: (d.running, d.name)) if loads else None
        choice = decide_before_placement(self.settings(pool), prompt, servers, likely)
        log.debug("first turn of %s before its placement: %s (likely decoder %s)", conv_id, choice, likely)
        if choice is None or not choice.on_pool:
            return choice, None
        return choice, backend_named(prefills, choice.server)

    def plan(
        self,
        *,
        mode: Mode,
        pool: str,
        prefills: Sequence[Backend],
        decoders: Sequence[Backend],
        placement: Placement | None,
        state: ConversationState | None,
        decided: PdChoice | None,
        prompt_tokens: int,
    ) -> tuple[TurnPlan, int]:
        """The turn's servers, and the prompt tokens its decoder prefills itself (0: its KV comes from the prefill
        server). `decided`: a choice made before the placement, which stands. NoBackend when there are none."""
        choice: PdChoice | None = None
        prompt = TurnPrompt(max(prompt_tokens, 1))
        if mode is Mode.CONVERSATION and placement is not None and state is not None:
            holds = state.kv_generation == placement.generation
            prompt = turn_prompt(prompt_tokens, context_tokens=state.context_tokens, decoder_holds=holds)
            choice = decided or self.decide(pool, prompt, prefills, placement.decoder, state.conversation_id)
        plan = plan_turn(
            mode=mode, placement=placement, prefills=prefills, decoders=decoders, book=self.book, choice=choice
        )
        return plan, 0 if plan.prefill is not None else prompt.decoder_uncached_tokens
