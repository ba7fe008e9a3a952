"""Exactly-once Redis effects per event: :class:`RedisOnce`, the Python port of
sdk/src/exactly_once.rs. It sends the SAME Lua script (``_once_script.SCRIPT``, a byte-for-byte
copy checked by the tests) with the same KEYS/ARGV layout, so Python and Rust plugins share
the bookkeeping rules: per-partition offset marks in ``{scope}marks`` for live events, bitmaps
``{scope}backfilled:{id // 65536}`` for backfilled ones, and bitmaps ``{scope}live:{id // 65536}``
of the event ids the live stream applied, kept ``live_ttl_seconds`` (24 h) after their last
write, so a producer's re-send at a new offset is skipped (``RESENT``; 1 bit per event id over
the window, about 21 MB a day at 2,000 events/s) (docs/plugin-authoring.md).

    once = RedisOnce("myplugin:once:")
    for e in batch.events:
        once.event(e).cmd("HINCRBY", key, field, 1)
    once.then().cmd("EXPIRE", key, 3600)   # optional: ordinary commands, same round trip
    applied = once.apply(host)            # one EVAL, atomic; applied.replies: the then replies
"""

from ._once_script import SCRIPT
from .host import CapabilityError, Commands, Failed, NotGranted, Status, send_commands

DEFAULT_BACKFILL_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_LIVE_TTL_SECONDS = 24 * 3600
IDS_PER_BITMAP = 1 << 16
SCRIPT_COMMANDS = ("HGET", "HSET", "GETBIT", "SETBIT", "EXPIRE", "EXISTS")
MIN_LIVE_FIELD = "min_live_event_id"

APPLIED = "a"
REPLAYED = "r"
APPLIED_BY_BACKFILL = "b"
COVERED_BY_LIVE = "l"
LEGACY_MARKER = "m"
# A live event above its mark whose event id was applied before at another offset: a re-send.
RESENT = "d"
OUTCOMES = (APPLIED, REPLAYED, APPLIED_BY_BACKFILL, COVERED_BY_LIVE, LEGACY_MARKER, RESENT)


