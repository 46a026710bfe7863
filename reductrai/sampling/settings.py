"""
The C{[sampling]} settings.

L{SAMPLING_FIELDS} is meant to be appended to L{reductrai.config.FIELDS}.
This module imports only L{reductrai.config.Field}, so C{reductrai.config}
can import it once C{Field} is defined.

Rates are fractions from 0 to 1.  Per-vendor and per-service rates are
lists of C{"name:rate"} strings (a TOML array, or one comma-separated
string in the environment: C{REDUCTRAI_SAMPLING_LOG_SERVICE_RATES=
"checkout:1,batch:0.01"}); the name is everything before the last colon,
so a service name may itself contain colons.  A service rate wins over a
vendor rate, which wins over the kind's rate.
"""

from __future__ import annotations

from reductrai.fields import Field

#: Log levels forwarded whatever the rate, as parsers spell them
#: (lower-cased): OTLP and Loki say C{warn}/C{error}/C{fatal}, Datadog
#: C{warning}/C{error}/C{critical}/C{alert}/C{emergency}, syslog-style
#: clients C{err}/C{crit}/C{emerg}.
DEFAULT_KEEP_LEVELS = [
    "warn",
    "warning",
    "error",
    "err",
    "critical",
    "crit",
    "fatal",
    "alert",
    "emergency",
    "emerg",
    "panic",
    "severe",
]

#: Fields hashed to decide a log line that carries no trace id.  The time
#: is part of the key so that one message text is not always kept or always
#: dropped; the key stays stable across retries and proxy instances.
DEFAULT_LOG_KEY_FIELDS = ["service", "host", "timestamp", "message"]

#: What happens to a body that could not be parsed (or has no parser).
OPAQUE_CHOICES = ("forward", "sample")

SAMPLING_FIELDS: tuple[Field, ...] = (
    Field("sampling", "trace_rate", "str", "",
          "Fraction of traces forwarded in sample mode, decided per trace id with the "
          "Datadog agent's rate sampler (every span of a trace is kept or dropped "
          "together). Empty means proxy.sample_rate."),
    Field("sampling", "log_rate", "str", "",
          "Fraction of log lines forwarded in sample mode; a line with a trace id follows "
          "its trace. Empty means proxy.sample_rate."),
    Field("sampling", "trace_vendor_rates", "list", [],
          "Per-vendor trace rates as vendor:rate entries (datadog:0.2)."),
    Field("sampling", "trace_service_rates", "list", [],
          "Per-service trace rates as service:rate entries (checkout:1). With different "
          "rates, a trace that spans services is complete when it is kept at the lowest "
          "of its services' rates."),
    Field("sampling", "log_vendor_rates", "list", [],
          "Per-vendor log rates as vendor:rate entries."),
    Field("sampling", "log_service_rates", "list", [],
          "Per-service log rates as service:rate entries."),
    Field("sampling", "keep_levels", "list", list(DEFAULT_KEEP_LEVELS),
          "Log levels always forwarded (lower case)."),
    Field("sampling", "log_key_fields", "list", list(DEFAULT_LOG_KEY_FIELDS),
          "Fields hashed to decide a log line without a trace id: service, host, "
          "timestamp, message, name, level, or any tag name."),
    Field("sampling", "opaque", "str", "forward",
          "Requests whose body is not parsed: forward them all, or sample whole "
          "requests of log and trace routes at the kind's rate.",
          choices=OPAQUE_CHOICES),
    Field("sampling", "record_rate", "bool", True,
          "Record the applied rate in forwarded traces (Datadog _sample_rate on root "
          "spans, OTLP tracestate ot=th)."),
)
