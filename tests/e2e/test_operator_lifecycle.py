"""Turns, completion, idle timeout and decoder loss against the real control plane."""

from __future__ import annotations

import pytest

from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, wait_for


@pytest.fixture
def operator_args() -> list[str]:
    return ["--idle-phase-after", "0.5"]


def fleet(api: Api, decoders: int) -> None:
    api.create_fleet(decoders)
    api.wait_ready_decoders(decoders)


def test_turns_follow_the_live_context_and_outgrowth(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 1)  # one decoder of 10,000 KV tokens, 9,500 after headroom
    api.create(conversation_body("a", "llama", 2000))
    wait_for(
        "a's reservation of 2 x 2000 (the prior: nothing observed yet, and it fits)",
        lambda: api.conv_status("a").get("reservedKvTokens") == 4000,
        tolerate=NOT_YET,
    )
    api.patch_conv("a", {"usage": {"turns": 1, "inputTokens": 2000, "outputTokens": 300}})
    s = wait_for(
        "a's first turn served", lambda: (s := api.conv_status("a"))["turnsServed"] == 1 and s, tolerate=NOT_YET
    )
    assert (s["phase"], s["liveKvTokens"], s["outputTokens"]) == ("Decoding", 2300, 300)
    # After each turn the reservation grows in place to the live context x the growth factor (room for the next
    # turn): 2 x 2300.
    wait_for("grown to 2 x 2300", lambda: api.conv_status("a")["reservedKvTokens"] == 4600, tolerate=NOT_YET)
    # 2 x 5500 does not fit the decoder: grown to the live context itself.
    api.patch_conv("a", {"usage": {"turns": 2, "inputTokens": 5000, "outputTokens": 500}})
    wait_for("grown to the live 5500", lambda: api.conv_status("a")["reservedKvTokens"] == 5500, tolerate=NOT_YET)
    # 4,000 left: b's prior (9,000) does not fit, nor its floor (4,500 + 256): it waits.
    api.create(conversation_body("b", "llama", 4500))
    wait_for(
        "b waiting for capacity",
        lambda: (api.conv_condition("b", "Placed") or {}).get("reason") == "NoCapacity",
        tolerate=NOT_YET,
    )
    # Past the decoder's room: kept pinned, flagged.
    api.patch_conv("a", {"usage": {"turns": 3, "inputTokens": 11000, "outputTokens": 1000}})
    cond = wait_for("Outgrown condition", lambda: api.conv_condition("a", "Outgrown"), tolerate=NOT_YET)
    assert (cond["status"], cond["reason"]) == ("True", "DecoderFull")
    s = api.conv_status("a")
    assert s["decoder"]["pod"] == "dec-0"
    assert s["kvTransfers"] == 1
    assert s["liveKvTokens"] == 12000
    # The Event is posted after the status write, in the background: await it as the condition is awaited.
    assert wait_for("Outgrown Event", lambda: api.events("Outgrown"))
    # Idle: no turn for a while shows phase Idle; a turn brings it back.
    wait_for("Idle", lambda: api.conv_status("a")["phase"] == "Idle", tolerate=NOT_YET)
    api.patch_conv("a", {"usage": {"turns": 4, "inputTokens": 11000, "outputTokens": 1100}})
    wait_for(
        "a's fourth turn served",
        lambda: api.conv_status("a")["phase"] in ("Decoding", "Idle") and api.conv_status("a")["turnsServed"] == 4,
        tolerate=NOT_YET,
    )
    # Completion frees it all; b gets placed. Each turn's growth (context after / before) is in the pool's
    # history, which sizes the next reservations (and survives a restart in the status).
    api.patch_conv("a", {"completed": True})
    wait_for("b placed after a completed", lambda: api.conv_status("b").get("phase") == "Prefilling", tolerate=NOT_YET)
    pool = wait_for(
        "the pool's observed growth ratios",
        lambda: len((p := api.get_pool("llama")["status"])["observedGrowthRatios"]) == 4 and p,
        tolerate=NOT_YET,
    )
    assert pool["observedGrowthRatios"] == [1.15, 2.3913, 2.1818, 1.0083]
    ended = api.conv_condition("a", "Ended")
    assert ended is not None
    assert ended["reason"] == "Completed"


def test_idle_timeout_releases(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 1)
    api.create(conversation_body("quiet", "llama", 1000, idleTimeoutSeconds=2))
    wait_for("quiet placed", lambda: api.conv_status("quiet").get("phase") == "Prefilling", tolerate=NOT_YET)
    wait_for("idle timeout", lambda: api.conv_status("quiet").get("phase") == "Completed", 10, tolerate=NOT_YET)
    ended = api.conv_condition("quiet", "Ended")
    assert ended is not None
    assert ended["reason"] == "IdleTimeout"
    assert not api.get_conv("quiet")["metadata"].get("finalizers")
    wait_for(
        "the pool's conversations released",
        lambda: api.get_pool("llama")["status"]["conversations"] == 0,
        tolerate=NOT_YET,
    )


def test_decoder_loss_replaces_or_queues_again(api: Api, operator: OperatorProcess) -> None:
    fleet(api, 2)
    for name, tokens in (("x", 2000), ("y", 2000), ("z", 2000)):
        api.create(conversation_body(name, "llama", tokens))
    wait_for(
        "x, y and z placed",
        lambda: all(api.conv_status(n).get("phase") == "Prefilling" for n in "xyz"),
        tolerate=NOT_YET,
    )
    on = {n: api.conv_status(n)["decoder"]["pod"] for n in "xyz"}
    victim = "dec-0" if list(on.values()).count("dec-0") == 2 else "dec-1"
    moved = sorted(n for n, pod in on.items() if pod == victim)
    api.delete_pod(victim)  # deleted: its conversations move at once (no grace)
    # Two conversations of 4000 on the lost decoder; the survivor holds one (4000 of 9500 usable): one fits, the
    # other waits in the queue again (a lost decoder never fails a conversation).
    wait_for(
        "moved or queued again",
        lambda: all(
            api.conv_status(n).get("placementGeneration", 0) == 2 or api.conv_status(n).get("phase") == "Pending"
            for n in moved
        ),
        tolerate=NOT_YET,
    )
    outcomes = sorted(api.conv_status(n)["phase"] for n in moved)
    assert outcomes == ["Pending", "Prefilling"]
    waiting = next(n for n in moved if api.conv_status(n)["phase"] == "Pending")
    for n in moved:
        s = api.conv_status(n)
        if s["phase"] == "Pending":
            placed = api.conv_condition(n, "Placed")
            assert placed is not None
            assert placed["reason"] == "NoCapacity"
            assert "its decoder was lost" in placed["message"]
            assert s.get("decoder") is None
        else:
            assert s["kvTransfers"] == 2
            assert s["decoder"]["pod"] != victim
    wait_for("a Warning Event DecoderLost", lambda: api.events("DecoderLost"), timeout_s=15)
    # Room again: the waiting one is placed, with a new generation for the router to follow.
    api.patch_conv(
        next(n for n in "xyz" if n != waiting and api.conv_status(n)["phase"] != "Pending"), {"completed": True}
    )
    again = wait_for(
        f"{waiting} placed again",
        lambda: (s := api.conv_status(waiting)).get("phase") == "Prefilling" and s,
        tolerate=NOT_YET,
    )
    assert again["placementGeneration"] == 2
