"""Shared pieces of the ConServe CRD models (pydantic is the one source of truth of the schemas)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "conserve.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class CamelModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused so typos surface."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class StatusModel(BaseModel):
    """Status models tolerate fields written by newer operators or by Kopf."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ServingPod(StatusModel):
    # A serving pod as a status names it (a conversation's decoder and prefill, a pool's decoders and prefills).
    pod: str = Field(max_length=253)
    node: str = Field("", max_length=253)
    tier: str = Field("", max_length=63)
    gpu_product: str = Field("", max_length=253)


def status_patch(status: StatusModel, fields: AbstractSet[str]) -> dict[str, Any]:
    """A merge patch of the status subresource: the named fields of the model, by alias, a None written as null
    (a merge patch clears a field that way); the fields not named are left to their writers."""
    return {"status": status.model_dump(mode="json", by_alias=True, include=set(fields))}


def cel(rule: str, message: str, *, field_path: str | None = None) -> dict[str, Any]:
    """`x-kubernetes-validations` for a field or model: the API server refuses an object that breaks the rule,
    with the field's path and the message (transition rules use `oldSelf`, checked on update only)."""
    validation: dict[str, Any] = {"rule": rule, "message": message}
    if field_path is not None:
        validation["fieldPath"] = field_path
    return {"x-kubernetes-validations": [validation]}


_SET_OPERATORS = ("In", "NotIn")


class LabelSelectorRequirement(CamelModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
            " : (!has(self.values) || size(self.values) == 0)",
            "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            field_path=".values",
        )
    )

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if (self.operator in _SET_OPERATORS) != bool(self.values):
            raise ValueError("values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist")
        return self


class LabelSelector(CamelModel):
    """A Kubernetes label selector (matchLabels and matchExpressions, ANDed)."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=64)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=64)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes semantics; an empty selector matches everything (callers refuse empty selectors)."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


NON_EMPTY_SELECTOR = cel(
    "(has(self.matchLabels) && size(self.matchLabels) > 0)"
    " || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
    "must select something (an empty selector would match every pod)",
)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """metav1.Condition."""

    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field("", max_length=64)  # RFC 3339
    observed_generation: int | None = Field(None, ge=0)


NonNegativeInt = Annotated[int, Field(ge=0)]
