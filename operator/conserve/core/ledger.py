"""The capacity ledger: which conversation holds how many KV tokens on which decoder.

Pure bookkeeping, no I/O. The operator rebuilds it from the API server (every Conversation's status) on start
and keeps it in step after each decision; the simulator drives the same class. Invariant: a decoder's
reservations never exceed its capacity (checked on every reserve and extend).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from conserve.core.placement import DecoderState


class CapacityError(ValueError):
    """A reservation that would oversubscribe a decoder."""


@dataclass(slots=True)
class _Holding:
    decoder: str
    reserved_kv_tokens: int
    live_kv_tokens: int = 0
    offloaded: bool = False  # its KV is in the decoder node's host memory (`conserve.core.offload`)


@dataclass(slots=True)
class CapacityLedger:
    decoders: dict[str, DecoderState] = field(default_factory=dict)
    holdings: dict[str, _Holding] = field(default_factory=dict)  # conversation key -> holding
    # decoder -> {conversation: holding}, the same objects as `holdings`: per-decoder sums cost the decoder's
    # conversations, not every conversation (a pool of 10,000 conversations places in microseconds, not ms).
    # Change holdings through the methods only, so the index stays in step.
    _by_decoder: dict[str, dict[str, _Holding]] = field(default_factory=dict, repr=False)

    def _put(self, conversation: str, holding: _Holding) -> None:
        self._drop(conversation)
        self.holdings[conversation] = holding
        self._by_decoder.setdefault(holding.decoder, {})[conversation] = holding

    def _drop(self, conversation: str) -> _Holding | None:
        holding = self.holdings.pop(conversation, None)
        if holding is not None:
            members = self._by_decoder.get(holding.decoder)
            if members is not None:
                members.pop(conversation, None)
                if not members:
                    del self._by_decoder[holding.decoder]
        return holding

    # --- decoders ---------------------------------------------------------------------------------------
    def upsert_decoder(self, decoder: DecoderState) -> None:
        """Add or refresh a decoder's static view (node, tier, readiness, capacity, energy)."""
        self.decoders[decoder.name] = decoder

    def remove_decoder(self, name: str) -> list[str]:
        """Forget a decoder; returns the conversations it held (their holdings are dropped)."""
        self.decoders.pop(name, None)
        orphans = sorted(self._by_decoder.get(name, {}))
        for key in orphans:
            self._drop(key)
        return orphans

    # --- conversations ----------------------------------------------------------------------------------
    def reserve(self, conversation: str, decoder: str, kv_tokens: int, *, live_kv_tokens: int = 0) -> None:
        """Record a reservation; raises CapacityError rather than oversubscribe."""
        if decoder not in self.decoders:
            raise CapacityError(f"unknown decoder {decoder!r}")
        previous = self._drop(conversation)
        used = self.reserved_on(decoder)
        capacity = self.decoders[decoder].capacity_kv_tokens
        need = max(kv_tokens, live_kv_tokens)
        if used + need > capacity:
            if previous is not None:
                self._put(conversation, previous)
            raise CapacityError(f"decoder {decoder!r}: {used} + {need} KV tokens exceeds capacity {capacity}")
        self._put(conversation, _Holding(decoder, kv_tokens, live_kv_tokens))

    def adopt(self, conversation: str, decoder: str, kv_tokens: int, live_kv_tokens: int = 0) -> None:
        """Record a reservation that already exists in the API server (rebuild on start), even over capacity.

        The truth lives in the API server: a rebuild must not drop a conversation; an oversubscribed decoder
        then simply takes no new placements until it drains.
        """
        self._put(conversation, _Holding(decoder, kv_tokens, live_kv_tokens))

    def release(self, conversation: str) -> bool:
        """Free a conversation's reservation. Returns False when it held nothing (release is idempotent)."""
        return self._drop(conversation) is not None

    def update_live(self, conversation: str, live_kv_tokens: int) -> None:
        holding = self.holdings.get(conversation)
        if holding is not None:
            holding.live_kv_tokens = live_kv_tokens

    def try_extend(self, conversation: str, kv_tokens: int) -> bool:
        """Grow a reservation in place when the decoder has room; False (and no change) otherwise."""
        holding = self.holdings.get(conversation)
        if holding is None:
            return False
        if kv_tokens <= holding.reserved_kv_tokens:
            return True
        if holding.offloaded:
            holding.reserved_kv_tokens = kv_tokens  # host-resident: no GPU capacity to check until it reloads
            return True
        capacity = self.decoders[holding.decoder].capacity_kv_tokens if holding.decoder in self.decoders else 0
        used_by_others = self.reserved_on(holding.decoder) - max(holding.reserved_kv_tokens, holding.live_kv_tokens)
        if used_by_others + kv_tokens > capacity:
            return False
        holding.reserved_kv_tokens = kv_tokens
        return True

    def set_offloaded(self, conversation: str, offloaded: bool) -> bool:
        """Mark a conversation's KV as moved to its decoder's host memory (True) or back on the GPU (False).

        An offloaded conversation keeps its pin and its reservation, but counts against no GPU capacity
        (`reserved_on`, `snapshot`). Marking one resident again does not check capacity (like `adopt`: the
        KV exists and must come back); the caller makes room first (`conserve.core.offload`). Returns False
        when the conversation holds nothing.
        """
        holding = self.holdings.get(conversation)
        if holding is None:
            return False
        holding.offloaded = offloaded
        return True

    def is_offloaded(self, conversation: str) -> bool:
        holding = self.holdings.get(conversation)
        return holding is not None and holding.offloaded

    def offloaded_on(self, decoder: str) -> int:
        """Live KV tokens of a decoder's conversations that sit in its host memory."""
        members = self._by_decoder.get(decoder, {})
        return sum(h.live_kv_tokens for h in members.values() if h.offloaded)

    def holding(self, conversation: str) -> tuple[str, int, int] | None:
        h = self.holdings.get(conversation)
        return None if h is None else (h.decoder, h.reserved_kv_tokens, h.live_kv_tokens)

    # --- views ------------------------------------------------------------------------------------------
    def reserved_on(self, decoder: str) -> int:
        """GPU KV tokens held on a decoder: each resident (not offloaded) conversation counts the larger of its
        reservation and live size."""
        members = self._by_decoder.get(decoder, {})
        return sum(max(h.reserved_kv_tokens, h.live_kv_tokens) for h in members.values() if not h.offloaded)

    def conversations_on(self, decoder: str) -> list[str]:
        return sorted(self._by_decoder.get(decoder, {}))

    def snapshot(self, names: Iterable[str] | None = None) -> list[DecoderState]:
        """Decoder states with current reservations, sorted by name (the placement's input)."""
        wanted = sorted(self.decoders) if names is None else sorted(n for n in names if n in self.decoders)
        states = []
        empty: dict[str, _Holding] = {}
        for name in wanted:
            members = self._by_decoder.get(name, empty)
            static = self.decoders[name]
            if not members and not (static.reserved_kv_tokens or static.live_kv_tokens or static.pinned_conversations):
                states.append(static)  # nothing held: the static view is the snapshot
                continue
            reserved = live = 0
            for h in members.values():
                if h.offloaded:
                    continue
                reserved += h.reserved_kv_tokens if h.reserved_kv_tokens > h.live_kv_tokens else h.live_kv_tokens
                live += h.live_kv_tokens
            count = len(members)
            # The constructor, not dataclasses.replace: replace introspects the fields on every call.
            states.append(
                DecoderState(
                    static.name,
                    static.node,
                    static.tier,
                    static.ready,
                    static.capacity_kv_tokens,
                    reserved,
                    live,
                    count,
                    static.energy_per_token_j,
                    static.gpu_count,
                )
            )
        return states

    def totals(self) -> Mapping[str, int]:
        capacity = sum(d.capacity_kv_tokens for d in self.decoders.values())
        reserved = sum(self.reserved_on(n) for n in self.decoders)
        return {
            "capacity_kv_tokens": capacity,
            "reserved_kv_tokens": reserved,
            "conversations": len(self.holdings),
        }
