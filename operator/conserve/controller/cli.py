"""`conserve operator`: run the Kopf operator (Conversation placement, DecoderPool status, decoder discovery).

RBAC the operator needs (the Helm chart grants exactly these; tests/e2e/test_helm.py runs the operator with
that ServiceAccount's token):
- conserve.dev: conversations: list, watch, patch (only to remove the finalizer earlier versions added);
  decoderpools: list, watch;
  conversations/status, decoderpools/status: patch. (A Role per watched namespace, or a ClusterRole with
  --all-namespaces.)
- core: pods: list, watch; nodes (cluster-scoped, ClusterRole): list, watch; events: create.
- coordination.k8s.io: leases: create, and get, update, patch on its own Lease in --lease-namespace; with
  --shards N also list (counting live replicas' member Leases) and get, update, patch on the shard and member
  Leases (names start with --lease-name).
- Kopf itself (scanning is off, no peering): nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys

from conserve.cliargs import add_seconds_option


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("operator", help="run the ConServe operator (Kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", dest="namespaces", help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    p.add_argument("--metrics-port", type=int, default=9100, help="Prometheus metrics port (0: off; default 9100)")
    p.add_argument("--health-port", type=int, default=0, help="Kopf liveness endpoint /healthz on this port (0: off)")
    p.add_argument(
        "--no-leader-elect",
        dest="leader_elect",
        action="store_false",
        help="run without the Lease (one replica only: tests, development)",
    )
    p.add_argument("--lease-name", default="conserve-operator", help="the Lease of leader election")
    p.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits after the leader's last renewal before taking over",
    )
    p.add_argument(
        "--lease-namespace",
        default=None,
        help="namespace of the Lease (default: $POD_NAMESPACE, the first --namespace, or default)",
    )
    p.add_argument("--identity", default=None, help="this replica's name in the Lease (default: $POD_NAME or host)")
    add_seconds_option(p, "--pool-status-interval", 0.5, "seconds between a pool's status writes")
    add_seconds_option(p, "--idle-sweep-interval", 1.0, "seconds between idle-timeout sweeps")
    add_seconds_option(p, "--idle-phase-after", 60.0, "seconds without a turn before a conversation shows phase Idle")
    p.add_argument(
        "--events",
        choices=["aggregated", "all", "warnings"],
        default="aggregated",
        help="Events to post: aggregated (Warnings each; Normal ones, Placed, Released, ..., at most one per "
        "namespace and reason per --event-window, with a summary), all (each), or warnings only",
    )
    p.add_argument("--event-window", type=float, default=10.0, help="seconds over which Normal Events are aggregated")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="shard DecoderPools over this many Leases (<lease-name>-shard-<i>): each replica leads its fair "
        "share of them; 1: one Lease, one leader",
    )
    p.add_argument(
        "--occupancy-interval",
        type=float,
        default=2.0,
        help="seconds between scrapes of each ready decoder's /metrics (vllm:kv_cache_usage_perc, "
        "vllm:num_requests_running): observed KV occupancy for placement (0: off)",
    )
    p.add_argument(
        "--vanished-sweep-interval",
        type=float,
        default=300.0,
        help="seconds between lists that release conversations deleted while a watch was down (0: off)",
    )
    p.add_argument(
        "--usage-port",
        type=int,
        default=0,
        help="accept the routers' turn reports (POST /v1/usage) on this port (0: off; spec.usage patches only)",
    )
    p.add_argument(
        "--usage-token-file",
        default=os.environ.get("CONSERVE_USAGE_TOKEN_FILE"),
        help="file holding the token the routers present (Authorization: Bearer); required with --usage-port",
    )
    add_seconds_option(
        p,
        "--checkpoint-interval",
        300.0,
        "seconds a conversation's streamed usage may wait before its status checkpoints it (when no decision "
        "writes it sooner)",
    )
    p.add_argument("--api-threads", type=int, default=64, help="threads (and connections) of the Kubernetes client")
    p.add_argument("--verbose", "-v", action="store_true")
    from conserve.energy.options import add_arguments as add_energy_arguments

    add_energy_arguments(p)  # the energy loop runs inside the operator when --energy-source is not none
    p.set_defaults(func=run, energy_source="none")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    from conserve.controller.main import OperatorOptions, run_operator
    from conserve.energy.options import EnergyOptions

    options = OperatorOptions(
        namespaces=args.namespaces or None,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        leader_elect=args.leader_elect,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace
        or os.environ.get("POD_NAMESPACE")
        or (args.namespaces[0] if args.namespaces else "default"),
        identity=args.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{secrets.token_hex(3)}",
        pool_status_interval_s=args.pool_status_interval,
        idle_sweep_interval_s=args.idle_sweep_interval,
        idle_phase_after_s=args.idle_phase_after,
        api_threads=args.api_threads,
        lease_duration_s=args.lease_duration,
        energy=EnergyOptions.from_args(args),
        normal_events=args.events != "warnings",
        event_window_s=args.event_window if args.events == "aggregated" else 0.0,
        shards=args.shards,
        vanished_sweep_interval_s=args.vanished_sweep_interval,
        occupancy_interval_s=args.occupancy_interval,
        usage_port=args.usage_port,
        usage_token_file=args.usage_token_file,
        checkpoint_interval_s=args.checkpoint_interval,
    )
    if args.usage_port and not args.usage_token_file:
        print("--usage-port: needs --usage-token-file (the reports are authenticated)", file=sys.stderr)
        return 2
    if args.shards < 1:
        print("--shards: must be at least 1", file=sys.stderr)
        return 2
    return asyncio.run(run_operator(options))
