"""
The HTTP request class of the ingest listeners.

Twisted's L{twisted.web.server.Request} spools bodies over 100 KB to a
temporary file and accepts any size.  L{IngestRequest} keeps the body in
memory up to C{max_body_bytes} and, past that, discards what arrives and
marks the request too large, so that the resource answers 413 without ever
holding more than the limit.
"""

from __future__ import annotations

from io import BytesIO

from twisted.web import server


class IngestRequest(server.Request):
    """
    A request whose body is held in memory with a size cap.

    The cap is the C{max_body_bytes} attribute of the site.
    """

    too_large = False
    received_bytes = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body_bytes
        self.content = BytesIO()
        if length is not None and length > limit:
            self.too_large = True

    def handleContentChunk(self, data):
        self.received_bytes += len(data)
        if self.too_large:
            return
        if self.received_bytes > self.channel.site.max_body_bytes:
            self.too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)


class IngestSite(server.Site):
    """
    A site serving L{IngestRequest} with a body cap and no access log of
    its own (the resource logs what matters, without credentials).
    """

    requestFactory = IngestRequest

    def __init__(self, resource, max_body_bytes: int, timeout: float, **kwargs) -> None:
        super().__init__(resource, timeout=timeout, **kwargs)
        self.max_body_bytes = max_body_bytes

    def log(self, request) -> None:
        # The default access log writes the full request-target, which may
        # hold an API key (Datadog's /v1/input/<key>, ?api_key=).
        return None


class QuietSite(server.Site):
    """
    A site without an access log, for the admin listener that probes hit
    every few seconds.
    """

    def log(self, request) -> None:
        return None
