"""Sharding by pool: several operator replicas, each leading a disjoint set of DecoderPools.

A pool belongs to shard `shard_of(namespace, pool, shards)` (a stable hash, the same in every replica). Each
shard is a `coordination.k8s.io` Lease, `<prefix>-shard-<i>`; each replica also renews a member Lease,
`<prefix>-member-<identity>`, so replicas can count each other. A replica holds at most its fair share,
ceil(shards / live members): it takes free or expired shards below that share, and hands back (fence first,
then release) what is above it, so a replica that joins gets its share within a renew period or two.

Nothing is placed twice: a shard's pools are decided only by its holder. A holder that cannot renew a shard for
`renew_deadline_s` (less than the Lease duration) stops writing for it before anyone else can take it; a new
holder rebuilds the shard's ledger from the API server before deciding (`on_acquired`); a replica's death hands
its shards to the others once their Leases expire (at most the Lease duration plus a renew period).

Decisions within a pool still have one writer; placements of different pools run in different processes, so
placement throughput grows with replicas until the API server is the limit (docs/SCALE.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conserve.controller import startup
from conserve.controller.kube import k8s
from conserve.controller.leader import LeaderElector, LeaseTiming, lease_call

log = logging.getLogger("conserve.operator")


def shard_of(namespace: str, pool: str, shards: int) -> int:
    """The shard of a pool: stable across processes and releases (not Python's salted hash)."""
    digest = hashlib.sha256(f"{namespace}/{pool}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def fair_share(shards: int, members: int) -> int:
    return math.ceil(shards / max(members, 1))


@dataclass
class ShardSet:
    """Which shards this replica leads, and which of them have their ledger rebuilt (`ready`)."""

    shards: int
    held: set[int] = field(default_factory=set)
    ready: dict[int, asyncio.Event] = field(default_factory=dict)
    #: Writes on their way to the API server, by shard (a shard is handed back once its writes have landed).
    inflight: dict[int, int] = field(default_factory=dict)

    def owns(self, namespace: str, pool: str) -> bool:
        return shard_of(namespace, pool, self.shards) in self.held

    async def wait_owned(self, namespace: str, pool: str) -> bool:
        """True once the pool's shard is held and rebuilt; False (at once) when another replica leads it."""
        shard = shard_of(namespace, pool, self.shards)
        if shard not in self.held:
            return False
        await self.ready.setdefault(shard, asyncio.Event()).wait()
        return shard in self.held


Callback = Callable[[int], Awaitable[None]]


class ShardLeases:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        prefix: str,
        identity: str,
        shard_set: ShardSet,
        timing: LeaseTiming,
        *,
        on_acquired: Callback,
        on_lost: Callback,
    ) -> None:
        self.namespace, self.prefix, self.identity = namespace, prefix, identity
        self.set = shard_set
        self.timing = timing
        self._on_acquired, self._on_lost = on_acquired, on_lost

        def elector(name: str) -> LeaderElector:
            return LeaderElector(api_client, namespace, name, identity, timing)

        self._member = elector(f"{prefix}-member-{identity}")
        self._shards = [elector(f"{prefix}-shard-{i}") for i in range(shard_set.shards)]
        self._api = k8s("client").CoordinationV1Api(api_client)
        self._last_ok: dict[int, float] = {}
        self._busy: set[int] = set()  # shards whose ledger is being rebuilt
        self._tasks: set[asyncio.Task[None]] = set()

    def _live_members(self) -> int:
        now = dt.datetime.now(dt.UTC)
        leases = self._api.list_namespaced_lease(self.namespace).items
        live = 0
        for lease in leases:
            if not lease.metadata.name.startswith(f"{self.prefix}-member-"):
                continue
            renewed, duration = lease.spec.renew_time, lease.spec.lease_duration_seconds or self.timing.lease_duration_s
            if lease.spec.holder_identity and renewed and renewed + dt.timedelta(seconds=duration) >= now:
                live += 1
        return max(live, 1)

    async def run(self) -> None:
        """Join (member Lease, one renew period so replicas started together see each other), then keep this
        replica's share of shards, for as long as the operator runs."""
        loop = asyncio.get_running_loop()
        await self._member.attempt("joining with")
        await asyncio.sleep(self.timing.renew_s)
        watchdog = asyncio.create_task(self._watchdog())
        offset = shard_of("", self.identity, self.set.shards)  # replicas try shards in different orders
        try:
            while True:
                members = await self._members()
                for shard in sorted(self.set.held):
                    await self._renew(shard, loop.time())
                if members:
                    target = fair_share(self.set.shards, members)
                    excess = max(len(self.set.held) - target, 0)
                    for shard in sorted(self.set.held - self._busy, reverse=True)[:excess]:
                        await self._hand_back(shard)
                    order = [(offset + i) % self.set.shards for i in range(self.set.shards)]
                    for shard in order:
                        if len(self.set.held) >= target:
                            break
                        if shard not in self.set.held and shard not in self._busy:
                            await self._try_take(shard, loop.time())
                await asyncio.sleep(self.timing.renew_s)
        finally:
            watchdog.cancel()

    async def _members(self) -> int:
        """Renew this replica's member Lease and count the live members; 0 (no rebalancing this round) when
        either call failed (logged: a missed renewal is for the watchdog to judge)."""
        if await self._member.attempt() is None:
            return 0
        return await asyncio.to_thread(lease_call, self._live_members, "counting members") or 0

    async def _renew(self, shard: int, started: float) -> None:
        ok = await self._shards[shard].attempt()
        if ok:
            self._last_ok[shard] = max(self._last_ok.get(shard, started), started)
        elif ok is False and shard in self.set.held:
            log.error("shards: shard %d taken by another replica", shard)
            await self._lose(shard)

    async def _try_take(self, shard: int, started: float) -> None:
        if not await self._shards[shard].attempt("acquiring"):
            return
        self._last_ok[shard] = started
        self.set.held.add(shard)
        self.set.ready[shard] = asyncio.Event()
        self._busy.add(shard)
        # The rebuild runs beside the renewals (a big shard's list takes seconds; the other Leases must not lapse).
        task = asyncio.create_task(self._rebuild(shard))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rebuild(self, shard: int) -> None:
        gate = self.set.ready[shard]
        try:
            await self._on_acquired(shard)
        except Exception:
            log.exception("shards: rebuilding shard %d failed; handing it back", shard)
            await self._lose(shard)
            await asyncio.to_thread(self._shards[shard].release)
        finally:
            self._busy.discard(shard)
            gate.set()
        if shard not in self.set.held:  # lost while rebuilding: forget what the rebuild loaded
            await self._on_lost(shard)
            return
        log.info("shards: %s holds shards %s", self.identity, sorted(self.set.held))

    async def _hand_back(self, shard: int) -> None:
        log.info("shards: handing shard %d back (above this replica's share)", shard)
        await self._lose(shard)
        # Writes already sent land before another replica can take over and list the shard (else it could list
        # a conversation as unplaced whose placement is still on its way, and place it twice).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.renew_deadline_s
        while self.set.inflight.get(shard, 0) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._shards[shard].release)

    async def _lose(self, shard: int) -> None:
        """Stop writing for the shard at once (fence), then forget its pools."""
        self.set.held.discard(shard)
        self._last_ok.pop(shard, None)
        gate = self.set.ready.pop(shard, None)
        if gate is not None:
            gate.set()  # waiting handlers see the shard is no longer held and drop their events
        await self._on_lost(shard)

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            for shard in list(self.set.held):
                if loop.time() - self._last_ok.get(shard, loop.time()) > self.timing.renew_deadline_s:
                    log.error(
                        "shards: no renewal of shard %d for %.1fs; stopping it", shard, self.timing.renew_deadline_s
                    )
                    await self._lose(shard)

    def release_all(self) -> None:
        """On a clean stop: give every Lease back so the others take over at once."""
        for shard in sorted(self.set.held):
            self._shards[shard].release()
        self.set.held.clear()
        self._member.release()


