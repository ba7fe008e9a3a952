"""The packed batch encoding, version 1 (magic ``FPB1``), read in place.

Byte for byte as docs/wit.md ("Packed batches") and sdk/src/packed.rs describe it:

- header, 16 bytes: magic ``FPB1``, event count (u32), row size (u32, 88 in version 1),
  string count (u32);
- ``count`` rows of ``row size`` bytes (a reader steps by the row size it is given);
- the string index: ``string count`` pairs (offset u32, length u32) into the string bytes;
- the string bytes, UTF-8.

A row is ``ROW = struct.Struct("<qqqqddqiiiIIIII")``: event_id, content_id, user_id,
event_ts_micros, engagement_seconds, engagement_pct, Kafka offset, Kafka partition,
duration_ms, length_seconds, event_type, device, content_type, Kafka topic (string indices,
``0xFFFFFFFF`` = none), flags.

:class:`PackedEvents` validates a buffer once (header, sizes, string table, every string index)
and decodes a row only when an :class:`Event` view is read (lazily, once per event).
"""

import struct

MAGIC = b"FPB1"
HEADER = struct.Struct("<4sIII")
HEADER_BYTES = 16
ROW = struct.Struct("<qqqqddqiiiIIIII")
ROW_BYTES = 88
NO_STRING = 0xFFFFFFFF
_INDEX = struct.Struct("<II")

F_CONTENT_ID = 1
F_USER_ID = 1 << 1
F_DURATION_MS = 1 << 2
F_LENGTH_SECONDS = 1 << 3
F_ENGAGEMENT_SECONDS = 1 << 4
F_ENGAGEMENT_PCT = 1 << 5
F_POSITION = 1 << 6

assert ROW.size == ROW_BYTES


class PackedError(ValueError):
    """The buffer is not a valid packed batch (a host bug, never the data's fault)."""

    def __init__(self, message):
        super().__init__("invalid packed batch: " + message)


class Position(tuple):
    """Where an event sits in Kafka: (topic, partition, offset)."""

    __slots__ = ()

    def __new__(cls, topic, partition, offset):
        return tuple.__new__(cls, (topic, partition, offset))

    topic = property(lambda self: self[0])
    partition = property(lambda self: self[1])
    offset = property(lambda self: self[2])

    def field(self):
        """The field of the exactly-once marks hash: ``{topic}/{partition}``."""
        return "%s/%d" % (self[0], self[1])

    def __repr__(self):
        return "Position(topic=%r, partition=%d, offset=%d)" % tuple(self)


class Event:
    """A view of one event of a packed batch; the row is decoded on first access."""

    __slots__ = ("_events", "_at", "_row")

    def __init__(self, events, at):
        self._events = events
        self._at = at
        self._row = None

    def _r(self):
        r = self._row
        if r is None:
            r = self._row = ROW.unpack_from(self._events._buf, self._at)
        return r

    def _opt(self, i, bit):
        r = self._r()
        return r[i] if r[14] & bit else None

    @property
    def event_id(self):
        return self._r()[0]

    @property
    def content_id(self):
        return self._opt(1, F_CONTENT_ID)

    @property
    def user_id(self):
        return self._opt(2, F_USER_ID)

    @property
    def event_ts_micros(self):
        return self._r()[3]

    @property
    def engagement_seconds(self):
        return self._opt(4, F_ENGAGEMENT_SECONDS)

    @property
    def engagement_pct(self):
        return self._opt(5, F_ENGAGEMENT_PCT)

    @property
    def duration_ms(self):
        return self._opt(8, F_DURATION_MS)

    @property
    def length_seconds(self):
        return self._opt(9, F_LENGTH_SECONDS)

    @property
    def event_type(self):
        return self._events._string(self._r()[10])

    @property
    def device(self):
        return self._events._string(self._r()[11])

    @property
    def content_type(self):
        return self._events._string(self._r()[12])

    def position(self):
        """The event's Kafka :class:`Position`, or None (a backfilled event)."""
        r = self._r()
        if not r[14] & F_POSITION:
            return None
        return Position(self._events._strings[r[13]], r[7], r[6])

    def fields(self):
        """All fields as a dict (tests, debugging)."""
        return {
            "event_id": self.event_id,
            "content_id": self.content_id,
            "user_id": self.user_id,
            "event_type": self.event_type,
            "event_ts_micros": self.event_ts_micros,
            "duration_ms": self.duration_ms,
            "device": self.device,
            "content_type": self.content_type,
            "length_seconds": self.length_seconds,
            "engagement_seconds": self.engagement_seconds,
            "engagement_pct": self.engagement_pct,
            "position": self.position(),
        }

    def __repr__(self):
        return "Event(%r)" % (self.fields(),)


