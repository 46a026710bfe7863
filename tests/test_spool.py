"""
The spool's rules, driven by L{task.Clock} and a scripted forwarder over a
real LMDB store: backoff, Retry-After, the circuit, concurrency, the drain
rate, FIFO order, live grace, dead letters, limits, restart and bounded
batch reads.
"""

from __future__ import annotations

import email.utils
import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import task

from reductrai.keybox import KeyBox
from reductrai.spool import (
    Circuit,
    Spool,
    SpoolOptions,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
)
from reductrai.spool.drain import USAGE_CHECK_INTERVAL
from reductrai.spool.entries import BODY_DB, DEAD_BODY_DB, DEAD_DB, SPOOL_DB, decode_entry
from reductrai.spool.policy import CLOSED, HALF_OPEN, OPEN

from tests.spool_support import UPSTREAM, ScriptedForwarder, accept, open_store, unreachable

START = 1_700_000_000.0


def make_clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(START)
    return clock


def make_spool(tmp_path, clock, forwarder, store=None, keybox=None, **options):
    defaults = dict(backoff_base=1.0, backoff_cap=8.0, live_grace=30.0, drain_rate=0, poll_interval=1.0)
    defaults.update(options)
    store = store or open_store(tmp_path / "store", clock)
    spool = Spool(
        store, forwarder, clock, SpoolOptions(**defaults), keybox or KeyBox.generate(),
        clock_ns=lambda: int(clock.seconds() * 1e9), rng=lambda: 1.0 - 1e-9,
    )
    return store, spool


def fill(spool, store, clock, count: int, settle_status=None, **kwargs) -> list[bytes]:
    """
    Accept C{count} requests and commit them; with C{settle_status} set,
    report that live outcome for each.
    """
    ids = []
    for number in range(count):
        entry_id, _ = accept(spool, store, number, **kwargs)
        ids.append(entry_id)
    clock.advance(0)
    if settle_status is not None:
        for entry_id in ids:
            spool.settle(entry_id, settle_status if settle_status != "none" else None)
        clock.advance(0)
    return ids


def count(store, db) -> int:
    handle = store.database(db)
    with store.env.begin() as txn:
        return txn.stat(handle)["entries"]


def advance(clock, seconds: float, step: float = 0.05) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)


# Policy


