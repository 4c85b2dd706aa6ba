"""The Helm chart (charts/conserve): lint, render with good and bad values, least-privilege RBAC, CRD drift.

Runs the helm binary built with the local control plane (conserve.devcluster.build, cached by version; a first
run builds it from its Go module, minutes on two cores): so these are `packaging` tests, not `unit` ones. Every
test renders with `helm template`: no cluster is needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from conserve.cli import build_parser
from conserve.core.gpus import Tier, node_gpu_from_labels
from conserve.devcluster import build

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "conserve"
KUBE_VERSION = build.KUBERNETES_VERSION

Manifest = dict[str, Any]

# The documented least-privilege RBAC (charts/conserve/README.md, "RBAC"): ClusterRole component -> rules as
# (apiGroup, resource) -> verbs. A rule the chart grants that is not here, or a verb more, fails the test.
OPERATOR_RULES: dict[tuple[str, str], set[str]] = {
    ("conserve.dev", "conversations"): {"list", "watch", "patch"},
    ("conserve.dev", "decoderpools"): {"list", "watch"},
    ("conserve.dev", "conversations/status"): {"patch"},
    ("conserve.dev", "decoderpools/status"): {"patch"},
    ("", "pods"): {"list", "watch"},
    ("", "nodes"): {"list", "watch"},
    ("", "events"): {"create"},
}
EXTENDER_RULES: dict[tuple[str, str], set[str]] = {
    ("", "nodes"): {"list", "watch"},
    ("", "pods"): {"list", "watch"},
}
# The second kube-scheduler is bound to upstream's own roles, plus its leader-election Lease.
SCHEDULER_CLUSTER_ROLES = {"system:kube-scheduler", "system:volume-scheduler"}


@cache
def helm_binary() -> str:
    part = build.part("helm")
    if not part.is_built():
        build.build_part(part)
    return str(build.binaries().helm)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=check)


def render(*sets: str, values: Mapping[str, Any] | None = None, release: str = "conserve") -> list[Manifest]:
    """`helm template` of the chart with `--set` pairs and/or a values mapping; the parsed documents."""
    args = ["template", release, str(CHART), "--namespace", "conserve-system", "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        args += ["--values", "-"]
    proc = subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        input=json.dumps(values) if values is not None else None,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(*sets: str) -> str:
    proc = helm("template", "conserve", str(CHART), "--kube-version", KUBE_VERSION, *_set_args(sets), check=False)
    assert proc.returncode != 0, f"expected helm to refuse {sets}"
    return proc.stderr


def _set_args(sets: Sequence[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def by_kind(docs: Sequence[Manifest], kind: str) -> dict[str, Manifest]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: Sequence[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for name, d in by_kind(docs, "Deployment").items():
        yield name, d["spec"]["template"]["spec"]


def rules_of(role: Manifest) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules", []):
        assert "resourceNames" not in rule or role["kind"] == "Role", rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return render()


# --- lint and render -----------------------------------------------------------------------------------------


def test_helm_lint_strict() -> None:
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render_has_every_component(default_docs: list[Manifest]) -> None:
    deployments = by_kind(default_docs, "Deployment")
    assert set(deployments) == {"conserve-operator", "conserve-extender", "conserve-scheduler"}
    assert deployments["conserve-operator"]["spec"]["replicas"] == 2
    assert set(by_kind(default_docs, "Service")) == {"conserve-extender", "conserve-operator-metrics"}
    assert set(by_kind(default_docs, "ServiceAccount")) == set(deployments)
    assert not by_kind(default_docs, "ServiceMonitor"), "the ServiceMonitor is off by default"
    lease = by_kind(default_docs, "Role")["conserve-operator-leader-election"]
    assert lease["rules"][1] == {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["conserve-operator"],
        "verbs": ["get", "update", "patch"],
    }


def test_operator_runs_the_documented_command(default_docs: list[Manifest]) -> None:
    container = by_kind(default_docs, "Deployment")["conserve-operator"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "conserve:0.1.0"
    assert container["args"] == [
        "operator",
        "--all-namespaces",
        "--metrics-port=9100",
        "--health-port=8080",
        "--lease-name=conserve-operator",
        "--lease-namespace=conserve-system",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9100, "health": 8080}


def test_extender_listens_on_all_interfaces_behind_its_service(default_docs: list[Manifest]) -> None:
    container = by_kind(default_docs, "Deployment")["conserve-extender"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["extender", "--host=0.0.0.0", "--port=8888"]
    assert "--scheduler-name=conserve-scheduler" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = by_kind(default_docs, "Service")["conserve-extender"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8888, "targetPort": "http", "protocol": "TCP"}]


def test_every_pod_is_non_root_read_only_with_resources_and_probes(default_docs: list[Manifest]) -> None:
    for name, spec in pod_specs(default_docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["serviceAccountName"] == name, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert c["resources"]["requests"]["cpu"], name
            assert c["resources"]["limits"]["memory"], name
            assert c["livenessProbe"], name
            assert c["readinessProbe"], name


def test_scheduler_configuration_calls_the_extender_service(default_docs: list[Manifest]) -> None:
    cm = by_kind(default_docs, "ConfigMap")["conserve-scheduler-config"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert [p["schedulerName"] for p in config["profiles"]] == ["conserve-scheduler"]
    assert config["leaderElection"] == {
        "leaderElect": True,
        "resourceLock": "leases",
        "resourceName": "conserve-scheduler",
        "resourceNamespace": "conserve-system",
    }
    [extender] = config["extenders"]
    assert extender == {
        "urlPrefix": "http://conserve-extender.conserve-system.svc:8888",
        "filterVerb": "filter",
        "prioritizeVerb": "prioritize",
        "weight": 5,
        "httpTimeout": "5s",
        "nodeCacheCapable": True,
        "ignorable": False,
        "enableHTTPS": False,
        "managedResources": [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}],
    }
    spec = by_kind(default_docs, "Deployment")["conserve-scheduler"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["image"] == f"registry.k8s.io/kube-scheduler:{KUBE_VERSION}"
    assert "--config=/etc/kubernetes/conserve-scheduler/config.yaml" in container["command"]
    assert {v["name"]: v for v in spec["volumes"]}["config"]["configMap"]["name"] == "conserve-scheduler-config"


def test_scheduler_name_image_and_extender_are_configurable() -> None:
    docs = render(
        "scheduler.name=gpu-conversations",
        "scheduler.image.tag=v1.35.2",
        "scheduler.extender.urlPrefix=https://ext.example:9443/x",
        "scheduler.extender.nodeCacheCapable=false",
    )
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["conserve-scheduler-config"]["data"]["config.yaml"])
    assert config["profiles"] == [{"schedulerName": "gpu-conversations"}]
    assert config["extenders"][0]["urlPrefix"] == "https://ext.example:9443/x"
    assert config["extenders"][0]["enableHTTPS"] is True
    deployments = by_kind(docs, "Deployment")
    scheduler = deployments["conserve-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    assert scheduler["image"] == "registry.k8s.io/kube-scheduler:v1.35.2"
    extender_args = deployments["conserve-extender"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--scheduler-name=gpu-conversations" in extender_args
    assert "--no-node-cache-capable" in extender_args
    lease_role = by_kind(docs, "Role")["conserve-scheduler-leader-election"]
    assert lease_role["rules"][1]["resourceNames"] == ["gpu-conversations"]


def test_placement_values_reach_every_pod() -> None:
    docs = render(
        values={
            "nodeSelector": {"type": "kwok"},
            "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
            "operator": {"nodeSelector": {"pool": "control"}},
            "imagePullSecrets": ["regcred"],
        }
    )
    for name, spec in pod_specs(docs):
        assert spec["nodeSelector"]["type"] == "kwok", name
        assert spec["tolerations"] == [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], name
    assert dict(pod_specs(docs))["conserve-operator"]["nodeSelector"] == {"type": "kwok", "pool": "control"}


def test_components_can_be_turned_off() -> None:
    docs = render("operator.enabled=false", "scheduler.enabled=false", "crds.enabled=false")
    assert set(by_kind(docs, "Deployment")) == {"conserve-extender"}
    assert not by_kind(docs, "CustomResourceDefinition")
    assert set(by_kind(docs, "ClusterRole")) == {"conserve-extender"}


def test_single_operator_without_leader_election() -> None:
    docs = render("operator.replicas=1", "operator.leaderElection.enabled=false")
    args = by_kind(docs, "Deployment")["conserve-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-leader-elect" in args
    assert not any(a.startswith("--lease") for a in args)
    assert "conserve-operator-leader-election" not in by_kind(docs, "Role")


def test_dcgm_energy_source_gets_endpointslices_in_the_exporters_namespace_only() -> None:
    docs = render("operator.energy.source=dcgm", "operator.energy.dcgm.service=gpu-operator/nvidia-dcgm-exporter")
    args = by_kind(docs, "Deployment")["conserve-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--energy-source=dcgm" in args
    assert "--dcgm-service=gpu-operator/nvidia-dcgm-exporter" in args
    role = by_kind(docs, "Role")["conserve-operator-dcgm-exporter"]
    assert role["metadata"]["namespace"] == "gpu-operator"
    assert rules_of(role) == {("discovery.k8s.io", "endpointslices"): {"list"}}
    binding = by_kind(docs, "RoleBinding")["conserve-operator-dcgm-exporter"]
    assert binding["subjects"][0]["name"] == "conserve-operator"
    assert "conserve-operator-dcgm-exporter" not in by_kind(render("operator.energy.source=nvml"), "Role")


def operator_args(docs: Sequence[Manifest]) -> list[str]:
    args: list[str] = by_kind(docs, "Deployment")["conserve-operator"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    return args


def parse_command(args: Sequence[str]) -> Any:
    """The container's args parsed by `conserve`'s own parser (the image's entrypoint), as the pod would run them:
    an unknown flag or a bad value exits (SystemExit), which fails the test."""
    return build_parser(only=args[0]).parse_args(list(args))


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], {"energy_source": "none"}),
        (
            [
                "operator.energy.source=dcgm",
                "operator.energy.intervalSeconds=5",
                "operator.energy.dcgm.service=gpu-operator/nvidia-dcgm-exporter",
                "operator.energy.dcgm.port=9500",
            ],
            {
                "energy_source": "dcgm",
                "energy_interval_seconds": 5.0,
                "dcgm_service": "gpu-operator/nvidia-dcgm-exporter",
                "dcgm_port": 9500,
                "dcgm_pod_selector": "",
                "dcgm_url": [],
            },
        ),
        (
            [
                "operator.energy.source=dcgm",
                "operator.energy.dcgm.podSelector=gpu-operator/app=nvidia-dcgm-exporter",
                "operator.energy.dcgm.urls={http://10.0.0.1:9400/metrics,http://10.0.0.2:9400/metrics}",
            ],
            {
                "energy_source": "dcgm",
                "energy_interval_seconds": 10.0,
                "dcgm_pod_selector": "gpu-operator/app=nvidia-dcgm-exporter",
                "dcgm_url": ["http://10.0.0.1:9400/metrics", "http://10.0.0.2:9400/metrics"],
                "dcgm_port": 9400,
            },
        ),
        (["operator.energy.source=nvml"], {"energy_source": "nvml", "energy_interval_seconds": 10.0}),
    ],
)
def test_rendered_operator_args_parse_with_the_operators_own_parser(sets: list[str], expected: dict[str, Any]) -> None:
    args = operator_args(render(*sets))
    parsed = parse_command(args)
    assert parsed.command == "operator"
    assert parsed.namespaces is None
    assert parsed.all_namespaces
    assert parsed.leader_elect
    assert (parsed.lease_name, parsed.lease_namespace) == ("conserve-operator", "conserve-system")
    assert (parsed.metrics_port, parsed.health_port) == (9100, 8080)
    assert {key: getattr(parsed, key) for key in expected} == expected
    if parsed.energy_source == "none":
        assert not [a for a in args if a.startswith(("--energy", "--dcgm"))]


def test_rendered_operator_args_without_leader_election_parse() -> None:
    parsed = parse_command(operator_args(render("operator.replicas=1", "operator.leaderElection.enabled=false")))
    assert not parsed.leader_elect


def test_sharded_operator_gets_its_shards_flag_and_lease_rights() -> None:
    docs = render("operator.replicas=4", "operator.leaderElection.shards=8")
    parsed = parse_command(operator_args(docs))
    assert parsed.shards == 8
    assert parsed.leader_elect
    rules = rules_of(by_kind(docs, "Role")["conserve-operator-leader-election"])
    assert rules == {("coordination.k8s.io", "leases"): {"create", "get", "list", "update", "patch"}}
    assert parse_command(operator_args(render())).shards == 1  # the default: one Lease, its name only


def test_usage_stream_gets_its_port_token_and_service_when_enabled() -> None:
    docs = render(
        "operator.usageStream.enabled=true",
        "operator.usageStream.tokenSecret=conserve-usage",
        "router.enabled=true",
        "router.auth.mode=none",
    )
    parsed = parse_command(operator_args(docs))
    assert (parsed.usage_port, parsed.usage_token_file) == (9102, "/var/run/conserve/usage/token")
    service = by_kind(docs, "Service")["conserve-operator-usage"]
    assert service["spec"]["ports"] == [{"name": "usage", "port": 9102, "targetPort": "usage", "protocol": "TCP"}]
    pod = by_kind(docs, "Deployment")["conserve-operator"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["usage-token"]["secret"]["secretName"] == "conserve-usage"
    router = by_kind(docs, "Deployment")["conserve-router"]["spec"]["template"]["spec"]
    router_args = router["containers"][0]["args"]
    assert "--usage-endpoint=http://conserve-operator-usage.conserve-system:9102" in router_args
    assert "--usage-token-file=/etc/conserve/usage/token" in router_args
    assert {v["name"]: v for v in router["volumes"]}["usage-token"]["secret"]["secretName"] == "conserve-usage"
    default = render("router.enabled=true", "router.auth.mode=none")
    assert parse_command(operator_args(default)).usage_port == 0  # off by default: spec.usage patches
    assert not [
        a
        for a in by_kind(default, "Deployment")["conserve-router"]["spec"]["template"]["spec"]["containers"][0]["args"]
        if a.startswith("--usage")
    ]
    assert "conserve-operator-usage" not in by_kind(default, "Service")


def test_service_monitor_and_dashboard_when_enabled() -> None:
    docs = render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom", "dashboard.enabled=true")
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {"conserve-operator", "conserve-extender"}
    assert monitors["conserve-operator"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["conserve-operator"]["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitors["conserve-extender"]["spec"]["endpoints"][0]["port"] == "http"
    assert monitors["conserve-extender"]["metadata"]["labels"]["release"] == "prom"
    services = by_kind(docs, "Service")
    for m in monitors.values():
        selected = [
            s
            for s in services.values()
            if m["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, m["metadata"]["name"]
    cm = by_kind(docs, "ConfigMap")["conserve-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["conserve.json"]) == json.loads((CHART / "dashboards" / "conserve.json").read_text())


# --- bad values fail with a clear message --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["operator.replicas=-1"], "at '/operator/replicas': minimum: got -1, want 0"),
        (["operator.replicaz=2"], "additional properties 'replicaz' not allowed"),
        (["image.pullPolicy=Sometimes"], "value must be one of 'Always', 'IfNotPresent', 'Never'"),
        (["scheduler.name=Conserve_Scheduler"], "at '/scheduler/name'"),
        (["scheduler.extender.httpTimeout=5"], "at '/scheduler/extender/httpTimeout': got number, want string"),
        (["scheduler.extender.weight=0"], "at '/scheduler/extender/weight': minimum"),
        (["extender.port=70000"], "at '/extender/port': maximum"),
        (["scheduler.image.tag=latest"], "at '/scheduler/image/tag'"),
        (["crds.enabled=maybe"], "at '/crds/enabled': got string, want boolean"),
        (["operator.leaderElection.enabled=false"], "operator.replicas > 1 needs operator.leaderElection.enabled"),
        (["scheduler.replicas=2", "scheduler.leaderElection=false"], "scheduler.replicas > 1 needs"),
        (["operator.energy.source=dcgm"], "operator.energy.source dcgm needs operator.energy.dcgm.service"),
        (["operator.energy.source=joulemeter"], "at '/operator/energy/source'"),
        (["operator.usageStream.enabled=true"], "operator.usageStream.enabled needs operator.usageStream.tokenSecret"),
        (
            [
                "operator.usageStream.enabled=true",
                "operator.usageStream.tokenSecret=t",
                "operator.leaderElection.shards=2",
            ],
            "operator.usageStream.enabled needs operator.leaderElection.shards 1",
        ),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(sets: list[str], message: str) -> None:
    assert message in render_error(*sets)


def test_every_value_is_documented() -> None:
    """Every leaf of values.yaml has a `# --` sentence above it (or above the map it belongs to)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")
    documented: list[tuple[int, bool]] = []  # (indent, documented) of the open ancestors
    undocumented: list[str] = []
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m:
            continue
        indent, name, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while documented and documented[-1][0] >= indent:
            documented.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        own = j >= 0 and lines[j].strip().startswith("# --")
        inherited = any(d for _, d in documented)
        nxt = next((ln for ln in lines[i + 1 :] if ln.strip() and not ln.strip().startswith("#")), "")
        is_leaf = bool(rest) or len(nxt) - len(nxt.lstrip()) <= indent
        if is_leaf and not (own or inherited):
            undocumented.append(name)
        documented.append((indent, own or inherited))
    assert not undocumented, f"values without a `# --` sentence: {undocumented}"


def test_schema_allows_exactly_the_values_in_values_yaml() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, sch: Any, path: str) -> None:
        if "$ref" in sch:
            sch = schema["definitions"][sch["$ref"].rsplit("/", 1)[1]]
        if "allOf" in sch and "properties" not in sch:
            return
        if isinstance(node, dict) and "properties" in sch:
            missing = set(node) - set(sch["properties"])
            assert not missing, f"{path}: values without a schema: {missing}"
            assert sch.get("additionalProperties") is False, f"{path}: schema must refuse unknown keys"
            for k, v in node.items():
                walk(v, sch["properties"][k], f"{path}.{k}")

    walk(values, schema, "")


