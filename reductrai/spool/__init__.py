"""
The durable spool: nothing accepted is ever lost.

Once the ingest resource answers 2xx, the request is in LMDB and reaches
its upstream at least once, whatever happens to the upstream or the
process.  See L{reductrai.spool.drain} for the contract with the
resource, L{reductrai.spool.entries} for the stored form and
L{reductrai.spool.policy} for the retry rules.

The names below load on first use, so that C{reductrai.config} can import
L{reductrai.spool.options} for the settings without importing the drain
loop (which imports the configuration in turn).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CREDENTIAL_HEADERS": "reductrai.spool.drain",
    "CREDENTIAL_QUERY": "reductrai.spool.drain",
    "Spool": "reductrai.spool.drain",
    "SpoolClosed": "reductrai.spool.drain",
    "SpoolCollector": "reductrai.spool.drain",
    "SpoolCounters": "reductrai.spool.drain",
    "ON_UPSTREAM_FAILURE": "reductrai.spool.options",
    "SPOOL_FIELDS": "reductrai.spool.options",
    "WHEN_FULL": "reductrai.spool.options",
    "SpoolOptions": "reductrai.spool.options",
    "Circuit": "reductrai.spool.policy",
    "TokenBucket": "reductrai.spool.policy",
    "backoff_delay": "reductrai.spool.policy",
    "parse_retry_after": "reductrai.spool.policy",
    "retryable_status": "reductrai.spool.policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'reductrai.spool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
