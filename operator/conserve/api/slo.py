"""A DecoderPool's conversation SLO (`spec.slo`) and what the operator reports of it (`status.slo`).

A turn meets the SLO when its first visible token comes within `ttfetSeconds` of the turn's arrival (a first
turn's wait in the pool's queue counts) and its tokens then stream at `tbtSeconds` or less apart (the turn's mean
gap). A conversation meets it when every turn did. Attainment is the share of ended conversations that met it;
goodput, the conversations per second that ended having met it. `attainmentTarget` is what the pool is meant to
keep: alerts and the benchmark's knee compare with it.

Classes give conversations an order in the queue (higher `priority` first) and, optionally, their own targets;
a Conversation names its class in `spec.sloClass` (else the pool's `defaultClass`, else the pool's targets and
priority 0). The queue's wait is bounded by the class's TTFET target: a conversation that cannot start within it
is refused (HTTP 429 at the router) rather than admitted late and missing anyway (`conserve.core.admission`).
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from conserve.api.common import CamelModel, StatusModel, cel

#: A class name: a DNS label (it becomes a metric label and a header value).
CLASS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_CLASSES = 16
MAX_TTFET_SECONDS = 3600.0
MAX_TBT_SECONDS = 60.0

_TBT_BELOW_TTFET = cel(
    "!has(self.tbtSeconds) || !has(self.ttfetSeconds) || self.tbtSeconds < self.ttfetSeconds",
    "tbtSeconds must be smaller than ttfetSeconds (a turn's first token cannot be due before its second)",
    field_path=".tbtSeconds",
)


def _check_tbt_below_ttfet(ttfet_s: float | None, tbt_s: float | None, where: str) -> None:
    if ttfet_s is not None and tbt_s is not None and tbt_s >= ttfet_s:
        raise ValueError(f"{where}tbtSeconds ({tbt_s:g}) must be smaller than ttfetSeconds ({ttfet_s:g})")


class SloClassSpec(CamelModel):
    model_config = ConfigDict(json_schema_extra=_TBT_BELOW_TTFET)

    name: str = Field(min_length=1, max_length=63, pattern=CLASS_NAME_PATTERN, description="The class's name.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher classes leave the queue first.")
    ttfet_seconds: float | None = Field(
        None, gt=0, le=MAX_TTFET_SECONDS, description="This class's TTFET target (default: the pool's)."
    )
    tbt_seconds: float | None = Field(
        None, gt=0, le=MAX_TBT_SECONDS, description="This class's time-between-tokens target (default: the pool's)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SloClassSpec:
        _check_tbt_below_ttfet(self.ttfet_seconds, self.tbt_seconds, f"classes[{self.name}].")
        return self


class SloSpec(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *_TBT_BELOW_TTFET["x-kubernetes-validations"],
                {
                    "rule": "!has(self.defaultClass) || (has(self.classes) && "
                    "self.classes.exists(c, c.name == self.defaultClass))",
                    "message": "defaultClass must name one of classes",
                    "fieldPath": ".defaultClass",
                },
                {
                    "rule": "!has(self.classes) || self.classes.all(c, "
                    "(has(c.tbtSeconds) ? c.tbtSeconds : self.tbtSeconds) < "
                    "(has(c.ttfetSeconds) ? c.ttfetSeconds : self.ttfetSeconds))",
                    "message": "each class's tbtSeconds (its own or the pool's) must be smaller than its ttfetSeconds",
                    "fieldPath": ".classes",
                },
            ]
        }
    )

    ttfet_seconds: float = Field(
        gt=0,
        le=MAX_TTFET_SECONDS,
        description="Target time from a turn's arrival to its first visible token (a first turn's queue wait "
        "included).",
    )
    tbt_seconds: float = Field(gt=0, le=MAX_TBT_SECONDS, description="Target mean time between a turn's output tokens.")
    attainment_target: float = Field(
        0.95, gt=0, le=1, description="Share of conversations that should meet the SLO (the attainment percentile)."
    )
    classes: list[SloClassSpec] = Field(
        default_factory=list,
        max_length=MAX_CLASSES,
        description="Priority classes; a Conversation names one in spec.sloClass.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    default_class: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=CLASS_NAME_PATTERN,
        description="The class of a Conversation that names none.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SloSpec:
        _check_tbt_below_ttfet(self.ttfet_seconds, self.tbt_seconds, "")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("classes: names must be unique")
        for c in self.classes:
            _check_tbt_below_ttfet(
                c.ttfet_seconds or self.ttfet_seconds, c.tbt_seconds or self.tbt_seconds, f"classes[{c.name}]."
            )
        if self.default_class is not None and self.default_class not in names:
            raise ValueError(f"defaultClass {self.default_class!r} must name one of classes")
        return self


#: A status count's bound (int64 holds it and any sum of a few thousand of them).
MAX_COUNT = 10**15


class SloClassStatus(StatusModel):
    """One class's figures ("" is the pool's own targets, for conversations with no class)."""

    name: str = Field("", max_length=63)
    #: Since the pool's status began (kept across operator restarts).
    ended_conversations: int = Field(0, ge=0, le=MAX_COUNT)
    met_conversations: int = Field(0, ge=0, le=MAX_COUNT)
    refused_conversations: int = Field(0, ge=0, le=MAX_COUNT)
    #: Over the operator's recent window (`windowSeconds`): share of ended conversations that met the SLO
    #: (None before one ended), and conversations per second that ended having met it.
    attainment: float | None = None
    goodput_per_second: float = 0.0


class PoolSloStatus(StatusModel):
    target_attainment: float | None = None
    attainment: float | None = None  # all classes, over the window
    goodput_per_second: float = 0.0
    window_seconds: float = 0.0
    classes: list[SloClassStatus] = Field(default_factory=list)
