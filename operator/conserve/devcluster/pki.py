"""A throwaway PKI for the local control plane: one CA, the API server's serving certificate, client
certificates for each component and the admin, the service-account signing key, and kubeconfigs for them."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)

# The API server's in-cluster names, so a pod-side client (or a kind-like setup) can verify it too.
API_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    scheduler: CertPair
    front_proxy_client: CertPair  # the API server's client identity towards aggregated API servers
    service_account_key: Path  # private key: the controller-manager and the API server sign with it
    service_account_pub: Path  # public key: the API server verifies with it


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool
) -> x509.CertificateBuilder:
    """What the CA and every leaf certificate share: names, validity (from 5 minutes ago, for clock skew),
    basic constraints and key usage (a CA also signs certificates and CRLs)."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    dir_: Path,
    stem: str,
    sans: list[x509.GeneralName] | None = None,
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(subject, ca_cert.subject, key.public_key(), ca=False).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(dir_ / f"{stem}.crt", dir_ / f"{stem}.key")
    _write_cert(cert, pair.cert)
    _write_key(key, pair.key)
    return pair


def generate(dir_: Path, service_ip: str = "10.96.0.1") -> Pki:
    """Write a fresh CA and every certificate and key the local cluster needs under ``dir_``."""
    dir_.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("conserve-local-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = CertPair(dir_ / "ca.crt", dir_ / "ca.key")
    _write_cert(ca_cert, ca.cert)
    _write_key(ca_key, ca.key)

    server_sans: list[x509.GeneralName] = [x509.DNSName(n) for n in API_DNS_NAMES]
    server_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", service_ip)]
    server = ExtendedKeyUsageOID.SERVER_AUTH
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    apiserver = _issue(ca_key, ca_cert, _name("kube-apiserver"), server, dir_, "apiserver", server_sans)
    # system:masters is bound to cluster-admin by the API server's bootstrap RBAC policy.
    admin = _issue(ca_key, ca_cert, _name("conserve-admin", "system:masters"), client, dir_, "admin")
    # The bootstrap policy grants these user names exactly what each component needs.
    kcm = _issue(ca_key, ca_cert, _name("system:kube-controller-manager"), client, dir_, "controller-manager")
    sched = _issue(ca_key, ca_cert, _name("system:kube-scheduler"), client, dir_, "scheduler")
    proxy = _issue(ca_key, ca_cert, _name("front-proxy-client"), client, dir_, "front-proxy-client")

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_key_path, sa_pub_path = dir_ / "sa.key", dir_ / "sa.pub"
    _write_key(sa_key, sa_key_path)
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Pki(ca, apiserver, admin, kcm, sched, proxy, sa_key_path, sa_pub_path)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: CertPair, name: str = "conserve-local") -> None:
    """A self-contained kubeconfig (certificates embedded): it can be copied elsewhere and still work."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [
            {
                "name": f"{name}-user",
                "user": {"client-certificate-data": _b64(user.cert), "client-key-data": _b64(user.key)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-user"}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
