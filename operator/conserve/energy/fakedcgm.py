"""A dcgm-exporter look-alike for fake GPUs: the same exposition format and labels, power from a load model.

Each fake GPU (a target: pod, namespace, node, GPU index, product) draws `conserve.core.perf.power_w` of its
catalog GPU at the activity a load source gives (in [0, 1]: 0 idle, 0.5 a bandwidth-bound decode, 1 a
compute-bound prefill); its energy counter integrates that power over time on a ticker, in mJ, from a
deterministic since-boot offset. A GPU whose pod runs a GPU-server simulator (`conserve gpu-sim`) instead follows
that simulator's own energy counter (`conserve_gpusim_energy_joules_total`, the pod's share per GPU): the counter
advances by exactly the joules gpu-sim integrated over its steps, so DCGM-derived figures equal gpu-sim's over any
window (up to one scrape of lag). Sampling the simulator's power gauge every few seconds and holding it cannot do
that: a decode server's power changes every step (milliseconds), and the samples alias.
Served like dcgm-exporter 3.x/4.x with the Kubernetes pod mapping on
(`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`, then `container`,
`namespace`, `pod` when a pod holds the GPU).

Load sources: a callable `(FakeGpu) -> activity`; `ConstantLoad`; and overrides set over HTTP
(`PUT /load {"<namespace>/<pod>" | "<UUID>": activity}`), which is how tests and demos move the power.
`conserve fake-dcgm --targets FILE` serves a YAML list of targets (`pod`, `namespace`, `node`, `gpu`, `product`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from conserve.core.gpus import CATALOG, GpuSpec, lookup_product
from conserve.core.perf import Device, power_w

log = logging.getLogger(__name__)

DRIVER_VERSION = "550.90.07"
#: Used when a product is not in the catalog: a 350 W board (L40S class).
FALLBACK_SPEC = CATALOG["L40S"]
#: Since-boot offset of each counter: about this long at idle power, so counters do not start at zero.
BOOT_IDLE_S = 3 * 24 * 3600


@dataclass(frozen=True, slots=True)
class FakeGpu:
    node: str
    gpu_index: int
    product: str  # a GFD product label ("NVIDIA-H200") or a driver name ("NVIDIA H200")
    pod: str = ""
    namespace: str = ""
    container: str = ""

    @property
    def uuid(self) -> str:
        digest = hashlib.sha256(f"{self.node}/{self.gpu_index}".encode()).hexdigest()
        return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"

    @property
    def model_name(self) -> str:
        # GFD builds its product label from the driver's name with spaces as dashes; undo that.
        return self.product.replace("-", " ")

    @property
    def spec(self) -> GpuSpec:
        return lookup_product(self.product) or FALLBACK_SPEC

    @property
    def pod_key(self) -> str:
        return f"{self.namespace}/{self.pod}" if self.pod else ""


LoadSource = Callable[[FakeGpu], float]
TargetSource = Callable[[], Sequence[FakeGpu]]
#: A GPU's cumulative energy (J) as an outside model counts it (a simulator's counter), or None: no such counter.
CounterSource = Callable[[FakeGpu], float | None]


@dataclass(frozen=True, slots=True)
class ConstantLoad:
    activity: float = 0.0

    def __call__(self, gpu: FakeGpu) -> float:
        return self.activity


@dataclass(slots=True)
class _GpuState:
    energy_mj: float
    power_w: float
    activity: float
    source_j: float | None = None  # the counter source's value at the last tick (None: integrating power)


def _boot_energy_mj(gpu: FakeGpu) -> float:
    jitter = int(gpu.uuid[4:12], 16) / 0xFFFFFFFF  # 0..1, stable per GPU
    return float(int(gpu.spec.idle_power_w * BOOT_IDLE_S * (1 + jitter) * 1000))


@dataclass
class FakeDcgmExporter:
    """The model behind the server: targets, their load, power and counters. The clock is injected."""

    targets: TargetSource
    load: LoadSource = field(default_factory=ConstantLoad)
    clock: Callable[[], float] = time.monotonic
    overrides: dict[str, float] = field(default_factory=dict)  # "<ns>/<pod>" or UUID -> activity
    #: Where a GPU's energy comes from a model's own counter (gpu-sim); an override still wins.
    counters: CounterSource | None = None
    _states: dict[str, _GpuState] = field(default_factory=dict)
    _last_tick_s: float | None = None

    def activity(self, gpu: FakeGpu) -> float:
        if gpu.uuid in self.overrides:
            value = self.overrides[gpu.uuid]
        elif gpu.pod_key and gpu.pod_key in self.overrides:
            value = self.overrides[gpu.pod_key]
        else:
            value = self.load(gpu)
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0

    def _overridden(self, gpu: FakeGpu) -> bool:
        return gpu.uuid in self.overrides or (bool(gpu.pod_key) and gpu.pod_key in self.overrides)

    def tick(self) -> list[tuple[FakeGpu, _GpuState]]:
        """Advance every GPU's counter since the last tick, then take its new load. Returns the GPUs' state.

        A GPU with a source counter (and no override) advances by the source's increase since the last tick (a
        source that went backwards restarted: its new value is what it drew since, the Prometheus rule); the first
        tick that sees the source only takes it as the baseline. Other GPUs integrate the power held since the
        last tick."""
        now_s = self.clock()
        elapsed_s = 0.0 if self._last_tick_s is None else max(now_s - self._last_tick_s, 0.0)
        self._last_tick_s = now_s
        out = []
        for gpu in self.targets():
            source_j = None if self.counters is None or self._overridden(gpu) else self.counters(gpu)
            if source_j is not None and not (math.isfinite(source_j) and source_j >= 0):
                source_j = None
            state = self._states.get(gpu.uuid)
            if state is None:
                state = _GpuState(_boot_energy_mj(gpu), gpu.spec.idle_power_w, 0.0)
                self._states[gpu.uuid] = state
            elif source_j is not None and state.source_j is not None:
                increase_j = source_j - state.source_j if source_j >= state.source_j else source_j
                state.energy_mj += increase_j * 1000.0
            else:
                state.energy_mj += state.power_w * elapsed_s * 1000.0  # power held since the last tick
            state.source_j = source_j
            state.activity = self.activity(gpu)
            state.power_w = power_w(Device(gpu.spec), state.activity)
            out.append((gpu, state))
        return out

    def render(self) -> str:
        """The /metrics page, as dcgm-exporter writes it."""
        gpus = self.tick()
        families: list[tuple[str, str, str, Callable[[FakeGpu, _GpuState], str]]] = [
            ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g, s: "1980"),
            ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g, s: str(int(30 + 40 * s.activity))),
            ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g, s: f"{s.power_w:.6f}"),
            (
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                "counter",
                "Total energy consumption since boot (in mJ).",
                lambda g, s: str(int(s.energy_mj)),
            ),
            ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g, s: str(round(100 * s.activity))),
            (
                "DCGM_FI_DEV_FB_USED",
                "gauge",
                "Framebuffer memory used (in MiB).",
                lambda g, s: str(int(g.spec.memory_bytes / 2**20 * 0.9)) if g.pod else "0",
            ),
        ]
        lines: list[str] = []
        for name, kind, help_text, value in families:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{_labels(gpu)}}} {value(gpu, state)}" for gpu, state in gpus)
        return "\n".join(lines) + "\n"


def _labels(gpu: FakeGpu) -> str:
    pairs = [
        ("gpu", str(gpu.gpu_index)),
        ("UUID", gpu.uuid),
        ("pci_bus_id", f"00000000:{0x18 + 0x10 * gpu.gpu_index:02X}:00.0"),
        ("device", f"nvidia{gpu.gpu_index}"),
        ("modelName", gpu.model_name),
        ("Hostname", gpu.node),
        ("DCGM_FI_DRIVER_VERSION", DRIVER_VERSION),
    ]
    if gpu.pod:
        pairs += [("container", gpu.container), ("namespace", gpu.namespace), ("pod", gpu.pod)]
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def make_app(exporter: FakeDcgmExporter, *, tick_s: float = 1.0) -> web.Application:
    """GET /metrics, GET /health, PUT /load (activity overrides; `null` removes one)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=exporter.render(), content_type="text/plain", charset="utf-8")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def set_load(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object of key -> activity")
        exporter.tick()  # close the interval at the old load before the new one applies
        for key, value in body.items():
            if value is None:
                exporter.overrides.pop(str(key), None)
            elif isinstance(value, int | float) and math.isfinite(value):
                exporter.overrides[str(key)] = float(value)
            else:
                raise web.HTTPBadRequest(text=f"activity of {key!r} must be a number or null")
        return web.json_response(exporter.overrides)

    async def ticker(app: web.Application) -> Any:
        async def run() -> None:
            while True:
                exporter.tick()
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(run())
        yield
        task.cancel()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_put("/load", set_load)
    app.cleanup_ctx.append(ticker)
    return app


# --- targets and load from a cluster ----------------------------------------------------------------------

LABEL_ROLE = "conserve.dev/role"
ANNOTATION_ENDPOINT = "conserve.dev/endpoint"
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
RESOURCE_GPU = "nvidia.com/gpu"


def targets_from_cluster(pods: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]) -> list[FakeGpu]:
    """Fake GPUs for the pods bound to GPU nodes, as the device plugin would hand them out: on each node, pods in
    name order take consecutive GPU indices (as many as they request); the node's other GPUs idle with no pod."""
    gpu_nodes: dict[str, tuple[str, int]] = {}
    for node_body in nodes:
        meta = node_body.get("metadata") or {}
        labels = meta.get("labels") or {}
        product = labels.get(LABEL_GPU_PRODUCT)
        if product:
            count = int((node_body.get("status") or {}).get("allocatable", {}).get(RESOURCE_GPU, 0) or 0)
            gpu_nodes[str(meta.get("name"))] = (str(product), count)
    by_node: dict[str, list[tuple[str, str, int]]] = {}
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or node not in gpu_nodes or meta.get("deletionTimestamp"):
            continue
        wanted = sum(_gpu_request(c) for c in spec.get("containers") or [])
        if wanted > 0:
            by_node.setdefault(node, []).append((str(meta.get("namespace")), str(meta.get("name")), wanted))
    targets = []
    for node, (product, count) in sorted(gpu_nodes.items()):
        index = 0
        for namespace, name, wanted in sorted(by_node.get(node, []), key=lambda p: (p[1], p[0])):
            for _ in range(wanted):
                if index < count:
                    targets.append(FakeGpu(node, index, product, name, namespace, "vllm"))
                    index += 1
        targets.extend(FakeGpu(node, i, product) for i in range(index, count))
    return targets


