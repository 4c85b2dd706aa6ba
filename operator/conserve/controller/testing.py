"""Builders and helpers for tests and benchmarks of the operator against a real API server.

Fluent-ish builders of test objects (a pool, decoder pods on KWOK GPU nodes, conversations), the CRDs applied
and Established, and the operator as a subprocess (`conserve operator`) that a test can kill and restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from conserve import testkit
from conserve.api import crdgen
from conserve.api.common import GROUP, VERSION
from conserve.controller.kube import k8s
from conserve.testkit.builders import ConversationBuilder, PodBuilder, PoolBuilder

T = TypeVar("T")


def pool_body(name: str, *, app: str = "dec", tokens_per_decoder: int | None = 100_000, **spec: Any) -> dict[str, Any]:
    pool = PoolBuilder(name).decoders(app).prefills(f"{app}-prefill")
    if tokens_per_decoder is not None:
        pool.kv_tokens(tokens_per_decoder)
    return pool.spec(**spec).build(validate=False)


def pod_body(
    name: str, node: str, *, app: str = "dec", gpus: int = 1, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A bare pod bound to a KWOK node (no scheduler involved); KWOK marks it Running and Ready."""
    pod = PodBuilder(name).on(node).app(app).gpus(gpus)
    for key, value in (annotations or {}).items():
        pod.annotate(key, value)
    body = pod.build()
    body["metadata"].setdefault("annotations", {})
    return body


def conversation_body(name: str, pool: str, first_turn_input_tokens: int, **spec: Any) -> dict[str, Any]:
    return ConversationBuilder(name, pool).tokens(first_turn_input_tokens).spec(**spec).build(validate=False)


class Api:
    """The few calls tests make, on one ApiClient."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        client = k8s("client")
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["kind"] == "Pod":
            self.core.create_namespaced_pod(self.namespace, body)
            return body
        plural = "decoderpools" if body["kind"] == "DecoderPool" else "conversations"
        out: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)
        return out

    def get_conv(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations", name
        )
        return out

    def get_pool(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "decoderpools", name
        )
        return out

    def list_convs(self) -> list[dict[str, Any]]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "conversations")
        return list(out["items"])

    def patch_conv(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            "conversations",
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def delete_conv(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "conversations", name)

    def conv_exists(self, name: str) -> bool:
        try:
            self.get_conv(name)
            return True
        except k8s("client.rest").ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def strip_finalizers(self) -> None:
        """After the operator stopped: let the namespace's conversations go (no operator is left to release)."""
        for item in self.list_convs():
            if item["metadata"].get("finalizers"):
                self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    "conversations",
                    item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                    _content_type="application/merge-patch+json",
                )

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)

    def events(self, reason: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [e for e in items if reason is None or e.reason == reason]


def wait_for(predicate: Callable[[], T], timeout_s: float = 15.0, interval_s: float = 0.1, what: str = "") -> T:
    """`conserve.testkit.wait_for`, predicate first (the operator tests' order), any exception counting as not yet."""
    return testkit.wait_for(what or repr(predicate), predicate, timeout_s, interval_s, tolerate=(Exception,))


def install_crds(api_client: Any, directory: Path = crdgen.CRDS_DIR, timeout_s: float = 30.0) -> None:
    """Create or update the CRDs and wait until they are Established (idempotent)."""
    client = k8s("client")
    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(directory.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        names.append(body["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(body)
        except k8s("client.rest").ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(body["metadata"]["name"])
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        for name in names:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_for(established, timeout_s, what="CRDs Established")


class OperatorProcess:
    """`conserve operator` as a subprocess: start, wait until its ledger is rebuilt, kill, restart."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        *,
        fast: bool = True,
        entry: Sequence[str] = ("-m", "conserve.cli"),
    ) -> None:
        self.entry = list(entry)  # what the interpreter runs before `operator ...` (a benchmark's launcher)
        self.fast = fast  # short sweep and status intervals (tests); False: the command's defaults (benchmarks)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30.0) -> OperatorProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        args = [sys.executable, *self.entry, "operator", "--namespace", self.namespace, "--metrics-port", "0"]
        if self.fast:
            args += ["--idle-sweep-interval", "0.2", "--pool-status-interval", "0.2"]
            if "--events" not in self.extra_args:
                args += ["--events", "all"]  # tests follow each conversation's Events
        args += self.extra_args
        if "--lease-name" not in self.extra_args:
            args.append("--no-leader-elect")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_log("ledger rebuilt", timeout_s)
        return self

    def log_text(self, since_start: bool = True) -> str:
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[self._log_offset if since_start else 0 :].decode(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 30.0) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return text in self.log_text()

        deadline = time.monotonic() + timeout_s
        while not seen():
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator did not log {text!r} in {timeout_s}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@contextlib.contextmanager
def running_operator(
    kubeconfig: Path, namespace: str, log_path: Path, extra_args: Sequence[str] = ()
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, namespace, log_path, extra_args).start()
    try:
        yield op
    finally:
        op.stop()
