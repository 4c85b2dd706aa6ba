"""Energy on the local control plane: a fake dcgm-exporter for the cluster's GPU nodes, the operator, and the
energy loop, as real processes: alone (`conserve energy`, which lists the objects) and inside the operator (which
reads its own state). Conversations placed on KWOK decode pods report usage; their energy appears in
Conversation status, the pool's decoders get power and energy, and /metrics carries the joules."""

from __future__ import annotations

import functools
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import PoolBuilder, wait_for
from conserve.testkit.builders import serving_deployment
from conserve.testkit.processes import ConserveProcesses

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "conserve.dev", "v1alpha1"
POOL = PoolBuilder("pool").decoders("dec").prefills("pre").build()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


def put_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=5):
        pass


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(params=["standalone", "in-operator"])
def energy_plane(
    request: pytest.FixtureRequest, cluster: ClusterHandle, namespace: str, conserve_processes: ConserveProcesses
) -> Iterator[dict[str, Any]]:
    dcgm_port, metrics_port = free_port(), free_port()
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    loop_args = [f"--dcgm-url=http://127.0.0.1:{dcgm_port}/metrics", "--energy-interval-seconds=1"]
    with cluster.api_client() as api:
        apps: Any = client.AppsV1Api(api)
        custom: Any = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", POOL)
        apps.create_namespaced_deployment(namespace, serving_deployment("pre", "prefill", 1))
        apps.create_namespaced_deployment(namespace, serving_deployment("dec", "decode", 2))
        operator_args = [f"--namespace={namespace}", "--no-leader-elect"]
        if request.param == "in-operator":
            operator_args += ["--energy-source=dcgm", *loop_args, f"--metrics-port={metrics_port}"]
        else:
            operator_args.append("--metrics-port=0")
        conserve_processes.start("operator", "operator", *operator_args)
        conserve_processes.start(
            "fake-dcgm",
            "fake-dcgm",
            "--from-cluster",
            kubeconfig,
            f"--namespace={namespace}",
            f"--port={dcgm_port}",
            "--activity=0.1",
            "--refresh-seconds=1",
            "--tick-seconds=0.5",
        )
        if request.param == "standalone":
            conserve_processes.start(
                "energy", "energy", kubeconfig, f"--namespace={namespace}", *loop_args, f"--metrics-port={metrics_port}"
            )

        def decoders_ready() -> bool:
            pool = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", "pool")
            status: dict[str, Any] = pool.get("status") or {}
            return status.get("readyDecoders") == 2 and len(status.get("prefills") or []) == 1

        def gpus_read() -> bool:
            # The loop's first reading is only a baseline: tokens reported before it are in no interval (the
            # operator starts its loop before the exporter is up), so conversations start once it is taken.
            pool = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", "pool")
            decoders = (pool.get("status") or {}).get("decoders") or []
            return bool(decoders) and all(d.get("powerWatts") for d in decoders)

        wait_for("the pool's 2 decoders and 1 prefill", decoders_ready, 90)
        wait_for("the energy loop's first reading of the decoders' GPUs", gpus_read, 60)
        yield {
            "custom": custom,
            "namespace": namespace,
            "dcgm": f"http://127.0.0.1:{dcgm_port}",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }


def test_conversation_energy_reaches_status_and_metrics(energy_plane: dict[str, Any]) -> None:
    custom, namespace = energy_plane["custom"], energy_plane["namespace"]

    def conv(name: str) -> dict[str, Any]:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "conversations", name)
        return obj

    for name, tokens in (("chat-a", 2000), ("chat-b", 500)):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Conversation",
            "metadata": {"name": name},
            "spec": {"pool": "pool", "firstTurnInputTokens": tokens},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "conversations", body)

    def decoder_of(name: str) -> str | None:
        decoder = (conv(name).get("status") or {}).get("decoder") or {}
        return str(decoder["pod"]) if decoder.get("pod") else None

    placed = {
        name: wait_for(f"{name} placed", functools.partial(decoder_of, name), 60) for name in ("chat-a", "chat-b")
    }

    # The decoders work: their GPUs draw half their dynamic range (a bandwidth-bound decode).
    put_json(energy_plane["dcgm"] + "/load", {f"{namespace}/{pod}": 0.5 for pod in set(placed.values())})
    usage = {"chat-a": (1, 2000, 400), "chat-b": (1, 500, 100)}
    for name, (turns, inputs, outputs) in usage.items():
        patch = {"spec": {"usage": {"turns": turns, "inputTokens": inputs, "outputTokens": outputs}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "conversations", name, patch)

    def with_energy(name: str) -> dict[str, Any] | None:
        status: dict[str, Any] = conv(name).get("status") or {}
        return status if status.get("energyPerTokenJoules") else None

    statuses = {
        name: wait_for(f"energy in {name}'s status", functools.partial(with_energy, name), 60) for name in usage
    }
    for name, status in statuses.items():
        assert status["energyJoules"] > 0
        assert status["energyPerTokenJoules"] == pytest.approx(status["energyJoules"] / usage[name][2], rel=0.05)

    # Energy keeps accruing while the conversations hold KV on a drawing GPU.
    first = statuses["chat-a"]["energyJoules"]
    wait_for("chat-a's energy to grow", lambda: conv("chat-a")["status"]["energyJoules"] > first + 1, 30)

    def pool_energy() -> dict[str, Any] | None:
        pool = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", "pool")
        status = pool.get("status") or {}
        decoders = status.get("decoders") or []
        busy = [d for d in decoders if d["pod"] in placed.values()]
        done = busy and all((d.get("energyJoules") or 0) > 0 and (d.get("powerWatts") or 0) > 300 for d in busy)
        return status if done and (status.get("energyJoules") or 0) > 0 else None

    pool_status = wait_for("power and energy of the decoders in the pool's status", pool_energy, 60)
    assert pool_status["powerWatts"] > 0

    def scraped() -> str | None:
        # Attribution and the tier's J per token come from different cycles' windows: wait for both.
        text = get(energy_plane["metrics"])
        attributed = metric(text, "conserve_attributed_energy_joules_total", namespace=namespace) > 0
        per_token = metric(text, "conserve_energy_per_token_joules", tier="bandwidth", role="decode") > 0
        return text if attributed and per_token else None

    text = wait_for("joules in /metrics", scraped, 30)
    labels = {"namespace": namespace, "pool": "pool"}
    assert metric(text, "conserve_unattributed_energy_joules_total", **labels) > 0
    assert metric(text, "conserve_energy_joules_total", **labels, role="decode") > 0
    assert metric(text, "conserve_pool_power_watts", **labels) > 0
    assert metric(text, "conserve_energy_per_token_joules", tier="bandwidth", role="decode") > 0
    assert metric(text, "conserve_gpu_power_watts", model_name="NVIDIA H200") > 0
    assert "chat-a" not in text  # no per-conversation label

    # A finished conversation's joules go into the histogram.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "conversations", "chat-b", {"spec": {"completed": True}}
    )
    wait_for(
        "the finished conversation in the energy histogram",
        lambda: metric(get(energy_plane["metrics"]), "conserve_conversation_energy_joules_count", **labels) >= 1,
        30,
    )
