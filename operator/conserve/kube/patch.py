"""Patch helpers: JSON merge patches (RFC 7386) of only the fields a writer owns, and raw-response writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Keyword arguments that make a client `patch_*` call send a JSON merge patch (its default is a strategic
#: merge for built-in kinds and a JSON patch list guess for custom objects).
MERGE_PATCH: Mapping[str, str] = {"_content_type": "application/merge-patch+json"}


def annotations_patch(annotations: Mapping[str, str | None]) -> dict[str, Any]:
    """A merge patch setting (or, with None, removing) annotations and nothing else."""
    return {"metadata": {"annotations": dict(annotations)}}


def labels_patch(labels: Mapping[str, str | None]) -> dict[str, Any]:
    """A merge patch setting (or, with None, removing) labels and nothing else."""
    return {"metadata": {"labels": dict(labels)}}


def drain(response: Any) -> None:
    """Read and release a `_preload_content=False` response, so its connection goes back to the pool."""
    response.read()
    response.release_conn()
