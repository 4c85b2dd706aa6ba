"""`conserve demo`: the whole system on one machine, a Mooncake slice replayed through it, a short report.

1. The local control plane (`conserve dev up`: etcd, kube-apiserver, controller-manager, kube-scheduler with the
   `conserve-scheduler` profile, KWOK fake GPU nodes), unless `--kubeconfig` names a cluster.
2. CRDs applied; the operator, the scheduler extender, the gpu-sim pod runner and the router started.
3. A DecoderPool with a prefill and a decode Deployment that the conserve-scheduler places (prefill on the
   compute tier, decode on the bandwidth tier); each pod answers through a gpu-sim server.
4. The slice replayed in both routing modes (`conserve load`), the offline simulator beside them; the report:
   placements (conversations per decoder), p95 TTFET, J per output token.
5. Everything it started is stopped; the cluster is torn down unless `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

GROUP, VERSION = "conserve.dev", "v1alpha1"
REPO_CRDS = Path(__file__).resolve().parents[3] / "crds"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="local cluster + operator + extender + router + gpu-sim; replay a slice")
    p.add_argument("--state-dir", type=Path, default=Path(".devcluster"), help="local cluster state directory")
    p.add_argument("--kubeconfig", type=Path, default=None, help="use this cluster instead of starting one")
    p.add_argument("--namespace", default="conserve-demo")
    p.add_argument("--prefill", type=int, default=2, help="prefill pods")
    p.add_argument("--decoders", type=int, default=4, help="decode pods")
    p.add_argument("--workload", default="mooncake")
    p.add_argument("--start-s", type=float, default=600.0)
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--speedup", type=float, default=3.0, help="gpu-sim runs with --time-scale 1/speedup")
    p.add_argument("--modes", default="conversation,per-turn")
    p.add_argument("--router-port", type=int, default=8080)
    p.add_argument("--keep", action="store_true", help="leave the cluster and the demo processes' pods up")
    p.add_argument("--logs", type=Path, default=Path(".demo-logs"))
    p.set_defaults(func=_run)


def _conserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "conserve.cli", *args]


def _kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    exe = shutil.which("kubectl") or "kubectl"
    done = subprocess.run(
        [exe, f"--kubeconfig={kubeconfig}", *args], check=True, capture_output=True, text=True, input=input
    )
    return done.stdout


def _manifests(namespace: str, prefill: int, decoders: int) -> list[dict[str, Any]]:
    def deployment(name: str, role: str, replicas: int) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": replicas, "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name, "conserve.dev/role": role},
                                 "annotations": {"conserve.dev/model": "llama-3-8b"}},
                    "spec": {
                        "schedulerName": "conserve-scheduler", "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest",
                                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                    },
                },
            },
        }  # fmt: skip

    pool = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DecoderPool", "metadata": {"name": "chat", "namespace": namespace},
        "spec": {"model": {"name": "llama-3-8b"}, "decoderSelector": {"matchLabels": {"app": "decode"}},
                 "prefillSelector": {"matchLabels": {"app": "prefill"}}},
    }  # fmt: skip
    return [pool, deployment("prefill", "prefill", prefill), deployment("decode", "decode", decoders)]


def _run(args: argparse.Namespace) -> int:
    args.logs.mkdir(parents=True, exist_ok=True)
    started_cluster = False
    if args.kubeconfig is None:
        print("cluster: conserve dev up ...", flush=True)
        subprocess.run(_conserve("dev", "up", f"--state-dir={args.state_dir}", "--free-ports"), check=True)
        started_cluster = True
        kubeconfig = args.state_dir.resolve() / "kubeconfig"
    else:
        kubeconfig = args.kubeconfig
    from conserve.devcluster.cluster import LocalCluster

    extender_port = LocalCluster.attach(args.state_dir).extender_port if args.kubeconfig is None else 8888
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def start(name: str, *cmd: str) -> None:
        with (args.logs / f"{name}.log").open("wb") as out:
            procs.append(subprocess.Popen(_conserve(*cmd), stdout=out, stderr=subprocess.STDOUT, env=env))

    try:
        _kubectl(kubeconfig, "apply", "--server-side", "-f", str(REPO_CRDS))
        _kubectl(
            kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/conversations.conserve.dev",
            "crd/decoderpools.conserve.dev",
        )
        subprocess.run(
            [shutil.which("kubectl") or "kubectl", f"--kubeconfig={kubeconfig}", "create", "namespace", args.namespace],
            capture_output=True,
        )
        kc = f"--kubeconfig={kubeconfig}"
        start("extender", "extender", "--host=127.0.0.1", f"--port={extender_port}", kc)
        start("operator", "operator", f"--namespace={args.namespace}", "--no-leader-elect", "--metrics-port=0")
        start(
            "gpusim",
            "gpu-sim",
            "pods",
            kc,
            f"--namespace={args.namespace}",
            f"--time-scale={1 / args.speedup}",
            "--stream-interval=8",
        )
        start("router", "router", kc, f"--namespace={args.namespace}", "--pool=chat", f"--port={args.router_port}")
        time.sleep(2.0)  # the extender's watch cache before the pods are scheduled
        manifests = _manifests(args.namespace, args.prefill, args.decoders)
        _kubectl(
            kubeconfig, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
        )
        router = f"http://127.0.0.1:{args.router_port}"
        _wait_backends(router, args.prefill, args.decoders)
        print(_kubectl(kubeconfig, "get", "pods", "-n", args.namespace, "-o", "wide"), flush=True)
        code = _replay(args, router)
        _report_placements(kubeconfig, args.namespace)
        return code
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if started_cluster and not args.keep:
            subprocess.run(_conserve("dev", "down", f"--state-dir={args.state_dir}"), check=False)
        elif started_cluster:
            print(f"cluster left up: export KUBECONFIG={kubeconfig}; `conserve dev down --state-dir {args.state_dir}`")


def _wait_backends(router: str, prefill: int, decoders: int, timeout_s: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{router}/conserve/backends", timeout=2) as resp:
                data = json.loads(resp.read())
            if len(data["prefills"]) >= prefill and len(data["decoders"]) >= decoders:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the pool's servers did not become ready behind the router (see .demo-logs/)")


def _replay(args: argparse.Namespace, router: str) -> int:
    from conserve.load.cli import offline, run_modes
    from conserve.load.report import format_table, slice_workload
    from conserve.sim.workload import load_workload

    full = load_workload(args.workload, duration_s=args.start_s + args.duration_s)
    workload = slice_workload(full, args.start_s, args.duration_s)
    print(
        f"replaying {workload.name}: {len(workload.conversations)} conversations, {workload.turns} turns, "
        f"speed-up {args.speedup:g}",
        flush=True,
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    summaries = asyncio.run(run_modes(workload, router, modes, args.speedup, None))
    summaries += asyncio.run(offline(workload, router))
    print(format_table(summaries))
    live = {s.label: s for s in summaries}
    conv, per_turn = live.get("conversation"), live.get("per-turn")
    if conv and per_turn and conv.ttfet_p95_s and per_turn.ttfet_p95_s:
        gain = 1 - conv.ttfet_p95_s / per_turn.ttfet_p95_s
        print(
            f"p95 TTFET: conversation {conv.ttfet_p95_s:.2f} s vs per-turn {per_turn.ttfet_p95_s:.2f} s "
            f"({gain:+.1%} lower); J per token: {conv.energy_per_token_j or 0:.3f} vs "
            f"{per_turn.energy_per_token_j or 0:.3f}"
        )
    return 0 if all(s.failed_turns == 0 for s in summaries) else 1


def _report_placements(kubeconfig: Path, namespace: str) -> None:
    data = json.loads(_kubectl(kubeconfig, "get", "conversations", "-n", namespace, "-o", "json"))
    per_decoder: Counter[str] = Counter()
    transfers = 0
    for item in data.get("items", []):
        status = item.get("status") or {}
        decoder = (status.get("decoder") or {}).get("pod", "(none)")
        per_decoder[decoder] += 1
        transfers += int(status.get("kvTransfers") or 0)
    print(
        f"placements: {len(data.get('items', []))} conversations, {transfers} KV transfers; per decoder: "
        + ", ".join(f"{d}={n}" for d, n in sorted(per_decoder.items()))
    )