class ShardFencedKube:
    """A `Kube` that drops writes for pools this replica does not lead (the moment a shard is lost, before Kopf
    or a decision in flight notices). `pool_of_conversation` maps (namespace, name) to the pool's name, or None
    when the conversation is unknown (then its shard's holder has dropped it too: the write is dropped)."""

    def __init__(self, inner: Any, shard_set: ShardSet, pool_of_conversation: Callable[[str, str], str | None]) -> None:
        self.inner = inner
        self.set = shard_set
        self.pool_of_conversation = pool_of_conversation
        self.dropped = 0

    def _shard(self, plural: str, namespace: str, name: str) -> int | None:
        """The shard of the object's pool when this replica holds it, else None (the write is dropped)."""
        pool = name if plural.startswith("decoderpools") else self.pool_of_conversation(namespace, name)
        shard = shard_of(namespace, pool, self.set.shards) if pool is not None else None
        if shard is None or shard not in self.set.held:
            self.dropped += 1
            return None
        return shard

    async def _fenced(self, shard: int, call: Awaitable[Any]) -> Any:
        self.set.inflight[shard] = self.set.inflight.get(shard, 0) + 1
        try:
            return await call
        finally:
            self.set.inflight[shard] -= 1

    async def list_objects(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        return list(await self.inner.list_objects(plural, namespace))

    async def list_pods(self, namespace: str | None) -> list[dict[str, Any]]:
        return list(await self.inner.list_pods(namespace))

    async def list_nodes(self) -> list[dict[str, Any]]:
        return list(await self.inner.list_nodes())

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        shard = self._shard(plural, namespace, name)
        if shard is None:
            return {}
        return dict(await self._fenced(shard, self.inner.patch_status(plural, namespace, name, patch)))

    async def patch_object(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        shard = self._shard(plural, namespace, name)
        if shard is None:
            return {}
        return dict(await self._fenced(shard, self.inner.patch_object(plural, namespace, name, patch)))

    async def post_event(self, obj: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        meta = obj.get("metadata", {})
        plural = "decoderpools" if obj.get("kind") == "DecoderPool" else "conversations"
        shard = self._shard(plural, meta.get("namespace", ""), meta.get("name", ""))
        if shard is not None:
            await self._fenced(shard, self.inner.post_event(obj, reason, message, warning=warning))

    def __getattr__(self, name: str) -> Any:  # api_client and other extras of the real client
        return getattr(self.inner, name)


@dataclass
class Sharding:
    """What `conserve operator --shards N` runs: the shard set (shared with the fenced client) and its Leases."""

    api_client: Any
    namespace: str
    prefix: str
    identity: str
    shard_set: ShardSet
    lease_duration_s: float = 15.0
    leases: ShardLeases | None = None

    async def start(self, engine: Any, namespaces: Sequence[str] | None) -> None:
        n = self.shard_set.shards

        def in_shard(shard: int) -> Callable[[str, str], bool]:
            return lambda namespace, pool: shard_of(namespace, pool, n) == shard

        async def acquired(shard: int) -> None:
            await startup.rebuild_pools(engine, namespaces, owns=in_shard(shard))

        async def lost(shard: int) -> None:
            dropped = startup.forget_pools(engine, in_shard(shard))
            log.info("shards: shard %d left (%d pools dropped)", shard, dropped)

        self.leases = ShardLeases(
            self.api_client,
            self.namespace,
            self.prefix,
            self.identity,
            self.shard_set,
            LeaseTiming.for_duration(self.lease_duration_s),
            on_acquired=acquired,
            on_lost=lost,
        )
        await self.leases.run()