class PackedEvents:
    """A validated version-1 buffer. ``len()``, indexing and iteration yield :class:`Event`."""

    __slots__ = ("_buf", "_count", "_row_bytes", "_strings")

    def __init__(self, buf):
        buf = bytes(buf)
        if len(buf) < HEADER_BYTES:
            raise PackedError("shorter than its header")
        magic, count, row_bytes, string_count = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise PackedError("bad magic (not FPB1)")
        if row_bytes < ROW_BYTES:
            raise PackedError("rows shorter than version 1's")
        rows_end = HEADER_BYTES + count * row_bytes
        if rows_end > len(buf):
            raise PackedError("rows run past the end")
        text_start = rows_end + string_count * 8
        if text_start > len(buf):
            raise PackedError("string index runs past the end")
        strings = []
        for i in range(string_count):
            off, length = _INDEX.unpack_from(buf, rows_end + i * 8)
            start = text_start + off
            end = start + length
            if end > len(buf):
                raise PackedError("a string is out of bounds or not UTF-8")
            try:
                strings.append(buf[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise PackedError("a string is out of bounds or not UTF-8") from None
        idx = struct.Struct("<IIIII")
        for i in range(count):
            row = HEADER_BYTES + i * row_bytes
            a, b, c, topic, flags = idx.unpack_from(buf, row + 68)
            for s in (a, b, c, topic):
                if s != NO_STRING and s >= string_count:
                    raise PackedError("a row names a string that does not exist")
            if flags & F_POSITION and topic == NO_STRING:
                raise PackedError("a position without a topic")
        self._buf = buf
        self._count = count
        self._row_bytes = row_bytes
        self._strings = strings

    def __len__(self):
        return self._count

    def __getitem__(self, index):
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("event index out of range")
        return Event(self, HEADER_BYTES + index * self._row_bytes)

    def __iter__(self):
        step = self._row_bytes
        for i in range(self._count):
            yield Event(self, HEADER_BYTES + i * step)

    def as_bytes(self):
        return self._buf

    def _string(self, index):
        return None if index == NO_STRING else self._strings[index]


class PackedWriter:
    """Builds a version-1 buffer as sdk/src/packed.rs's PackedWriter does (for tests)."""

    def __init__(self):
        self._rows = bytearray()
        self._count = 0
        self._strings = []

    def _intern(self, s):
        if s is None:
            return NO_STRING
        try:
            return self._strings.index(s)
        except ValueError:
            self._strings.append(s)
            return len(self._strings) - 1

    def push(self, event_id, event_ts_micros=0, content_id=None, user_id=None,
             event_type=None, duration_ms=None, device=None, content_type=None,
             length_seconds=None, engagement_seconds=None, engagement_pct=None,
             position=None):
        flags = 0
        for value, bit in ((content_id, F_CONTENT_ID), (user_id, F_USER_ID),
                           (duration_ms, F_DURATION_MS), (length_seconds, F_LENGTH_SECONDS),
                           (engagement_seconds, F_ENGAGEMENT_SECONDS),
                           (engagement_pct, F_ENGAGEMENT_PCT), (position, F_POSITION)):
            if value is not None:
                flags |= bit
        et = self._intern(event_type)
        dev = self._intern(device)
        ct = self._intern(content_type)
        topic = self._intern(position[0] if position is not None else None)
        partition, offset = (position[1], position[2]) if position is not None else (0, 0)
        self._rows += ROW.pack(
            event_id, content_id or 0, user_id or 0, event_ts_micros,
            engagement_seconds or 0.0, engagement_pct or 0.0, offset, partition,
            duration_ms or 0, length_seconds or 0, et, dev, ct, topic, flags)
        self._count += 1
        return self

    def finish(self):
        encoded = [s.encode("utf-8") for s in self._strings]
        out = bytearray(HEADER.pack(MAGIC, self._count, ROW_BYTES, len(encoded)))
        out += self._rows
        at = 0
        for s in encoded:
            out += _INDEX.pack(at, len(s))
            at += len(s)
        for s in encoded:
            out += s
        return bytes(out)
