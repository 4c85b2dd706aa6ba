"""The OpenAI-compatible request bodies the router and gpu-sim both read: how many prompt tokens a request has."""

from __future__ import annotations

from typing import Any

from conserve.core.tokens import estimate_messages_tokens, estimate_tokens


def prompt_tokens_of(body: dict[str, Any], chat: bool) -> int:
    """The estimate the router uses too (conserve.core.tokens); token-id prompts are counted exactly."""
    if chat:
        contents: list[str] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                contents.append(content)
            elif isinstance(content, list):
                contents.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return max(estimate_messages_tokens(contents), 1)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return max(sum(estimate_tokens(str(p)) for p in prompt), 1)
    return max(estimate_tokens(str(prompt)), 1)
