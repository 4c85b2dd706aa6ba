"""Which Kubernetes client for ConServe (not a test): the synchronous `kubernetes` client in threads, as
`conserve.kube` runs it, against `kubernetes_asyncio` (aiohttp, no threads), on the two paths where the client
is the bottleneck, in one run on one local control plane:

1. the router's placement wait: create a Conversation, then wait for the watch to bring its placement
   (`status.decoder`), `--concurrency` new conversations at a time; the threaded side is the router's own
   `KubeControlPlane` (create pool + informer), the asyncio side the same contract in kube_async_client.py;
   p50 / p99 of create-to-placement and conversations placed per second;
2. the operator's placement throughput: `--count` conversations exist before the operator starts (a backlog:
   the operator's own pace, not a client's), placed per second from the first placement to the last, with the
   operator's `Kube` on each client (the same engine, the same Kopf).

    .venv/bin/pip install kubernetes_asyncio   # the contender only; ConServe does not depend on it
    .venv/bin/python benchmarks/kube_client_bench.py [--kubeconfig K] [--rounds 1] [--out results/kube_client.json]

One run (--count 300 --concurrency 32 --rounds 1; 2 cores shared with other jobs, load average 17-19):
    placement wait   threads  p50 5778 ms  p99 10323 ms  2.5 placed/s
                     asyncio  p50 4630 ms  p99  8118 ms  6.4 placed/s   (asyncio/threads: 0.80, 0.79, 2.56)
    operator backlog threads  8.1 placed/s;  asyncio 8.1 placed/s          (1.00)
Each scenario ran once, threads first (on a freshly started cluster): more rounds (--rounds 3 alternates them)
on a quiet machine before reading much into the router's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from operator_bench import PlacementWatch, cluster, make_namespace, quantile, setup_pool

from conserve.devcluster import nodes
from conserve.kube import new_api_client
from conserve.kube.clients import CoreV1Api
from conserve.router.control import CREATE_THREADS, PATCH_THREADS, KubeControlPlane
from conserve.testkit import Api, OperatorProcess, conversation_body, install_crds, pod_body, pool_body

HERE = Path(__file__).resolve().parent
CLIENTS = ("threads", "asyncio")


def fresh_namespace(kubeconfig: Path, ns: str, threads: int) -> Api:
    """A new namespace, and the set-up client's calls in it."""
    setup_client = new_api_client(kubeconfig, pool_size=threads + 4)
    make_namespace(CoreV1Api(setup_client), ns)
    return Api(setup_client, ns)


async def _placement_waits(plane: Any, prefix: str, count: int, concurrency: int) -> tuple[list[float], float]:
    await plane.start()
    gate = asyncio.Semaphore(concurrency)
    waits: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            name = f"{prefix}-{i:05d}"
            t0 = time.perf_counter()
            await plane.create_conversation(name, {"pool": "bench", "firstTurnInputTokens": 1000})
            await plane.wait_placement(name, newer_than=None, timeout_s=120)
            waits.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await plane.stop()
    return waits, time.perf_counter() - t0


def placement_wait(
    kind: str, kubeconfig: Path, node_names: list[str], work: Path, tag: str, args: Any
) -> dict[str, Any]:
    ns = f"kb-wait-{kind}-{tag}"
    api = fresh_namespace(kubeconfig, ns, args.threads)
    op = OperatorProcess(kubeconfig, ns, work / f"{ns}.log", fast=False).start()
    try:
        setup_pool(api, 20, 1_000_000, node_names, args.threads)

        async def run() -> tuple[list[float], float]:
            if kind == "threads":
                client = new_api_client(kubeconfig, pool_size=CREATE_THREADS + PATCH_THREADS + 2)
                return await _placement_waits(
                    KubeControlPlane(api_client=client, namespace=ns), "w", args.count, args.concurrency
                )
            # The contender is installed for this benchmark only: imported when its turn comes.
            from kube_async_client import AsyncControlPlane  # noqa: PLC0415
            from kube_async_client import new_api_client as new_async_client  # noqa: PLC0415

            client = await new_async_client(str(kubeconfig), CREATE_THREADS + PATCH_THREADS + 2)
            async with client:
                return await _placement_waits(AsyncControlPlane(client, ns), "w", args.count, args.concurrency)

        waits, span_s = asyncio.run(run())
    finally:
        op.stop()
    return {
        "client": kind,
        "conversations": args.count,
        "concurrency": args.concurrency,
        "p50_ms": round(quantile(waits, 0.50) * 1000, 1),
        "p99_ms": round(quantile(waits, 0.99) * 1000, 1),
        "mean_ms": round(statistics.mean(waits) * 1000, 1),
        "placed_per_s": round(len(waits) / span_s, 1),
    }


