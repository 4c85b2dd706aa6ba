"""The router's callers: API keys from a mounted Secret (reloaded), a gateway's identity header, tenants (admins,
pools), conversations scoped by owner, and the servers' key."""

from __future__ import annotations

from pathlib import Path

import pytest

from conserve.router.auth import (
    ANONYMOUS,
    RELOAD_S,
    Authenticator,
    AuthError,
    AuthMode,
    BackendCredentials,
    owned_name,
    parse_tenants,
)
from conserve.router.policy import conversation_object_name

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys_dir(tmp_path: Path, keys: dict[str, str]) -> Path:
    """A Secret as the kubelet mounts it: a file per key, plus its own dot-entries."""
    directory = tmp_path / "keys"
    directory.mkdir(exist_ok=True)
    (directory / "..data").mkdir(exist_ok=True)
    for name, key in keys.items():
        (directory / name).write_text(key + "\n")
    return directory


def test_none_mode_is_the_anonymous_administrator() -> None:
    assert Authenticator().identify({}) == ANONYMOUS
    assert ANONYMOUS.admin
    assert ANONYMOUS.may_use("any-pool")


def test_api_keys_name_their_identity_and_refuse_a_wrong_or_missing_key(tmp_path: Path) -> None:
    auth = Authenticator(AuthMode.API_KEYS, api_keys_dir=keys_dir(tmp_path, {"alice": "k-alice", "bob": "k-bob"}))
    assert auth.identify({"Authorization": "Bearer k-alice"}).name == "alice"
    assert auth.identify({"Authorization": "bearer  k-bob "}).name == "bob"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-alice"}, {"Authorization": ""}):
        with pytest.raises(AuthError) as refused:
            auth.identify(headers)
        assert refused.value.status == 401
        assert "k-alice" not in str(refused.value)


def test_keys_are_read_again_after_the_reload_interval(tmp_path: Path) -> None:
    clock = Clock()
    directory = keys_dir(tmp_path, {"alice": "old"})
    auth = Authenticator(AuthMode.API_KEYS, api_keys_dir=directory, clock=clock)
    assert auth.identify({"Authorization": "Bearer old"}).name == "alice"
    (directory / "alice").write_text("new")  # the Secret rotated
    clock.now += RELOAD_S
    assert auth.identify({"Authorization": "Bearer new"}).name == "alice"
    with pytest.raises(AuthError):
        auth.identify({"Authorization": "Bearer old"})


def test_a_missing_keys_directory_stops_the_router_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Authenticator(AuthMode.API_KEYS, api_keys_dir=tmp_path / "absent").check_files()
    with pytest.raises(ValueError, match="api-keys-dir"):
        Authenticator(AuthMode.API_KEYS)


def test_header_mode_trusts_only_the_configured_header(tmp_path: Path) -> None:
    auth = Authenticator(AuthMode.HEADER, identity_header="X-Auth-Subject")
    assert auth.identify({"X-Auth-Subject": "team-a"}).name == "team-a"
    for headers in ({}, {"X-Other": "team-a"}, {"X-Auth-Subject": "a\nb"}, {"X-Auth-Subject": "x" * 300}):
        with pytest.raises(AuthError):
            auth.identify(headers)
    with pytest.raises(ValueError, match="identity-header"):
        Authenticator(AuthMode.HEADER)


def test_tenants_give_admins_and_pools(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("admins: [ops]\npools:\n  alice: [a, b]\n  '*': [shared]\n")
    auth = Authenticator(AuthMode.HEADER, identity_header="X-User", tenants_file=tenants)
    ops, alice, carol = (auth.identify({"X-User": n}) for n in ("ops", "alice", "carol"))
    assert ops.admin
    assert not alice.admin
    assert not carol.admin
    assert alice.may_use("a")
    assert not alice.may_use("shared")
    assert carol.may_use("shared")
    assert not carol.may_use("a")
    assert ops.may_use("shared")
    assert not ops.may_use("a")


@pytest.mark.parametrize(
    ("text", "field"),
    [("[1, 2]", "mapping"), ("admins: ops", "admins"), ("pools: [a]", "pools"), ("pools: {alice: a}", "pools.alice")],
)
def test_a_malformed_tenants_file_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse_tenants(text)


def test_conversations_are_scoped_by_owner() -> None:
    assert owned_name("", "chat-1") == conversation_object_name("chat-1")  # --auth none: the names of before
    alice, bob = owned_name("alice", "chat-1"), owned_name("bob", "chat-1")
    assert len({alice, bob, owned_name("", "chat-1")}) == 3
    assert alice.startswith("r-chat-1-")
    assert len(alice) <= 63


def test_backend_credentials_come_from_the_secret_file(tmp_path: Path) -> None:
    assert BackendCredentials().headers() == {}
    key = tmp_path / "api-key"
    key.write_text("s3cret\n")
    clock = Clock()
    credentials = BackendCredentials(key, clock=clock)
    assert credentials.headers() == {"Authorization": "Bearer s3cret"}
    key.write_text("rotated")
    clock.now += RELOAD_S
    assert credentials.headers() == {"Authorization": "Bearer rotated"}


def test_a_request_goes_to_an_allowed_pool_or_is_refused() -> None:
    alice = Authenticator(AuthMode.HEADER, identity_header="X-User").identify({"X-User": "alice"})
    assert alice.pool_for(None, "default") == "default"  # no allow-list: any pool
    limited = type(alice)("carol", pools=frozenset({"b", "a"}))
    assert limited.pool_for("b", "default") == "b"
    assert limited.pool_for(None, "default") == "a"  # the router's pool is not hers: the first of her own
    with pytest.raises(AuthError, match="X-Conserve-Pool") as refused:
        limited.pool_for("default", "default")
    assert refused.value.status == 403
