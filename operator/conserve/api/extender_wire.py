"""The kube-scheduler extender wire types (`k8s.io/kube-scheduler/extender/v1`, types.go), as pydantic models.

The Go structs carry no json tags, so the JSON keys are the Go field names (`Pod`, `Nodes`, `NodeNames`, ...).
Go's encoder writes nil pointers, slices and maps as `null`; its decoder takes a missing key as the zero value.
These models accept both, and `dump_go` writes what the Go encoder would.

Embedded Kubernetes objects (`*v1.Pod`, `*v1.NodeList`) keep their own camelCase json tags; they stay plain
dicts here (`Pod`) or a minimal list model (`NodeList` with raw `items`), since the extender reads a few fields
and, in full-node mode, must return the nodes it keeps unchanged.

Upstream shapes (Go):
    type ExtenderArgs struct { Pod *v1.Pod; Nodes *v1.NodeList; NodeNames *[]string }
    type FailedNodesMap map[string]string
    type ExtenderFilterResult struct {
        Nodes *v1.NodeList; NodeNames *[]string; FailedNodes FailedNodesMap
        FailedAndUnresolvableNodes FailedNodesMap; Error string }
    type HostPriority struct { Host string; Score int64 }
    type HostPriorityList []HostPriority
    type ExtenderBindingArgs struct { PodName string; PodNamespace string; PodUID types.UID; Node string }
    type ExtenderBindingResult struct { Error string }
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

#: MaxExtenderPriority in k8s.io/kube-scheduler/extender/v1.
MAX_EXTENDER_PRIORITY = 10


class _Wire(BaseModel):
    # Unknown keys are ignored, as Go's decoder does; names are the Go field names.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def dump_go(self) -> dict[str, Any]:
        """The JSON object the Go encoder would write: every field present, nil as null."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.dump_go(), separators=(",", ":")).encode()


class NodeList(BaseModel):
    """`v1.NodeList` (json tags: apiVersion, kind, metadata, items); items stay raw Node objects."""

    model_config = ConfigDict(extra="allow")

    apiVersion: str | None = None
    kind: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    items: list[dict[str, Any]] | None = None

    def dump_go(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metadata": self.metadata, "items": self.items}
        if self.apiVersion is not None:
            out["apiVersion"] = self.apiVersion
        if self.kind is not None:
            out["kind"] = self.kind
        return out


class ExtenderArgs(_Wire):
    """What the scheduler POSTs to filter and prioritize: the pod, and Nodes or NodeNames (nodeCacheCapable)."""

    Pod: dict[str, Any] | None = None
    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None


_encode_string = json.encoder.encode_basestring_ascii


def _encode_string_map(values: dict[str, str] | None) -> str:
    """JSON of a map whose values repeat (a filter's reasons): each distinct value is escaped once; C-level maps."""
    if values is None:
        return "null"
    encoded_value = {value: ":" + _encode_string(value) for value in set(values.values())}
    items = map(str.__add__, map(_encode_string, values), map(encoded_value.__getitem__, values.values()))
    return "{" + ",".join(items) + "}"


def _encode_string_list(values: list[str] | None) -> str:
    return "null" if values is None else "[" + ",".join(map(_encode_string, values)) + "]"


class ExtenderFilterResult(_Wire):
    Nodes: NodeList | None = None
    NodeNames: list[str] | None = None
    FailedNodes: dict[str, str] | None = None
    FailedAndUnresolvableNodes: dict[str, str] | None = None
    Error: str = ""

    def dump_go(self) -> dict[str, Any]:
        return {
            "Nodes": self.Nodes.dump_go() if self.Nodes is not None else None,
            "NodeNames": self.NodeNames,
            "FailedNodes": self.FailedNodes,
            "FailedAndUnresolvableNodes": self.FailedAndUnresolvableNodes,
            "Error": self.Error,
        }

    def to_json_bytes(self) -> bytes:
        """What the Go encoder writes (`dump_go`), built faster: a 5,000-node answer repeats a few reasons."""
        nodes = "null" if self.Nodes is None else json.dumps(self.Nodes.dump_go(), separators=(",", ":"))
        return (
            f'{{"Nodes":{nodes},"NodeNames":{_encode_string_list(self.NodeNames)},'
            f'"FailedNodes":{_encode_string_map(self.FailedNodes)},'
            f'"FailedAndUnresolvableNodes":{_encode_string_map(self.FailedAndUnresolvableNodes)},'
            f'"Error":{_encode_string(self.Error)}}}'
        ).encode()


class HostPriority(_Wire):
    Host: str
    Score: int = Field(ge=0, le=MAX_EXTENDER_PRIORITY)


class HostPriorityList(RootModel[list[HostPriority]]):
    def dump_go(self) -> list[dict[str, Any]]:
        return [{"Host": h.Host, "Score": h.Score} for h in self.root]

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.dump_go(), separators=(",", ":")).encode()


class ExtenderBindingArgs(_Wire):
    PodName: str = ""
    PodNamespace: str = ""
    PodUID: str = ""
    Node: str = ""


class ExtenderBindingResult(_Wire):
    Error: str = ""


class ExtenderError(_Wire):
    """The body of an error response of a verb whose result has no Error field (prioritize)."""

    Error: str