# --- RBAC is least privilege ---------------------------------------------------------------------------------


def test_operator_and_extender_rbac_is_exactly_the_documented_list(default_docs: list[Manifest]) -> None:
    roles = by_kind(default_docs, "ClusterRole")
    assert set(roles) == {"conserve-operator", "conserve-extender"}
    assert rules_of(roles["conserve-operator"]) == OPERATOR_RULES
    assert rules_of(roles["conserve-extender"]) == EXTENDER_RULES
    readme = (CHART / "README.md").read_text()
    for (group, resource), verbs in {**OPERATOR_RULES, **EXTENDER_RULES}.items():
        row = f"| `{group or 'core'}` | `{resource}` | {', '.join(sorted(verbs))} |"
        assert row in readme, f"README.md does not document {row}"


def test_no_role_grants_wildcards_secrets_or_deletes(default_docs: list[Manifest]) -> None:
    for kind in ("ClusterRole", "Role"):
        for name, role in by_kind(default_docs, kind).items():
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], name
                assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
                assert "secrets" not in rule["resources"], name


def test_each_binding_names_its_own_service_account(default_docs: list[Manifest]) -> None:
    bindings = list(by_kind(default_docs, "ClusterRoleBinding").values()) + list(
        by_kind(default_docs, "RoleBinding").values()
    )
    refs: dict[str, set[str]] = {}
    for b in bindings:
        [subject] = b["subjects"]
        assert subject["kind"] == "ServiceAccount"
        assert subject["namespace"] == "conserve-system"
        refs.setdefault(subject["name"], set()).add(b["roleRef"]["name"])
    assert refs["conserve-operator"] == {"conserve-operator", "conserve-operator-leader-election"}
    assert refs["conserve-extender"] == {"conserve-extender"}
    assert refs["conserve-scheduler"] == SCHEDULER_CLUSTER_ROLES | {
        "extension-apiserver-authentication-reader",
        "conserve-scheduler-leader-election",
    }
    lease = by_kind(default_docs, "Role")["conserve-scheduler-leader-election"]
    assert lease["metadata"]["namespace"] == "conserve-system"
    assert lease["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["conserve-scheduler"],
            "verbs": ["get", "update"],
        },
    ]


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render("rbac.create=false")
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


