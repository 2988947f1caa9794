"""Development certificates: a CA and a serving certificate signed by it.

The only module that touches crypto. SANs are written explicitly with cryptography.x509
(pyOpenSSL >= 26.2 no longer adds them, and Go clients such as the apiserver ignore the
CN). In a cluster, the Helm chart or cert-manager issues the certificate instead.

    python -m webhooks.certs [DIR] [--service NAME] [--namespace NS] [--force]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SERVICE = "stunner-guard"
DEFAULT_NAMESPACE = "stunner-guard"


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the apiserver may use for the webhook Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stunner-guard development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate(
    service: str = DEFAULT_SERVICE, namespace: str = DEFAULT_NAMESPACE, days: int = 365
) -> dict[str, bytes]:
    """PEM bytes for ``ca.crt``, ``ca.key``, ``tls.crt`` and ``tls.key``."""
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("stunner-guard development CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost")]
    sans += [x509.DNSName(n) for n in service_dns_names(service, namespace)]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{service}.{namespace}.svc"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": _pem_key(ca_key),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": _pem_key(key),
    }


def expiry_timestamps(pem: bytes) -> list[float]:
    """The notAfter of every certificate in a PEM file, in file order, as Unix time: a
    serving file holds the leaf first (then any intermediates), a CA file one or more CAs.
    ValueError when the file holds no certificate or a malformed one."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise ValueError(f"not a PEM certificate file: {err}") from err
    return [c.not_valid_after_utc.timestamp() for c in certificates]


def write(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m webhooks.certs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", default="certs")
    parser.add_argument("--service", default=DEFAULT_SERVICE)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--force", action="store_true", help="replace existing certificates")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    if (directory / "tls.crt").exists() and (directory / "tls.key").exists() and not args.force:
        print(f"{directory}/tls.crt exists; keeping it (--force to replace)")
        return 0
    write(directory, generate(args.service, args.namespace, args.days))
    print(
        f"wrote {directory}/ca.crt, ca.key, tls.crt, tls.key "
        f"(SANs: localhost, 127.0.0.1, ::1, {args.service}.{args.namespace}.svc ...)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
