"""An in-memory API server behind `conserve.controller.kube.Kube`, for unit tests of the adapters that write.

Status and object patches are JSON merge patches (RFC 7386: nested objects merge, `None` removes a key, lists
are replaced); each write bumps the object's resourceVersion, and a patch carrying
`metadata.resourceVersion` is refused (409, `Conflict`) unless it matches, as the API server does. Lists return
copies. An object a test did not register is created by its first patch (a test of the writer need not build
the whole object); with `strict=True` that patch is a 404 (`NotFound`) instead.
"""

from __future__ import annotations

import asyncio
import copy
from collections import defaultdict
from typing import Any

from conserve.kube.errors import Conflict, NotFound

Body = dict[str, Any]


def merge_patch(target: Body, patch: Body) -> Body:
    """Apply a JSON merge patch to `target` in place (and return it)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKube:
    """Objects by plural (`objects`), pods, nodes; the writes it saw (`patches`, `events`)."""

    def __init__(self, objects: dict[str, list[Body]] | None = None, *, strict: bool = False) -> None:
        self.objects: defaultdict[str, list[Body]] = defaultdict(list, objects or {})
        self.pods: list[Body] = []
        self.nodes: list[Body] = []
        self.strict = strict
        self.patches: list[tuple[str, str, Body]] = []
        self.events: list[tuple[str, str]] = []
        #: The status / metadata of every object written through this fake, by (plural, name).
        self.status: dict[tuple[str, str], Body] = {}
        self.meta: dict[tuple[str, str], Body] = {}

    # --- reads ---------------------------------------------------------------------------------------------

    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]:
        return [copy.deepcopy(o) for o in self.objects[plural] if _in(o, namespace)]

    async def list_pods(self, namespace: str | None) -> list[Body]:
        return [p for p in self.pods if _in(p, namespace)]

    async def list_nodes(self) -> list[Body]:
        return self.nodes

    def get(self, plural: str, name: str, namespace: str | None = None) -> Body:
        """The stored object itself (a test may edit it, as another writer would)."""
        found = self._find(plural, namespace, name)
        if found is None:
            raise KeyError(f"{plural}/{name}")
        return found

    # --- writes --------------------------------------------------------------------------------------------

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        obj = await self._patch(plural, namespace, name, patch, "status")
        self.status[(plural, name)] = obj["status"]
        return copy.deepcopy(obj)

    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        obj = await self._patch(plural, namespace, name, patch, "metadata", "spec")
        self.meta[(plural, name)] = obj["metadata"]
        return copy.deepcopy(obj)

    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((obj["metadata"]["name"], reason))

    async def _patch(self, plural: str, namespace: str, name: str, patch: Body, *fields: str) -> Body:
        await asyncio.sleep(0)  # let other tasks interleave, as real I/O would
        obj = self._find(plural, namespace, name)
        if obj is None:
            if self.strict:
                raise NotFound(404, f"{plural} {namespace}/{name} not found")
            obj = {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "0"}}
            self.objects[plural].append(obj)
        meta = obj.setdefault("metadata", {})
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and str(wanted) != str(meta.get("resourceVersion")):
            raise Conflict(409, f"{plural} {name}: resourceVersion {wanted} is stale")
        for field in fields:
            if field in patch:
                merge_patch(
                    obj.setdefault(field, {}), {k: v for k, v in patch[field].items() if k != "resourceVersion"}
                )
        obj.setdefault("status", {})
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)
        self.patches.append((plural, name, patch))
        return obj

    def _find(self, plural: str, namespace: str | None, name: str) -> Body | None:
        for obj in self.objects[plural]:
            meta = obj.get("metadata") or {}
            if meta.get("name") == name and _in(obj, namespace):
                return obj
        return None


def _in(obj: Body, namespace: str | None) -> bool:
    """Whether the object is in the namespace (None: any; an object a test built without one: every one)."""
    own = (obj.get("metadata") or {}).get("namespace")
    return namespace is None or own is None or own == namespace
