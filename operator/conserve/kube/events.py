"""Kubernetes Events about an object, as `kubectl describe` shows them."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from typing import Any

from conserve.api.common import API_VERSION

#: The API server refuses longer messages.
MESSAGE_LIMIT = 1024


def event_body(
    obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False, component: str
) -> dict[str, Any]:
    """A core/v1 Event about `obj` (a body with metadata), from `component`, in the object's namespace."""
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name', 'obj')}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", API_VERSION),
            "kind": obj.get("kind", ""),
            "name": meta.get("name", ""),
            "namespace": namespace,
            "uid": meta.get("uid", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
        },
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "type": "Warning" if warning else "Normal",
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": component,
        "firstTimestamp": now[:19] + "Z",
        "lastTimestamp": now[:19] + "Z",
        "eventTime": now,
        "action": reason,
        "count": 1,
    }
