"""The threaded contender of benchmarks/kube_client_bench.py: the router's control plane as it was before it moved
to the asyncio client, the synchronous `kubernetes` client in threads.

Its watches are `conserve.kube.Informer`s (threads that hand events to the event loop) and its writes run on two
thread pools of its own (creates never queue behind usage patches, and neither waits for the loop's small default
executor); the placement cache and its waiters are the router's own (`PlacementCache`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.kube import ApiError, Informer, new_api_client
from conserve.kube.clients import CustomObjectsApi
from conserve.router.control import PlacementCache, conversation_body

#: Threads of the create pool (a burst of new conversations) and of the usage-patch pool.
CREATE_THREADS = 32
PATCH_THREADS = 8


class ThreadedControlPlane(PlacementCache):
    """The router's `ControlPlane` on the synchronous client: informer threads and two write pools."""

    def __init__(self, *, namespace: str, kubeconfig: str | Path | None) -> None:
        super().__init__()
        # One connection per thread of the two pools, plus the two watches.
        self._client = new_api_client(kubeconfig, pool_size=CREATE_THREADS + PATCH_THREADS + 2)
        self._api = CustomObjectsApi(self._client)
        self._namespace = namespace
        self._informers: list[Informer] = []
        self._creates = ThreadPoolExecutor(CREATE_THREADS, thread_name_prefix="router-create")
        self._patches = ThreadPoolExecutor(PATCH_THREADS, thread_name_prefix="router-patch")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._informers = await self.follow(
            Informer, self._api.list_namespaced_custom_object, self._namespace, loop=loop
        )

    async def stop(self) -> None:
        for informer in self._informers:
            informer.stop()
        self._creates.shutdown(wait=False, cancel_futures=True)
        self._patches.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    async def _call(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def create_conversation(self, name: str, spec: dict[str, Any], owner: str = "") -> None:
        create = self._api.create_namespaced_custom_object
        try:
            await self._call(
                self._creates, create, GROUP, VERSION, self._namespace, CONVERSATIONS, conversation_body(name, spec)
            )
        except ApiError as err:
            if err.status != 409:  # already there
                raise

    async def delete_conversation(self, name: str) -> None:
        uid = self.forget(name)
        options = {"preconditions": {"uid": uid}} if uid else {}
        delete = functools.partial(self._api.delete_namespaced_custom_object, body=options)
        try:
            await self._call(self._creates, delete, GROUP, VERSION, self._namespace, CONVERSATIONS, name)
        except ApiError as err:
            if err.status not in (404, 409):  # gone, or already replaced
                raise

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None:
        patch_object = self._api.patch_namespaced_custom_object
        await self._call(self._patches, patch_object, GROUP, VERSION, self._namespace, CONVERSATIONS, name, patch)
