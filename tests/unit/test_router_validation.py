"""Request checks before the router acts: 400 naming the field (413 for size), nothing else done."""

from __future__ import annotations

import json

import pytest

from conserve.router.validation import MAX_ID_CHARS, RequestInvalid, check_headers, parse_body

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(**fields: object) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{oops", "not JSON"),
        (b"[1]", "JSON object"),
        (body(max_tokens="abc"), "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(max_tokens=1.5), "max_tokens"),
        (body(max_completion_tokens=-3), "max_completion_tokens"),
        (body(user="a\x00b"), "user"),
        (body(user="a\nb"), "user"),
        (body(user=5), "user"),
        (body(user="x" * (MAX_ID_CHARS + 1)), "user"),
        (body(metadata={"conversation_id": "\x07"}), "metadata.conversation_id"),
        (body(metadata="x"), "metadata"),
        (body(stream="yes"), "stream"),
        (body(stream_options=[]), "stream_options"),
        (body(model=3), "model"),
        (body(messages=[]), "messages"),
        (body(messages=["hi"]), "messages[0]"),
    ],
)
def test_a_bad_chat_body_is_400_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(RequestInvalid) as refused:
        parse_body(raw, "chat")
    assert refused.value.status == 400
    assert field in str(refused.value)


def test_a_completion_needs_a_prompt() -> None:
    assert parse_body(b'{"prompt": "hi", "max_tokens": 3}', "completions")["prompt"] == "hi"
    with pytest.raises(RequestInvalid, match="prompt"):
        parse_body(b'{"max_tokens": 3}', "completions")


def test_a_good_body_is_returned_as_sent() -> None:
    sent = {**CHAT, "max_tokens": 10, "user": "chat-1", "stream": True, "temperature": 0.2, "extra": {"x": 1}}
    assert parse_body(json.dumps(sent).encode(), "chat") == sent
    assert parse_body(body(max_tokens=None), "chat")["max_tokens"] is None  # null: the server's default


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-Conversation-Id": "a\x00"}, "X-Conversation-Id"),
        ({"X-Conserve-Pool": "Bad_Pool"}, "X-Conserve-Pool"),
        ({"X-Conserve-Pool": "../x"}, "X-Conserve-Pool"),
        ({"X-Conserve-Routing": "fastest"}, "X-Conserve-Routing"),
    ],
)
def test_bad_router_headers_are_400_naming_the_header(headers: dict[str, str], field: str) -> None:
    with pytest.raises(RequestInvalid, match=field):
        check_headers(headers)
    check_headers({"X-Conversation-Id": "chat-1", "X-Conserve-Pool": "llama.small", "X-Conserve-Routing": "per-turn"})