def operator_throughput(
    kind: str, kubeconfig: Path, node_names: list[str], work: Path, tag: str, args: Any
) -> dict[str, Any]:
    ns = f"kb-op-{kind}-{tag}"
    api = fresh_namespace(kubeconfig, ns, args.threads)
    api.create(pool_body("bench", tokens_per_decoder=1_000_000))
    names = [f"b-{i:05d}" for i in range(args.count)]
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda i: api.create(pod_body(f"dec-{i}", node_names[i % len(node_names)])), range(20)))
        list(pool.map(lambda n: api.create(conversation_body(n, "bench", 1000)), names))
    entry = ("-m", "conserve.cli") if kind == "threads" else (str(HERE / "kube_async_client.py"),)
    op = OperatorProcess(kubeconfig, ns, work / f"{ns}.log", fast=False, entry=entry)
    with PlacementWatch(api.custom.api_client, ns) as watch:
        op.start(wait_ready=False)
        try:
            ok = watch.wait(names, 300)
        finally:
            op.stop()
    span = max(watch.placed.values()) - min(watch.placed.values())
    return {"client": kind, "conversations": args.count, "all_placed": ok, "placed_per_s": round(args.count / span, 1)}


def ratios(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """asyncio / threads of each figure, over the rounds' means."""
    out = {}
    for key in keys:
        mean = {k: statistics.mean(r[key] for r in rows if r["client"] == k) for k in CLIENTS}
        out[f"{key}_asyncio_over_threads"] = round(mean["asyncio"] / mean["threads"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("CONSERVE_KUBECONFIG"))
    parser.add_argument("--out", type=Path, default=Path("results/kube_client_bench.json"))
    parser.add_argument("--threads", type=int, default=16, help="threads of the set-up client")
    parser.add_argument("--count", type=int, default=600, help="conversations per scenario and client")
    parser.add_argument("--concurrency", type=int, default=32, help="new conversations in flight (placement wait)")
    parser.add_argument("--rounds", type=int, default=1, help="threads then asyncio, this many times")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conserve-kube-bench-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "placement_wait": [], "operator_throughput": []}
    with cluster(args.kubeconfig, work) as kubeconfig:
        bench_nodes = nodes.make_gpu_nodes("kb-h200", 10, "NVIDIA-H200", 8, 143771, pods="250")
        node_names = nodes.apply_gpu_nodes(kubeconfig, bench_nodes)
        nodes.wait_nodes_ready(kubeconfig, node_names)
        with new_api_client(kubeconfig) as api_client:
            install_crds(api_client)
        for r in range(args.rounds):
            for kind in CLIENTS:
                row = placement_wait(kind, kubeconfig, node_names, work, str(r), args)
                results["placement_wait"].append(row)
                print(json.dumps(row), flush=True)
            for kind in CLIENTS:
                row = operator_throughput(kind, kubeconfig, node_names, work, str(r), args)
                results["operator_throughput"].append(row)
                print(json.dumps(row), flush=True)
    results["ratios"] = {
        "placement_wait": ratios(results["placement_wait"], ("p50_ms", "p99_ms", "placed_per_s")),
        "operator_throughput": ratios(results["operator_throughput"], ("placed_per_s",)),
    }
    print(json.dumps(results["ratios"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
