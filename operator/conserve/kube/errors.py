"""The API server's refusals as exceptions the adapters can name, instead of status codes spread around."""

from __future__ import annotations

from typing import Any

from kubernetes.client.exceptions import ApiException

#: What a client call raises on an HTTP error (`.status`, `.reason`, `.body`).
ApiError = ApiException


class KubeError(Exception):
    """An API call failed with an HTTP status (`status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status


class NotFound(KubeError):
    """The object is gone (404)."""


class Refused(KubeError):
    """The API server refused the write (409 / 422): e.g. a finalizer added to an object being deleted."""


class Conflict(Refused):
    """Already exists, or a stale resourceVersion (409)."""


class Gone(KubeError):
    """A watch's resourceVersion is too old (410): list again."""


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error, None for anything else (a reset connection, a timeout)."""
    if isinstance(exc, KubeError):
        return exc.status
    if isinstance(exc, ApiException):
        return int(exc.status) if exc.status is not None else None
    return None


def error_for(status: int, message: str) -> KubeError:
    """The named error for an HTTP status (either client library's refusal, a raw response's status)."""
    kind: type[KubeError] = {404: NotFound, 409: Conflict, 410: Gone, 422: Refused}.get(status, KubeError)
    return kind(status, message)


def translate(exc: ApiException) -> KubeError:
    """The named error for an `ApiException` (callers `raise translate(exc) from exc`)."""
    return error_for(int(exc.status or 0), f"{exc.reason}: {exc.body}" if exc.body else str(exc.reason))


def from_watch_error(obj: dict[str, Any]) -> KubeError:
    """The error a watch stream's ERROR event carries (a `Status` object)."""
    status = int(obj.get("code") or 500)
    kind: type[KubeError] = Gone if status == 410 else KubeError
    return kind(status, str(obj.get("message", "watch error")))