def _gpu_request(container: Mapping[str, Any]) -> int:
    resources = container.get("resources") or {}
    value = (resources.get("limits") or {}).get(RESOURCE_GPU) or (resources.get("requests") or {}).get(RESOURCE_GPU)
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


@dataclass
class GpuSimLoad:
    """Load and energy from the GPU-server simulators (`conserve gpu-sim`): each pod's modelled power
    (`conserve_gpusim_power_watts`, for all its GPUs) turned back into an activity of the same power model (the
    power gauge and the utilisation), and each pod's energy counter (`conserve_gpusim_energy_joules_total`, J) split
    evenly over its GPUs (`counter_j`, the exporter's energy counter). `endpoints` maps "<ns>/<pod>" to the
    simulator's host:port (the pod's `conserve.dev/endpoint`). A scrape that fails keeps the pod's last values, so
    the next good one covers the gap exactly once; a pod whose endpoint is gone is forgotten."""

    endpoints: dict[str, str] = field(default_factory=dict)
    gpus_per_pod: dict[str, int] = field(default_factory=dict)
    power_w: dict[str, float] = field(default_factory=dict)  # last scraped, per pod
    energy_j: dict[str, float] = field(default_factory=dict)  # last scraped, per pod (all its GPUs)

    def __call__(self, gpu: FakeGpu) -> float:
        watts = self.power_w.get(gpu.pod_key)
        if watts is None:
            return 0.0
        per_gpu_w = watts / max(self.gpus_per_pod.get(gpu.pod_key, 1), 1)
        spec = gpu.spec
        return (per_gpu_w - spec.idle_power_w) / max(spec.tdp_w - spec.idle_power_w, 1e-9)

    def counter_j(self, gpu: FakeGpu) -> float | None:
        """This GPU's share of its pod's simulator energy counter (J), or None when no simulator reports one."""
        joules = self.energy_j.get(gpu.pod_key)
        if joules is None:
            return None
        return joules / max(self.gpus_per_pod.get(gpu.pod_key, 1), 1)

    async def refresh(self, session: Any) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        endpoints = dict(self.endpoints)
        for gone in [k for k in set(self.power_w) | set(self.energy_j) if k not in endpoints]:
            self.power_w.pop(gone, None)
            self.energy_j.pop(gone, None)
        for key, endpoint in endpoints.items():
            try:
                async with session.get(f"http://{endpoint}/metrics") as response:
                    response.raise_for_status()
                    text = await response.text()
                power, energy = None, None
                for family in text_string_to_metric_families(text):
                    if family.name == "conserve_gpusim_power_watts" and family.samples:
                        power = float(sum(s.value for s in family.samples))
                    elif family.name == "conserve_gpusim_energy_joules":  # a counter: samples end in _total
                        values = [s.value for s in family.samples if s.name.endswith("_total")]
                        energy = float(sum(values)) if values else None
            except Exception as exc:  # a simulator starting, busy or restarting: keep the last values
                log.debug("gpu-sim %s at %s: %s", key, endpoint, exc)
                continue
            if power is not None:
                self.power_w[key] = power
            if energy is not None:
                self.energy_j[key] = energy


