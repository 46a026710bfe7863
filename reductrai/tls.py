"""
Server-side TLS: the development certificate and the pyOpenSSL context
options of the ingest listeners.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from OpenSSL import crypto
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger

log = Logger()

DEV_CERTIFICATE = "tls/dev-cert.pem"
DEV_PRIVATE_KEY = "tls/dev-key.pem"

#: ECDHE with AEAD ciphers only for TLS 1.2 (TLS 1.3 suites are fixed by
#: OpenSSL and all acceptable).
MODERN_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


def ensure_dev_certificate(data_dir: str) -> tuple[str, str]:
    """
    Return the development certificate and key paths in C{data_dir},
    generating a self-signed certificate for C{localhost}, C{127.0.0.1} and
    C{::1} on first use.  The key file is created with mode 0600.

    @return: C{(certificate_path, private_key_path)}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    certificate_path = Path(data_dir) / DEV_CERTIFICATE
    key_path = Path(data_dir) / DEV_PRIVATE_KEY
    if certificate_path.exists() and key_path.exists():
        return str(certificate_path), str(key_path)

    certificate_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reductrai development certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_bytes)
    _write_private(certificate_path, certificate.public_bytes(serialization.Encoding.PEM))
    log.info(
        "Generated a self-signed development certificate at {path}; "
        "clients must trust it explicitly",
        path=str(certificate_path),
    )
    return str(certificate_path), str(key_path)


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def load_pem_chain(certificate_path: str) -> list[crypto.X509]:
    """
    Read every certificate of a PEM file, leaf first.

    @raise ValueError: the file holds no certificate.
    """
    data = Path(certificate_path).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    if not blocks:
        raise ValueError(f"no PEM certificate in {certificate_path}")
    return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]


def server_options(
    certificate_path: str, private_key_path: str, minimum_version: str = "1.2"
) -> CertificateOptions:
    """
    Build the TLS options of an ingest listener: the certificate chain, TLS
    1.2 or 1.3 at the lowest, ECDHE with AEAD ciphers.

    @raise ValueError: a file is missing or does not hold what it should.
    """
    try:
        chain = load_pem_chain(certificate_path)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(private_key_path).read_bytes())
    except OSError as error:
        raise ValueError(f"cannot read TLS file {error.filename}: {error.strerror}") from None
    except crypto.Error as error:
        raise ValueError(f"invalid TLS key or certificate ({private_key_path}): {error}") from None
    return CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=_VERSIONS[minimum_version],
        acceptableCiphers=MODERN_CIPHERS,
    )

