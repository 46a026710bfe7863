"""
The spool's settings: L{SpoolOptions} and the C{[spool]} rows of the
configuration table.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

from reductrai.fields import Field

_MiB = 1024 * 1024

WHEN_FULL = ("reject", "drop_oldest")
ON_UPSTREAM_FAILURE = ("spool", "relay")


@attrs.frozen
class SpoolOptions:
    """
    How the spool bounds itself, retries and drains.

    @ivar max_bytes: pending bytes (entry metadata and wire bodies) at
        which the spool is full; 0 for no limit.
    @ivar max_entries: pending entries at which the spool is full; 0 for
        no limit.
    @ivar when_full: C{"reject"}: L{Spool.is_full} turns true and the
        resource answers 503; C{"drop_oldest"}: new entries push the
        oldest pending ones out, counted as dropped.
    @ivar max_attempts: delivery attempts (the live forward included)
        after which an entry becomes a dead letter; 0 for no limit.
    @ivar max_age: seconds after which an undelivered entry becomes a dead
        letter instead of being sent; 0 for no limit.
    @ivar backoff_base: seconds of the first retry delay ceiling; the
        ceiling doubles with each consecutive failure of an upstream.
    @ivar backoff_cap: largest retry delay ceiling in seconds.
    @ivar max_retry_after: longest C{Retry-After} honoured, in seconds.
    @ivar circuit_failures: consecutive failures that open an upstream's
        circuit.
    @ivar max_concurrency: replays in flight at once per upstream.
    @ivar drain_rate: replays started per second per upstream (a token
        bucket holding C{max_concurrency} tokens); 0 for no limit.
    @ivar live_grace: seconds an entry belongs to its live forward before
        the drain loop may send it; longer than the upstream timeout.
    @ivar batch_size: entries read from LMDB per read transaction.
    @ivar poll_interval: seconds between checks for work when no event
        wakes the loop (entries added by another process, clock drift).
    @ivar stop_timeout: seconds L{Spool.stop} waits for replays in flight.
    """

    max_bytes: int = 4096 * _MiB
    max_entries: int = 0
    when_full: str = "reject"
    max_attempts: int = 0
    max_age: float = 7 * 24 * 3600.0
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    max_retry_after: float = 3600.0
    circuit_failures: int = 5
    max_concurrency: int = 8
    drain_rate: float = 100.0
    live_grace: float = 60.0
    batch_size: int = 256
    poll_interval: float = 1.0
    stop_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, not {self.when_full!r}")
        if self.max_concurrency < 1 or self.batch_size < 1 or self.circuit_failures < 1:
            raise ValueError("max_concurrency, batch_size and circuit_failures must be at least 1")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], upstream_timeout: Optional[float] = None) -> "SpoolOptions":
        """
        Build the options from resolved settings (the keys of
        L{SPOOL_FIELDS}).  A C{spool.live_grace} of 0 becomes the upstream
        timeout plus 10 seconds.
        """
        grace = float(settings["spool.live_grace"])
        if grace <= 0:
            grace = float(upstream_timeout if upstream_timeout is not None else settings["upstream.timeout"]) + 10.0
        return cls(
            max_bytes=int(settings["spool.max_bytes"]),
            max_entries=int(settings["spool.max_entries"]),
            when_full=settings["spool.when_full"],
            max_attempts=int(settings["spool.max_attempts"]),
            max_age=float(settings["spool.max_age"]),
            backoff_base=float(settings["spool.backoff_base"]),
            backoff_cap=float(settings["spool.backoff_cap"]),
            circuit_failures=int(settings["spool.circuit_failures"]),
            max_concurrency=int(settings["spool.max_concurrency"]),
            drain_rate=float(settings["spool.drain_rate"]),
            live_grace=grace,
            batch_size=int(settings["spool.batch_size"]),
        )


SPOOL_FIELDS: tuple[Field, ...] = (
    Field("spool", "max_bytes", "int", 4096 * _MiB,
          "Bytes of undelivered requests (wire bodies and their metadata) at which "
          "the spool is full; 0 for no limit other than the store's map size.",
          minimum=0),
    Field("spool", "max_entries", "int", 0,
          "Undelivered requests at which the spool is full; 0 for no limit.",
          minimum=0),
    Field("spool", "when_full", "str", "reject",
          "reject: answer new requests with 503 and Retry-After while the spool is "
          "full; drop_oldest: accept them and delete the oldest undelivered "
          "requests (counted in reductrai_spool_dropped_total).",
          choices=WHEN_FULL),
    Field("spool", "max_attempts", "int", 0,
          "Delivery attempts after which a request moves to the dead letters; "
          "0 retries without limit.", minimum=0),
    Field("spool", "max_age", "float", 7 * 24 * 3600.0,
          "Seconds after which an undelivered request moves to the dead letters "
          "instead of being sent; 0 keeps trying without limit.", minimum=0),
    Field("spool", "on_upstream_failure", "str", "spool",
          "What the client gets when the live forward fails (unreachable, timeout, "
          "408, 429, 5xx): spool answers the vendor's success response, since the "
          "request is kept and delivered later; relay passes the upstream's error "
          "on (a client that resends then causes a duplicate upstream).",
          choices=ON_UPSTREAM_FAILURE),
    Field("spool", "key", "secret", None,
          "Key that encrypts the credentials of spooled requests (AES-256-GCM): "
          "64 hexadecimal digits or base64 of 32 bytes, usually given as "
          "spool.key_file or REDUCTRAI_SPOOL_KEY_FILE. Unset uses spool.key in the "
          "data directory, created with mode 0600 on first start."),
    Field("spool", "backoff_base", "float", 1.0,
          "Seconds of the first retry delay ceiling after an upstream failure; the "
          "ceiling doubles per consecutive failure and each delay is drawn at "
          "random below it (full jitter).", minimum=0.001),
    Field("spool", "backoff_cap", "float", 300.0,
          "Largest retry delay ceiling in seconds.", minimum=0.001),
    Field("spool", "circuit_failures", "int", 5,
          "Consecutive failures after which the spool stops sending to an upstream "
          "and only probes it with one request until it answers.", minimum=1),
    Field("spool", "max_concurrency", "int", 8,
          "Spooled requests in flight at once per upstream.", minimum=1),
    Field("spool", "drain_rate", "float", 100.0,
          "Spooled requests sent per second per upstream while draining a backlog; "
          "0 for no limit.", minimum=0),
    Field("spool", "live_grace", "float", 0.0,
          "Seconds a new request belongs to its live forward before the drain loop "
          "may send it; 0 means upstream.timeout plus 10 seconds.", minimum=0),
    Field("spool", "batch_size", "int", 256,
          "Spooled requests read from the store per read transaction while "
          "draining.", minimum=1, maximum=100000),
)
