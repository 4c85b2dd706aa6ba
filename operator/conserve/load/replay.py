"""Replays a workload against the router over HTTP, one asyncio task per conversation.

Timing follows the offline simulator: a conversation's first turn arrives at its arrival time; a later turn at
its trace timestamp or when the previous turn finished plus its think time, whichever is later. Everything is
compressed by `speedup` in real time; measured latencies are multiplied back (modelled seconds).

Requests are OpenAI chat completions, streamed, with `X-Conversation-Id` (unique per run and mode),
`X-Conserve-Routing` (the mode), `X-Conversation-End: true` on the last turn and `X-Conserve-Effective: false` on
turns the user does not see. Each turn's answer says where its prompt was prefilled (`X-Conserve-Prefill-Site`).
Prompts are filler text sized with the shared token estimate: the history (the previous prompts and the answers
received) plus a new user message, so that the prompt is the turn's `input_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from conserve.core.tokens import estimate_tokens, filler_text
from conserve.load.report import ConversationOutcome, TurnOutcome
from conserve.router.policy import (
    CONVERSATION_HEADER,
    DECODER_RESPONSE_HEADER,
    EFFECTIVE_HEADER,
    END_HEADER,
    GENERATION_RESPONSE_HEADER,
    MODE_HEADER,
    PREFILL_SITE_RESPONSE_HEADER,
)
from conserve.sim.conversations import Conversation, Workload


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    router_url: str
    mode: str
    run_id: str
    speedup: float = 1.0
    model: str = "llama-3-8b"
    max_output_tokens: int | None = None
    request_timeout_s: float = 600.0


async def replay(
    workload: Workload,
    config: ReplayConfig,
    *,
    on_turn: Callable[[], None] | None = None,
) -> list[ConversationOutcome]:
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.monotonic() + 0.5  # a moment to start every task
        tasks = [_conversation(http, conv, config, t0, on_turn) for conv in workload.conversations]
        return list(await asyncio.gather(*tasks))


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _conversation(
    http: aiohttp.ClientSession,
    conv: Conversation,
    config: ReplayConfig,
    t0: float,
    on_turn: Callable[[], None] | None,
) -> ConversationOutcome:
    s = config.speedup
    outcome = ConversationOutcome(conv.key)
    conv_id = f"{config.run_id}-{config.mode}-{conv.key}"
    start = t0 + conv.arrival_s / s
    await _sleep_until(start)
    messages: list[dict[str, str]] = []
    history_tokens = 0
    prev_done = start
    for index, turn in enumerate(conv.turns):
        ready = prev_done + turn.think_s / s
        if turn.not_before_s is not None:
            ready = max(ready, t0 + turn.not_before_s / s)
        await _sleep_until(ready)
        if turn.input_tokens > history_tokens:
            messages.append({"role": "user", "content": filler_text(turn.input_tokens - history_tokens)})
        else:  # the client cut its history: send the turn's prompt afresh
            messages = [{"role": "user", "content": filler_text(turn.input_tokens)}]
        max_tokens = turn.output_tokens
        if config.max_output_tokens is not None:
            max_tokens = min(max_tokens, config.max_output_tokens)
        headers = {CONVERSATION_HEADER: conv_id, MODE_HEADER: config.mode}
        if index == len(conv.turns) - 1:
            headers[END_HEADER] = "true"
        if not turn.user_visible:
            headers[EFFECTIVE_HEADER] = "false"
        sent = time.monotonic()
        result, text = await _turn(http, config, messages, max(max_tokens, 1), headers, index, sent, s)
        prev_done = time.monotonic()
        outcome.turns.append(result)
        if on_turn is not None:
            on_turn()
        if not result.ok:
            break  # a failed turn ends the conversation (its later turns would not have happened)
        if outcome.ttfet_s is None and turn.user_visible and result.ttft_s is not None:
            outcome.ttfet_s = (sent - start) * s + result.ttft_s
        messages.append({"role": "assistant", "content": text})
        history_tokens = sum(estimate_tokens(m["content"]) for m in messages)
    return outcome


async def _turn(
    http: aiohttp.ClientSession,
    config: ReplayConfig,
    messages: list[dict[str, str]],
    max_tokens: int,
    headers: dict[str, str],
    index: int,
    sent: float,
    speedup: float,
) -> tuple[TurnOutcome, str]:
    body = {
        "model": config.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    first: float | None = None
    last: float | None = None
    tokens = 0
    try:
        async with http.post(f"{config.router_url}/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return TurnOutcome(index, False, error=f"HTTP {resp.status}: {text}"), ""
            decoder = resp.headers.get(DECODER_RESPONSE_HEADER, "")
            generation = resp.headers.get(GENERATION_RESPONSE_HEADER, "")
            site = resp.headers.get(PREFILL_SITE_RESPONSE_HEADER, "")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    tokens = usage["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") or ""
                    if content:
                        now = time.monotonic()
                        first = now if first is None else first
                        last = now
                        parts.append(content)
    except (aiohttp.ClientError, TimeoutError) as err:
        return TurnOutcome(index, False, error=f"{type(err).__name__}: {err}"), ""
    text = "".join(parts)
    tokens = tokens or estimate_tokens(text)
    ttft = None if first is None else (first - sent) * speedup
    tbt = None
    if first is not None and last is not None and tokens > 1:
        tbt = (last - first) * speedup / (tokens - 1)
    return TurnOutcome(index, True, ttft, tbt, tokens, decoder, generation, prefill_site=site), text
