"""
The C{twistd reductrai} command: options and service construction.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.python import usage

from reductrai import __version__
from reductrai.config import MODES, ConfigError, load_settings
from reductrai.service import ReductraiService


class Options(usage.Options):
    """
    Command-line options; each overrides the configuration file and the
    environment.  No option default shows a secret.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the reductrai telemetry proxy. Settings come from the TOML file "
        "given with --config (default: embedded defaults), then environment "
        "variables, then these options. With no upstream configured the proxy "
        "stores every request and answers as the vendor would (store-only)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["forward-to", None, None, "Base URL that receives every forwarded request (proxy.forward_to)."],
        ["mode", None, None, "Proxy mode: " + ", ".join(MODES) + " (proxy.mode)."],
        ["data-dir", None, None, "Data directory (server.data_dir)."],
        ["datadog-site", None, None, "Datadog site to forward to, e.g. datadoghq.eu (datadog.site)."],
        ["tls-certificate", None, None, "PEM certificate chain for ssl: listeners (server.tls_certificate)."],
        ["tls-private-key", None, None, "PEM private key for ssl: listeners (server.tls_private_key)."],
        ["ca-bundle", None, None, "CA bundle for verifying upstream TLS (upstream.ca_bundle)."],
        ["log-format", None, None, "Log format: text or json, one JSON object a line (log.format)."],
        ["workers", None, None, "Processes serving the ingest listeners (server.workers)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["admin-listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Ingest listener as a Twisted endpoint string; repeat for several
        (server.listen).
        """
        self["listen"].append(description)

    def opt_admin_listen(self, description: str) -> None:
        """
        Admin listener as a Twisted endpoint string; repeat for several
        (server.admin_listen).
        """
        self["admin-listen"].append(description)

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"reductrai {__version__}")
        sys.exit(0)

    def overrides(self) -> dict[str, Any]:
        """
        Return the options given, keyed by setting.
        """
        return {
            "proxy.forward_to": self["forward-to"],
            "proxy.mode": self["mode"],
            "server.data_dir": self["data-dir"],
            "datadog.site": self["datadog-site"],
            "server.tls_certificate": self["tls-certificate"],
            "server.tls_private_key": self["tls-private-key"],
            "upstream.ca_bundle": self["ca-bundle"],
            "log.format": self["log-format"],
            "server.listen": self["listen"] or None,
            "server.admin_listen": self["admin-listen"] or None,
            "server.workers": self["workers"],
        }


def makeService(options: Options, reactor: Optional[Any] = None) -> ReductraiService:
    """
    Build the daemon from parsed options.

    @raise SystemExit: the configuration is invalid; the message names the
        setting, the value and what is allowed.
    """
    try:
        settings = load_settings(options["config"], overrides=options.overrides())
    except ConfigError as error:
        sys.stderr.write(f"reductrai: invalid configuration: {error}\n")
        raise SystemExit(2)
    daemon = ReductraiService(settings, reactor, exit_on_startup_error=True, config_path=options["config"])
    if settings["log.format"] == "json":
        from reductrai.logformat import use_on_application

        use_on_application(daemon)
        if settings["server.workers"] > 1:
            _tag_worker_zero(daemon)
    return daemon


def _tag_worker_zero(daemon: ReductraiService) -> None:
    """
    Give worker 0's own JSON log lines the C{worker} field that the other
    workers' relayed lines carry.
    """
    from twisted.logger import ILogObserver
    from twisted.python.components import Componentized

    original = daemon.setServiceParent

    def setServiceParent(parent):
        result = original(parent)
        observer = parent.getComponent(ILogObserver, None) if isinstance(parent, Componentized) else None
        if observer is not None:

            def tagged(event: dict) -> None:
                event.setdefault("worker", 0)
                observer(event)

            parent.setComponent(ILogObserver, tagged)
        return result

    daemon.setServiceParent = setServiceParent
