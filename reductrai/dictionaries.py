"""
Trained zstd dictionaries, one line of versions per stream.

A stream is a vendor and a route kind (C{"datadog/logs"}).  Small requests
of one stream share most of their bytes (field names, tag sets, host and
service names), which per-request zstd cannot see; a dictionary trained on
recent bodies of the stream gives each new record that shared context.

Dictionaries are stored in the C{dicts} database: key the 4-byte big-endian
dictionary id, value::

    stream length (2 bytes) | stream (UTF-8) | created_ns (8) | samples (4) | dictionary bytes

The C{meta} database maps C{b"dict-current:" + stream} to the id that new
records of the stream use.  Ids are never reused, so a record's
C{dictionary} header field always names the exact bytes it needs.  A stream
is retrained after L{DictionaryOptions.retrain_records} new records or
L{DictionaryOptions.retrain_bytes} new body bytes, so the dictionary follows
the traffic as it changes.

Records carry their header in the same zstd frame as their body
(L{reductrai.record}), so a training sample is the start of that frame
content: the header followed by the body (L{reductrai.record.record_sample}).
The header of a small request is then mostly dictionary matches.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from typing import Callable, Optional

import attrs
import lmdb
import zstandard
from twisted.internet import threads
from twisted.logger import Logger

from reductrai.record import record_sample

DICTS_DB = b"dicts"
META_DB = b"meta"
CURRENT_PREFIX = b"dict-current:"
NEXT_ID_KEY = b"dict-next-id"

_ID = struct.Struct(">I")
_VALUE = struct.Struct(">H")
_VALUE_TAIL = struct.Struct(">QI")


@attrs.frozen
class DictionaryOptions:
    """
    When and how dictionaries are trained.

    @ivar size: dictionary size in bytes.
    @ivar first_records: records a stream needs before its first training.
    @ivar retrain_records: new records after which a stream is retrained.
    @ivar retrain_bytes: new body bytes after which a stream is retrained.
    @ivar sample_records: how many recent bodies are kept as samples.
    @ivar sample_bytes: how many bytes of samples are kept at most.
    @ivar max_sample_size: bodies longer than this are cut for training.
    @ivar level: the zstd level records are compressed at with a dictionary.
    """

    size: int = 32 * 1024
    first_records: int = 64
    retrain_records: int = 5000
    # Large bodies gain little from a dictionary, so bytes alone retrain
    # rarely; small bodies reach retrain_records first.
    retrain_bytes: int = 1024 * 1024 * 1024
    sample_records: int = 2000
    sample_bytes: int = 8 * 1024 * 1024
    max_sample_size: int = 64 * 1024
    level: int = 3


@attrs.frozen
class Dictionary:
    """
    One stored dictionary.
    """

    id: int
    stream: str
    created_ns: int
    samples: int
    data: bytes


def encode_dictionary(dictionary: Dictionary) -> bytes:
    """
    Build the stored value of a dictionary.
    """
    stream = dictionary.stream.encode("utf-8")
    return b"".join(
        (_VALUE.pack(len(stream)), stream, _VALUE_TAIL.pack(dictionary.created_ns, dictionary.samples), dictionary.data)
    )


def decode_dictionary(key: bytes, value: bytes) -> Dictionary:
    """
    Read a stored dictionary.

    @raise ValueError: the value is malformed.
    """
    (length,) = _VALUE.unpack_from(value)
    stream = bytes(value[2 : 2 + length]).decode("utf-8")
    created_ns, samples = _VALUE_TAIL.unpack_from(value, 2 + length)
    return Dictionary(_ID.unpack(key)[0], stream, created_ns, samples, bytes(value[2 + length + _VALUE_TAIL.size :]))


def id_key(dictionary_id: int) -> bytes:
    return _ID.pack(dictionary_id)


def train(samples: list[bytes], size: int) -> bytes:
    """
    Train a dictionary of at most C{size} bytes on C{samples}.

    @raise zstandard.ZstdError: the samples are too few or too uniform.
    """
    return zstandard.train_dictionary(size, samples, level=3).as_bytes()


def dictionary_compressor(data: bytes, level: int) -> zstandard.ZstdCompressor:
    """
    Return a compressor for record frames with the dictionary C{data}.

    Every writer of dictionary-compressed records builds its compressor
    here, so that any thread writes the same frame.  The frame leaves out
    zstd's dictionary id: the record names the dictionary before its frame.
    """
    return zstandard.ZstdCompressor(
        level=level,
        dict_data=zstandard.ZstdCompressionDict(data),
        write_checksum=True,
        write_content_size=True,
        write_dict_id=False,
    )


def read_dictionaries(env: lmdb.Environment, txn: Optional[lmdb.Transaction] = None) -> list[Dictionary]:
    """
    Return every stored dictionary, oldest first.
    """
    try:
        db = env.open_db(DICTS_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        return []
    owned = txn is None
    txn = txn or env.begin()
    try:
        return [decode_dictionary(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    finally:
        if owned:
            txn.abort()


class DictionaryLookup:
    """
    Look up a dictionary's bytes by id in an environment, with a cache;
    safe to use from the thread that created it only.
    """

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._cache: dict[int, bytes] = {}
        self._db = None

    def __call__(self, dictionary_id: int) -> Optional[bytes]:
        found = self._cache.get(dictionary_id)
        if found is not None:
            return found
        if self._db is None:
            try:
                self._db = self._env.open_db(DICTS_DB, create=False)
            except lmdb.Error:
                return None
        with self._env.begin(db=self._db) as txn:
            value = txn.get(id_key(dictionary_id))
        if value is None:
            return None
        found = self._cache[dictionary_id] = decode_dictionary(id_key(dictionary_id), value).data
        return found


class DictionaryData(dict):
    """
    Dictionary bytes by id.  When an environment is attached, L{get} reads
    an id it does not hold from the C{dicts} database: a worker process
    that does not train learns the dictionaries worker 0 trained.
    """

    env: Optional[lmdb.Environment] = None

    def get(self, dictionary_id: int, default: Optional[bytes] = None) -> Optional[bytes]:
        found = super().get(dictionary_id)
        if found is not None or self.env is None:
            return found if found is not None else default
        try:
            db = self.env.open_db(DICTS_DB, create=False)
            with self.env.begin(db=db) as txn:
                value = txn.get(id_key(dictionary_id))
        except lmdb.Error:
            return default
        if value is None:
            return default
        found = self[dictionary_id] = decode_dictionary(id_key(dictionary_id), bytes(value)).data
        return found


@attrs.define
class _StreamState:
    samples: deque = attrs.field(factory=deque)
    sample_bytes: int = 0
    new_records: int = 0
    new_bytes: int = 0
    training: bool = False
    current: Optional[int] = None
    compressor: Optional[zstandard.ZstdCompressor] = None


class DictionaryManager:
    """
    Hold the current dictionary of each stream for the writer, collect
    samples and retrain in a thread.

    @ivar trainings: how many dictionaries were trained.
    @ivar trains: whether this manager collects samples and trains; only
        one process of a shared environment trains (worker 0), the others
        follow its dictionaries with L{refresh}.
    """

    trains: bool = True

    log = Logger()

    def __init__(
        self,
        options: DictionaryOptions,
        submit: Callable[[list], object],
        reactor=None,
        clock_ns: Callable[[], int] = None,
        run_in_thread: Optional[Callable] = None,
    ) -> None:
        """
        @param submit: commits operations with the store's group commit and
            returns a L{Deferred} (L{reductrai.store.RecordStore.submit}).
        @param run_in_thread: C{(function, *args) -> Deferred}; training
            runs through it (default: the reactor's thread pool).
        """
        import time

        self.options = options
        self._submit = submit
        self._reactor = reactor
        self._clock_ns = clock_ns or time.time_ns
        self._run = run_in_thread or (lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self._streams: dict[str, _StreamState] = {}
        self._next_id = 1
        self._random = random.Random(0)
        self.trainings = 0
        self.data: DictionaryData = DictionaryData()

    def load(self, env: lmdb.Environment) -> None:
        """
        Read the stored dictionaries and each stream's current one.
        """
        with env.begin(write=True) as txn:
            meta = env.open_db(META_DB, txn=txn)
            env.open_db(DICTS_DB, txn=txn)
            for dictionary in read_dictionaries(env, txn):
                self.data[dictionary.id] = dictionary.data
                self._next_id = max(self._next_id, dictionary.id + 1)
            cursor = txn.cursor(db=meta)
            if cursor.set_range(CURRENT_PREFIX):
                for key, value in cursor:
                    if not key.startswith(CURRENT_PREFIX):
                        break
                    stream = bytes(key[len(CURRENT_PREFIX) :]).decode("utf-8")
                    dictionary_id = _ID.unpack(value)[0]
                    if dictionary_id in self.data:
                        self._install(stream, dictionary_id)
            stored_next = txn.get(NEXT_ID_KEY, db=meta)
            if stored_next is not None:
                self._next_id = max(self._next_id, _ID.unpack(stored_next)[0])

    def refresh(self, env: lmdb.Environment) -> int:
        """
        Follow the dictionaries another process trains: read each stream's
        current id from C{meta} and install it when it changed, loading its
        bytes from C{dicts}.  Unknown ids met while decoding are loaded on
        demand by L{DictionaryData.get}.

        @return: how many streams changed their dictionary.
        """
        self.data.env = env
        changed = 0
        try:
            meta = env.open_db(META_DB, create=False)
        except lmdb.Error:
            return 0
        with env.begin(db=meta, buffers=False) as txn:
            cursor = txn.cursor()
            currents = []
            if cursor.set_range(CURRENT_PREFIX):
                for key, value in cursor:
                    if not key.startswith(CURRENT_PREFIX):
                        break
                    currents.append((key[len(CURRENT_PREFIX) :].decode("utf-8"), _ID.unpack(value)[0]))
        for stream, dictionary_id in currents:
            if self.current(stream) == dictionary_id or self.data.get(dictionary_id) is None:
                continue
            self._install(stream, dictionary_id)
            changed += 1
        return changed

    def _state(self, stream: str) -> _StreamState:
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _StreamState()
        return state

    def _install(self, stream: str, dictionary_id: int) -> None:
        state = self._state(stream)
        state.current = dictionary_id
        state.compressor = dictionary_compressor(self.data[dictionary_id], self.options.level)

    def compressor_for(self, stream: str) -> tuple[Optional[int], Optional[zstandard.ZstdCompressor]]:
        """
        Return the current dictionary id of C{stream} and a compressor
        using it, or C{(None, None)} when the stream has no dictionary yet.
        """
        state = self._streams.get(stream)
        if state is None or state.current is None:
            return None, None
        return state.current, state.compressor

    def current(self, stream: str) -> Optional[int]:
        state = self._streams.get(stream)
        return state.current if state else None

    def observe(self, stream: str, body: bytes, head: Optional[bytes] = None) -> None:
        """
        Keep a training sample of a record of C{stream} and start a
        training when the stream is due.

        @param body: the record's decoded body.
        @param head: the record's serialised header
            (L{reductrai.record.header_bytes}); the sample is then the
            start of the record's frame content, header first, as the
            record codec compresses it.  Without it the sample is the
            start of the body.
        """
        if not body or not self.trains:
            return
        options = self.options
        state = self._state(stream)
        if head is None:
            sample = body[: options.max_sample_size]
        else:
            sample = record_sample(head, body, options.max_sample_size)
        if len(state.samples) >= options.sample_records or state.sample_bytes + len(sample) > options.sample_bytes:
            # Replace a random kept sample so the set spans the whole period
            # since the last training, not only its end.
            if state.samples:
                index = self._random.randrange(len(state.samples))
                state.sample_bytes -= len(state.samples[index])
                state.samples[index] = sample
                state.sample_bytes += len(sample)
        else:
            state.samples.append(sample)
            state.sample_bytes += len(sample)
        state.new_records += 1
        state.new_bytes += len(body)
        if state.training:
            return
        due = (
            state.new_records >= options.first_records
            if state.current is None
            else state.new_records >= options.retrain_records or state.new_bytes >= options.retrain_bytes
        )
        if due:
            self.start_training(stream)

    def start_training(self, stream: str):
        """
        Train a new dictionary for C{stream} from its samples in a thread,
        then store it and make it current.

        @return: a L{Deferred} firing with the new id, or L{None} when
            training failed (too few or too uniform samples).
        """
        state = self._state(stream)
        state.training = True
        samples = list(state.samples)
        state.new_records = 0
        state.new_bytes = 0
        dictionary_id = self._next_id
        self._next_id += 1
        size = self.options.size

        def trained(data: bytes):
            dictionary = Dictionary(dictionary_id, stream, self._clock_ns(), len(samples), data)
            ops = [
                ("put", DICTS_DB, id_key(dictionary_id), encode_dictionary(dictionary)),
                ("put", META_DB, CURRENT_PREFIX + stream.encode("utf-8"), id_key(dictionary_id)),
                ("put", META_DB, NEXT_ID_KEY, id_key(self._next_id)),
            ]
            self.data[dictionary_id] = data

            def committed(_):
                self._install(stream, dictionary_id)
                self.trainings += 1
                self.log.info(
                    "Trained dictionary {id} for {stream} on {samples} samples ({size} bytes)",
                    id=dictionary_id, stream=stream, samples=len(samples), size=len(data),
                )
                return dictionary_id

            return self._submit(ops).addCallback(committed)

        def failed(failure):
            self.log.warn(
                "Training a dictionary for {stream} failed: {error}", stream=stream, error=str(failure.value)
            )
            return None

        def done(result):
            state.training = False
            return result

        d = self._run(train, samples, size)
        d.addCallback(trained)
        d.addErrback(failed)
        d.addBoth(done)
        return d
