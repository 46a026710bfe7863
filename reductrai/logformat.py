"""
JSON log lines for twistd.

L{json_observer} writes one JSON object a line to standard output: the
time (UTC, ISO 8601), the level, the namespace, the formatted message, the
event's named fields and, for failures, the traceback.  Two ways to use
it:

  - C{twistd -n --pidfile= reductrai --log-format json} (or the setting
    C{log.format = "json"}, environment C{REDUCTRAI_LOG_FORMAT=json}):
    L{use_on_application} puts the observer on the application that twistd
    creates, which twistd's logger then uses;
  - C{twistd -n --pidfile= --logger=reductrai.logformat.json_observer
    reductrai}: twistd calls the factory itself.

Field values that are not JSON numbers, strings, booleans or null are
written as their C{repr}, which L{reductrai.secrets.Secret} redacts.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Optional

from twisted.logger import ILogObserver, formatEvent
from twisted.python.components import Componentized
from zope.interface import implementer

_RESERVED = frozenset({"time", "level", "namespace", "message", "traceback"})
_SKIPPED = frozenset({"format", "message", "isError", "system", "time", "why", "failure", "printed", "debug"})


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)) and len(value) <= 50:
        return [_plain(item) for item in value]
    return repr(value)


def event_as_line(event: dict) -> str:
    """
    Render a log event as one JSON line (without the newline).
    """
    stamp = event.get("log_time")
    when = (
        datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="milliseconds")
        if isinstance(stamp, (int, float))
        else None
    )
    level = event.get("log_level")
    document: dict[str, Any] = {
        "time": when,
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", event.get("system", "-")),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIPPED:
            continue
        name = key if key not in _RESERVED else "field_" + key
        document[name] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            document["traceback"] = failure.getTraceback()
        except Exception:
            document["traceback"] = repr(failure)
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Write every event as a JSON line to a text stream.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict) -> None:
        try:
            line = event_as_line(event)
        except Exception as error:
            line = json.dumps({"level": "error", "message": f"unloggable event: {error!r}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def json_observer(stream: Optional[IO[str]] = None) -> JSONLineObserver:
    """
    The observer factory for twistd's C{--logger} option: JSON lines on
    standard output.
    """
    return JSONLineObserver(stream if stream is not None else sys.stdout)


def use_on_application(service, stream: Optional[IO[str]] = None) -> None:
    """
    Make twistd log JSON lines for C{service}: when twistd parents the
    service to its application, the application gets a JSON observer as
    its L{ILogObserver}, which twistd's logger uses when C{--logger} is not
    given.
    """
    original = service.setServiceParent

    def setServiceParent(parent):
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, json_observer(stream))
        return original(parent)

    service.setServiceParent = setServiceParent
