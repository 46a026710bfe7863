"""
The key box: AES-GCM round trip, tamper detection, the key file, and
credentials never stored in the clear.
"""

from __future__ import annotations

import base64
import os
import stat

import pytest
from twisted.internet import task

from reductrai.keybox import KEY_FILE_NAME, KeyBox, KeyBoxError, parse_key
from reductrai.secrets import Secret
from reductrai.spool import Spool, SpoolOptions
from reductrai.spool.entries import SPOOL_DB

from tests.spool_support import ScriptedForwarder, accept, open_store


def test_round_trip_and_binding_to_the_entry():
    box = KeyBox.generate()
    secret = b"DD-API-KEY: 0123456789abcdef0123456789abcdef"
    blob = box.seal(secret, b"entry-1")
    assert secret not in blob
    assert box.open(blob, b"entry-1") == secret
    with pytest.raises(KeyBoxError):
        box.open(blob, b"entry-2")  # another entry's blob


def test_tampering_is_detected():
    box = KeyBox.generate()
    blob = bytearray(box.seal(b"authorization: Bearer xyz", b"id"))
    for position in (0, 3, 20, len(blob) - 1):
        altered = bytearray(blob)
        altered[position] ^= 0x01
        with pytest.raises(KeyBoxError):
            box.open(bytes(altered), b"id")
    with pytest.raises(KeyBoxError):
        box.open(bytes(blob[:-1]), b"id")


def test_other_key_fails_and_previous_keys_open():
    old, new = os.urandom(32), os.urandom(32)
    blob = KeyBox(old).seal(b"x-license-key: abc", b"id")
    with pytest.raises(KeyBoxError):
        KeyBox(new).open(blob, b"id")
    assert KeyBox(new, previous=[old]).open(blob, b"id") == b"x-license-key: abc"


def test_key_file_created_with_mode_0600_and_reused(tmp_path):
    first = KeyBox.load(str(tmp_path))
    path = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = first.seal(b"api-key: 1", b"id")
    assert KeyBox.load(str(tmp_path)).open(blob, b"id") == b"api-key: 1"


def test_key_file_readable_by_others_is_refused(tmp_path):
    KeyBox.load(str(tmp_path))
    path = tmp_path / KEY_FILE_NAME
    path.chmod(0o644)
    with pytest.raises(KeyBoxError, match="chmod 600"):
        KeyBox.load(str(tmp_path))


def test_configured_key_in_hex_or_base64(tmp_path):
    raw = os.urandom(32)
    by_hex = KeyBox.load(str(tmp_path), Secret(raw.hex(), "spool.key"))
    by_b64 = KeyBox.load(str(tmp_path), Secret(base64.b64encode(raw).decode(), "spool.key"))
    assert by_b64.open(by_hex.seal(b"v", b"id"), b"id") == b"v"
    assert not (tmp_path / KEY_FILE_NAME).exists()
    with pytest.raises(KeyBoxError) as raised:
        parse_key("not-a-key", "spool.key")
    assert "not-a-key" not in str(raised.value)


def test_credentials_never_reach_the_data_file(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    store = open_store(tmp_path / "store", clock)
    spool = Spool(store, ScriptedForwarder(), clock, SpoolOptions(live_grace=600), KeyBox.load(str(tmp_path)),
                  clock_ns=lambda: int(clock.seconds() * 1e9))
    spool.start()
    api_key = b"a7f3c9e1d5b2" * 3  # 36 bytes, distinctive
    query_key = b"q9z8y7x6w5v4u3t2s1r0"
    from twisted.web.http_headers import Headers

    for number in range(20):
        headers = Headers({b"DD-API-KEY": [api_key], b"Authorization": [b"Bearer " + api_key],
                           b"X-Insert-Key": [api_key], b"x-seq": [str(number).encode()]})
        entry_id, ops = spool.entry_ops("http://127.0.0.1:9", b"POST", b"/v1/input?api_key=" + query_key,
                                        headers, b"payload %d" % number)
        store.append({"vendor": "datadog", "kind": "logs", "route": "r", "method": "POST", "path": "/v1/input",
                      "query": "", "content_type": None, "content_encoding": None, "wire_size": 9,
                      "headers": []}, b"payload", extra=ops)
    clock.advance(0)
    with store.env.begin() as txn:
        assert txn.stat(store.database(SPOOL_DB))["entries"] == 20
    store.env.sync(True)
    data = (tmp_path / "store" / "data.mdb").read_bytes()
    assert b"payload 7" in data  # the bodies are there in the clear ...
    assert api_key not in data and query_key not in data  # ... the credentials are not
    assert api_key.hex().encode() not in data and base64.b64encode(api_key) not in data
    # The displayed target keeps the path and drops the key parameter.
    from reductrai.spool.entries import decode_entry

    with store.env.begin() as txn:
        meta, sealed = decode_entry(next(iter(txn.cursor(db=store.database(SPOOL_DB))))[1])
    assert meta.display == "/v1/input?" and sealed
