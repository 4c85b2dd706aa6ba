"""``conserve dev``: build, start, inspect and stop the local control plane."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from conserve.devcluster import build

if TYPE_CHECKING:
    from conserve.devcluster.cluster import LocalCluster


def default_state_dir() -> Path:
    # `.devcluster/` in the current directory (git-ignored in the repository), unless overridden.
    return Path(os.environ.get("CONSERVE_STATE_DIR", ".devcluster")).resolve()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser("dev", help="the local Kubernetes control plane (etcd, kube-*, KWOK)")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="ACTION")
    dev_sub.required = True

    p = dev_sub.add_parser("build", help="build (or reuse from the cache) etcd, Kubernetes, KWOK and helm")
    p.add_argument("parts", nargs="*", metavar="PART", help=f"parts to build: {', '.join(build_names())}")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    p.set_defaults(func=cmd_build)

    def state_arg(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="where the cluster keeps its data, certificates, logs and kubeconfig "
            "(default: $CONSERVE_STATE_DIR or ./.devcluster)",
        )

    p = dev_sub.add_parser("up", help="start the cluster in the background and create the fake GPU nodes")
    state_arg(p)
    p.add_argument("--nodes", type=Path, default=None, help="nodes file (default: the packaged nodes.yaml)")
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free ports instead of the well-known ones (6443, 2379, ...); the extender URL gets one too",
    )
    p.add_argument(
        "--extender-url", default=None, help="URL of the conserve scheduler extender (default http://127.0.0.1:8888/)"
    )
    p.add_argument(
        "--unlimited-inflight",
        action="store_true",
        help="turn off the API server's in-flight limits and priority-and-fairness (load tests)",
    )
    p.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    p.set_defaults(func=cmd_up)

    p = dev_sub.add_parser("down", help="stop every process of the cluster and check none is left")
    state_arg(p)
    p.add_argument("--purge", action="store_true", help="also delete the state directory")
    p.set_defaults(func=cmd_down)

    p = dev_sub.add_parser("status", help="show which components are running")
    state_arg(p)
    p.set_defaults(func=cmd_status)

    p = dev_sub.add_parser("env", help="print `export KUBECONFIG=...` for eval $(conserve dev env)")
    state_arg(p)
    p.set_defaults(func=cmd_env)


def build_names() -> list[str]:
    return [p.name for p in build.PARTS]


def cmd_build(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.parts) - set(build_names()))
    if unknown:
        print(f"unknown parts {unknown}; choose from {build_names()}", file=sys.stderr)
        return 2
    try:
        build.build_all(args.parts or None, force=args.force)
    except build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from conserve.devcluster import nodes
    from conserve.devcluster.cluster import LocalCluster, Ports

    state_dir = args.state_dir or default_state_dir()
    if (state_dir / "state.json").exists():
        existing = LocalCluster.attach(state_dir)
        if any(existing.status().values()):
            print(f"a cluster is already running from {state_dir}; `conserve dev down` first", file=sys.stderr)
            return 1
    specs = nodes.load_node_specs(args.nodes)  # read before starting anything: a bad file fails fast
    missing = build.missing_parts()
    if missing and args.no_build:
        print(f"not built: {missing}; run `conserve dev build`", file=sys.stderr)
        return 1
    if missing:
        build.build_all()
    # A fresh cluster every time: stale etcd data or certificates from a crashed run only confuse.
    if state_dir.exists():
        shutil.rmtree(state_dir)
    start = time.monotonic()
    cluster = LocalCluster(
        state_dir,
        ports=None if args.free_ports else Ports.fixed(),
        extender_url=args.extender_url,
        unlimited_inflight=args.unlimited_inflight,
    )
    cluster.start()
    try:
        names = nodes.apply_gpu_nodes(cluster.kubeconfig, specs)
        nodes.wait_nodes_ready(cluster.kubeconfig, names)
    except BaseException:
        cluster.stop()
        raise
    print(f"cluster up in {time.monotonic() - start:.1f}s: {cluster.server}, {len(names)} fake GPU nodes")
    print(f"  state and logs:   {state_dir}")
    print(f"  schedulers:       default-scheduler, {cluster.scheduler_name} (extender {cluster.extender_url})")
    print(f"  kubeconfig:       {cluster.kubeconfig}")
    print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
    return 0


def _recorded_cluster(state_dir: Path, consequence: str = "") -> LocalCluster | None:
    """The cluster `conserve dev up` recorded in `state_dir`; None, after printing why, if there is none."""
    from conserve.devcluster.cluster import ClusterError, LocalCluster

    try:
        return LocalCluster.attach(state_dir)
    except ClusterError:
        print(f"no cluster recorded in {state_dir}{consequence}")
        return None


def cmd_down(args: argparse.Namespace) -> int:
    from conserve.devcluster.cluster import ClusterError

    state_dir = args.state_dir or default_state_dir()
    cluster = _recorded_cluster(state_dir, "; nothing to stop")
    if cluster is None:
        return 0
    names = [rec.name for rec in cluster.processes]
    try:
        cluster.stop()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"stopped {', '.join(names) or 'nothing'}; no process left")
    if args.purge:
        shutil.rmtree(state_dir)
        print(f"removed {state_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    cluster = _recorded_cluster(state_dir)
    if cluster is None:
        return 1
    status = cluster.status()
    if not status:
        print(f"stopped (state in {state_dir})")
        return 1
    for rec in cluster.processes:
        print(f"{rec.name:<24} {'running' if status[rec.name] else 'stopped':<8} pid {rec.pid:<8} {rec.log}")
    print(f"server {cluster.server}  kubeconfig {cluster.kubeconfig}  extender {cluster.extender_url}")
    return 0 if status and all(status.values()) else 1


def cmd_env(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    kubeconfig = state_dir / "kubeconfig"
    if not kubeconfig.exists():
        print(f"no kubeconfig in {state_dir}; run `conserve dev up`", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={shlex.quote(str(kubeconfig))}")
    return 0
