"""The API calls e2e tests and benchmarks make against a real API server, through the one Kubernetes adapter:
the CRDs applied and Established, Conversations and DecoderPools created, read, patched and deleted, pods and
Events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conserve.api import conversation, crdgen, decoderpool
from conserve.api.common import GROUP, VERSION
from conserve.kube import MERGE_PATCH, ApiError, status_of
from conserve.kube.clients import ApiextensionsV1Api, CoreV1Api, CustomObjectsApi
from conserve.testkit.builders import conversation_body, pod_body, pool_body
from conserve.testkit.wait import wait_for

Body = dict[str, Any]

#: What a read of something the operator has not written yet raises: a 404, or a status field not there yet (a
#: KeyError, or a TypeError from indexing a status that is still None). A probe reading through `Api` passes
#: `tolerate=NOT_YET` to `wait_for`.
NOT_YET: tuple[type[Exception], ...] = (ApiError, LookupError, TypeError)

_PLURALS = {conversation.KIND: conversation.PLURAL, decoderpool.KIND: decoderpool.PLURAL}


class Api:
    """The few calls tests make, on one ApiClient, in one namespace."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.custom = CustomObjectsApi(api_client)
        self.core = CoreV1Api(api_client)
        self.namespace = namespace

    def create(self, body: Body) -> Body:
        if body["kind"] == "Pod":
            self.core.create_namespaced_pod(self.namespace, body)
            return body
        created: Body = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, _PLURALS[body["kind"]], body
        )
        return created

    def create_fleet(self, decoders: int, tokens: int = 10_000, *, prefills: int = 0, **spec: Any) -> None:
        """The pool `llama` of `tokens` KV per decoder (`spec`: more of its fields, as on the wire), its decoders
        `dec-<i>` on the devcluster's KWOK H200 nodes and its prefill servers `pre-<i>` on the H100 ones (bare
        pods: KWOK runs them without a scheduler)."""
        self.create(pool_body("llama", tokens_per_decoder=tokens, **spec))
        for i in range(decoders):
            self.create(pod_body(f"dec-{i}", f"kwok-h200-{i % 2}"))
        for i in range(prefills):
            self.create(pod_body(f"pre-{i}", f"kwok-h100-{i % 2}", app="dec-prefill"))

    def first_placement(self, tokens: int = 2000, timeout_s: float = 60.0) -> Body:
        """One decoder and one prefill server (`create_fleet`), seen ready in the pool's status; then the
        conversation `c0` of `tokens` first-turn tokens: its status once placed."""
        self.create_fleet(1, prefills=1)
        # The pool status writer (decoderpools/status patch) follows the pod and node watches.
        self.wait_ready_decoders(1, timeout_s=timeout_s)
        self.create(conversation_body("c0", "llama", tokens))
        return self.wait_conv_phase("c0", "Prefilling", timeout_s)

    def wait_ready_decoders(self, count: int, pool: str = "llama", timeout_s: float = 15.0) -> Body:
        """The pool's status once it counts `count` ready decoders."""

        def ready() -> Body | None:
            status = self.pool_status(pool)
            return status if status.get("readyDecoders") == count else None

        return wait_for(f"{count} ready decoders in {pool}'s status", ready, timeout_s, tolerate=NOT_YET)

    def wait_conv_phase(self, name: str, phase: str, timeout_s: float = 15.0) -> Body:
        """The conversation's status once it shows `phase`."""

        def in_phase() -> Body | None:
            status = self.conv_status(name)
            return status if status.get("phase") == phase else None

        return wait_for(f"{name} {phase}", in_phase, timeout_s, tolerate=NOT_YET)

    def get_conv(self, name: str) -> Body:
        return self._get(conversation.PLURAL, name)

    def get_pool(self, name: str) -> Body:
        return self._get(decoderpool.PLURAL, name)

    def conv_status(self, name: str) -> Body:
        """The conversation's status; empty until the operator writes one."""
        return dict(self.get_conv(name).get("status") or {})

    def conv_condition(self, name: str, type_: str) -> Body | None:
        """The conversation's condition of that type; None until the operator writes one."""
        return next((c for c in self.conv_status(name).get("conditions", []) if c["type"] == type_), None)

    def pool_status(self, name: str) -> Body:
        """The pool's status; empty until the operator writes one."""
        return dict(self.get_pool(name).get("status") or {})

    def list_convs(self) -> list[Body]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, conversation.PLURAL)
        return list(out["items"])

    def patch_conv(self, name: str, spec: Body) -> None:
        self._merge_patch(name, {"spec": spec})

    def delete_conv(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, conversation.PLURAL, name)

    def conv_exists(self, name: str) -> bool:
        try:
            self.get_conv(name)
        except ApiError as exc:
            if status_of(exc) == 404:
                return False
            raise
        return True

    def strip_finalizers(self) -> None:
        """After the operator stopped: let the namespace's conversations go (no operator is left to release)."""
        for item in self.list_convs():
            if item["metadata"].get("finalizers"):
                self._merge_patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)

    def events(self, reason: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [e for e in items if reason is None or e.reason == reason]

    def _get(self, plural: str, name: str) -> Body:
        out: Body = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        return out

    def _merge_patch(self, name: str, patch: Body) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, conversation.PLURAL, name, patch, **MERGE_PATCH
        )


def install_crds(api_client: Any, directory: Path = crdgen.CRDS_DIR, timeout_s: float = 30.0) -> None:
    """Create or update the CRDs and wait until they are Established (idempotent)."""
    ext = ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(directory.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        try:
            ext.create_custom_resource_definition(body)
        except ApiError as exc:
            if status_of(exc) != 409:
                raise
            body["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(name).metadata.resource_version
            ext.replace_custom_resource_definition(name, body)

    def established() -> bool:
        for name in names:
            crd = ext.read_custom_resource_definition(name)
            conditions = {c.type: c.status for c in ((crd.status and crd.status.conditions) or [])}
            if conditions.get("Established") != "True":
                return False
        return True

    wait_for("the CRDs Established", established, timeout_s)