def test_backoff_full_jitter_stays_under_the_capped_exponential_ceiling():
    rng = random.Random(7)
    base, cap = 0.5, 10.0
    for failures in range(1, 12):
        ceiling = min(cap, base * 2 ** (failures - 1))
        delays = [backoff_delay(failures, base, cap, rng.random) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads delays over the whole interval.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9
    assert backoff_delay(0, base, cap) == 0.0
    assert backoff_delay(500, base, cap, lambda: 0.5) == cap / 2


def test_retry_after_seconds_and_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after(b"120", now) == 120.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date.encode(), now) == pytest.approx(30.0, abs=1.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    assert parse_retry_after(b"soon", now) is None
    assert parse_retry_after(None, now) is None


def test_circuit_opens_probes_once_and_closes():
    circuit = Circuit(threshold=3, base=1.0, cap=4.0, rng=lambda: 1.0)
    now = 100.0
    assert circuit.allows(now)
    assert circuit.failed(now) is None  # one failure: closed, delayed 1 s
    assert not circuit.allows(now + 0.5)
    assert circuit.allows(now + 1.0)
    circuit.failed(now + 1.0)
    assert circuit.failed(now + 3.0) == OPEN  # third failure, delay 4 s
    assert not circuit.allows(now + 6.9)
    assert circuit.allows(now + 7.0)
    assert circuit.state == HALF_OPEN
    circuit.sending()
    assert not circuit.allows(now + 7.0)  # only one probe at a time
    assert circuit.failed(now + 7.5) is None
    assert circuit.state == OPEN
    assert circuit.allows(now + 7.5 + 4.0)
    circuit.sending()
    assert circuit.succeeded() == HALF_OPEN
    assert circuit.state == CLOSED
    assert circuit.allows(now + 11.5)


def test_token_bucket_rate():
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    taken = sum(bucket.take(t / 100.0) for t in range(0, 300))  # 3 s in 10 ms steps
    # The burst plus 10 per second over 3 s, within one token.
    assert 2 + 29 <= taken <= 2 + 30


# The accept path


def test_settle_2xx_deletes_the_entry_and_its_credentials(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder)
    spool.start()
    fill(spool, store, clock, 5, settle_status=202)
    assert count(store, SPOOL_DB) == 0
    assert count(store, BODY_DB) == 0
    advance(clock, 40)
    assert forwarder.calls == []
    assert spool.counters.delivered == 5


def test_live_entries_wait_for_their_grace(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder, live_grace=30.0)
    spool.start()
    fill(spool, store, clock, 3)
    advance(clock, 29.0)
    assert forwarder.calls == []  # the live forwards are still running
    advance(clock, 2.0)
    assert sorted(call.seq for call in forwarder.calls) == [0, 1, 2]
    clock.advance(0)
    assert count(store, SPOOL_DB) == 0


def test_live_failure_hands_the_entry_to_the_drain_loop(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder)
    spool.start()
    fill(spool, store, clock, 4, settle_status=503)
    # One failure each from the live forwards: attempts stored as 1.
    with store.env.begin() as txn:
        metas = [decode_entry(v)[0] for _, v in txn.cursor(db=store.database(SPOOL_DB))]
    assert [m.attempts for m in metas] == [1, 1, 1, 1]
    advance(clock, 10)
    assert [call.seq for call in forwarder.calls] == [0, 1, 2, 3]
    # The replay carries the exact target and the credential header.
    assert forwarder.calls[0].target == b"/api/v2/series?n=0"
    assert forwarder.calls[0].headers.getRawHeaders(b"dd-api-key") == [b"k" * 32]
    assert count(store, SPOOL_DB) == 0
    assert count(store, BODY_DB) == 0


def test_live_4xx_drops_without_retry(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder)
    spool.start()
    fill(spool, store, clock, 3, settle_status=400)
    advance(clock, 40)
    assert forwarder.calls == []
    assert count(store, SPOOL_DB) == 0
    assert count(store, DEAD_DB) == 0
    assert spool.counters.rejected_by_upstream == 3


# The drain loop


def test_fifo_per_upstream_with_one_replay_at_a_time(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder, max_concurrency=1)
    spool.start()
    fill(spool, store, clock, 20, settle_status="none")
    fill(spool, store, clock, 5, settle_status="none", base="http://127.0.0.1:10")
    advance(clock, 20)
    first = [call.seq for call in forwarder.calls if call.base == UPSTREAM]
    second = [call.seq for call in forwarder.calls if call.base == "http://127.0.0.1:10"]
    assert first == list(range(20))
    assert second == list(range(5))
    assert forwarder.max_in_flight <= 2  # one per upstream


def test_concurrency_is_bounded_per_upstream(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder(answer=lambda call: None)
    store, spool = make_spool(tmp_path, clock, forwarder, max_concurrency=3, circuit_failures=100)
    spool.start()
    fill(spool, store, clock, 10, settle_status="none")
    advance(clock, 10)
    assert len(forwarder.calls) == 3
    assert forwarder.max_in_flight == 3
    for call in list(forwarder.calls):
        forwarder.reply(call, 202)
    clock.advance(0)
    assert len(forwarder.calls) == 6
    assert forwarder.max_in_flight == 3


def test_drain_rate_limits_replays(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    rate = 5.0
    store, spool = make_spool(tmp_path, clock, forwarder, drain_rate=rate, max_concurrency=2, live_grace=0.0)
    spool.start()
    fill(spool, store, clock, 100)
    advance(clock, 4.0, step=0.01)
    # A burst of max_concurrency tokens, then rate per second.
    assert len(forwarder.calls) <= 2 + rate * 4.0 + 1
    assert len(forwarder.calls) >= rate * 4.0 - 1


def test_backoff_and_circuit_stop_sending_while_the_upstream_is_down(tmp_path):
    clock = make_clock()
    state = {"up": False}
    forwarder = ScriptedForwarder(answer=lambda call: 202 if state["up"] else unreachable())
    store, spool = make_spool(tmp_path, clock, forwarder, circuit_failures=3, backoff_base=1.0, backoff_cap=8.0,
                              max_concurrency=1)
    spool.start()
    fill(spool, store, clock, 10, settle_status="none")  # one live failure
    advance(clock, 60.0)
    # rng gives the full ceiling: delays 2, 4, 8, 8, ... after the live
    # failure (1 s) -> sends near t=1, 3, 7, 15, 23, 31, 39, 47, 55.
    sends = len(forwarder.calls)
    assert 7 <= sends <= 10
    assert spool.status()["upstreams"][UPSTREAM]["circuit"] in (OPEN, HALF_OPEN)
    # Each send while open was a single probe of the oldest entry.
    assert {call.seq for call in forwarder.calls} == {0}
    state["up"] = True
    advance(clock, 20.0)
    clock.advance(0)
    assert count(store, SPOOL_DB) == 0
    assert spool.status()["upstreams"][UPSTREAM]["circuit"] == CLOSED
    delivered = [call.seq for call in forwarder.calls[sends:]]
    assert delivered == list(range(10))


def test_retry_after_is_honoured(tmp_path):
    clock = make_clock()
    answers = iter([429])
    forwarder = ScriptedForwarder()

    def answer(call):
        status = next(answers, 202)
        if status == 429:
            forwarder.reply(call, 429, {b"retry-after": [b"12"]})
            return None
        return status

    forwarder.answer = answer
    store, spool = make_spool(tmp_path, clock, forwarder, backoff_base=0.1, backoff_cap=0.1, max_concurrency=1)
    spool.start()
    fill(spool, store, clock, 2, settle_status="none")
    advance(clock, 1.0)
    assert len(forwarder.calls) == 1
    first = clock.seconds()
    advance(clock, 10.5)
    assert len(forwarder.calls) == 1  # still within Retry-After
    advance(clock, 2.0)
    assert [call.seq for call in forwarder.calls] == [0, 0, 1]
    assert first > 0


def test_permanent_failures_become_dead_letters_without_credentials(tmp_path):
    clock = make_clock()
    forwarder = ScriptedForwarder(answer=lambda call: {0: 400, 1: 403, 2: 413}.get(call.seq, 202))
    store, spool = make_spool(tmp_path, clock, forwarder)
    spool.start()
    fill(spool, store, clock, 4, settle_status="none")
    advance(clock, 10)
    assert count(store, SPOOL_DB) == 0
    assert count(store, BODY_DB) == 0
    assert count(store, DEAD_DB) == 3
    assert count(store, DEAD_BODY_DB) == 3
    with store.env.begin() as txn:
        dead = [decode_entry(v) for _, v in txn.cursor(db=store.database(DEAD_DB))]
    assert sorted(meta.status for meta, _ in dead) == [400, 403, 413]
    for meta, sealed in dead:
        assert sealed == b""  # credentials deleted
        names = {name.lower() for name, _ in meta.headers}
        assert "dd-api-key" not in names
        assert "x-seq" in names
        assert meta.reason.startswith("upstream answered")
    assert spool.status()["dead_letters"] == 3


def test_too_many_attempts_and_too_old(tmp_path):
    clock = make_clock()
    forwarder = ScriptedForwarder(answer=lambda call: 500)
    store, spool = make_spool(tmp_path, clock, forwarder, max_attempts=3, circuit_failures=100,
                              backoff_base=0.1, backoff_cap=0.1, max_concurrency=1)
    spool.start()
    fill(spool, store, clock, 2, settle_status=500)
    advance(clock, 5)
    # Each entry: the live attempt plus two replays.
    assert [call.seq for call in forwarder.calls] == [0, 0, 1, 1]
    assert count(store, DEAD_DB) == 2
    assert count(store, SPOOL_DB) == 0

    clock2 = make_clock()
    forwarder2 = ScriptedForwarder(answer=lambda call: 500)
    store2, spool2 = make_spool(tmp_path / "b", clock2, forwarder2, max_age=60.0, circuit_failures=100,
                                backoff_base=30.0, backoff_cap=30.0, max_concurrency=1)
    spool2.start()
    fill(spool2, store2, clock2, 1, settle_status=500)
    advance(clock2, 120, step=0.5)
    # Sent at about t=30 and t=60+; the attempt due after 60 s is not made.
    assert 1 <= len(forwarder2.calls) <= 2
    assert count(store2, DEAD_DB) == 1
    with store2.env.begin() as txn:
        meta, _ = decode_entry(txn.get(next(iter(txn.cursor(db=store2.database(DEAD_DB))))[0], db=store2.database(DEAD_DB)))
    assert "max_age" in meta.reason


def test_reject_when_full(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder, max_entries=5, when_full="reject")
    spool.start()
    fill(spool, store, clock, 4)
    assert not spool.is_full()
    fill(spool, store, clock, 1)
    # The size is read again only once the check interval has passed.
    clock.advance(2 * USAGE_CHECK_INTERVAL)
    assert spool.is_full()


def test_drop_oldest_when_full(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder(answer=lambda call: None)
    store, spool = make_spool(tmp_path, clock, forwarder, max_entries=5, when_full="drop_oldest")
    spool.start()
    ids = fill(spool, store, clock, 5)
    for number in range(5, 8):
        accept(spool, store, number)
        clock.advance(0)
    assert not spool.is_full()
    assert spool.counters.dropped_oldest == 3
    with store.env.begin() as txn:
        left = [key for key, _ in txn.cursor(db=store.database(SPOOL_DB))]
    assert ids[:3] == sorted(set(ids[:3]) - set(left))
    assert len(left) == 5


def test_restart_resumes_pending_entries_at_once(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    keybox = KeyBox.generate()
    store, spool = make_spool(tmp_path, clock, forwarder, keybox=keybox, live_grace=600.0)
    spool.start()
    fill(spool, store, clock, 7)  # all live, none settled: the process dies now
    spool.stop()
    store.close()
    clock.advance(0)

    forwarder2 = ScriptedForwarder()
    store2, spool2 = make_spool(tmp_path, clock, forwarder2, store=open_store(tmp_path / "store", clock),
                                keybox=keybox, live_grace=600.0)
    spool2.start()
    advance(clock, 1.0)
    assert [call.seq for call in forwarder2.calls] == list(range(7))
    assert count(store2, SPOOL_DB) == 0


def test_draining_reads_bounded_batches(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder, batch_size=50, max_concurrency=8, circuit_failures=5000)
    spool.start()
    total = 1000
    fill(spool, store, clock, total, settle_status="none")
    advance(clock, 30)
    assert count(store, SPOOL_DB) == 0
    assert len({call.seq for call in forwarder.calls}) == total
    assert spool.counters.largest_batch <= 50
    assert spool.counters.batches_read >= total // 50


def test_stop_waits_for_replays_then_cancels(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder(answer=lambda call: None)
    store, spool = make_spool(tmp_path, clock, forwarder, stop_timeout=5.0, max_concurrency=2, circuit_failures=100)
    spool.start()
    fill(spool, store, clock, 3, settle_status="none")
    advance(clock, 10)
    assert len(forwarder.calls) == 2
    stopped = []
    spool.stop().addCallback(stopped.append)
    forwarder.reply(forwarder.calls[0], 202)
    assert stopped == []
    clock.advance(5.0)
    assert stopped == [None]
    clock.advance(0)
    assert count(store, SPOOL_DB) == 2  # one delivered, the cancelled one and the unsent one stay


def test_status_and_metrics(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder(answer=lambda call: unreachable())
    store, spool = make_spool(tmp_path, clock, forwarder, circuit_failures=1)
    spool.start()
    fill(spool, store, clock, 3, settle_status="none")
    clock.advance(10)
    status = spool.status()
    assert status["depth"] == 3
    assert status["bytes"] > 0
    assert status["oldest_age"] == pytest.approx(10.0, abs=0.5)
    registry = CollectorRegistry()
    registry.register(spool.metrics_collector())
    text = generate_latest(registry).decode()
    assert "reductrai_spool_entries 3.0" in text
    assert 'reductrai_spool_circuit{state="open",upstream="http://127.0.0.1:9"} 1.0' in text
    assert "reductrai_spool_delivered_total 0.0" in text


def test_options_from_the_settings_table():
    from reductrai.spool import SPOOL_FIELDS

    settings = {field.key: field.default for field in SPOOL_FIELDS}
    settings["upstream.timeout"] = 30.0
    options = SpoolOptions.from_settings(settings)
    by_key = {field.key: field.default for field in SPOOL_FIELDS}
    assert options.max_bytes == by_key["spool.max_bytes"]
    assert options.when_full == by_key["spool.when_full"]
    assert options.max_attempts == by_key["spool.max_attempts"]
    assert options.max_concurrency == by_key["spool.max_concurrency"]
    # A live grace of 0 follows the upstream timeout.
    assert by_key["spool.live_grace"] == 0
    assert options.live_grace == 30.0 + 10.0
    assert {"spool.on_upstream_failure", "spool.key"} <= set(by_key)
    with pytest.raises(ValueError):
        SpoolOptions(when_full="block")


def test_spool_references_counts_entries_older_than_the_cut(tmp_path):
    clock, forwarder = make_clock(), ScriptedForwarder()
    store, spool = make_spool(tmp_path, clock, forwarder)
    spool.start()
    fill(spool, store, clock, 4)
    clock.advance(10)
    fill(spool, store, clock, 3, base="http://127.0.0.1:10")
    from reductrai.record import make_key

    cut = make_key(int((START + 5) * 1e9), 0)
    later = make_key(int((START + 20) * 1e9), 0)
    with store.env.begin() as txn:
        assert spool.spool_references(txn, [cut]) == 4
        assert spool.spool_references(txn, [later]) == 7
        assert spool.spool_references(txn, []) == 0
