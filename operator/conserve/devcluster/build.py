"""Build the local control plane's binaries from Go modules and cache them by version.

Each part is built by one ``go build`` from a small go.mod of our own under ``gomods/`` that names the
upstream command as a ``tool`` (so ``go mod tidy`` keeps it) and pins every dependency in go.sum:

- ``gomods/etcd``: etcd's server (its own go.mod has replace lines, so ``go install pkg@v`` fails);
- ``gomods/kubernetes``: kube-apiserver, kube-controller-manager and kube-scheduler, with a ``replace``
  line for every staging module (upstream's ``./staging`` replaces are ignored in a dependency); bump the
  version by editing ``require k8s.io/kubernetes`` and every ``replace`` to the matching v0.N.M, then
  ``go mod tidy``, and change ``KUBERNETES_VERSION`` below;
- ``gomods/kwok``: KWOK, plus its own default Stage files copied from the module next to the binary;
- ``gomods/helm``: helm v3;
- ``gomods/prometheus``: prometheus and promtool (v0.3MM.P is Prometheus 3.MM.P), for the chart's rules and
  dashboard checked by a real server; built with every service discovery but Kubernetes' and file's left out
  (``-tags remove_all_sd,enable_kubernetes_sd``: the cloud SDKs are most of the build) and without the web UI's
  assets (its HTTP API, which the tests and the demo use, is whole).

Binaries land in ``<cache>/controlplane/<part>-<version>/bin``; a stamp file there records the go.sum hash
and ldflags, so a part is rebuilt only when its module changes and a second run takes seconds. The cache
is ``$CONSERVE_CACHE_DIR`` or ``~/.cache/conserve``; GOMODCACHE and GOCACHE stay Go's defaults (outside
the repository, shared with other Go work).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ETCD_VERSION = "v3.6.16"
KUBERNETES_VERSION = "v1.36.3"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
PROMETHEUS_VERSION = "v3.16.0"  # the Go module's v0.316.0

GOMODS_DIR = Path(__file__).resolve().parent / "gomods"

# KWOK's own default stages (from its module's kustomize/stage), as kwokctl uses them: nodes become Ready
# and keep a Lease, pods become Running, Job pods Succeed, deleted pods go away.
KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def cache_dir() -> Path:
    """The root of conserve's cache, outside the repository."""
    env = os.environ.get("CONSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "conserve"


def _go_env(gomod: Path, *args: str) -> str:
    out = subprocess.run(["go", *args], cwd=gomod, check=True, capture_output=True, text=True, env=_build_env())
    return out.stdout.strip()


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    # Static binaries, as upstream ships them; no C toolchain needed.
    env["CGO_ENABLED"] = "0"
    # Never fetch a different toolchain behind the user's back.
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _kubernetes_ldflags(_gomod: Path) -> list[str]:
    # Without these, /version says v0.0.0-master and Helm charts with a kubeVersion constraint refuse it.
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitCommit": "conserve-built",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
    }
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{key}={value}" for key, value in values.items()]
    return flags


def _kwok_ldflags(_gomod: Path) -> list[str]:
    return [f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}"]


def _helm_ldflags(gomod: Path) -> list[str]:
    # As helm's Makefile: the default Capabilities.KubeVersion follows the client-go it is built with.
    client_go = _go_env(gomod, "list", "-m", "-f", "{{.Version}}", "k8s.io/client-go")
    major0, minor = client_go.lstrip("v").split(".")[:2]
    k8s_major = str(int(major0) + 1)
    return [
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor={k8s_major}",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor}",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor={k8s_major}",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}",
    ]


def _prometheus_ldflags(_gomod: Path) -> list[str]:
    # `prometheus --version` and the build_info metric name the release, as upstream's builds do.
    return [f"-X github.com/prometheus/common/version.Version={PROMETHEUS_VERSION.lstrip('v')}"]


def _no_ldflags(_gomod: Path) -> list[str]:
    # etcd's version is a constant in go.etcd.io/etcd/api/v3/version.
    return []


def _copy_kwok_stages(gomod: Path, part_dir: Path) -> None:
    module_dir = Path(_go_env(gomod, "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"))
    stages = part_dir / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    for rel in KWOK_STAGE_FILES:
        shutil.copyfile(module_dir / rel, stages / Path(rel).name)


@dataclass(frozen=True)
class Part:
    """One cached build: a go.mod of ours, the packages it builds and the binaries they make."""

    name: str
    version: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    ldflags: Callable[[Path], list[str]] = field(default=_no_ldflags)
    after_build: Callable[[Path, Path], None] | None = None
    tags: tuple[str, ...] = ()

    @property
    def gomod(self) -> Path:
        return GOMODS_DIR / self.name

    def dir(self, cache: Path | None = None) -> Path:
        return (cache or cache_dir()) / "controlplane" / f"{self.name}-{self.version}"

    def bin_dir(self, cache: Path | None = None) -> Path:
        return self.dir(cache) / "bin"

    def binary(self, name: str, cache: Path | None = None) -> Path:
        return self.bin_dir(cache) / name

    def stamp_key(self) -> str:
        digest = hashlib.sha256()
        for fname in ("go.mod", "go.sum"):
            digest.update((self.gomod / fname).read_bytes())
        if self.tags:  # (a part without tags keeps the key it always had)
            digest.update(",".join(self.tags).encode())
        return digest.hexdigest()

    def is_built(self, cache: Path | None = None) -> bool:
        stamp = self.dir(cache) / "stamp.json"
        if not stamp.is_file() or not all(self.binary(b, cache).is_file() for b in self.binaries):
            return False
        try:
            data = json.loads(stamp.read_text())
        except ValueError:
            return False
        return bool(data.get("gomod_sha256") == self.stamp_key())


