"""Fluent builders of the objects tests create: Conversations and DecoderPools (checked by their api models, so
a test cannot build what the CRD would refuse unless it asks for `build(validate=False)`), and serving pods.

    ConversationBuilder("c1", pool="llama").tokens(2_000).priority(5).build()
    PoolBuilder("llama").decoders(app="dec").kv_tokens(100_000).build()
    PodBuilder("dec-0").on("h200-0").app("dec").role("decode").gpus(1).build()
"""

from __future__ import annotations

import copy
from typing import Any, Self

from pydantic import BaseModel

from conserve.api.common import API_VERSION
from conserve.api.conversation import KIND as CONVERSATION
from conserve.api.conversation import ConversationSpec
from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.labels import (
    ANNOTATION_ENDPOINT,
    ANNOTATION_MODEL,
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY_MIB,
    LABEL_GPU_PRODUCT,
    LABEL_ROLE,
    RESOURCE_GPU,
)

Body = dict[str, Any]


class _Builder:
    def __init__(self, name: str) -> None:
        self._metadata: Body = {"name": name}
        self._spec: Body = {}

    def namespace(self, namespace: str) -> Self:
        self._metadata["namespace"] = namespace
        return self

    def label(self, key: str, value: str) -> Self:
        self._metadata.setdefault("labels", {})[key] = value
        return self

    def annotate(self, key: str, value: str) -> Self:
        self._metadata.setdefault("annotations", {})[key] = value
        return self

    def spec(self, **fields: Any) -> Self:
        """Spec fields as they are on the wire (camelCase), over what the builder set."""
        self._spec.update(fields)
        return self

    def _custom_object(self, kind: str, model: type[BaseModel] | None) -> Body:
        """The object; its spec checked by `model` first (a ValidationError names the field and the reason)."""
        if model is not None:
            model.model_validate(self._spec)
        metadata, spec = copy.deepcopy(self._metadata), copy.deepcopy(self._spec)
        return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


class ConversationBuilder(_Builder):
    def __init__(self, name: str, pool: str = "pool") -> None:
        super().__init__(name)
        self._spec = {"pool": pool, "firstTurnInputTokens": 1000}

    def tokens(self, first_turn_input_tokens: int) -> Self:
        return self.spec(firstTurnInputTokens=first_turn_input_tokens)

    def priority(self, priority: int) -> Self:
        return self.spec(priority=priority)

    def idle_timeout(self, seconds: int) -> Self:
        return self.spec(idleTimeoutSeconds=seconds)

    def completed(self) -> Self:
        return self.spec(completed=True)

    def build(self, *, validate: bool = True) -> Body:
        return self._custom_object(CONVERSATION, ConversationSpec if validate else None)


class PoolBuilder(_Builder):
    def __init__(self, name: str, model: str = "llama-3-8b") -> None:
        super().__init__(name)
        self._spec = {"model": {"name": model}, "decoderSelector": {"matchLabels": {"app": "dec"}}}

    def decoders(self, app: str = "dec") -> Self:
        return self.spec(decoderSelector={"matchLabels": {"app": app}})

    def prefills(self, app: str = "dec-prefill") -> Self:
        return self.spec(prefillSelector={"matchLabels": {"app": app}})

    def kv_tokens(self, tokens_per_decoder: int) -> Self:
        return self.spec(kvCapacity={"tokensPerDecoder": tokens_per_decoder})

    def build(self, *, validate: bool = True) -> Body:
        return self._custom_object("DecoderPool", DecoderPoolSpec if validate else None)


