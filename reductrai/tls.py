"""
Server-side TLS: the development certificate, the pyOpenSSL contexts of the
listeners, certificates chosen by SNI, client certificates (mutual TLS) and
certificate reloads.

A L{ServerTLS} creates the connections of one C{ssl:} listener.  It holds
one context per certificate; a reload builds new contexts and swaps them
in, so handshakes that start afterwards use the new certificates while
open connections keep the ones they were made with.  L{TLSManager} makes
the L{ServerTLS} of every listener, reloads them on demand (SIGHUP) and
polls the files' modification times.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from typing import Callable, Iterable, Optional, Sequence

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

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



def _load_key_pair(certificate_path: str, private_key_path: str) -> tuple[list[crypto.X509], crypto.PKey]:
    try:
        chain = load_pem_chain(certificate_path)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(private_key_path).read_bytes())
    except OSError as error:
        raise ValueError(f"cannot read TLS file {error.filename}: {error.strerror}") from None
    except crypto.Error as error:
        raise ValueError(f"invalid TLS key or certificate ({private_key_path}): {error}") from None
    return chain, key


def dns_names(certificate: crypto.X509) -> list[str]:
    """
    Return the lower-case DNS names of a certificate's subjectAltName.
    """
    from cryptography import x509

    try:
        extension = certificate.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in extension.value.get_values_for_type(x509.DNSName)]


def parse_sni_entry(entry: str) -> tuple[str, str]:
    """
    Split a C{server.tls_sni_certificates} entry, C{CERT:KEY} or one PEM
    file holding both, into C{(certificate_path, private_key_path)}.
    """
    certificate, colon, key = entry.partition(":")
    return (certificate, key) if colon and key else (certificate, certificate)


def peer_certificate_subject(transport) -> Optional[str]:
    """
    Return the subject of the verified client certificate of a TLS
    connection as an RFC 4514 string, or L{None} without one.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        certificate = get()
    except SSL.Error:
        return None
    if certificate is None:
        return None
    return certificate.to_cryptography().subject.rfc4514_string()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS side of one listener: a default certificate chain, further
    chains chosen by the server name a client sends (SNI), TLS 1.2 or 1.3
    at the lowest with ECDHE and AEAD ciphers, and optionally client
    certificates verified against a CA bundle.
    """

    log = Logger()

    def __init__(
        self,
        certificate_path: str,
        private_key_path: str,
        sni: Sequence[tuple[str, str]] = (),
        minimum_version: str = "1.2",
        client_ca: Optional[str] = None,
        client_auth: str = "require",
    ) -> None:
        """
        @param sni: further C{(certificate_path, private_key_path)} pairs;
            each serves the DNS names of its certificate.
        @param client_ca: PEM bundle of the CAs of client certificates;
            L{None} asks for none.
        @param client_auth: C{"require"} refuses a client without a valid
            certificate, C{"optional"} verifies one when sent.
        @raise ValueError: a file is missing or does not hold what it
            should; the message names it.
        """
        self.certificate_path = certificate_path
        self.private_key_path = private_key_path
        self.sni = tuple(sni)
        self.minimum_version = minimum_version
        self.client_ca = client_ca
        self.client_auth = client_auth
        self._default: SSL.Context
        self._by_name: dict[str, SSL.Context] = {}
        self._stamps = self._file_stamps()
        self._default, self._by_name = self._build()

    def files(self) -> list[str]:
        """
        Every file this listener's TLS reads.
        """
        paths = [self.certificate_path, self.private_key_path]
        for certificate, key in self.sni:
            paths += [certificate, key]
        if self.client_ca:
            paths.append(self.client_ca)
        return sorted(set(paths))

    def _file_stamps(self) -> dict[str, tuple]:
        stamps: dict[str, tuple] = {}
        for path in self.files():
            try:
                info = os.stat(path)
            except OSError:
                stamps[path] = ()
                continue
            stamps[path] = (info.st_mtime_ns, info.st_size, info.st_ino)
        return stamps

    def _options(self, chain: list[crypto.X509], key: crypto.PKey, client_cas: list) -> CertificateOptions:
        return CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=_VERSIONS[self.minimum_version],
            acceptableCiphers=MODERN_CIPHERS,
            verify=bool(client_cas),
            caCerts=client_cas or None,
            requireCertificate=self.client_auth == "require",
        )

    def _build(self) -> tuple[SSL.Context, dict[str, SSL.Context]]:
        client_cas: list = []
        if self.client_ca:
            try:
                client_cas = load_pem_chain(self.client_ca)
            except OSError as error:
                raise ValueError(f"cannot read client CA bundle {self.client_ca}: {error.strerror}") from None
            except crypto.Error as error:
                raise ValueError(f"invalid client CA bundle {self.client_ca}: {error}") from None
        chain, key = _load_key_pair(self.certificate_path, self.private_key_path)
        default = self._options(chain, key, client_cas).getContext()
        by_name: dict[str, SSL.Context] = {}
        for certificate_path, key_path in self.sni:
            sni_chain, sni_key = _load_key_pair(certificate_path, key_path)
            names = dns_names(sni_chain[0])
            if not names:
                raise ValueError(f"certificate {certificate_path} names no DNS name to select it by")
            context = self._options(sni_chain, sni_key, client_cas).getContext()
            for name in names:
                by_name.setdefault(name, context)
        default.set_tlsext_servername_callback(self._select)
        return default, by_name

    def context_for(self, server_name: Optional[str]) -> SSL.Context:
        """
        Return the context serving C{server_name}: an exact DNS name, then a
        wildcard one level up, then the default certificate.
        """
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self._by_name.get(name)
            if context is None and "." in name:
                context = self._by_name.get("*." + name.split(".", 1)[1])
            if context is not None:
                return context
        return self._default

    def _select(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        context = self.context_for(name)
        if context is not self._default:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """
        Create the connection of a new client with the current contexts.
        """
        return SSL.Connection(self._default, None)

    def changed(self) -> bool:
        """
        Whether a file changed (modification time, size or inode) since the
        last load.
        """
        return self._file_stamps() != self._stamps

    def reload(self) -> None:
        """
        Read the files again and use them for new handshakes.

        @raise ValueError: a file is missing or invalid; the contexts in use
            stay as they were.
        """
        stamps = self._file_stamps()
        default, by_name = self._build()
        self._default, self._by_name, self._stamps = default, by_name, stamps


class TLSManager:
    """
    Make the L{ServerTLS} of every listener from the settings and keep
    their certificates current.
    """

    log = Logger()

    def __init__(self, settings, default_files: Callable[[], tuple[str, str]], metrics=None, reactor=None) -> None:
        """
        @param default_files: returns C{(certificate_path, private_key_path)}
            for listeners that name no certificate.
        """
        self.settings = settings
        self.default_files = default_files
        self.metrics = metrics
        self.reactor = reactor
        self.listeners: list[ServerTLS] = []
        self._poll: Optional[LoopingCall] = None

    def factory(self, role: str) -> Callable[[str, str], ServerTLS]:
        """
        Return the function that builds the L{ServerTLS} of a listener of
        C{role}; client certificates are asked on ingest listeners only.
        """

        def build(certificate_path: str, private_key_path: str) -> ServerTLS:
            settings = self.settings
            client_ca = settings["server.tls_client_ca"] or None if role == "ingest" else None
            tls = ServerTLS(
                certificate_path,
                private_key_path,
                sni=[parse_sni_entry(entry) for entry in settings["server.tls_sni_certificates"]],
                minimum_version=settings["server.tls_minimum_version"],
                client_ca=client_ca,
                client_auth=settings["server.tls_client_auth"],
            )
            self.listeners.append(tls)
            return tls

        return build

    def reload(self, only_changed: bool = False) -> int:
        """
        Reload the certificates of every listener (of those whose files
        changed when C{only_changed}).  A listener whose files are invalid
        keeps its certificates; the error is logged and counted.

        @return: the number of listeners reloaded.
        """
        reloaded = 0
        for tls in self.listeners:
            if only_changed and not tls.changed():
                continue
            try:
                tls.reload()
            except ValueError as error:
                self._count("error")
                self.log.error(
                    "Keeping the TLS certificates in use: reloading {path} failed: {error}",
                    path=tls.certificate_path, error=str(error),
                )
                continue
            reloaded += 1
            self._count("ok")
            self.log.info("Reloaded the TLS certificates of {path}", path=tls.certificate_path)
        return reloaded

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(outcome).inc()

    def start(self) -> None:
        """
        Poll the files every C{server.tls_reload_interval} seconds, if
        there are TLS listeners and the interval is not 0.
        """
        interval = self.settings["server.tls_reload_interval"]
        if not self.listeners or not interval:
            return
        self._poll = LoopingCall(self.reload, True)
        if self.reactor is not None:
            self._poll.clock = self.reactor
        self._poll.start(interval, now=False)

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None


def _is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_upstreams(settings) -> list[tuple[str, str]]:
    """
    Check the upstream base URLs (C{proxy.forward_to} and every
    C{*.endpoint} setting) for plain HTTP.

    An C{http://} URL to a loopback host (C{localhost}, C{127.0.0.0/8},
    C{::1}) is allowed: its traffic does not leave the host.  Any other
    C{http://} URL needs C{upstream.allow_plain_http}.

    @return: C{(setting, url)} of the allowed plain-HTTP URLs to
        non-loopback hosts, for a warning at start.
    @raise ValueError: a plain-HTTP URL to a non-loopback host without
        C{upstream.allow_plain_http}; the message names the setting.
    """
    from urllib.parse import urlsplit

    found = []
    for key in sorted(settings.values):
        if key != "proxy.forward_to" and not key.endswith(".endpoint"):
            continue
        url = settings.values[key]
        if not isinstance(url, str) or not url:
            continue
        parts = urlsplit(url)
        if parts.scheme != "http" or _is_loopback_host(parts.hostname or ""):
            continue
        if not settings["upstream.allow_plain_http"]:
            raise ValueError(
                f"{key}: {url!r} sends traffic, API keys included, unencrypted; use https:// "
                f"or set upstream.allow_plain_http = true"
            )
        found.append((key, url))
    return found