PARTS: tuple[Part, ...] = (
    Part("etcd", ETCD_VERSION, ("go.etcd.io/etcd/server/v3",), ("etcd",)),
    Part(
        "kubernetes",
        KUBERNETES_VERSION,
        (
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
        ),
        ("kube-apiserver", "kube-controller-manager", "kube-scheduler"),
        _kubernetes_ldflags,
    ),
    Part("kwok", KWOK_VERSION, ("sigs.k8s.io/kwok/cmd/kwok",), ("kwok",), _kwok_ldflags, _copy_kwok_stages),
    Part("helm", HELM_VERSION, ("helm.sh/helm/v3/cmd/helm",), ("helm",), _helm_ldflags),
    Part(
        "prometheus",
        PROMETHEUS_VERSION,
        ("github.com/prometheus/prometheus/cmd/prometheus", "github.com/prometheus/prometheus/cmd/promtool"),
        ("prometheus", "promtool"),
        _prometheus_ldflags,
        tags=("remove_all_sd", "enable_kubernetes_sd"),
    ),
)


def part(name: str) -> Part:
    for p in PARTS:
        if p.name == name:
            return p
    raise KeyError(name)


@dataclass(frozen=True)
class Binaries:
    """Paths of every built binary the local cluster runs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kwok: Path
    kwok_stages: tuple[Path, ...]
    helm: Path
    prometheus: Path
    promtool: Path


def binaries(cache: Path | None = None) -> Binaries:
    k8s, kwok = part("kubernetes"), part("kwok")
    return Binaries(
        etcd=part("etcd").binary("etcd", cache),
        kube_apiserver=k8s.binary("kube-apiserver", cache),
        kube_controller_manager=k8s.binary("kube-controller-manager", cache),
        kube_scheduler=k8s.binary("kube-scheduler", cache),
        kwok=kwok.binary("kwok", cache),
        kwok_stages=tuple(kwok.dir(cache) / "stages" / Path(rel).name for rel in KWOK_STAGE_FILES),
        helm=part("helm").binary("helm", cache),
        prometheus=part("prometheus").binary("prometheus", cache),
        promtool=part("prometheus").binary("promtool", cache),
    )


class BuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[conserve build] {msg}", file=sys.stderr, flush=True)


def build_part(p: Part, cache: Path | None = None, force: bool = False) -> float:
    """Build one part unless its stamp matches; returns seconds spent building (0 when cached)."""
    if not force and p.is_built(cache):
        _log(f"{p.name} {p.version}: cached in {p.bin_dir(cache)}")
        return 0.0
    if shutil.which("go") is None:
        raise BuildError("the `go` command is not on PATH; install Go 1.26 or newer")
    part_dir = p.dir(cache)
    part_dir.mkdir(parents=True, exist_ok=True)
    ldflags = " ".join(["-s", "-w", *p.ldflags(p.gomod)])
    # Build into a temporary directory next to the final one so a failed or interrupted build never
    # leaves a half-written binary that a later run would trust.
    with tempfile.TemporaryDirectory(dir=part_dir, prefix=".build-") as tmp:
        # One package: name the output (etcd's main package is ".../server/v3", which Go would call
        # "server"); several: a directory, so shared packages compile once in one `go build`.
        out = f"{tmp}/{p.binaries[0]}" if len(p.packages) == 1 else tmp + "/"
        tags = ["-tags", ",".join(p.tags)] if p.tags else []
        cmd = ["go", "build", "-trimpath", *tags, "-ldflags", ldflags, "-o", out, *p.packages]
        _log(f"{p.name} {p.version}: building {' '.join(b for b in p.binaries)} (cd {p.gomod}; go build ...)")
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=p.gomod, env=_build_env())
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise BuildError(f"go build of {p.name} {p.version} failed (exit {proc.returncode})")
        bin_dir = p.bin_dir(cache)
        bin_dir.mkdir(exist_ok=True)
        for b in p.binaries:
            os.replace(Path(tmp) / b, bin_dir / b)
    if p.after_build is not None:
        p.after_build(p.gomod, part_dir)
    stamp = {
        "part": p.name,
        "version": p.version,
        "gomod_sha256": p.stamp_key(),
        "ldflags": ldflags,
        "go": _go_env(p.gomod, "env", "GOVERSION"),
        "build_seconds": round(seconds, 1),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (part_dir / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    _log(f"{p.name} {p.version}: built in {seconds:.0f}s -> {p.bin_dir(cache)}")
    return seconds


def build_all(names: Sequence[str] | None = None, cache: Path | None = None, force: bool = False) -> Binaries:
    """Build (or reuse) every part, one after another: two cores are best spent on one build at a time."""
    start = time.monotonic()
    for p in PARTS:
        if names and p.name not in names:
            continue
        build_part(p, cache, force)
    _log(f"all parts ready in {time.monotonic() - start:.1f}s (cache {cache or cache_dir()})")
    return binaries(cache)


def missing_parts(cache: Path | None = None) -> list[str]:
    return [p.name for p in PARTS if not p.is_built(cache)]
