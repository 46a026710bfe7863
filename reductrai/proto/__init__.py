"""
Protobuf classes for the vendor wire formats that no installed package
provides: Prometheus remote write 1.0 and 2.0, the Loki push request, and the
Datadog Agent's metric, sketch and trace payloads.

The C{*.proto} sources sit beside the generated C{*_pb2.py} modules; see
C{README.md} in this directory for the command that regenerates them.  The
generated code needs the protobuf runtime 7.35.1 or later, below 8.
"""
