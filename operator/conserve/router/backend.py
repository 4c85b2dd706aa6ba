"""HTTP to the serving backends (vLLM, or conserve gpu-sim): the disaggregated-prefill protocol.

Prefill: the request with max_tokens 1, no streaming, and `kv_transfer_params: {"do_remote_decode": true, ...}`
(what vLLM's NixlConnector proxy sends); the response's `kv_transfer_params` go into the decode request, whose
server then pulls the KV from the prefill server. Decode: always streamed (with usage) so the router can time
the first token, whatever the client asked for.

Failures, told apart because they call for different answers: `BackendUnavailable` (no connection, or it broke
before anything came: the server may be gone, the turn may go elsewhere), `BackendRejected` (the server answered
an HTTP error: it is there, the request is what it refused; its status and message go back to the client) and
`BackendBroken` (the connection broke after the answer started: the client gets an error, nothing is replayed).
Every request carries `headers` (the `Authorization` the servers need, `conserve.router.auth.BackendCredentials`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp

from conserve.router.policy import CONVERSATION_HEADER
from conserve.router.turns import TurnError, TurnResult

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class BackendUnavailable(Exception):
    """The server could not be reached, or the connection broke before it sent anything."""


class BackendRejected(Exception):
    """The server answered an HTTP error: `status` and its `message` (vLLM's and OpenAI's error shapes read)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class BackendBroken(Exception):
    """The connection broke (or the stream ended without `[DONE]`) after the answer started."""


def as_turn_error(err: BackendRejected | BackendBroken) -> TurnError:
    """What the client gets: a server's 4xx as that 4xx with its message, any other error as a 502 with it."""
    if isinstance(err, BackendBroken):
        return TurnError(502, f"the model server failed mid-answer: {err}", code="BackendBroken")
    status = err.status if 400 <= err.status < 500 else 502
    return TurnError(status, f"the model server refused the request: {err.message}", code="BackendRejected")


#: Errors that mean the connection failed (aiohttp's, a socket's, a timeout).
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError)


def error_message(status: int, text: str) -> str:
    """The message of a server's error body: OpenAI's `{"error": {"message"}}`, vLLM's `{"message"}`, or the text
    (at most 500 characters)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        message = inner.get("message") if isinstance(inner, dict) else data.get("message")
        if isinstance(message, str) and message:
            return message[:500]
    return text.strip()[:500] or f"HTTP {status}"


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = copy.copy(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.copy(body)
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}
    out.pop("kv_transfer_params", None)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


def _headers(conversation_id: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    return {**extra, CONVERSATION_HEADER: conversation_id} if conversation_id else dict(extra)


async def prefill(
    session: aiohttp.ClientSession,
    endpoint: str,
    kind: str,
    body: dict[str, Any],
    conversation_id: str | None,
    headers: Mapping[str, str] = MappingProxyType({}),
) -> dict[str, Any] | None:
    """Run the prefill; returns the kv_transfer_params for the decoder (None if the server gave none)."""
    url = f"http://{endpoint}{PATHS[kind]}"
    try:
        async with session.post(url, json=prefill_body(body), headers=_headers(conversation_id, headers)) as resp:
            if resp.status >= 400:
                raise BackendRejected(resp.status, error_message(resp.status, await resp.text()))
            data = await resp.json(content_type=None)
    except _CONNECTION_ERRORS as err:
        raise BackendUnavailable(f"prefill {endpoint}: {type(err).__name__}: {err}") from err
    except ValueError as err:  # not JSON
        raise BackendRejected(502, "the prefill server's answer is not JSON") from err
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return params if isinstance(params, dict) else None


async def stream_decode(
    session: aiohttp.ClientSession,
    endpoint: str,
    kind: str,
    body: dict[str, Any],
    conversation_id: str | None,
    kv_transfer_params: dict[str, Any] | None,
    headers: Mapping[str, str] = MappingProxyType({}),
) -> AsyncIterator[dict[str, Any]]:
    """Yields the decoder's SSE chunks (parsed). BackendUnavailable (before the first chunk) means nothing was
    generated, so the caller may retry elsewhere; BackendBroken after it. Closing the generator (the client left)
    closes the connection, which aborts the request on the server."""
    url = f"http://{endpoint}{PATHS[kind]}"
    payload = decode_body(body, kv_transfer_params)
    try:
        resp = await session.post(url, json=payload, headers=_headers(conversation_id, headers))
    except _CONNECTION_ERRORS as err:
        raise BackendUnavailable(f"decode {endpoint}: {type(err).__name__}: {err}") from err
    yielded = False
    async with resp:
        if resp.status >= 400:
            raise BackendRejected(resp.status, error_message(resp.status, await resp.text()))
        try:
            async for chunk in _events(resp):
                if chunk is None:  # [DONE]
                    return
                yielded = True
                yield chunk
        except _CONNECTION_ERRORS as err:
            if not yielded:
                raise BackendUnavailable(f"decode {endpoint}: {type(err).__name__}: {err}") from err
            raise BackendBroken(f"the decoder's connection broke mid-answer ({type(err).__name__})") from err
    if not yielded:
        raise BackendUnavailable(f"decode {endpoint}: the stream ended before any chunk")
    raise BackendBroken("the decoder's stream ended without [DONE]")


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON objects of an SSE body, None for `[DONE]`; an error event is BackendRejected (vLLM sends one when
    a request fails after its stream started)."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if isinstance(chunk, dict):
            if isinstance(chunk.get("error"), dict) and not chunk.get("choices"):
                raise BackendRejected(502, error_message(502, json.dumps(chunk)))
            yield chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            parts.append(delta["content"])
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


def note_usage_and_finish(chunk: dict[str, Any], result: TurnResult) -> None:
    """The decoder's own count of output tokens and its finish reason, when a chunk carries them."""
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            result.finish_reason = str(choice["finish_reason"])
