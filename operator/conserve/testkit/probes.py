"""Reads tests poll (with `wait_for`) while a server comes up: an HTTP GET that answers (0, "") until it listens."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """The status and body of a GET; (0, "") while nothing answers. An HTTP error status is an answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""
