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
from typing import Any

from conserve.controller.kube import k8s

log = logging.getLogger("conserve.operator")


def _micro(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: int = 15,
        renew_s: float = 2.0,
        renew_deadline_s: float = 10.0,
    ) -> None:
        self._api = k8s("client").CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s, self.renew_s, self.renew_deadline_s = lease_duration_s, renew_s, renew_deadline_s

    def _try_acquire_or_renew(self) -> bool:
        api_exception = k8s("client.rest").ApiException
        now = dt.datetime.now(dt.UTC)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_duration_s,
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
        duration = lease.spec.lease_duration_seconds or self.lease_duration_s
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

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while True:
            try:
                if await asyncio.to_thread(self._try_acquire_or_renew):
                    log.info("leader election: %s holds lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except Exception as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("leader election: waiting for lease %s/%s held by another replica", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew_s)

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
                try:
                    ok = await asyncio.to_thread(self._try_acquire_or_renew)
                except Exception as exc:
                    log.warning("leader election: renewal failed: %s", exc)
                    ok = False
                if ok:
                    last_ok = max(last_ok, started)
                elif await asyncio.to_thread(self._held_by_other):
                    log.error("leader election: lease %s/%s taken by another replica", self.namespace, self.name)
                    lost.set()
                    return
                await asyncio.sleep(self.renew_s)

        renewer = asyncio.create_task(renew_forever())
        try:
            while not lost.is_set():
                if loop.time() - last_ok > self.renew_deadline_s:
                    log.error(
                        "leader election: no renewal of %s/%s for %.1fs; stopping",
                        self.namespace,
                        self.name,
                        self.renew_deadline_s,
                    )
                    lost.set()
                    break
                await asyncio.sleep(0.1)
        finally:
            renewer.cancel()

    def _held_by_other(self) -> bool:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except Exception:
            return False
        return bool(lease.spec.holder_identity) and lease.spec.holder_identity != self.identity

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once instead of after its expiry."""
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                self._api.patch_namespaced_lease(
                    self.name, self.namespace, {"spec": {"holderIdentity": None, "renewTime": None}}
                )
        except Exception as exc:
            log.warning("leader election: release failed: %s", exc)
