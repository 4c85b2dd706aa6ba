"""A request's body and headers checked before the router acts on them (creates a Conversation, picks a server):
every refusal is HTTP 400 naming the field and the reason (413 for a body over the limit, refused before it is
read whole). Only what the router itself reads is checked; the rest goes to the server as sent, and the server's
own 4xx comes back to the client."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from conserve.router.policy import CONVERSATION_HEADER, MODE_HEADER, POOL_HEADER, Mode

#: Default limit of a request body (bytes): a long prompt is some MB of text; larger is refused (413).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Longest conversation id (header, `user` or `metadata.conversation_id`).
MAX_ID_CHARS = 256
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class RequestInvalid(Exception):
    """A request the router refuses: its status (400, 413) and the reason, naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _bad(field: str, reason: str) -> RequestInvalid:
    return RequestInvalid(400, f"{field}: {reason}")


def _check_id(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    if len(value) > MAX_ID_CHARS:
        raise _bad(field, f"longer than {MAX_ID_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _bad(field, "contains control characters")


def parse_body(raw: bytes, kind: str) -> dict[str, Any]:
    """The JSON object of a request body, its fields checked; RequestInvalid otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestInvalid(400, f"body: not UTF-8 (byte {err.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestInvalid(400, f"body: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(body, dict):
        raise RequestInvalid(400, "body: must be a JSON object")
    check_fields(body, kind)
    return body


def check_fields(body: Mapping[str, Any], kind: str) -> None:
    _check_options(body)
    _check_ids(body)
    _check_prompt(body, kind)


def _check_options(body: Mapping[str, Any]) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _bad(field, "must be a positive integer")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise _bad("stream", "must be true or false")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise _bad("stream_options", "must be an object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad("model", "must be a string")


def _check_ids(body: Mapping[str, Any]) -> None:
    if body.get("user") is not None:
        _check_id("user", body["user"])
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata", "must be an object")
        if metadata.get("conversation_id") is not None:
            _check_id("metadata.conversation_id", metadata["conversation_id"])


def _check_prompt(body: Mapping[str, Any], kind: str) -> None:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad(f"messages[{i}]", "must be an object")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise _bad("prompt", "must be a string or a list")


def check_headers(headers: Mapping[str, str]) -> None:
    """The router's own headers: a conversation id it can store, a pool name Kubernetes can hold, a known mode."""
    conversation = headers.get(CONVERSATION_HEADER)
    if conversation is not None:
        _check_id(CONVERSATION_HEADER, conversation)
    pool = headers.get(POOL_HEADER)
    if pool is not None and not _POOL_NAME.match(pool):
        raise _bad(POOL_HEADER, "not a DecoderPool name (lowercase letters, digits, '-' and '.')")
    mode = headers.get(MODE_HEADER)
    if mode is not None and mode.strip().lower() not in {m.value for m in Mode}:
        raise _bad(MODE_HEADER, f"must be one of {', '.join(m.value for m in Mode)}")
