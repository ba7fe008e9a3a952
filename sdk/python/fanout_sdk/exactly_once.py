"""Exactly-once Redis effects per event: :class:`RedisOnce`, the Python port of
sdk/src/exactly_once.rs. It sends the SAME Lua script (``_once_script.SCRIPT``, a byte-for-byte
copy checked by the tests) with the same KEYS/ARGV layout, so Python and Rust plugins share
the bookkeeping rules: per-partition offset marks in ``{scope}marks`` for live events, bitmaps
``{scope}backfilled:{id // 65536}`` for backfilled ones (docs/plugin-authoring.md).

    once = RedisOnce("myplugin:once:")
    for e in batch.events:
        once.event(e, [command("HINCRBY", key, field, 1)])
    applied = once.apply(host)   # one EVAL, atomic
"""

from ._once_script import SCRIPT
from .host import CapabilityError, Failed, NotGranted, Status, arg_bytes

DEFAULT_BACKFILL_TTL_SECONDS = 7 * 24 * 3600
IDS_PER_BITMAP = 1 << 16
SCRIPT_COMMANDS = ("HGET", "HSET", "GETBIT", "SETBIT", "EXPIRE", "EXISTS")
MIN_LIVE_FIELD = "min_live_event_id"

APPLIED = "a"
REPLAYED = "r"
APPLIED_BY_BACKFILL = "b"
COVERED_BY_LIVE = "l"
LEGACY_MARKER = "m"
OUTCOMES = (APPLIED, REPLAYED, APPLIED_BY_BACKFILL, COVERED_BY_LIVE, LEGACY_MARKER)


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
    """One (event_id, outcome letter) per event, in the order they were added."""

    def __init__(self, events):
        self.events = events

    def applied(self):
        return sum(1 for _, o in self.events if o == APPLIED)

    def skipped(self):
        return len(self.events) - self.applied()

    def is_applied(self, index):
        return index < len(self.events) and self.events[index][1] == APPLIED


class RedisOnce:
    def __init__(self, scope, backfill_ttl_seconds=DEFAULT_BACKFILL_TTL_SECONDS,
                 legacy_marker_prefix=None):
        self.scope = scope
        self.backfill_ttl_seconds = max(1, int(backfill_ttl_seconds))
        self.legacy_marker_prefix = legacy_marker_prefix
        self.events = []  # (event_id, position or None, [command])

    def __len__(self):
        return len(self.events)

    def event(self, e, commands):
        """Adds an event (an :class:`Event` view) with the commands that apply it."""
        return self.event_at(e.event_id, e.position(), commands)

    def event_at(self, event_id, position, commands):
        """``position``: (topic, partition, offset) or None (backfilled)."""
        cmds = [[arg_bytes(a) for a in c] for c in commands]
        self.events.append((event_id, None if position is None else tuple(position), cmds))
        return self

    def marks_key(self):
        return self.scope + "marks"

    def bitmap_key(self, event_id):
        return "%sbackfilled:%d" % (self.scope, event_id // IDS_PER_BITMAP)

    def eval_command(self):
        keys, at = [], {}

        def index(raw):
            i = at.get(raw)
            if i is None:
                keys.append(raw)
                i = at[raw] = len(keys)
            return i

        index(self.marks_key().encode())
        argv = [str(self.backfill_ttl_seconds).encode(), str(len(self.events)).encode()]
        for event_id, pos, cmds in self.events:
            argv.append(str(event_id).encode())
            if pos is None:
                argv += [b"", b""]
            else:
                argv += [("%s/%d" % (pos[0], pos[1])).encode(), str(pos[2]).encode()]
            argv.append(str(index(self.bitmap_key(event_id).encode())).encode())
            argv.append(str(event_id % IDS_PER_BITMAP).encode())
            legacy = 0
            if self.legacy_marker_prefix is not None:
                legacy = index(("%s%d" % (self.legacy_marker_prefix, event_id)).encode())
            argv.append(str(legacy).encode())
            argv.append(str(len(cmds)).encode())
            for c in cmds:
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

    def apply(self, host, then=()):
        """Applies the events' commands exactly once (one EVAL), then ``then`` (ordinary
        commands) in the same pipeline. Returns :class:`Applied` (and with ``then``, the
        replies to it: ``(applied, replies)``)."""
        commands = [self.eval_command()] if self.events else []
        commands += list(then)
        if not commands:
            return (Applied([]), []) if then else Applied([])
        replies = host.redis_pipeline(commands, False)
        if len(replies) != len(commands):
            raise Failed("redis: %d replies for %d commands" % (len(replies), len(commands)))
        applied = self.parse_reply(replies[0]) if self.events else Applied([])
        rest = replies[1:] if self.events else replies
        return (applied, rest) if then else applied


__all__ = ["RedisOnce", "Applied", "key_mask", "SCRIPT", "SCRIPT_COMMANDS", "CapabilityError",
           "Status"]
