"""Who is calling the router, what they may do, and the credentials the router itself presents to the servers.

Three ways to know a caller (`--auth`):
- `none` (the default, for development and tests): every caller is the same anonymous administrator.
- `api-keys`: `Authorization: Bearer <key>`, checked against a mounted Kubernetes Secret (`--api-keys-dir`):
  each key of the Secret is an identity, its value that identity's key. The kubelet updates the mounted files when
  the Secret changes; the router reads them again every `RELOAD_S` (a removed key stops working then).
- `header`: the router sits behind a gateway that authenticates (an Envoy/Gateway API `ext_authz`, an API
  gateway, llm-d's inference gateway): it trusts the identity in `--identity-header` (e.g. `X-Auth-Subject`).
  Only then is that header read, and only the gateway must be able to reach the router (the chart's
  NetworkPolicy). A request without it is refused.

What an identity may do comes from `--tenants-file` (a mounted ConfigMap, YAML or JSON, reloaded like the keys):
`admins` (identities that see the servers: `/conserve/backends` and the response headers that name pods) and
`pools` (identity: the DecoderPools its requests may name; `"*"`: every identity not listed; an identity with no
entry at all may use any pool). Conversations are scoped by identity (`owned_name`): the same conversation id
sent by two identities names two conversations, so one can never reach, extend or end the other's.

Backends started with `--api-key` (vLLM) need `Authorization: Bearer <key>` on every request:
`BackendCredentials` reads that key from a mounted Secret file (`--backend-api-key-file`), reloaded the same way.
No key is ever logged.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conserve.router.policy import conversation_object_name

log = logging.getLogger(__name__)
#: Seconds between reads of the mounted Secret and ConfigMap files (the kubelet's own sync is about a minute).
RELOAD_S = 5.0
#: Longest identity accepted (from a header or a Secret key name).
MAX_IDENTITY_CHARS = 253


class AuthMode(enum.StrEnum):
    NONE = "none"
    API_KEYS = "api-keys"
    HEADER = "header"


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: `name` ("" for the anonymous caller of `--auth none`), whether it may see the servers, and the
    pools it may use (None: any)."""

    name: str
    admin: bool = False
    pools: frozenset[str] | None = None

    def may_use(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools

    def pool_for(self, requested: str | None, default: str) -> str:
        """The pool of a request: the one it names (AuthError 403 if not allowed), else `default`, else (not
        allowed either) the first of its own by name."""
        if requested:
            if not self.may_use(requested):
                raise AuthError(403, f"X-Conserve-Pool: pool {requested} is not allowed for this caller")
            return requested
        return default if self.may_use(default) or not self.pools else sorted(self.pools)[0]


ANONYMOUS = Identity("", admin=True)


class AuthError(Exception):
    """A request refused: 401 (no or a wrong credential) or 403 (a known caller asking for what it may not)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def owned_name(owner: str, conversation_id: str) -> str:
    """The Conversation object of `conversation_id` sent by `owner`: the anonymous caller's is the plain
    `conversation_object_name`; any other identity's hash covers the identity too, so ids never collide."""
    if not owner:
        return conversation_object_name(conversation_id)
    return conversation_object_name(conversation_id, scope=owner)


class _Reloading:
    """A value read from files, read again when `RELOAD_S` has passed since the last read."""

    def __init__(self, read: Callable[[], Any], clock: Callable[[], float]) -> None:
        self._read, self._clock = read, clock
        self._value: Any = None
        self._read_at: float | None = None

    def get(self) -> Any:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= RELOAD_S:
            self._read_at = now
            try:
                self._value = self._read()
            except (OSError, ValueError, yaml.YAMLError) as err:
                if self._value is None:
                    raise
                log.warning("keeping the previous contents: %s", err)  # never the contents themselves
        return self._value


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def read_api_keys(directory: Path) -> dict[bytes, str]:
    """A mounted Secret's files: identity (the file name) by the digest of its key (the file's text, stripped).
    The kubelet's own entries (names starting with a dot) are skipped, so are empty files."""
    keys: dict[bytes, str] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        key = path.read_text().strip()
        if key and len(path.name) <= MAX_IDENTITY_CHARS:
            keys[_digest(key)] = path.name
    return keys


@dataclass(frozen=True, slots=True)
class Tenants:
    admins: frozenset[str] = frozenset()
    pools: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def identity(self, name: str) -> Identity:
        allowed = self.pools.get(name, self.pools.get("*"))
        return Identity(name, admin=name in self.admins, pools=allowed)


def parse_tenants(text: str) -> Tenants:
    """`{"admins": [...], "pools": {identity: [pool, ...]}}` (YAML or JSON); a field of the wrong type is an
    error naming it."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("tenants file: must be a mapping with `admins` and `pools`")
    admins = data.get("admins") or []
    if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
        raise ValueError("tenants file: `admins` must be a list of identities")
    pools = data.get("pools") or {}
    if not isinstance(pools, dict):
        raise ValueError("tenants file: `pools` must map identities to lists of pools")
    parsed: dict[str, frozenset[str]] = {}
    for name, names in pools.items():
        if not isinstance(names, list) or not all(isinstance(p, str) for p in names):
            raise ValueError(f"tenants file: `pools.{name}` must be a list of pool names")
        parsed[str(name)] = frozenset(names)
    return Tenants(frozenset(admins), parsed)


def _has_control_chars(value: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


class Authenticator:
    """The caller of a request (its headers), or AuthError."""

    def __init__(
        self,
        mode: AuthMode = AuthMode.NONE,
        *,
        api_keys_dir: Path | None = None,
        identity_header: str | None = None,
        tenants_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode is AuthMode.API_KEYS and api_keys_dir is None:
            raise ValueError("--auth api-keys needs --api-keys-dir (a mounted Secret)")
        if mode is AuthMode.HEADER and not identity_header:
            raise ValueError("--auth header needs --identity-header (the header the gateway sets)")
        self.mode = mode
        self._identity_header = identity_header
        self._keys = _Reloading(lambda: read_api_keys(api_keys_dir), clock) if api_keys_dir is not None else None
        self._tenants = (
            _Reloading(lambda: parse_tenants(tenants_file.read_text()), clock) if tenants_file is not None else None
        )

    def check_files(self) -> None:
        """Read the mounted files once (at startup: a missing or malformed one stops the router, named)."""
        if self._keys is not None:
            self._keys.get()
        if self._tenants is not None:
            self._tenants.get()

    def identify(self, headers: Mapping[str, str]) -> Identity:
        if self.mode is AuthMode.NONE:
            return ANONYMOUS
        if self.mode is AuthMode.HEADER:
            assert self._identity_header is not None
            name = (headers.get(self._identity_header) or "").strip()
            if not name:
                raise AuthError(401, f"no {self._identity_header} header (set by the authenticating gateway)")
            if len(name) > MAX_IDENTITY_CHARS or _has_control_chars(name):
                raise AuthError(401, f"{self._identity_header}: not a valid identity")
        else:
            name = self._key_owner(headers.get("Authorization") or "")
        tenants: Tenants = self._tenants.get() if self._tenants is not None else Tenants()
        return tenants.identity(name)

    def _key_owner(self, authorization: str) -> str:
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError(401, "missing API key: send `Authorization: Bearer <key>`")
        assert self._keys is not None
        keys: dict[bytes, str] = self._keys.get()
        digest = _digest(key.strip())
        owner = next((name for known, name in keys.items() if hmac.compare_digest(known, digest)), None)
        if owner is None:
            raise AuthError(401, "invalid API key")
        return owner


class BackendCredentials:
    """The headers every request to a server carries: `Authorization: Bearer <key>` from a mounted Secret file
    (vLLM's `--api-key`), none without one."""

    def __init__(self, key_file: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = _Reloading(lambda: key_file.read_text().strip(), clock) if key_file is not None else None

    def headers(self) -> dict[str, str]:
        if self._key is None:
            return {}
        key: str = self._key.get()
        return {"Authorization": f"Bearer {key}"} if key else {}
