"""
The C{twistd reductrai} plugin; the daemon itself is in L{reductrai.tap}.
"""

from twisted.application.service import ServiceMaker

reductrai = ServiceMaker(
    "reductrai",
    "reductrai.tap",
    "Telemetry proxy that keeps a compressed local copy of everything.",
    "reductrai",
)
