"""
Configuration: one TOML file, overridden by environment variables, overridden
by command-line options.

Every setting has a section and a name (C{proxy.mode}), a type, a default and
a check.  Each can be set in the file (C{[proxy] mode = "forward"}), in the
environment as C{REDUCTRAI_<SECTION>_<NAME>} (C{REDUCTRAI_PROXY_MODE}), and a
few also under the names users of the original product already set
(C{PROXY_MODE}, C{FORWARD_TO}, ...).  Secrets have a C{*_FILE} form that
reads the value from a file.  A wrong value raises L{ConfigError} whose
message names the setting, the value and what is allowed; a secret's value
is never part of any message.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs

from reductrai.fields import Field
from reductrai.secrets import Secret

MODES = ("forward", "sample", "store-only", "forward-only")
DURABILITY = ("fsync", "interval", "none")
DATADOG_SITES = (
    "datadoghq.com",
    "us3.datadoghq.com",
    "us5.datadoghq.com",
    "datadoghq.eu",
    "ap1.datadoghq.com",
    "ap2.datadoghq.com",
    "ddog-gov.com",
)


#: Settings any of which, when set, gives the proxy an upstream.
UPSTREAM_KEYS = (
    "proxy.forward_to",
    "datadog.endpoint",
    "datadog.site",
    "datadog.agent_endpoint",
    "newrelic.region",
    "newrelic.endpoint",
    "otlp.endpoint",
    "prometheus.endpoint",
    "splunk.endpoint",
    "loki.endpoint",
    "elasticsearch.endpoint",
    "influxdb.endpoint",
    "zipkin.endpoint",
)


class ConfigError(ValueError):
    """
    A setting has an invalid value, or the configuration file is unreadable.
    """


_MiB = 1024 * 1024

FIELDS: tuple[Field, ...] = (
    Field("server", "listen", "list",
          ["ssl:8443:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"],
          "Ingest listeners as Twisted endpoint strings. An ssl: listener without "
          "privateKey= and certKey= uses server.tls_certificate and server.tls_private_key."),
    Field("server", "admin_listen", "list", ["tcp:8081:interface=127.0.0.1"],
          "Admin listeners (health, readiness, metrics) as Twisted endpoint strings."),
    Field("server", "host", "str", "",
          "Interface for the default ingest listeners; ignored when server.listen is set.",
          env=("REDUCTRAI_HOST",)),
    Field("server", "port", "int", 0,
          "Port of the default plain HTTP ingest listener (0 keeps 8080); "
          "ignored when server.listen is set.",
          env=("REDUCTRAI_PORT",), minimum=0, maximum=65535),
    Field("server", "tls_port", "int", 0,
          "Port of the default HTTPS ingest listener (0 keeps 8443); "
          "ignored when server.listen is set.",
          env=("REDUCTRAI_TLS_PORT",), minimum=0, maximum=65535),
    Field("server", "data_dir", "str", "./var",
          "Directory for the LMDB environment and the development certificate.",
          env=("REDUCTRAI_DATA_DIR",)),
    Field("server", "tls_certificate", "str", "",
          "PEM certificate chain for ssl: listeners; empty generates a self-signed "
          "development certificate in the data directory."),
    Field("server", "tls_private_key", "str", "",
          "PEM private key for server.tls_certificate."),
    Field("server", "tls_minimum_version", "str", "1.2",
          "Lowest TLS version the ingest listeners accept.", choices=("1.2", "1.3")),
    Field("server", "request_timeout", "float", 60.0,
          "Seconds a client connection may stay idle or take to send a request.",
          minimum=1),
    Field("server", "shutdown_timeout", "float", 10.0,
          "Seconds a stopping daemon (SIGTERM) waits for requests in flight before "
          "it commits and closes the store.", minimum=0),
    Field("server", "workers", "int", 1,
          "Processes serving the ingest listeners. With more than 1, the twistd "
          "process (worker 0) binds the listeners, starts the others, restarts "
          "one that dies and stops them on SIGTERM; all share the store. The "
          "admin listeners, the compactor, retention, dictionary training and "
          "the spool's drain loop run in worker 0 only.", minimum=1, maximum=16),
    Field("proxy", "mode", "str", "",
          "forward: store and forward everything; sample: store everything, forward "
          "all metrics, events and checks and a sample of logs and traces (see the "
          "[sampling] section); store-only: store, answer as the vendor would, forward "
          "nothing; forward-only: forward without storing. Empty means sample when an "
          "upstream is set and store-only otherwise.",
          env=("PROXY_MODE",), choices=("",) + MODES),
    Field("proxy", "sample_rate", "float", 0.1,
          "Fraction of logs and traces to forward in sample mode (the default rate "
          "of sampling.trace_rate and sampling.log_rate).",
          env=("SAMPLE_RATE",), minimum=0.0, maximum=1.0),
    Field("proxy", "forward_to", "str", "",
          "One base URL that receives every forwarded request, whatever its vendor "
          "(overrides the per-vendor upstreams).",
          env=("FORWARD_TO",)),
    Field("upstream", "connect_timeout", "float", 5.0,
          "Seconds to wait for an upstream TCP and TLS connection.", minimum=0.1),
    Field("upstream", "timeout", "float", 30.0,
          "Seconds for a whole upstream exchange, from connect to the last byte "
          "of the response.", minimum=0.1),
    Field("upstream", "max_in_flight", "int", 256,
          "Maximum concurrent upstream requests; further requests wait for a slot.",
          minimum=1),
    Field("upstream", "ca_bundle", "str", "",
          "PEM file of CA certificates that upstream TLS certificates are verified "
          "against; empty uses the system CAs."),
    Field("datadog", "site", "str", "",
          "Datadog site to forward to (datadoghq.com, datadoghq.eu, ...): picks the "
          "api., http-intake.logs., trace.agent. and event-management-intake. hosts "
          "of that site. Empty forwards Datadog traffic only when datadog.endpoint "
          "or proxy.forward_to is set.",
          env=("DD_SITE", "DATADOG_SITE"), choices=("",) + DATADOG_SITES),
    Field("datadog", "endpoint", "str", "",
          "Base URL for all Datadog traffic, overriding the site's hosts.",
          env=("DATADOG_ENDPOINT",)),
    Field("datadog", "api_key", "secret", None,
          "API key added to Datadog requests that carry none.",
          env=("DATADOG_API_KEY", "DD_API_KEY")),
    Field("datadog", "agent_endpoint", "str", "",
          "Base URL of a Datadog Agent that receives what tracing libraries send "
          "to /v0.3/traces, /v0.4/traces and /v0.5/traces.",
          env=("DD_TRACE_AGENT_URL",)),
    Field("newrelic", "region", "str", "",
          "New Relic region to forward to (us or eu): picks the metric-api, log-api, "
          "trace-api and insights-collector hosts of that region.",
          env=("NEW_RELIC_REGION",), choices=("", "us", "eu")),
    Field("newrelic", "endpoint", "str", "",
          "Base URL for all New Relic traffic, overriding the region's hosts.",
          env=("NEW_RELIC_ENDPOINT",)),
    Field("newrelic", "api_key", "secret", None,
          "License or API key added to New Relic requests that carry none.",
          env=("NEW_RELIC_API_KEY", "NEW_RELIC_LICENSE_KEY")),
    Field("otlp", "endpoint", "str", "",
          "Base URL of the OTLP/HTTP receiver that gets /v1/traces, /v1/metrics and /v1/logs.",
          env=("OTLP_ENDPOINT",)),
    Field("prometheus", "endpoint", "str", "",
          "Base URL of the remote-write receiver (the request path is kept).",
          env=("PROMETHEUS_ENDPOINT",)),
    Field("splunk", "endpoint", "str", "",
          "Base URL of the Splunk HTTP Event Collector.",
          env=("SPLUNK_ENDPOINT", "SPLUNK_HEC_ENDPOINT")),
    Field("loki", "endpoint", "str", "",
          "Base URL of Loki.", env=("LOKI_ENDPOINT",)),
    Field("elasticsearch", "endpoint", "str", "",
          "Base URL of Elasticsearch.", env=("ELASTICSEARCH_ENDPOINT",)),
    Field("influxdb", "endpoint", "str", "",
          "Base URL of InfluxDB.", env=("INFLUXDB_ENDPOINT",)),
    Field("zipkin", "endpoint", "str", "",
          "Base URL of the Zipkin collector.", env=("ZIPKIN_ENDPOINT",)),
    Field("limits", "max_body_bytes", "int", 32 * _MiB,
          "Largest request body accepted as received (before decoding).", minimum=1024),
    Field("limits", "max_decoded_bytes", "int", 128 * _MiB,
          "Largest request body accepted after undoing its Content-Encoding.",
          minimum=1024),
    Field("storage", "map_size", "int", 1024 * _MiB,
          "Initial LMDB map size in bytes; it doubles when full, up to "
          "storage.max_map_size.", minimum=_MiB),
    Field("storage", "max_map_size", "int", 256 * 1024 * _MiB,
          "Upper bound of the LMDB map size in bytes.", minimum=_MiB),
    Field("storage", "compression_level", "int", 3,
          "zstd level for stored request bodies.", minimum=1, maximum=22),
    Field("storage", "index_items", "bool", True,
          "Parse payloads in forward mode too, so that stored records carry their "
          "items (service, host, metric name, trace id) for the query API. Store-only "
          "and sample modes always parse.",),
    Field("storage", "compact_after", "float", 300.0,
          "Seconds a record stays in its hot form (one zstd frame with the stream's "
          "trained dictionary) before the compactor packs it into a block.", minimum=0),
    Field("storage", "block_level", "int", 19,
          "zstd level of packed blocks.", minimum=1, maximum=22),
    Field("retention", "max_age", "float", 30 * 86400.0,
          "Seconds records are kept (30 days by default); 0 keeps them forever. "
          "Undelivered spool entries are never removed by retention.", minimum=0),
    Field("retention", "max_bytes", "int", 0,
          "Data bytes kept at most, oldest records deleted first; 0 for no limit.", minimum=0),
    Field("storage", "durability", "str", "interval",
          "fsync: sync before answering; interval: sync every storage.sync_interval "
          "seconds (a process crash loses nothing, a power loss at most that "
          "interval); none: leave syncing to the operating system.",
          choices=DURABILITY),
    Field("storage", "sync_interval", "float", 1.0,
          "Seconds between syncs when storage.durability is interval.", minimum=0.01),
    Field("server", "tls_sni_certificates", "list", [],
          "Further certificates for ssl: listeners, chosen by the name a client asks "
          "for (SNI), each as CERTIFICATE_PATH:KEY_PATH (or one PEM file holding both); "
          "a certificate serves the DNS names of its subjectAltName, wildcards included. "
          "Clients that send no known name get server.tls_certificate."),
    Field("server", "tls_reload_interval", "float", 5.0,
          "Seconds between checks of the TLS files' modification times; a changed "
          "file is reloaded for new handshakes without closing open connections "
          "(SIGHUP reloads at once). 0 checks only on SIGHUP.", minimum=0),
    Field("server", "tls_client_ca", "str", "",
          "PEM bundle of the CAs that sign client certificates on ssl: ingest "
          "listeners (mutual TLS); empty asks no client certificate."),
    Field("server", "tls_client_auth", "str", "require",
          "With server.tls_client_ca set: require refuses clients without a valid "
          "certificate; optional verifies a certificate when one is sent.",
          choices=("require", "optional")),
    Field("upstream", "allow_plain_http", "bool", False,
          "Allow http:// upstream URLs to hosts other than loopback addresses (the "
          "traffic, API keys included, then crosses the network unencrypted); "
          "a warning is logged at start."),
    Field("admin", "tokens_file", "str", "",
          "File of bearer tokens for the admin listener, one a line; every admin path "
          "except /health and /ready needs one of them (or an htpasswd user).",
          env=("REDUCTRAI_ADMIN_TOKENS_FILE",)),
    Field("admin", "htpasswd_file", "str", "",
          "htpasswd file of admin users with bcrypt hashes (htpasswd -B); "
          "HTTP Basic authentication.",
          env=("REDUCTRAI_ADMIN_HTPASSWD_FILE",)),
    Field("admin", "allow_unauthenticated_loopback", "bool", False,
          "Serve the admin paths without a credential when no credential is "
          "configured and every admin listener is bound to a loopback address."),
    Field("admin", "max_auth_failures", "int", 10,
          "Failed admin authentications per client address and minute before that "
          "address is answered 429 until the minute is over.", minimum=1),
    Field("limits", "allow_networks", "list", [],
          "Client networks (CIDR) allowed on the ingest listeners; others get 403 "
          "and the connection is closed. Empty allows every address."),
    Field("limits", "client_requests_per_second", "float", 0.0,
          "Sustained ingest requests per second per client (its certificate "
          "subject under mutual TLS, else its address); 0 disables the limit. "
          "Excess requests get 429 with Retry-After.", minimum=0),
    Field("limits", "client_burst", "int", 200,
          "Requests a client may send at once above its sustained rate.", minimum=1),
    Field("limits", "max_connections", "int", 1024,
          "Open client connections per listener role (ingest, admin); a connection "
          "beyond it gets 503 and is closed.", minimum=1),
    Field("limits", "max_header_count", "int", 100,
          "Header fields per request; more get 431.", minimum=8),
    Field("limits", "max_header_bytes", "int", 16384,
          "Bytes of the request line and header fields together; more get 431.",
          minimum=1024),
    Field("limits", "request_deadline", "float", 300.0,
          "Seconds a client may take to send one whole request, headers and body, "
          "however steadily it sends; then 408 and the connection is closed "
          "(server.request_timeout bounds each silence).", minimum=1),
    Field("log", "format", "str", "text",
          "Log format of twistd's log: text, or json (one JSON object a line).",
          env=("REDUCTRAI_LOG_FORMAT",), choices=("text", "json")),
)  # end of FIELDS

from reductrai.sampling.settings import SAMPLING_FIELDS  # noqa: E402
from reductrai.spool.options import SPOOL_FIELDS  # noqa: E402

FIELDS = FIELDS + tuple(SAMPLING_FIELDS) + tuple(SPOOL_FIELDS)

FIELDS_BY_KEY = {field.key: field for field in FIELDS}


def _describe(field: Field, value: Any) -> str:
    if field.kind == "secret":
        return "<secret>"
    return repr(value)


def _convert(field: Field, value: Any, origin: str) -> Any:
    """
    Convert a raw value (from TOML, the environment or the command line) to
    the field's type and check it.
    """

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"{field.key}: invalid value {_describe(field, value)} from {origin}; {expected}"
        )

    kind = field.kind
    if kind == "secret":
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str) or not value.strip():
            raise fail("expected a non-empty string")
        return Secret(value.strip(), field.key)
    if kind == "list":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail("expected a list of non-empty strings")
        return list(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise fail("expected true or false")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise fail(f"expected a number")
        try:
            number = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise fail("expected an integer" if kind == "int" else "expected a number") from None
        if field.minimum is not None and number < field.minimum:
            raise fail(f"the minimum is {field.minimum:g}")
        if field.maximum is not None and number > field.maximum:
            raise fail(f"the maximum is {field.maximum:g}")
        return number
    if not isinstance(value, str):
        raise fail("expected a string")
    value = value.strip()
    if field.choices and value not in field.choices:
        allowed = ", ".join(repr(c) for c in field.choices)
        raise fail(f"allowed: {allowed}")
    return value


def _read_file(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path!r} is not valid TOML: {error}") from None
    values: dict[str, dict[str, Any]] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: top-level key {section!r} must be a [section] table"
            )
        for name, value in table.items():
            key = f"{section}.{name}"
            if key.endswith("_file") and key[: -len("_file")] in FIELDS_BY_KEY:
                values[key] = {"value": value, "origin": path}
                continue
            if key not in FIELDS_BY_KEY:
                known = ", ".join(sorted(f.key for f in FIELDS if f.section == section))
                hint = f"; known keys in [{section}]: {known}" if known else ""
                raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
            values[key] = {"value": value, "origin": path}
    return values


def _secret_from_file(field: Field, path: Any, origin: str) -> Secret:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{field.key}_file: invalid value {path!r} from {origin}; expected a path")
    try:
        return Secret.from_file(path, field.key)
    except ValueError as error:
        raise ConfigError(f"{error} (from {origin})") from None


@attrs.frozen
class Settings:
    """
    The resolved configuration, read-only.

    Values are available as C{settings["section.name"]} and as
    C{settings.get("section.name")}; see L{FIELDS} for the keys.
    """

    values: Mapping[str, Any]
    origins: Mapping[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str) -> Any:
        return self.values[key]

    @property
    def effective_mode(self) -> str:
        """
        The proxy mode in force: the configured one, or C{"sample"} when an
        upstream is configured and C{"store-only"} otherwise.
        """
        mode = self.values["proxy.mode"]
        if mode:
            return mode
        return "sample" if self.has_upstream else "store-only"

    @property
    def has_upstream(self) -> bool:
        """
        Whether any upstream base URL is configured.
        """
        return any(self.values[key] for key in UPSTREAM_KEYS)

    def describe(self) -> list[tuple[str, str, str]]:
        """
        Return C{(key, value, origin)} rows for display, secrets redacted.
        """
        rows = []
        for field in FIELDS:
            value = self.values[field.key]
            shown = "<secret>" if field.kind == "secret" and value is not None else repr(value)
            rows.append((field.key, shown, self.origins[field.key]))
        return rows

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v}" for k, v, _ in self.describe()) + ")"


def load_settings(
    config_path: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Settings:
    """
    Resolve the configuration from its three layers.

    @param config_path: a TOML file, or L{None} for the embedded defaults.
    @param environ: the environment (default L{os.environ}).
    @param overrides: values from the command line by setting key
        (C{"proxy.forward_to"}); L{None} values are ignored.
    @raise ConfigError: any value is invalid.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {}
    if config_path:
        raw.update(_read_file(config_path))

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in FIELDS:
        value: Any = field.default
        origin = "default"

        file_value = raw.get(field.key)
        if file_value is not None:
            value, origin = file_value["value"], file_value["origin"]
            value = _convert(field, value, origin)
        if field.kind == "secret" and f"{field.key}_file" in raw:
            entry = raw[f"{field.key}_file"]
            value = _secret_from_file(field, entry["value"], entry["origin"])
            origin = entry["origin"]

        for name in field.env_names:
            if environ.get(name, "") != "":
                origin = f"environment variable {name}"
                value = _convert(field, environ[name], origin)
                break
            file_name = name + "_FILE"
            if field.kind == "secret" and environ.get(file_name, "") != "":
                origin = f"environment variable {file_name}"
                value = _secret_from_file(field, environ[file_name], origin)
                break

        if overrides and overrides.get(field.key) is not None:
            origin = "command line"
            value = _convert(field, overrides[field.key], origin)

        values[field.key] = value
        origins[field.key] = origin

    _apply_listener_shortcuts(values, origins)
    _check_urls(values, origins)
    if values["storage.max_map_size"] < values["storage.map_size"]:
        raise ConfigError(
            f"storage.max_map_size: invalid value {values['storage.max_map_size']!r}; "
            f"it must be at least storage.map_size ({values['storage.map_size']})"
        )
    if bool(values["server.tls_certificate"]) != bool(values["server.tls_private_key"]):
        raise ConfigError(
            "server.tls_certificate and server.tls_private_key must be set together "
            "(or both left empty for the development certificate)"
        )
    return Settings(values=values, origins=origins)


