"""The local cluster's pure parts: node specs and manifests, scheduler configuration, certificates, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from conserve import cli
from conserve.api.labels import LABEL_GPU_COUNT, LABEL_GPU_MEMORY_MIB, LABEL_GPU_PRODUCT, RESOURCE_GPU
from conserve.devcluster import build, nodes, pki
from conserve.devcluster.cluster import LocalCluster, Ports
from conserve.devcluster.testing import namespace_name


def test_default_nodes_file_has_every_tier_with_gfd_labels() -> None:
    specs = nodes.load_node_specs()
    products = {s.gpu_product for s in specs}
    assert {
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-H200",
        "NVIDIA-A100-SXM4-80GB",
        "NVIDIA-H20",
        "NVIDIA-L40S",
    } <= products
    for spec in specs:
        m = spec.manifest()
        labels = m["metadata"]["labels"]
        assert labels[LABEL_GPU_PRODUCT] == spec.gpu_product
        assert labels[LABEL_GPU_MEMORY_MIB] == str(spec.gpu_memory_mib)
        assert labels[LABEL_GPU_COUNT] == str(spec.gpu_count)
        assert labels["nvidia.com/gpu.present"] == "true"
        assert m["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
        assert m["status"]["allocatable"][RESOURCE_GPU] == str(spec.gpu_count)
        assert m["status"]["capacity"] == m["status"]["allocatable"]
        assert "taints" not in m["spec"]


def test_nodes_file_overrides_and_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "nodes.yaml"
    f.write_text(
        "defaults: {cpu: '8'}\n"
        "pools:\n"
        "- name: x\n  count: 2\n  memory: 64Gi\n  labels: {conserve.dev/tier: bandwidth}\n"
        "  gpu: {product: NVIDIA-H20, memoryMiB: 97871, count: 4, compute: '9.0'}\n"
    )
    specs = nodes.load_node_specs(f)
    assert [s.name for s in specs] == ["kwok-x-0", "kwok-x-1"]
    m = specs[0].manifest()
    assert m["status"]["allocatable"]["cpu"] == "8"
    assert m["status"]["allocatable"]["memory"] == "64Gi"
    assert m["metadata"]["labels"]["conserve.dev/tier"] == "bandwidth"
    assert m["metadata"]["labels"]["nvidia.com/gpu.compute.major"] == "9"

    f.write_text(f.read_text() + "- name: x\n  gpu: {product: P, memoryMiB: 1, count: 1}\n")
    with pytest.raises(ValueError, match="duplicate"):
        nodes.load_node_specs(f)


def test_make_gpu_nodes_for_benchmarks() -> None:
    specs = nodes.make_gpu_nodes("bench-h200", 1000, "NVIDIA-H200", 8, 143771)
    assert len({s.name for s in specs}) == 1000
    assert specs[-1].manifest()["metadata"]["name"] == "bench-h200-999"


def test_scheduler_configs_keep_the_extender_off_the_default_profile(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, extender_url="http://127.0.0.1:9999/")
    default = c.scheduler_config(tmp_path / "kc", with_extender=False)
    conserve = c.scheduler_config(tmp_path / "kc", with_extender=True)
    assert default["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert [p["schedulerName"] for p in default["profiles"]] == ["default-scheduler"]
    assert "extenders" not in default
    assert [p["schedulerName"] for p in conserve["profiles"]] == [c.scheduler_name] == ["conserve-scheduler"]
    (ext,) = conserve["extenders"]
    assert ext["urlPrefix"] == "http://127.0.0.1:9999/"
    assert (ext["filterVerb"], ext["prioritizeVerb"], ext["weight"]) == ("filter", "prioritize", 5)
    assert ext["nodeCacheCapable"] is True
    assert ext["ignorable"] is False
    assert ext["httpTimeout"] == "5s"
    assert ext["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    assert c.extender_port == 9999


def test_free_ports_are_distinct_and_fixed_ports_are_well_known(tmp_path: Path) -> None:
    ports = Ports.free()
    assert len(set(vars(ports).values())) == 7
    assert Ports.fixed().apiserver == 6443
    assert LocalCluster(tmp_path, ports=Ports.fixed()).extender_url == "http://127.0.0.1:8888/"


def test_pki_admin_is_in_system_masters_and_server_cert_names_loopback(tmp_path: Path) -> None:
    certs = pki.generate(tmp_path)
    admin = x509.load_pem_x509_certificate(certs.admin.cert.read_bytes())
    orgs = [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["system:masters"]
    server = x509.load_pem_x509_certificate(certs.apiserver.cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.96.0.1"]
    assert oct(certs.ca.key.stat().st_mode & 0o777) == "0o600"


def test_namespace_names_are_valid_and_unique() -> None:
    a, b = namespace_name("test_Thing[param-1]"), namespace_name("test_Thing[param-1]")
    assert a != b
    assert len(a) <= 63
    assert a.startswith("t-test-thing-param-1-")


def test_build_parts_are_pinned_modules() -> None:
    names = [p.name for p in build.PARTS]
    assert names == ["etcd", "kubernetes", "kwok", "helm", "prometheus"]
    for p in build.PARTS:
        gomod = (p.gomod / "go.mod").read_text()
        assert (p.gomod / "go.sum").is_file()
        for pkg in p.packages:
            assert f"\t{pkg}\n" in gomod or f"tool {pkg}\n" in gomod
    k8s = (build.part("kubernetes").gomod / "go.mod").read_text()
    assert f"k8s.io/kubernetes {build.KUBERNETES_VERSION}" in k8s
    assert "k8s.io/client-go => k8s.io/client-go v0." + build.KUBERNETES_VERSION.split(".", 1)[1] in k8s


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONSERVE_CACHE_DIR", str(tmp_path))
    assert build.part("etcd").bin_dir() == tmp_path / "controlplane" / f"etcd-{build.ETCD_VERSION}" / "bin"
    assert build.missing_parts() == ["etcd", "kubernetes", "kwok", "helm", "prometheus"]


def test_cli_dev_parses_and_imports_no_operator_stack(tmp_path: Path) -> None:
    parser = cli.build_parser("dev")
    args = parser.parse_args(["dev", "up", "--free-ports", "--state-dir", "/tmp/x"])
    assert args.free_ports
    assert args.state_dir == Path("/tmp/x")
    # `conserve dev` stays light: it must not drag in kopf or aiohttp.
    code = (
        "import sys; from conserve.cli import main; "
        f"rc = main(['dev', 'status', '--state-dir', {str(tmp_path)!r}]); "
        "heavy = [m for m in ('kopf', 'aiohttp') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(0 if rc == 1 else 3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no cluster recorded" in proc.stdout
