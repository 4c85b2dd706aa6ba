"""A tokenizer-free token estimate shared by the router, the GPU-server simulator and the load generator.

Rule: ceil(characters / 4) per message content (the common "about four characters per token" rule of thumb
for English BPE vocabularies), no per-message overhead. It is an estimate for reservations and for the
simulator's pacing, not a tokenizer; a real vLLM backend reports exact counts in `usage`.
"""

from __future__ import annotations

from collections.abc import Iterable

CHARS_PER_TOKEN = 4
#: One filler token: exactly CHARS_PER_TOKEN characters, so estimate_tokens(filler_text(n)) == n.
FILLER_TOKEN = "tok "


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def estimate_messages_tokens(contents: Iterable[str]) -> int:
    return sum(estimate_tokens(c) for c in contents)


def filler_text(tokens: int) -> str:
    """Text that estimates to exactly `tokens` tokens (the load generator's prompts, the simulator's output)."""
    return FILLER_TOKEN * max(tokens, 0)