def key_mask(cmd):
    """Which arguments of a command (list of bytes) are keys, as the host's grant check reads
    them (sdk/src/exactly_once.rs ``key_mask``)."""
    if not cmd:
        raise NotGranted("an empty command")
    name = cmd[0].decode("utf-8", "replace").upper()
    n = len(cmd)
    mask = [False] * n
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "MULTI", "EXEC"):
        raise NotGranted("%s cannot run inside the exactly-once script" % name)
    if name in ("PING", "TIME", "ECHO"):
        pass
    elif name in ("DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "PFCOUNT"):
        mask[1:] = [True] * (n - 1)
    elif name in ("MSET", "MSETNX"):
        for i in range(1, n, 2):
            mask[i] = True
    elif name in ("ZUNIONSTORE", "ZINTERSTORE"):
        try:
            keys = int(cmd[2])
        except (IndexError, ValueError):
            raise NotGranted("%s: argument 2 must be numkeys" % name) from None
        if n > 1:
            mask[1] = True
        for i in range(3, min(n, 3 + keys)):
            mask[i] = True
    elif n > 1:
        mask[1] = True
    return mask


class Applied:
    """One (event_id, outcome letter) per event, in the order they were added, and the replies
    to the :meth:`RedisOnce.then` commands."""

    def __init__(self, events, replies=()):
        self.events = events
        self.replies = list(replies)

    def applied(self):
        return sum(1 for _, o in self.events if o == APPLIED)

    def skipped(self):
        return len(self.events) - self.applied()

    def is_applied(self, index):
        return index < len(self.events) and self.events[index][1] == APPLIED


class RedisOnce:
    def __init__(self, scope, backfill_ttl_seconds=DEFAULT_BACKFILL_TTL_SECONDS,
                 legacy_marker_prefix=None, live_ttl_seconds=DEFAULT_LIVE_TTL_SECONDS):
        self.scope = scope
        self.backfill_ttl_seconds = max(1, int(backfill_ttl_seconds))
        self.live_ttl_seconds = max(1, int(live_ttl_seconds))
        self.legacy_marker_prefix = legacy_marker_prefix
        self.events = []  # (event_id, position or None, Commands)
        self._then = Commands()

    def __len__(self):
        return len(self.events)

    def event(self, e):
        """Adds an event (an :class:`Event` view); returns its :class:`Commands` to fill:
        ``once.event(e).cmd("HINCRBY", key, field, 1)`` (any number of commands, none too)."""
        return self.event_at(e.event_id, e.position())

    def event_at(self, event_id, position):
        """:meth:`event` from an id and ``position``: (topic, partition, offset) or None
        (backfilled)."""
        cmds = Commands()
        self.events.append((event_id, None if position is None else tuple(position), cmds))
        return cmds

    def then(self):
        """Ordinary commands sent after the script in the same round trip (idempotent ones that
        need no bookkeeping); their replies are :attr:`Applied.replies`."""
        return self._then

    def marks_key(self):
        return self.scope + "marks"

    def bitmap_key(self, event_id):
        return "%sbackfilled:%d" % (self.scope, event_id // IDS_PER_BITMAP)

    def live_bitmap_key(self, event_id):
        return "%slive:%d" % (self.scope, event_id // IDS_PER_BITMAP)

    def eval_command(self):
        keys, at = [], {}

        def index(raw):
            i = at.get(raw)
            if i is None:
                keys.append(raw)
                i = at[raw] = len(keys)
            return i

        index(self.marks_key().encode())
        argv = [str(self.backfill_ttl_seconds).encode(), str(self.live_ttl_seconds).encode(),
                str(len(self.events)).encode()]
        for event_id, pos, cmds in self.events:
            argv.append(str(event_id).encode())
            if pos is None:
                argv += [b"", b""]
            else:
                argv += [("%s/%d" % (pos[0], pos[1])).encode(), str(pos[2]).encode()]
            argv.append(str(index(self.bitmap_key(event_id).encode())).encode())
            argv.append(str(event_id % IDS_PER_BITMAP).encode())
            # Backfilled events never touch the live bitmap: no key for them.
            live = 0 if pos is None else index(self.live_bitmap_key(event_id).encode())
            argv.append(str(live).encode())
            legacy = 0
            if self.legacy_marker_prefix is not None:
                legacy = index(("%s%d" % (self.legacy_marker_prefix, event_id)).encode())
            argv.append(str(legacy).encode())
            argv.append(str(len(cmds)).encode())
            for c in cmds.commands:
                mask = key_mask(c)
                argv.append(str(len(c)).encode())
                argv.append(b"".join(b"k" if k else b"v" for k in mask))
                for a, k in zip(c, mask):
                    argv.append(str(index(a)).encode() if k else a)
        return [b"EVAL", SCRIPT.encode(), str(len(keys)).encode()] + keys + argv

    def parse_reply(self, reply):
        if isinstance(reply, bytes):
            codes = reply.decode("ascii", "replace")
        elif isinstance(reply, str):
            codes = str(reply)
        elif reply is None and not self.events:
            codes = ""
        else:
            raise Failed("exactly-once script answered %r" % (reply,))
        if len(codes) != len(self.events):
            raise Failed("exactly-once script answered %d outcomes for %d events"
                         % (len(codes), len(self.events)))
        out = []
        for c, (event_id, _, _) in zip(codes, self.events):
            if c not in OUTCOMES:
                raise Failed("exactly-once script: outcome %r" % c)
            out.append((event_id, c))
        return Applied(out)

    def apply(self, host):
        """Applies the events' commands exactly once (one EVAL), then the :meth:`then`
        commands, in one round trip. Returns :class:`Applied`; raises
        :class:`CapabilityError`."""
        commands = [self.eval_command()] if self.events else []
        commands += self._then.commands
        replies = send_commands(host, commands, False)
        if not self.events:
            return Applied([], replies)
        return Applied(self.parse_reply(replies[0]).events, replies[1:])


__all__ = ["RedisOnce", "Applied", "key_mask", "SCRIPT", "SCRIPT_COMMANDS", "CapabilityError",
           "Status"]
