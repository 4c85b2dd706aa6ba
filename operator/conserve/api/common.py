"""Shared pieces of the ConServe CRD models (pydantic is the one source of truth of the schemas)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
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


class LabelSelectorRequirement(CamelModel):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(CamelModel):
    """A Kubernetes label selector (matchLabels and matchExpressions, ANDed)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: str = ""  # RFC 3339
    observed_generation: int | None = None


NonNegativeInt = Annotated[int, Field(ge=0)]
