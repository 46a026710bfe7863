"""
Authentication of the admin listener.

L{AdminGuard} wraps the whole admin resource tree, so that every path added
to it (the query API included) needs a credential; only C{/health} and
C{/ready}, which orchestrators probe, stay open.  A credential is a bearer
token from C{admin.tokens_file} (one a line) or a user of
C{admin.htpasswd_file} (bcrypt hashes, HTTP Basic).  Tokens are compared
through their SHA-256 digests in constant time; bcrypt runs in a thread so
that the reactor does not wait for it.  A client address with
C{admin.max_auth_failures} failures in a minute gets 429 until the minute
is over, whatever it sends.

Without any configured credential the protected paths answer 401 with a
message saying how to configure one, unless
C{admin.allow_unauthenticated_loopback} is set and every admin listener is
bound to a loopback address (or is a UNIX socket).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from twisted.internet import threads
from twisted.logger import Logger, LogLevel
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET

from reductrai.listeners import split_description
from reductrai.ratelimit import RateLimitedLog

#: Paths served without a credential: orchestrators' probes.
OPEN_PATHS = frozenset({b"health", b"ready"})

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")

HOW_TO_CONFIGURE = (
    "no admin credential is configured: set admin.tokens_file (bearer tokens, one a line) "
    "or admin.htpasswd_file (htpasswd -B users); or, with every admin listener on a loopback "
    "address, admin.allow_unauthenticated_loopback = true"
)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def load_tokens(path: str) -> list[bytes]:
    """
    Read bearer tokens, one a line; blank lines and lines starting with
    C{#} are skipped.  Only the SHA-256 digests are kept.

    @raise ValueError: the file cannot be read or contains no token; the
        message names the path, never a token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"admin.tokens_file: cannot read {path!r}: {getattr(error, 'strerror', None) or 'not UTF-8'}") from None
    digests = [_digest(line.strip().encode("utf-8")) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not digests:
        raise ValueError(f"admin.tokens_file: {path!r} contains no token; add one token a line")
    return digests


def load_htpasswd(path: str) -> dict[str, bytes]:
    """
    Read an htpasswd file of C{user:bcrypt-hash} lines.

    @raise ValueError: the file cannot be read, or a line is not a bcrypt
        entry; the message names the path and line number, never a hash.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"admin.htpasswd_file: cannot read {path!r}: {getattr(error, 'strerror', None) or 'not UTF-8'}") from None
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user or not hashed.startswith(_BCRYPT_PREFIXES):
            raise ValueError(
                f"admin.htpasswd_file: line {number} of {path!r} is not a bcrypt entry "
                f"(create users with: htpasswd -B {path} USER)"
            )
        users[user] = hashed.encode("ascii")
    if not users:
        raise ValueError(f"admin.htpasswd_file: {path!r} contains no user; add user:bcrypt-hash lines (htpasswd -B)")
    return users


def listeners_are_loopback(descriptions: Sequence[str]) -> bool:
    """
    Whether every listener of C{descriptions} (Twisted endpoint strings)
    accepts connections from this host only: a TCP or TLS listener bound
    to a loopback address, or a UNIX socket.
    """
    for description in descriptions:
        positional, keywords = split_description(description)
        kind = positional[0].lower() if positional else ""
        if kind == "unix":
            continue
        if kind not in ("tcp", "tcp6", "ssl"):
            return False
        interface = keywords.get("interface", "")
        if interface == "localhost":
            continue
        try:
            if not ipaddress.ip_address(interface).is_loopback:
                return False
        except ValueError:
            return False
    return True


class FailureTracker:
    """
    Count failed attempts per client address over fixed one-minute windows.
    """

    def __init__(self, max_failures: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str, tuple[float, int]] = {}

    def _current(self, peer: str) -> tuple[float, int]:
        now = self._clock()
        start, count = self._failures.get(peer, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        return start, count

    def retry_after(self, peer: str) -> float:
        """
        Return the seconds C{peer} must wait before trying again, C{0.0}
        when it may try now.
        """
        start, count = self._current(peer)
        if count < self.max_failures:
            return 0.0
        return max(0.0, self.window - (self._clock() - start))

    def record(self, peer: str) -> None:
        """
        Count one failure of C{peer}.
        """
        start, count = self._current(peer)
        self._failures[peer] = (start, count + 1)
        if len(self._failures) > 10000:
            now = self._clock()
            for key, (began, _) in list(self._failures.items()):
                if now - began >= self.window:
                    del self._failures[key]


class AdminAuthenticator:
    """
    The admin credentials and the decision of whether a request may pass.
    """

    log = Logger()

    def __init__(
        self,
        tokens_file: str = "",
        htpasswd_file: str = "",
        allow_unauthenticated: bool = False,
    ) -> None:
        """
        @param allow_unauthenticated: serve without a credential while none
            is configured (the caller decides it only for loopback
            listeners).
        @raise ValueError: a credential file is unreadable or invalid.
        """
        self.tokens_file = tokens_file
        self.htpasswd_file = htpasswd_file
        self.allow_unauthenticated = allow_unauthenticated
        self._tokens: list[bytes] = []
        self._users: dict[str, bytes] = {}
        self._dummy_hash: Optional[bytes] = None
        self.reload()

    @classmethod
    def from_settings(cls, settings) -> "AdminAuthenticator":
        """
        Build the authenticator of the admin listeners from the settings.

        @raise ValueError: a credential file is unreadable or invalid.
        """
        loopback = listeners_are_loopback(settings["server.admin_listen"])
        return cls(
            settings["admin.tokens_file"],
            settings["admin.htpasswd_file"],
            allow_unauthenticated=settings["admin.allow_unauthenticated_loopback"] and loopback,
        )

    def reload(self) -> None:
        """
        Read the credential files again.

        @raise ValueError: a file is unreadable or invalid; the credentials
            in use stay as they were.
        """
        tokens = load_tokens(self.tokens_file) if self.tokens_file else []
        users = load_htpasswd(self.htpasswd_file) if self.htpasswd_file else {}
        dummy = None
        if users:
            import bcrypt

            sample = next(iter(users.values()))
            rounds = int(sample[4:6]) if sample[4:6].isdigit() else 12
            dummy = bcrypt.hashpw(b"reductrai-unknown-user", bcrypt.gensalt(rounds=max(4, min(rounds, 31))))
        self._tokens, self._users, self._dummy_hash = tokens, users, dummy

    @property
    def configured(self) -> bool:
        """
        Whether any credential is configured.
        """
        return bool(self._tokens or self._users)

    @property
    def open(self) -> bool:
        """
        Whether protected paths are served without a credential.
        """
        return not self.configured and self.allow_unauthenticated

    def check_token(self, token: bytes) -> bool:
        """
        Whether C{token} is one of the configured bearer tokens; every
        token is compared, each in constant time.
        """
        candidate = _digest(token)
        found = False
        for digest in self._tokens:
            found |= hmac.compare_digest(candidate, digest)
        return found

    def check_password(self, user: str, password: bytes) -> bool:
        """
        Whether C{user} and C{password} match an htpasswd entry.  An
        unknown user costs one bcrypt check as well.  Blocking: call it
        from a thread.
        """
        import bcrypt

        hashed = self._users.get(user)
        if hashed is None and self._dummy_hash is None:
            return False
        try:
            ok = bcrypt.checkpw(password, hashed if hashed is not None else self._dummy_hash)
        except ValueError:
            return False
        return ok and hashed is not None


class _Refusal(Resource):
    """
    A fixed JSON error answer.
    """

    isLeaf = True

    def __init__(self, status: int, message: str, headers: Optional[dict[bytes, bytes]] = None) -> None:
        super().__init__()
        self.status = status
        self.message = message
        self.headers = headers or {}

    def render(self, request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return json.dumps({"error": self.message}).encode("utf-8")


class _Verifying(Resource):
    """
    Check an HTTP Basic credential in a thread, then serve the path the
    guard held back, or refuse.
    """

    isLeaf = True

    def __init__(self, guard: "AdminGuard", name: bytes, user: str, password: bytes) -> None:
        super().__init__()
        self.guard = guard
        self.name = name
        self.user = user
        self.password = password

    def render(self, request):
        checked = threads.deferToThread(self.guard.authenticator.check_password, self.user, self.password)
        checked.addCallback(self._checked, request)
        checked.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _checked(self, ok: bool, request) -> None:
        if request._disconnected:
            return
        if ok:
            resource = self.guard.wrapped.getChildWithDefault(self.name, request)
            request.render(getChildForRequest(resource, request))
        else:
            request.render(self.guard.refuse(request, "wrong_password"))

    def _failed(self, failure, request) -> None:
        self.guard.log.failure("Checking an admin password failed", failure)
        if not request._disconnected:
            request.render(_Refusal(500, "the credential could not be checked"))


class AdminGuard(Resource):
    """
    The root of the admin listener: the wrapped tree behind a credential
    check.  Children added with L{putChild} go to the wrapped tree.
    """

    log = Logger()

    def __init__(self, wrapped: Resource, authenticator: AdminAuthenticator, max_failures: int = 10,
                 metrics=None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.authenticator = authenticator
        self.metrics = metrics
        self.failures = FailureTracker(max_failures, clock=clock)
        self._log = RateLimitedLog(self.log, clock=clock)

    def putChild(self, path: bytes, child: Resource) -> None:
        self.wrapped.putChild(path, child)

    def render(self, request):
        return self.wrapped.render(request)

    def getChildWithDefault(self, name: bytes, request) -> Resource:
        if name in OPEN_PATHS and request.postpath in ([], [b""]):
            return self.wrapped.getChildWithDefault(name, request)
        authenticator = self.authenticator
        if authenticator.open:
            return self.wrapped.getChildWithDefault(name, request)
        peer = self._peer(request)
        wait = self.failures.retry_after(peer)
        if wait:
            self._count("blocked")
            return _Refusal(429, "too many failed authentications; retry later",
                            {b"retry-after": str(max(1, int(wait + 0.999))).encode("ascii")})
        if not authenticator.configured:
            self._count("not_configured")
            return _Refusal(401, HOW_TO_CONFIGURE)
        scheme, _, credential = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        scheme = scheme.lower()
        credential = credential.strip()
        if scheme == b"bearer" and credential and authenticator._tokens:
            if authenticator.check_token(credential):
                return self.wrapped.getChildWithDefault(name, request)
            return self.refuse(request, "wrong_token")
        if scheme == b"basic" and credential and authenticator._users:
            try:
                user, colon, password = base64.b64decode(credential, validate=True).partition(b":")
                user_text = user.decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return self.refuse(request, "malformed")
            if not colon:
                return self.refuse(request, "malformed")
            return _Verifying(self, name, user_text, password)
        return self.refuse(request, "missing" if not scheme else "unsupported_scheme", count=bool(scheme))

    def refuse(self, request, reason: str, count: bool = True) -> Resource:
        """
        Answer 401 for a missing or wrong credential; a wrong one counts
        toward the client's failure limit and is logged with its address.
        """
        peer = self._peer(request)
        self._count(reason)
        if count:
            self.failures.record(peer)
            self._log.emit(
                "auth:" + peer,
                LogLevel.warn,
                "Failed admin authentication from {peer} ({reason}) on {path}",
                peer=peer, reason=reason, path=request.path.decode("latin-1")[:200],
            )
        challenges = []
        if self.authenticator._tokens:
            challenges.append(b'Bearer realm="reductrai admin"')
        if self.authenticator._users:
            challenges.append(b'Basic realm="reductrai admin", charset="UTF-8"')
        return _Refusal(401, "a valid admin credential is required", {b"www-authenticate": b", ".join(challenges)})

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admin_auth_failures.labels(reason).inc()

    @staticmethod
    def _peer(request) -> str:
        address = request.getClientAddress()
        return str(getattr(address, "host", address))
