"""
Reloading on SIGHUP: certificates, admin credentials and secrets read from
files, without a restart and without closing connections.

L{Reloader} runs a list of named actions in the reactor thread when the
process gets SIGHUP.  An action that fails is logged and the others still
run; each action keeps what it had when its new files are invalid.
"""

from __future__ import annotations

import re
import signal
from typing import Callable, Optional

from twisted.logger import Logger

from reductrai.config import FIELDS
from reductrai.secrets import Secret

_SOURCE = re.compile(r"^(?P<setting>\S+) \((?P<path>.+)\)$")


def reread_secrets(settings) -> list[str]:
    """
    Read again every secret setting that came from a file, replacing the
    value in C{settings}.

    @return: the keys of the secrets read again.
    @raise ValueError: a file is unreadable or empty; the message names the
        setting and the path, never a value.  Secrets read before the
        failure keep their new values.
    """
    values = settings.values
    reread = []
    for field in FIELDS:
        if field.kind != "secret":
            continue
        current = values.get(field.key)
        if not isinstance(current, Secret):
            continue
        match = _SOURCE.match(current.source)
        if match is None or match.group("setting") != field.key:
            continue
        values[field.key] = Secret.from_file(match.group("path"), field.key)
        reread.append(field.key)
    return reread


class Reloader:
    """
    Named reload actions run on SIGHUP.
    """

    log = Logger()

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.actions: list[tuple[str, Callable[[], object]]] = []
        self._previous: Optional[object] = None
        self._installed = False

    def add(self, name: str, action: Callable[[], object]) -> None:
        """
        Run C{action} on every reload; C{name} says what it reloads in logs.
        """
        self.actions.append((name, action))

    def reload(self) -> int:
        """
        Run every action now.

        @return: the number of actions that failed.
        """
        failed = 0
        for name, action in self.actions:
            try:
                action()
            except ValueError as error:
                failed += 1
                self.log.error("Reloading {what} failed, keeping the current one: {error}", what=name, error=str(error))
            except Exception:
                failed += 1
                self.log.failure("Reloading {what} failed unexpectedly", what=name)
        self.log.info("Reload done: {count} part(s), {failed} failed", count=len(self.actions), failed=failed)
        return failed

    def install(self) -> None:
        """
        Reload on SIGHUP (where the platform has it).
        """
        if not hasattr(signal, "SIGHUP") or self._installed:
            return

        def handler(signum, frame):
            self.reactor.callFromThread(self.reload)

        self._previous = signal.signal(signal.SIGHUP, handler)
        self._installed = True

    def uninstall(self) -> None:
        """
        Restore the SIGHUP handler that was there before L{install}.
        """
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