def _apply_listener_shortcuts(values: dict[str, Any], origins: dict[str, str]) -> None:
    """
    Rewrite the default ingest listeners from C{server.host},
    C{server.port} and C{server.tls_port} when the listener list itself
    was not configured.
    """
    if origins["server.listen"] != "default":
        return
    host = values["server.host"] or "127.0.0.1"
    port = values["server.port"] or 8080
    tls_port = values["server.tls_port"] or 8443
    if (host, port, tls_port) == ("127.0.0.1", 8080, 8443):
        return
    interface = host.replace(":", "\\:")
    values["server.listen"] = [
        f"ssl:{tls_port}:interface={interface}",
        f"tcp:{port}:interface={interface}",
    ]
    origins["server.listen"] = "server.host, server.port and server.tls_port"


def _check_urls(values: dict[str, Any], origins: dict[str, str]) -> None:
    from urllib.parse import urlsplit

    for key in UPSTREAM_KEYS:
        if not key.endswith((".endpoint", ".forward_to")):
            continue
        url = values[key]
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{key}: invalid value {url!r} from {origins[key]}; expected an "
                f"http:// or https:// base URL such as https://api.datadoghq.eu"
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"{key}: invalid value {url!r} from {origins[key]}; a base URL has "
                f"no query string or fragment"
            )
        values[key] = url.rstrip("/")


