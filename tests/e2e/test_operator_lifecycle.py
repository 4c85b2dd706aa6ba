"""Turns, completion, idle timeout and decoder loss against the real control plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conserve.controller.testing import (
    Api,
    OperatorProcess,
    conversation_body,
    pod_body,
    pool_body,
    wait_for,
)
from conserve.devcluster.testing import ClusterHandle


@pytest.fixture
def operator(cluster: ClusterHandle, namespace: str, api: Api, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log", ["--idle-phase-after", "0.5"])
    yield op.start()
    op.stop()
    api.strip_finalizers()


def status(api: Api, name: str) -> dict:  # type: ignore[type-arg]
    return dict(api.get_conv(name).get("status") or {})


def condition(api: Api, name: str, type_: str) -> dict | None:  # type: ignore[type-arg]
    return next((c for c in status(api, name).get("conditions", []) if c["type"] == type_), None)


def fleet(api: Api, decoders: int, tokens: int = 10_000) -> None:
    api.create(pool_body("llama", tokens_per_decoder=tokens))
    for i in range(decoders):
        api.create(pod_body(f"dec-{i}", f"kwok-h200-{i % 2}"))
    wait_for(lambda: api.get_pool("llama").get("status", {}).get("readyDecoders") == decoders, what="decoders ready")


def test_turns_follow_the_live_context_and_outgrowth(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 1)
    api.create(conversation_body("a", "llama", 2000))
    wait_for(lambda: status(api, "a").get("reservedKvTokens") == 4000)
    api.patch_conv("a", {"usage": {"turns": 1, "inputTokens": 2000, "outputTokens": 300}})
    s = wait_for(lambda: (s := status(api, "a"))["turnsServed"] == 1 and s)
    assert (s["phase"], s["liveKvTokens"], s["outputTokens"]) == ("Decoding", 2300, 300)
    # Past the reservation with room on the decoder: extended in place to 1.25 x the live context.
    api.patch_conv("a", {"usage": {"turns": 2, "inputTokens": 5000, "outputTokens": 500}})
    wait_for(lambda: status(api, "a")["reservedKvTokens"] == 6875, what="extended to 1.25 x 5500")
    api.create(conversation_body("b", "llama", 2000))
    wait_for(lambda: (condition(api, "b", "Placed") or {}).get("reason") == "NoCapacity")
    # Past the decoder's room: kept pinned, flagged.
    api.patch_conv("a", {"usage": {"turns": 3, "inputTokens": 11000, "outputTokens": 1000}})
    cond = wait_for(lambda: condition(api, "a", "Outgrown"), what="Outgrown condition")
    assert (cond["status"], cond["reason"]) == ("True", "DecoderFull")
    s = status(api, "a")
    assert s["decoder"]["pod"] == "dec-0" and s["kvTransfers"] == 1 and s["liveKvTokens"] == 12000
    assert api.events("Outgrown")
    # Idle: no turn for a while shows phase Idle; a turn brings it back.
    wait_for(lambda: status(api, "a")["phase"] == "Idle", what="Idle")
    api.patch_conv("a", {"usage": {"turns": 4, "inputTokens": 11000, "outputTokens": 1100}})
    wait_for(lambda: status(api, "a")["phase"] in ("Decoding", "Idle") and status(api, "a")["turnsServed"] == 4)
    # Completion frees it all; the growth ratio (12100 / 2000) enters the pool's history; b gets placed.
    api.patch_conv("a", {"completed": True})
    wait_for(lambda: status(api, "b").get("phase") == "Prefilling", what="b placed after a completed")
    pool = wait_for(lambda: (p := api.get_pool("llama")["status"])["observedGrowthRatios"] and p)
    assert pool["observedGrowthRatios"] == [6.05]
    ended = condition(api, "a", "Ended")
    assert ended is not None and ended["reason"] == "Completed"


def test_idle_timeout_releases(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 1)
    api.create(conversation_body("quiet", "llama", 1000, idleTimeoutSeconds=2))
    wait_for(lambda: status(api, "quiet").get("phase") == "Prefilling")
    wait_for(lambda: status(api, "quiet").get("phase") == "Completed", timeout_s=10, what="idle timeout")
    ended = condition(api, "quiet", "Ended")
    assert ended is not None and ended["reason"] == "IdleTimeout"
    assert not (api.get_conv("quiet")["metadata"].get("finalizers") or [])
    wait_for(lambda: api.get_pool("llama")["status"]["conversations"] == 0)


def test_decoder_loss_replaces_or_fails(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 2)
    for name, tokens in (("x", 2000), ("y", 2000), ("z", 2000)):
        api.create(conversation_body(name, "llama", tokens))
    wait_for(lambda: all(status(api, n).get("phase") == "Prefilling" for n in "xyz"))
    on = {n: status(api, n)["decoder"]["pod"] for n in "xyz"}
    victim = "dec-0" if list(on.values()).count("dec-0") == 2 else "dec-1"
    moved = sorted(n for n, pod in on.items() if pod == victim)
    api.delete_pod(victim)
    # Two conversations of 4000 on the lost decoder; the survivor holds one (4000 of 9500 usable): one fits.
    wait_for(
        lambda: all(
            status(api, n).get("placementGeneration", 0) == 2 or status(api, n).get("phase") == "Failed" for n in moved
        ),
        what="moved or failed",
    )
    outcomes = sorted(status(api, n)["phase"] for n in moved)
    assert outcomes == ["Failed", "Prefilling"]
    for n in moved:
        s = status(api, n)
        if s["phase"] == "Failed":
            assert condition(api, n, "Placed")["reason"] == "DecoderLost"  # type: ignore[index]
        else:
            assert s["kvTransfers"] == 2 and s["decoder"]["pod"] != victim
    assert api.events("DecoderLost")
