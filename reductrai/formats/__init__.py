"""
Vendor wire formats parsed into items.

Each module in this package turns one vendor's request body (already
decoded from its content-encoding) into a L{ParsedPayload}.  Parsers are pure
functions of their input: they do no I/O, keep no state between calls and
raise L{PayloadError} for input the vendor itself would reject with a 400.
"""