# --- CRDs: templates generated from crds/, kept on uninstall -------------------------------------------------


def source_crds() -> dict[str, Manifest]:
    out: dict[str, Manifest] = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out[doc["metadata"]["name"]] = doc
    return out


def test_crd_templates_are_in_step_with_crds_dir() -> None:
    assert source_crds(), "crds/ holds no CRD: run `conserve crds generate`"
    proc = subprocess.run([sys.executable, str(CHART / "hack" / "crds.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, "CRD templates drifted; run `python charts/conserve/hack/crds.py`\n" + proc.stdout


def test_rendered_crds_equal_the_generated_ones(default_docs: list[Manifest]) -> None:
    rendered = by_kind(default_docs, "CustomResourceDefinition")
    sources = source_crds()
    assert sources
    assert set(sources) == set(rendered)
    for name, crd in sources.items():
        assert rendered[name]["spec"] == crd["spec"], name
    for crd in rendered.values():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crds_keep_switch() -> None:
    docs = render("crds.keep=false")
    crds = by_kind(docs, "CustomResourceDefinition")
    assert set(crds) == set(source_crds())
    for crd in crds.values():
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


# --- dashboard and kind cluster ------------------------------------------------------------------------------


def undefined_metrics(exprs: Sequence[str]) -> set[str]:
    """The conserve_* metrics the PromQL expressions read that no code defines (a counter may be defined without
    the `_total` its exposition adds). Recording rules' names (level:metric:operations) are not metrics."""
    names = (m for e in exprs for m in re.findall(r"(?<![\w:])conserve_[a-z_]+\b(?!:)", e))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in names}
    source = "\n".join(p.read_text() for p in (REPO / "operator" / "conserve").rglob("*.py"))
    return {m for m in used if f'"{m}"' not in source and f'"{m.removesuffix("_total")}"' not in source}


def test_dashboard_queries_only_metrics_the_code_defines() -> None:
    dashboard = json.loads((CHART / "dashboards" / "conserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    missing = undefined_metrics(exprs)
    assert not missing, f"the dashboard queries metrics no code defines: {missing}"


def test_prometheus_rules_query_only_metrics_the_code_defines() -> None:
    rule = render("prometheusRule.enabled=true")
    (spec,) = [d["spec"] for d in rule if d["kind"] == "PrometheusRule"]
    exprs = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    missing = undefined_metrics(exprs)
    assert not missing, f"the rules query metrics no code defines: {missing}"


def test_kind_config_has_gpu_nodes_of_both_tiers() -> None:
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    tiers = [node_gpu_from_labels(n["labels"]).tier for n in workers]
    assert tiers.count(Tier.COMPUTE) >= 1, tiers
    assert tiers.count(Tier.BANDWIDTH) >= 1, tiers
    for n in workers:
        assert {"nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count"} <= set(n["labels"])


def test_dockerfile_runs_as_the_charts_non_root_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    # The base is a build argument (`make image` passes a local Debian one); its default stays the official image.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\s*$", dockerfile, re.M)
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^USER 10001(:10001)?\s*$", dockerfile, re.M)
    assert 'ENTRYPOINT ["conserve"]' in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001


# --- the router ------------------------------------------------------------------------------------------------

ROUTER_RULES: dict[tuple[str, str], set[str]] = {
    ("conserve.dev", "conversations"): {"create", "delete", "list", "patch", "watch"},
    ("conserve.dev", "decoderpools"): {"list", "watch"},
}
ROUTER_VALUES: dict[str, Any] = {
    "router": {
        "enabled": True,
        "namespace": "llm",
        "pool": "llama",
        "auth": {"mode": "api-keys", "apiKeysSecret": "router-keys"},
        "tenants": {"admins": ["ops"], "pools": {"alice": ["llama"]}},
        "backendAuth": {"secret": "vllm-key", "key": "token"},
    }
}


def test_router_is_off_by_default(default_docs: list[Manifest]) -> None:
    assert "conserve-router" not in by_kind(default_docs, "Deployment")
    assert not by_kind(default_docs, "NetworkPolicy")


def test_router_runs_with_its_keys_tenants_and_backend_key_mounted_read_only() -> None:
    docs = render(values=ROUTER_VALUES)
    spec = dict(pod_specs(docs))["conserve-router"]
    [container] = spec["containers"]
    assert container["args"] == [
        "router", "--host=0.0.0.0", "--port=8080", "--namespace=llm", "--pool=llama", "--max-body-bytes=16777216",
        "--auth=api-keys", "--api-keys-dir=/etc/conserve/api-keys", "--tenants-file=/etc/conserve/tenants/tenants.yaml",
        "--backend-api-key-file=/etc/conserve/backend/token",
    ]  # fmt: skip
    # Every flag the chart passes is one `conserve router` knows.
    parsed = build_parser().parse_args(container["args"])
    assert parsed.api_keys_dir == Path("/etc/conserve/api-keys")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "router-keys"
    assert volumes["backend-auth"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] != "tmp")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    tenants = yaml.safe_load(by_kind(docs, "ConfigMap")["conserve-router-tenants"]["data"]["tenants.yaml"])
    assert tenants == {"admins": ["ops"], "pools": {"alice": ["llama"]}}
    assert by_kind(docs, "Service")["conserve-router"]["spec"]["ports"][0]["targetPort"] == "http"


def test_router_rbac_is_the_documented_role_in_its_pools_namespace_only() -> None:
    docs = render(values=ROUTER_VALUES)
    role = by_kind(docs, "Role")["conserve-router"]
    assert role["metadata"]["namespace"] == "llm"
    assert rules_of(role) == ROUTER_RULES
    assert "conserve-router" not in by_kind(docs, "ClusterRole")
    binding = by_kind(docs, "RoleBinding")["conserve-router"]
    [subject] = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "conserve-router", "namespace": "conserve-system"}


def test_router_network_policy_lets_clients_in_and_only_servers_api_and_dns_out() -> None:
    values = {"router": {**ROUTER_VALUES["router"], "networkPolicy": {
        "enabled": True, "clients": [{"namespaceSelector": {"matchLabels": {"gateway": "true"}}}],
        "serverPorts": [8000], "apiServerCIDRs": ["10.0.0.1/32"], "apiServerPorts": [443],
        "servers": {"enabled": True},
    }}}  # fmt: skip
    policies = by_kind(render(values=values), "NetworkPolicy")
    router = policies["conserve-router"]["spec"]
    assert router["policyTypes"] == ["Ingress", "Egress"]
    gateway = {"namespaceSelector": {"matchLabels": {"gateway": "true"}}}
    assert router["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}], "from": [gateway]}]
    servers, api, dns = router["egress"]
    assert servers["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "llm"}
    assert servers["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert api == {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert {p["port"] for p in dns["ports"]} == {53}
    inbound = policies["conserve-router-servers"]
    assert inbound["metadata"]["namespace"] == "llm"
    assert inbound["spec"]["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("router.enabled=true",), "router.auth.apiKeysSecret"),
        (("router.enabled=true", "router.auth.mode=header"), "router.auth.identityHeader"),
        (("router.enabled=true", "router.auth.mode=magic"), "/router/auth/mode"),
        (("router.enabled=true", "router.auth.mode=none", "router.pool=Bad_Pool"), "/router/pool"),
    ],
)
def test_router_values_are_refused_with_the_value_named(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)
