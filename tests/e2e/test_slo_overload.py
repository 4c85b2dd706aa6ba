"""A pool with an SLO receives more conversations than it can serve (local control plane: operator, gpu-sim pods and
the router as processes).

The pool has one decoder with room for one conversation, an SLO (TTFET 6 s, TBT 1 s) and two classes: gold
(priority 10) and bronze (the default). Checked, as a client and a platform team see it:
- the admitted conversations' turns meet the SLO (the router judges them; the Conversation and the pool's status
  show it: sloMissedTurns 0, status.slo attainment and met conversations per class);
- the excess waits in the queue, gold ahead of bronze, and what cannot start within its class's TTFET target is
  refused with HTTP 429, Retry-After and the reason (QueueWaitExceeded, over its budget), not admitted late;
- nothing is lost: every conversation was either served or refused with a reason, no 5xx, the refusals counted in
  status.slo;
- the pool recovers when load falls: a new conversation is served once the others end.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_router_queue import BusyPlane, one_decoder_plane

from conserve.core.tokens import filler_text
from conserve.testkit import PoolBuilder, wait_for
from conserve.testkit.processes import StartServingStack

pytestmark = pytest.mark.e2e

TTFET_S = 6
#: One decoder of 4,000 KV tokens: a first turn of 1,500 tokens reserves about 3,000, so one conversation at a time.
#: No idle-KV reclaim (it would make room by offloading an admitted conversation's KV between its turns).
POOL = (
    PoolBuilder("pool")
    .decoders("dec")
    .prefills("pre")
    .kv_tokens(4_000)
    .spec(
        placement={"maxQueueWaitSeconds": 120},
        kvLifecycle={"enabled": False},
        slo={
            "ttfetSeconds": TTFET_S,
            "tbtSeconds": 1,
            "attainmentTarget": 0.9,
            "classes": [{"name": "gold", "priority": 10}, {"name": "bronze"}],
            "defaultClass": "bronze",
        },
    )
    .build()
)


@pytest.fixture
def slo_plane(namespace: str, serving_stack: StartServingStack) -> BusyPlane:
    return one_decoder_plane(namespace, serving_stack, POOL)


def _turn(
    plane: BusyPlane, conv: str, slo_class: str | None = None, *, end: bool = False
) -> tuple[int, dict[str, str], str]:
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": filler_text(1500)}], "max_tokens": 16}
    headers = {"X-Conversation-Id": conv}
    if slo_class is not None:
        headers["X-Conserve-Slo-Class"] = slo_class
    if end:
        headers["X-Conversation-End"] = "true"
    return plane.http("POST", "/v1/chat/completions", body, headers)


def _pool_slo(plane: BusyPlane) -> dict[str, Any]:
    obj = plane.custom.get_namespaced_custom_object("conserve.dev", "v1alpha1", plane.namespace, "decoderpools", "pool")
    slo: dict[str, Any] = obj.get("status", {}).get("slo") or {}
    return slo


def _phase(plane: BusyPlane, conv: str) -> str | None:
    """The Conversation's phase; None before the router has created it."""
    try:
        phase: str | None = plane.conversation(conv).get("status", {}).get("phase")
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return phase


def _class(slo: dict[str, Any], name: str) -> dict[str, Any]:
    return next((c for c in slo.get("classes", []) if c.get("name") == name), {})


def test_slo_admitted_conversations_meet_it_the_excess_is_refused_with_429_and_the_pool_recovers(
    slo_plane: BusyPlane,
) -> None:
    plane = slo_plane
    # An admitted gold conversation: two turns, both within the SLO.
    for _ in range(2):
        status, headers, data = _turn(plane, "gold-1", "gold")
        assert status == 200, data
    decoder = headers["X-Conserve-Decoder"]

    # Overload: a bronze and then a gold conversation arrive while gold-1 holds the only decoder.
    answers: dict[str, tuple[int, dict[str, str], str]] = {}

    def client(conv: str, slo_class: str | None) -> None:
        answers[conv] = _turn(plane, conv, slo_class)

    bronze = threading.Thread(target=client, args=("bronze-1", None))  # the pool's default class
    bronze.start()
    time.sleep(0.5)
    gold = threading.Thread(target=client, args=("gold-2", "gold"))
    gold.start()
    wait_for(
        "both waiting in the pool's queue",
        lambda: all(_phase(plane, c) == "Pending" for c in ("bronze-1", "gold-2")),
        timeout_s=4,
    )
    # Room frees: the gold conversation goes first, though the bronze one came earlier.
    assert _turn(plane, "gold-1", "gold", end=True)[0] == 200
    gold.join(timeout=60)
    assert answers["gold-2"][0] == 200, answers["gold-2"]
    assert answers["gold-2"][1]["X-Conserve-Decoder"] == decoder

    # The bronze conversation cannot start within its class's TTFET target: refused with 429, Retry-After and why.
    bronze.join(timeout=60)
    status, headers, data = answers["bronze-1"]
    assert status == 429, data
    assert int(headers["Retry-After"]) >= 1
    error = json.loads(data)["error"]
    assert error["code"] in ("QueueWaitExceeded", "NoCapacity")  # the operator's refusal, or the router's own wait
    obj = wait_for(
        "bronze-1 refused by the operator",
        lambda: (o := plane.conversation("bronze-1"))["status"].get("phase") == "Failed" and o,
        timeout_s=30,
    )
    placed = next(c for c in obj["status"]["conditions"] if c["type"] == "Placed")
    assert placed["reason"] == "QueueWaitExceeded"
    assert f"over its budget of {TTFET_S} s (NoCapacity: " in placed["message"]

    # What the platform team sees: the admitted conversations met the SLO; the refusal is counted, not lost.
    done = plane.conversation("gold-1")["status"]
    assert (done["phase"], done["sloClass"], done.get("sloMissedTurns", 0)) == ("Completed", "gold", 0)
    slo = wait_for(
        "the pool's SLO status",
        lambda: (s := _pool_slo(plane)) and _class(s, "bronze").get("refusedConversations") == 1 and s,
        timeout_s=30,
    )
    assert slo["targetAttainment"] == 0.9
    gold_figures = _class(slo, "gold")
    assert (gold_figures["endedConversations"], gold_figures["metConversations"]) == (1, 1)
    assert gold_figures["attainment"] == 1.0
    assert slo["attainment"] == 1.0
    _, _, metrics = plane.http("GET", "/metrics")
    # gold-1's three turns and gold-2's one, judged by the router
    assert 'conserve_router_slo_turns_total{outcome="met",pool="pool",slo_class="gold"} 4.0' in metrics

    # The pool recovers when load falls: gold-2 ends, a new bronze conversation is served at once.
    assert plane.http("DELETE", "/v1/conversations/gold-2")[0] == 200
    started = time.monotonic()
    status, _, data = _turn(plane, "bronze-2")
    assert status == 200, data
    assert time.monotonic() - started < TTFET_S
    wait_for(
        "bronze-2's class in its status",
        lambda: plane.conversation("bronze-2")["status"].get("sloClass") == "bronze",
        timeout_s=30,
    )
