"""Leader election on a coordination.k8s.io Lease: of several replicas, only the holder runs the operator.

Why not Kopf peering: peers of equal priority all pause (kopf/_core/engines/peering.py), so replicas need
distinct priorities, and a paused replica that resumes has no hook to rebuild its ledger. A Lease gives the
usual Kubernetes semantics instead: a standby waits for the Lease; the holder renews it every `renew_s`; when a
renewal has not succeeded for `renew_deadline_s` (less than the lease duration, so the holder always stops
before another can take over) the holder stops, and its process exits non-zero to be restarted as a standby.
A new leader starts from scratch: the ledger is rebuilt from the API server before any decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from conserve.controller.kube import k8s

log = logging.getLogger("conserve.operator")
T = TypeVar("T")


def lease_call(call: Callable[[], T], what: str) -> T | None:
    """One Lease API call; None when it failed, logged. Elections go on after any failure of one call (an API
    error, a timeout, a reset connection): a run of failures is for the holder's watchdog to judge."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 logged; the election must outlive any one failed call
        log.warning("leader election: %s failed: %s", what, exc)
        return None


def _micro(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """A Lease's duration, its holder's renew period, and how long the holder may go without a good renewal
    before it stops (less than the duration: it stops before another replica may take the Lease over)."""

    lease_duration_s: int = 15
    renew_s: float = 2.0
    renew_deadline_s: float = 10.0

    @classmethod
    def for_duration(cls, duration_s: float) -> LeaseTiming:
        """client-go's ratios (15 s lease, 10 s renew deadline, 2 s retry), for every Lease of the operator."""
        return cls(max(int(duration_s), 1), renew_s=duration_s * 2 / 15, renew_deadline_s=duration_s * 2 / 3)


class LeaderElector:
    def __init__(
        self, api_client: Any, namespace: str, name: str, identity: str, timing: LeaseTiming | None = None
    ) -> None:
        self._api = k8s("client").CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing or LeaseTiming()

    def _try_acquire_or_renew(self) -> bool:
        api_exception = k8s("client.rest").ApiException
        now = dt.datetime.now(dt.UTC)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.timing.lease_duration_s,
            "renewTime": _micro(now),
        }
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except api_exception as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            try:
                self._api.create_namespaced_lease(self.namespace, body)
                return True
            except api_exception as exc2:
                if exc2.status == 409:
                    return False
                raise
        holder = lease.spec.holder_identity or ""
        renewed = lease.spec.renew_time
        duration = lease.spec.lease_duration_seconds or self.timing.lease_duration_s
        expired = renewed is None or renewed + dt.timedelta(seconds=duration) < now
        if holder and holder != self.identity and not expired:
            return False
        acquired = lease.spec.acquire_time
        transitions = lease.spec.lease_transitions or 0
        if holder != self.identity:
            acquired, transitions = now, transitions + 1
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            # resourceVersion makes the write conditional: of two standbys racing for it, one gets a 409.
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": {**spec, "acquireTime": _micro(acquired or now), "leaseTransitions": transitions},
        }
        try:
            self._api.replace_namespaced_lease(self.name, self.namespace, body)
        except api_exception as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def attempt(self, what: str = "renewing") -> bool | None:
        """One acquire-or-renew, in a thread: True when this replica holds the Lease now, False when another
        replica does, None when the call failed (logged)."""
        return await asyncio.to_thread(lease_call, self._try_acquire_or_renew, f"{what} lease {self.name}")

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while not await self.attempt("acquiring"):
            if not announced:
                log.info("leader election: waiting for lease %s/%s held by another replica", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.timing.renew_s)
        log.info("leader election: %s holds lease %s/%s", self.identity, self.namespace, self.name)

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew every renew_s; set `lost` once no renewal has succeeded for renew_deadline_s, measured from the
        start of the last good one (the renewTime it wrote) by a watchdog that does not wait on a slow API call,
        or as soon as another replica holds the Lease."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()

        async def renew_forever() -> None:
            nonlocal last_ok
            while True:
                started = loop.time()
                if await self.attempt():
                    last_ok = max(last_ok, started)
                elif await asyncio.to_thread(lease_call, self._held_by_other, f"reading lease {self.name}"):
                    log.error("leader election: lease %s/%s taken by another replica", self.namespace, self.name)
                    lost.set()
                    return
                await asyncio.sleep(self.timing.renew_s)

        renewer = asyncio.create_task(renew_forever())
        try:
            while not lost.is_set():
                if loop.time() - last_ok > self.timing.renew_deadline_s:
                    log.error(
                        "leader election: no renewal of %s/%s for %.1fs; stopping",
                        self.namespace,
                        self.name,
                        self.timing.renew_deadline_s,
                    )
                    lost.set()
                    break
                await asyncio.sleep(0.1)
        finally:
            renewer.cancel()

    def _held_by_other(self) -> bool:
        lease = self._api.read_namespaced_lease(self.name, self.namespace)
        return bool(lease.spec.holder_identity) and lease.spec.holder_identity != self.identity

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once instead of after its expiry."""
        lease_call(self._release, f"releasing lease {self.name}")

    def _release(self) -> None:
        lease = self._api.read_namespaced_lease(self.name, self.namespace)
        if lease.spec.holder_identity == self.identity:
            self._api.patch_namespaced_lease(
                self.name, self.namespace, {"spec": {"holderIdentity": None, "renewTime": None}}
            )
