"""
Listening endpoints from Twisted endpoint strings.

C{tcp:}, C{unix:} and any other endpoint type go to
L{twisted.internet.endpoints.serverFromString} unchanged.  C{ssl:} strings
are built here instead, so that every TLS listener gets the hardened
options of L{reductrai.tls.ServerTLS} (TLS 1.2 at the lowest, modern
ciphers, SNI, client certificates, reloads) whatever the string says; an C{ssl:} string without
C{privateKey=}/C{certKey=} uses the server's configured certificate.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

from reductrai.tls import ServerTLS


class ListenerError(ValueError):
    """
    An endpoint string is invalid.
    """


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string into positional arguments and keyword
    arguments, honouring backslash escapes of C{:} and C{=}.
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for character in description:
        if escaped:
            current.append("\\" + character)
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    parts.append("".join(current))

    positional: list[str] = []
    keywords: dict[str, str] = {}
    for part in parts:
        name, equals, value = _split_unescaped(part, "=")
        if equals:
            keywords[_unescape(name)] = _unescape(value)
        else:
            positional.append(_unescape(part))
    return positional, keywords


def _split_unescaped(text: str, separator: str) -> tuple[str, bool, str]:
    index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == separator:
            return text[:index], True, text[index + 1 :]
        index += 1
    return text, False, ""


def _unescape(text: str) -> str:
    out = []
    index = 0
    while index < len(text):
        if text[index] == "\\" and index + 1 < len(text):
            out.append(text[index + 1])
            index += 2
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def build_endpoint(
    reactor,
    description: str,
    default_tls_files: Optional[Callable[[], tuple[str, str]]] = None,
    tls_minimum_version: str = "1.2",
    tls_factory: Optional[Callable[[str, str], object]] = None,
) -> IStreamServerEndpoint:
    """
    Build a server endpoint from an endpoint string.

    @param default_tls_files: called for an C{ssl:} string that names no
        certificate; returns C{(certificate_path, private_key_path)}.
    @param tls_factory: builds the TLS connection creator of an C{ssl:}
        listener from C{(certificate_path, private_key_path)}, such as
        L{reductrai.tls.TLSManager.factory}; by default a
        L{reductrai.tls.ServerTLS} with C{tls_minimum_version} and no
        client certificates.
    @raise ListenerError: the string is invalid; the message names it.
    """
    positional, keywords = split_description(description)
    kind = positional[0].lower() if positional else ""
    if kind != "ssl":
        try:
            return serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as error:
            raise ListenerError(f"invalid listener {description!r}: {error}") from None
    port, options, keywords = _ssl_listener(description, default_tls_files, tls_minimum_version, tls_factory)
    return SSL4ServerEndpoint(
        reactor,
        port,
        options,
        backlog=int(keywords.get("backlog", 128)),
        interface=keywords.get("interface", ""),
    )


def is_tls(description: str) -> bool:
    """
    Return whether an endpoint string is an C{ssl:} listener.
    """
    positional, _ = split_description(description)
    return bool(positional) and positional[0].lower() == "ssl"


def adopt_listener(
    reactor,
    description: str,
    fd: int,
    family: int,
    factory,
    default_tls_files: Optional[Callable[[], tuple[str, str]]] = None,
    tls_minimum_version: str = "1.2",
    tls_factory: Optional[Callable[[str, str], object]] = None,
):
    """
    Serve C{factory} on a listening socket bound by another process (the
    worker 0 of L{reductrai.worker}), wrapped in TLS exactly as
    L{build_endpoint} wraps the listener of C{description}.  The reactor
    duplicates C{fd}; the caller closes its copy.

    @param family: the socket's address family (C{socket.AF_INET},
        C{AF_INET6} or C{AF_UNIX}).
    @return: the listening port.
    @raise ListenerError: the string is invalid.
    """
    if is_tls(description):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        _, options, _ = _ssl_listener(description, default_tls_files, tls_minimum_version, tls_factory)
        factory = TLSMemoryBIOFactory(options, False, factory)
    return reactor.adoptStreamPort(fd, family, factory)


def _ssl_listener(
    description: str,
    default_tls_files: Optional[Callable[[], tuple[str, str]]],
    tls_minimum_version: str,
    tls_factory: Optional[Callable[[str, str], object]],
) -> tuple[int, object, dict[str, str]]:
    """
    Check an C{ssl:} string and build its TLS connection creator.

    @return: C{(port, options, keywords)}.
    @raise ListenerError: the string is invalid.
    """
    positional, keywords = split_description(description)
    if len(positional) != 2:
        raise ListenerError(
            f"invalid listener {description!r}: expected ssl:PORT[:interface=ADDRESS]"
            f"[:privateKey=PATH:certKey=PATH]"
        )
    try:
        port = int(positional[1])
    except ValueError:
        raise ListenerError(f"invalid listener {description!r}: port {positional[1]!r} is not a number") from None
    unknown = set(keywords) - {"interface", "backlog", "privateKey", "certKey"}
    if unknown:
        raise ListenerError(
            f"invalid listener {description!r}: unsupported option(s) {sorted(unknown)}; "
            f"allowed: interface, backlog, privateKey, certKey"
        )
    certificate = keywords.get("certKey")
    private_key = keywords.get("privateKey")
    if certificate is None and private_key is None:
        if default_tls_files is None:
            raise ListenerError(f"invalid listener {description!r}: no certificate configured")
        certificate, private_key = default_tls_files()
    elif certificate is None or private_key is None:
        certificate = certificate or private_key
        private_key = private_key or certificate
    try:
        if tls_factory is None:
            options = ServerTLS(certificate, private_key, minimum_version=tls_minimum_version)
        else:
            options = tls_factory(certificate, private_key)
    except ValueError as error:
        raise ListenerError(f"invalid listener {description!r}: {error}") from None
    return port, options, keywords
