"""The operator's engine on the fake API, for the unit tests of its decisions: an H200 node, decoder (and
prefill) pods, one pool `llama`, and the ledger rebuilt from the fake API as the operator does at startup."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from conserve.controller import startup
from conserve.controller.engine import Engine, EngineConfig
from conserve.testkit import FakeClock, FakeKube, PodBuilder, conversation_body, gpu_node, pool_body

NS = "ns"
Body = dict[str, Any]


def sync(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """No asyncio plugin in the test environment: run each async test in its own event loop."""

    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


def pod(name: str, node: str, ready: bool = True, app: str = "dec") -> Body:
    """A one-GPU serving pod in NS, bound to `node` and Running (Ready or not)."""
    return PodBuilder(name).namespace(NS).on(node).app(app).running(ready=ready).build()


def stored(body: Body, *, generation: int = 1, created: str | None = None) -> Body:
    """`body` as the API server returns it: in NS, with a uid, a generation and (given) its creation time."""
    body["metadata"].update(namespace=NS, uid=f"uid-{body['metadata']['name']}", generation=generation)
    if created is not None:
        body["metadata"]["creationTimestamp"] = created
    return body


def stored_conv(name: str, tokens: int, *, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> Body:
    """A stored conversation of pool `llama`; `spec` as on the wire."""
    return stored(conversation_body(name, "llama", tokens, **spec), created=created)


def pool_world(decoders: int, tokens: int = 10_000, *, prefills: int = 0, **pool_spec: Any) -> FakeKube:
    """The fake API holding one H200 node `n0`, decoders `dec-<i>` (and prefill servers `pre-<i>`) on it, and
    the pool `llama` of `tokens` KV per decoder (9,500 usable of 10,000)."""
    kube = FakeKube()
    kube.nodes = [gpu_node("n0")]
    kube.pods = [pod(f"dec-{i}", "n0") for i in range(decoders)]
    kube.pods += [pod(f"pre-{i}", "n0", app="dec-prefill") for i in range(prefills)]
    body = pool_body("llama", tokens_per_decoder=tokens, **pool_spec)
    body["metadata"].update(namespace=NS, generation=1)
    kube.objects["decoderpools"] = [body]
    return kube


async def started_engine(kube: FakeKube, clock: FakeClock | None = None) -> Engine:
    """An engine on `kube` (and `clock`; the system's by default), its ledger rebuilt from what `kube` holds."""
    engine = Engine(kube, EngineConfig(), clock=clock)
    await startup.rebuild(engine, [NS])
    return engine


async def engine_with(decoders: int, tokens: int = 10_000, **pool_spec: Any) -> tuple[Engine, FakeKube]:
    """An engine on a fresh `pool_world`."""
    kube = pool_world(decoders, tokens, **pool_spec)
    return await started_engine(kube), kube


def held_per_decoder(engine: Engine) -> dict[str, int]:
    """The KV tokens reserved on each decoder of the pool."""
    pool = engine.world.pool(NS, "llama")
    return {d.name: d.reserved_kv_tokens for d in pool.scheduler.decoders()}