class ClusterTargets:
    """Targets (and gpu-sim endpoints) refreshed from the API server on a background thread's schedule."""

    def __init__(self, kubeconfig: str | None, namespace: str | None, load: GpuSimLoad) -> None:
        import kubernetes

        k8s: Any = kubernetes  # the client is untyped
        configuration = k8s.client.Configuration()
        k8s.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        self._api: Any = k8s.client.ApiClient(configuration)
        self._core: Any = k8s.client.CoreV1Api(self._api)
        self._namespace = namespace
        self._load = load
        self.targets: list[FakeGpu] = []

    def __call__(self) -> Sequence[FakeGpu]:
        return self.targets

    def refresh(self) -> None:
        nodes = self._api.sanitize_for_serialization(self._core.list_node().items)
        if self._namespace:
            pod_list = self._core.list_namespaced_pod(self._namespace)
        else:
            pod_list = self._core.list_pod_for_all_namespaces()
        pods = self._api.sanitize_for_serialization(pod_list.items)
        self.targets = targets_from_cluster(pods, nodes)
        endpoints, counts = {}, {}
        for pod in pods:
            meta = pod.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            endpoint = (meta.get("annotations") or {}).get(ANNOTATION_ENDPOINT)
            if endpoint:
                endpoints[key] = endpoint
                counts[key] = max(sum(_gpu_request(c) for c in (pod.get("spec") or {}).get("containers") or []), 1)
        self._load.endpoints, self._load.gpus_per_pod = endpoints, counts


