"""
The bare twisted.web baseline: a TLS server on 127.0.0.1 that reads each
request body and responds 202 C{{"errors":[]}}, with nothing else.  It shows
what Twisted's HTTP and TLS stack costs before reductrai does any work.

Usage: C{python twisted_baseline.py PORT CERTIFICATE PRIVATE_KEY}
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

ANSWER = b'{"errors":[]}'


class Accept(Resource):
    """
    Respond 202 to every request on every path.
    """

    isLeaf = True

    def render(self, request) -> bytes:
        request.content.read()
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return ANSWER


def main(argv: list[str]) -> None:
    port, certificate, private_key = argv[1], argv[2], argv[3]
    site = Site(Accept())
    site.noisy = False
    site.log = lambda request: None
    endpoint = serverFromString(
        reactor, f"ssl:{port}:interface=127.0.0.1:privateKey={private_key}:certKey={certificate}"
    )
    endpoint.listen(site)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
