"""The fields ConServe reads of core/v1 Pods and Nodes, as models every reader parses through (the operator's
pod discovery, the scheduler extender, the gpu-sim pod runner).

Parsing is lenient: these objects are the API server's, not ours, and a reader must not fail on one it does not
expect. A field of the wrong type takes its default, an object that is not a mapping is empty; nothing raises.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from conserve.api.labels import ANNOTATION_ENDPOINT, LABEL_ROLE, POD_FINISHED_PHASES, POD_RUNNING, RESOURCE_GPU


class _Lenient(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    @model_validator(mode="wrap")
    @classmethod
    def _defaults_for_the_malformed(cls, value: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if isinstance(value, cls):
            return value
        fields = value if isinstance(value, dict) else {}
        try:
            return handler(fields)
        except ValidationError as exc:  # nested models are lenient themselves: these are this level's fields
            malformed = {err["loc"][0] for err in exc.errors() if err["loc"]}
            return handler({k: v for k, v in fields.items() if k not in malformed})


def _strings(value: Any) -> dict[str, str]:
    """Labels and annotations: the string values of a mapping (anything else is dropped)."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


StringMap = Annotated[dict[str, str], PlainValidator(_strings)]


def parse_count(value: object) -> int:
    """An integer resource quantity ("8", 8; "8k" is not a GPU count): 0 when it is not a plain integer."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        try:
            return max(int(value.strip()), 0)
        except ValueError:
            return 0
    return 0


class ObjectMeta(_Lenient):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    labels: StringMap = Field(default_factory=dict)
    annotations: StringMap = Field(default_factory=dict)
    deletion_timestamp: str | None = None


class ResourceRequirements(_Lenient):
    limits: dict[str, Any] = Field(default_factory=dict)
    requests: dict[str, Any] = Field(default_factory=dict)

    @property
    def gpus(self) -> int:
        # Extended resources: requests default to limits and may not differ from them; take the larger.
        return max(parse_count(self.requests.get(RESOURCE_GPU)), parse_count(self.limits.get(RESOURCE_GPU)))


class Container(_Lenient):
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)


class PodSpec(_Lenient):
    node_name: str = ""
    scheduler_name: str = ""
    containers: list[Container] = Field(default_factory=list)
    init_containers: list[Container] = Field(default_factory=list)


class PodCondition(_Lenient):
    type: str = ""
    status: str = ""


class PodStatus(_Lenient):
    phase: str = ""
    pod_ip: str = Field("", alias="podIP")
    conditions: list[PodCondition] = Field(default_factory=list)


class Pod(_Lenient):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def gpus(self) -> int:
        """GPUs the pod holds: max(sum over containers, largest init container), as the scheduler counts."""
        total = sum(c.resources.gpus for c in self.spec.containers)
        return max(total, max((c.resources.gpus for c in self.spec.init_containers), default=0))

    @property
    def role(self) -> str:
        """The serving role its label states, normalized ("" when none): `prefill`, `decode` or `both`."""
        return self.metadata.labels.get(LABEL_ROLE, "").strip().lower()

    @property
    def endpoint(self) -> str:
        """host:port the data plane sends to in place of the pod IP ("" when not annotated)."""
        return self.metadata.annotations.get(ANNOTATION_ENDPOINT, "")

    @property
    def terminating(self) -> bool:
        return bool(self.metadata.deletion_timestamp)

    @property
    def finished(self) -> bool:
        """Succeeded or Failed: it holds no GPU and serves nothing."""
        return self.status.phase in POD_FINISHED_PHASES

    @property
    def ready(self) -> bool:
        """Running, Ready and not terminating: it may take work."""
        ready = any(c.type == "Ready" and c.status == "True" for c in self.status.conditions)
        return ready and self.status.phase == POD_RUNNING and not self.terminating


class NodeStatus(_Lenient):
    allocatable: dict[str, Any] = Field(default_factory=dict)


class Node(_Lenient):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    status: NodeStatus = Field(default_factory=NodeStatus)

    @property
    def allocatable_gpus(self) -> int:
        return parse_count(self.status.allocatable.get(RESOURCE_GPU))