class PodBuilder(_Builder):
    """A serving pod: one container asking for GPUs; bound to a node with `on` (no scheduler involved)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._node: str | None = None
        self._gpus = 1
        self._status: Body | None = None

    def app(self, app: str) -> Self:
        return self.label("app", app)

    def role(self, role: str) -> Self:
        return self.label(LABEL_ROLE, role)

    def model(self, model: str) -> Self:
        return self.annotate(ANNOTATION_MODEL, model)

    def endpoint(self, host_port: str) -> Self:
        return self.annotate(ANNOTATION_ENDPOINT, host_port)

    def on(self, node: str) -> Self:
        self._node = node
        return self

    def gpus(self, count: int) -> Self:
        self._gpus = count
        return self

    def running(self, *, ready: bool = True, pod_ip: str = "10.0.0.1") -> Self:
        """The status KWOK (or a kubelet) would report."""
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        self._status = {"phase": "Running", "podIP": pod_ip, "conditions": [condition]}
        return self

    def build(self) -> Body:
        spec: Body = {
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {"name": "server", "image": "fake", "resources": {"limits": {RESOURCE_GPU: str(self._gpus)}}}
            ],
        }
        if self._node is not None:
            spec["nodeName"] = self._node
        body: Body = {"apiVersion": "v1", "kind": "Pod", "metadata": copy.deepcopy(self._metadata), "spec": spec}
        if self._status is not None:
            body["status"] = copy.deepcopy(self._status)
        return body


def pool_body(name: str, *, app: str = "dec", tokens_per_decoder: int | None = 100_000, **spec: Any) -> Body:
    """A pool of the decoders labelled `app: <app>` and the prefill servers `app: <app>-prefill`; the spec
    fields as on the wire over that (not validated: a test may build what the CRD would refuse)."""
    pool = PoolBuilder(name).decoders(app).prefills(f"{app}-prefill")
    if tokens_per_decoder is not None:
        pool.kv_tokens(tokens_per_decoder)
    return pool.spec(**spec).build(validate=False)


def pod_body(
    name: str, node: str, *, app: str = "dec", gpus: int = 1, annotations: dict[str, str] | None = None
) -> Body:
    """A bare pod bound to a KWOK node (no scheduler involved); KWOK marks it Running and Ready."""
    pod = PodBuilder(name).on(node).app(app).gpus(gpus)
    for key, value in (annotations or {}).items():
        pod.annotate(key, value)
    body = pod.build()
    body["metadata"].setdefault("annotations", {})
    return body


def conversation_body(name: str, pool: str, first_turn_input_tokens: int, **spec: Any) -> Body:
    """A conversation; the spec fields as on the wire (not validated)."""
    return ConversationBuilder(name, pool).tokens(first_turn_input_tokens).spec(**spec).build(validate=False)


def gpu_node(name: str, product: str = "NVIDIA-H200", memory_mib: int = 143_771, count: int = 8) -> Body:
    """A node as GPU feature discovery labels it (only the metadata: what the operator reads)."""
    labels = {LABEL_GPU_PRODUCT: product, LABEL_GPU_MEMORY_MIB: str(memory_mib), LABEL_GPU_COUNT: str(count)}
    return {"metadata": {"name": name, "labels": labels}}


#: The devcluster's GPU product of each serving role: prefill on the compute tier, decode on the bandwidth tier.
ROLE_PRODUCTS = {"prefill": "NVIDIA-H100-80GB-HBM3", "decode": "NVIDIA-H200"}


def serving_deployment(name: str, role: str, replicas: int, gpu_product: str | None = None) -> Body:
    """A Deployment of `replicas` one-GPU serving pods (`app: name`, role label) on nodes of one GPU product (the
    role's in `ROLE_PRODUCTS` by default); the gpu-sim pod runner serves them on KWOK nodes (no image pulled)."""
    gpu_product = gpu_product or ROLE_PRODUCTS[role]
    labels = {"app": name, LABEL_ROLE: role}
    container = {"name": "vllm", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {RESOURCE_GPU: "1"}}}
    pod_spec = {"terminationGracePeriodSeconds": 0, "nodeSelector": {LABEL_GPU_PRODUCT: gpu_product}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels}, "spec": {**pod_spec, "containers": [container]}},
        },
    }
