"""
Secret values that never show themselves.

A L{Secret} wraps a credential read from configuration (an API key, a
token).  Its C{repr} and C{str} are redacted, so that a secret that ends up
in a log event, an exception message or a printed configuration shows as
C{<secret>} instead of its value.  Code that needs the value asks for it
with L{Secret.reveal}.
"""

from __future__ import annotations

import hmac
from pathlib import Path

REDACTED = "<secret>"


class Secret:
    """
    A credential whose value is only available through L{reveal}.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        """
        @param value: the secret itself.
        @param source: where it came from (a setting name or a file path),
            safe to show in messages.
        """
        self._value = value
        self.source = source

    @classmethod
    def from_file(cls, path: str, setting: str) -> "Secret":
        """
        Read a secret from a file, as Docker and Kubernetes secrets provide
        them: the whole content with surrounding whitespace stripped.

        @raise ValueError: the file cannot be read or is empty; the message
            names the setting and the path, never the content.
        """
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{setting}: cannot read secret file {path!r}: {error.strerror}") from None
        if not value:
            raise ValueError(f"{setting}: secret file {path!r} is empty")
        return cls(value, f"{setting} ({path})")

    def reveal(self) -> str:
        """
        Return the secret value.  Callers must not log or store it.
        """
        return self._value

    def matches(self, candidate: str | bytes) -> bool:
        """
        Compare C{candidate} with the secret in constant time.
        """
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8")
        return hmac.compare_digest(self._value.encode("utf-8"), candidate)

    def __repr__(self) -> str:
        return f"Secret({REDACTED}, source={self.source!r})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("Secret values cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(Secret)
