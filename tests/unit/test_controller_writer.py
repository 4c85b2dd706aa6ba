"""The operator's writes (controller/writer.py): retried on a transient failure, never after a refusal, nothing
once fenced; Normal Events only when asked for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conserve.api.conversation import ConversationSpec
from conserve.controller.state import ConvRecord
from conserve.controller.writer import Writer, WriterConfig
from conserve.testkit import FakeKube

NS = "ns"


class FlakyKube(FakeKube):
    """Status writes fail (a reset connection) this many times before they land."""

    def __init__(self, failures: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.attempts = 0

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return await super().patch_status(plural, namespace, name, patch)


def record(name: str = "a") -> ConvRecord:
    spec = ConversationSpec.model_validate({"pool": "llama", "firstTurnInputTokens": 100})
    conv = ConvRecord(NS, name, f"uid-{name}", spec, created_at_s=0.0)
    conv.dirty = True
    return conv


@pytest.mark.parametrize(
    ("failures", "retries", "strict", "attempts", "owed"),
    [
        (2, 3, False, 3, False),  # a transient failure is retried until the write lands
        (5, 2, False, 2, True),  # one that keeps failing stays owed: the record's next write sends it again
        (0, 6, True, 1, False),  # a refusal (strict: the object is gone, 404) is not retried, and nothing is owed
    ],
)
def test_status_writes_retry_transient_failures_only(
    failures: int, retries: int, strict: bool, attempts: int, owed: bool
) -> None:
    kube = FlakyKube(failures, strict=strict)
    conv = record()
    asyncio.run(Writer(kube, WriterConfig(write_retries=retries)).write_status(conv))
    assert kube.attempts == attempts
    assert conv.dirty is owed
    assert (("conversations", "a") in kube.status) is (not owed and not strict)


def test_nothing_is_written_once_fenced() -> None:
    kube = FlakyKube(failures=0)
    writer = Writer(kube, WriterConfig())
    writer.fenced = True

    async def run() -> None:
        await writer.write_status(record())
        writer.post_event(record(), "Outgrown", "kept pinned", warning=True)
        await writer.drain_background()

    asyncio.run(run())
    assert kube.attempts == 0
    assert kube.events == []


def test_normal_events_only_when_asked_for() -> None:
    async def posted(normal_events: bool) -> list[tuple[str, str]]:
        kube = FakeKube()
        writer = Writer(kube, WriterConfig(normal_events=normal_events))
        writer.post_event(record("a"), "Placed", "placed on dec-0")
        writer.post_event(record("b"), "Outgrown", "kept pinned", warning=True)
        await writer.drain_background()
        return sorted(kube.events)

    assert asyncio.run(posted(True)) == [("a", "Placed"), ("b", "Outgrown")]
    assert asyncio.run(posted(False)) == [("b", "Outgrown")]
