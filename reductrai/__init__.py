"""
reductrai: a telemetry proxy that keeps a compressed local copy of everything
it forwards.
"""

__version__ = "0.1.0"