def example_config() -> str:
    """
    Render an annotated TOML configuration holding every setting with its
    default, the text of C{conf/reductrai.example.toml}.
    """
    lines = [
        "# reductrai configuration: every setting with its default.",
        "# Environment variables override this file (REDUCTRAI_<SECTION>_<NAME>, and",
        "# the names listed per setting); command-line options override both.",
        "# Secrets also take a <name>_file key or a <VARIABLE>_FILE environment",
        "# variable naming a file that holds the value.",
    ]
    sections: dict[str, list[Field]] = {}
    for field in FIELDS:
        sections.setdefault(field.section, []).append(field)
    for section, fields in sections.items():
        lines += ["", f"[{section}]"]
        for field in fields:
            lines.extend(_example_lines(field))
    return "\n".join(lines) + "\n"


def _example_lines(field: Field) -> list[str]:
    lines = [""]
    lines.extend(f"# {chunk}" for chunk in _wrap(field.help, 76))
    if field.env:
        lines.append("# Environment: " + ", ".join(field.env_names))
    if field.kind == "secret":
        lines.append(f'# {field.name}_file = "/run/secrets/{field.name}"')
    else:
        lines.append(f"{field.name} = {_toml_value(field.default)}")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _wrap(text: str, width: int) -> Sequence[str]:
    import textwrap

    return textwrap.wrap(text, width)


OptionConverter = Callable[[str], Any]