# --- CLI -------------------------------------------------------------------------------------------------


def load_targets(path: Path) -> list[FakeGpu]:
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of targets")
    return [
        FakeGpu(
            node=str(item["node"]),
            gpu_index=int(item.get("gpu", 0)),
            product=str(item["product"]),
            pod=str(item.get("pod", "")),
            namespace=str(item.get("namespace", "")),
            container=str(item.get("container", "")),
        )
        for item in items
    ]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fake-dcgm", help="serve dcgm-exporter metrics for fake GPUs whose power follows their load"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--targets", type=Path, help="YAML list of pod/namespace/node/gpu/product")
    source.add_argument(
        "--from-cluster",
        action="store_true",
        help="every GPU of the cluster's GPU nodes, pods mapped as the device plugin would; load from gpu-sim",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--namespace", default=None, help="with --from-cluster: only this namespace's pods")
    parser.add_argument("--refresh-seconds", type=float, default=2.0, help="with --from-cluster: re-list this often")
    parser.add_argument("--activity", type=float, default=0.0, help="activity of every GPU without an override")
    parser.add_argument(
        "--tick-seconds",
        type=float,
        default=1.0,
        help="how often counters advance (and, with --from-cluster, gpu-sim is scraped)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.targets is not None:
        targets = load_targets(args.targets)
        exporter = FakeDcgmExporter(targets=lambda: targets, load=ConstantLoad(args.activity))
        app = make_app(exporter, tick_s=args.tick_seconds)
        log.info("fake dcgm-exporter: %d GPUs on http://%s:%d/metrics", len(targets), args.host, args.port)
    else:
        gpusim = GpuSimLoad()
        cluster = ClusterTargets(args.kubeconfig, args.namespace, gpusim)
        baseline = ConstantLoad(args.activity)

        def load(gpu: FakeGpu) -> float:
            return gpusim(gpu) if gpu.pod_key in gpusim.power_w else baseline(gpu)

        exporter = FakeDcgmExporter(targets=cluster, load=load, counters=gpusim.counter_j)
        app = make_app(exporter, tick_s=args.tick_seconds)

        async def follow_cluster(app: web.Application) -> Any:
            import aiohttp

            async def list_cluster() -> None:
                while True:
                    try:
                        await asyncio.to_thread(cluster.refresh)
                    except Exception as exc:  # the API server restarting: keep the last targets
                        log.warning("fake dcgm-exporter: cluster refresh failed: %s", exc)
                    await asyncio.sleep(args.refresh_seconds)

            async def scrape_gpusim() -> None:
                # As often as the counters tick: the exporter's counters lag gpu-sim's by at most this.
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                    while True:
                        await gpusim.refresh(session)
                        await asyncio.sleep(args.tick_seconds)

            tasks = [asyncio.create_task(list_cluster()), asyncio.create_task(scrape_gpusim())]
            yield
            for task in tasks:
                task.cancel()

        app.cleanup_ctx.append(follow_cluster)
        log.info("fake dcgm-exporter for the cluster's GPU nodes on http://%s:%d/metrics", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
