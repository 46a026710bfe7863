"""
Vendors as tables of routes.

A vendor is data: the paths it accepts, the kind of telemetry on each, the
upstream host each goes to, the answer it gives on success, the shape of its
error bodies and where its clients put credentials.  The ingest resource
looks a request up in a L{Router} and never branches on a vendor's name.
"""
