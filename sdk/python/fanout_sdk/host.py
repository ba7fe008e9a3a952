"""The host's capabilities (Redis, HTTP, ClickHouse, logs, metrics) behind one interface.

:class:`WasmHost` calls the real host through the component's imports (componentize-py's
generated ``wit_world`` bindings, imported only when a call is made, so everything else in
the SDK runs under plain CPython). :class:`MockHost` records calls for unit tests.

Redis, one way: ``host.redis().cmd("INCR", key).cmd("EXPIRE", key, 60).send()`` (one round
trip, one reply per command; a single command is a pipeline of one). Arguments may be ``str``,
``bytes``, ``int`` or ``float``. Replies: nil -> ``None``, integer -> ``int``, data -> ``bytes``,
status -> :class:`Status` (a ``str``), array -> ``list``.

Metrics appear on the host's /metrics as ``fanout_plugin_counter_total{plugin,name}`` and
``fanout_plugin_gauge{plugin,name}``; names are ``[a-z_][a-z0-9_]*``, at most 64 bytes and 100
per plugin (:func:`valid_metric_name`): the host drops others, :class:`MockHost` raises.
"""

import json
import re


class CapabilityError(Exception):
    """A capability call failed: :class:`NotGranted` (nothing was sent) or :class:`Failed`."""

    kind = "failed"

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason

    def describe(self):
        return "%s: %s" % (self.kind, self.reason)


class NotGranted(CapabilityError):
    kind = "not granted"


class Failed(CapabilityError):
    kind = "failed"


class Status(str):
    """A Redis status reply (``OK``)."""


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self):
        return json.loads(self.body)


def arg_bytes(a):
    if isinstance(a, bytes):
        return a
    if isinstance(a, (bytearray, memoryview)):
        return bytes(a)
    if isinstance(a, bool):
        raise TypeError("a Redis argument cannot be a bool")
    if isinstance(a, (int, float)):
        return repr(a).encode() if isinstance(a, float) else str(a).encode()
    return str(a).encode("utf-8")


class Commands:
    """Redis commands under construction, each a list of bytes as the host takes it:
    ``cmds.cmd("HINCRBY", key, field, 1)``. Used by :class:`Pipeline` and by
    :meth:`fanout_sdk.RedisOnce.event`."""

    def __init__(self):
        self.commands = []

    def cmd(self, name, *args):
        """Adds command ``name`` with its arguments; returns ``self`` for chaining."""
        self.commands.append([arg_bytes(name)] + [arg_bytes(a) for a in args])
        return self

    def __len__(self):
        return len(self.commands)


class Pipeline(Commands):
    """Commands for one round trip to Redis: ``host.redis()``, then ``cmd(...)``, then
    :meth:`send`."""

    def __init__(self, host):
        super().__init__()
        self.host = host
        self.is_atomic = False

    def atomic(self):
        """Runs the commands inside ``MULTI``/``EXEC``."""
        self.is_atomic = True
        return self

    def send(self):
        """Sends the commands in one round trip and empties the pipeline: one reply per
        command, in order (nothing is sent for no command). Raises :class:`CapabilityError`."""
        commands, self.commands = self.commands, []
        return send_commands(self.host, commands, self.is_atomic)


def send_commands(host, commands, atomic=False):
    """``host.redis_pipeline`` with the reply count checked."""
    if not commands:
        return []
    replies = host.redis_pipeline(commands, atomic)
    if len(replies) != len(commands):
        raise Failed("redis: %d replies for %d commands" % (len(replies), len(commands)))
    return replies


METRIC_NAME_MAX_LEN = 64
METRIC_NAMES_MAX = 100
_METRIC_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")


def valid_metric_name(name):
    """Whether the host records a metric of this name: ``[a-z_][a-z0-9_]*``, at most 64 bytes
    (the host's ``valid_metric_name``, host/src/metrics.rs)."""
    return (isinstance(name, str) and len(name.encode()) <= METRIC_NAME_MAX_LEN
            and _METRIC_NAME.match(name) is not None)


class Host:
    """What a sink can call; ``init`` and ``write`` receive it. Subclasses implement the
    primitives (``redis_pipeline`` is the transport under :meth:`redis`)."""

    def redis(self):
        """A :class:`Pipeline`: ``host.redis().cmd("SET", key, value).send()``."""
        return Pipeline(self)

    def redis_pipeline(self, commands, atomic=False):
        """The transport under :meth:`redis`: ``commands`` are lists of bytes. Implement it;
        call :meth:`redis`."""
        raise NotImplementedError

    def http_send(self, method, url, headers=(), body=b"", timeout_ms=10_000):
        raise NotImplementedError

    def http_send_all(self, requests, max_in_flight=16):
        """``requests``: (method, url, headers, body, timeout_ms) tuples. One result per
        request, in order: a :class:`Response` or a :class:`CapabilityError` instance."""
        raise NotImplementedError

    def clickhouse_execute(self, sql):
        raise NotImplementedError

    def clickhouse_insert_json_rows(self, database, table, rows):
        raise NotImplementedError

    def log(self, level, message):
        raise NotImplementedError

    def counter_add(self, name, value=1):
        raise NotImplementedError

    def gauge_set(self, name, value):
        raise NotImplementedError

    # Conveniences over the primitives.
    def post_json(self, url, body, headers=(), timeout_ms=10_000):
        text = body if isinstance(body, (bytes, str)) else json.dumps(body, separators=(",", ":"))
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self.http_send("POST", url, [("content-type", "application/json")] + list(headers),
                              text, timeout_ms)

    def trace(self, message):
        self.log("trace", message)

    def debug(self, message):
        self.log("debug", message)

    def info(self, message):
        self.log("info", message)

    def warn(self, message):
        self.log("warn", message)

    def error(self, message):
        self.log("error", message)


def _capability_error(err):
    """Our exception for a componentize-py ``Err(CapabilityError_*)``."""
    from wit_world.imports import errors

    value = getattr(err, "value", err)
    if isinstance(value, errors.CapabilityError_NotGranted):
        return NotGranted(value.value)
    if isinstance(value, errors.CapabilityError_Failed):
        return Failed(value.value)
    return Failed(str(value))


def _reply(r):
    from wit_world.imports import redis as r_

    if isinstance(r, (r_.Reply_Nil, r_.Scalar_Nil)):
        return None
    if isinstance(r, (r_.Reply_Status, r_.Scalar_Status)):
        return Status(r.value)
    if isinstance(r, r_.Reply_Array):
        return [_reply(s) for s in r.value]
    return r.value  # integer or data


class WasmHost(Host):
    """The real host, through the component's imports."""

    def redis_pipeline(self, commands, atomic=False):
        from componentize_py_types import Err
        from wit_world.imports import redis

        cmds = [[arg_bytes(a) for a in c] for c in commands]
        try:
            return [_reply(r) for r in redis.pipeline(cmds, atomic)]
        except Err as e:
            raise _capability_error(e) from None

    def _request(self, method, url, headers, body, timeout_ms):
        from wit_world.imports import http

        if isinstance(body, str):
            body = body.encode("utf-8")
        return http.Request(method, url, list(headers), bytes(body), int(timeout_ms))

    def http_send(self, method, url, headers=(), body=b"", timeout_ms=10_000):
        from componentize_py_types import Err
        from wit_world.imports import http

        try:
            r = http.send(self._request(method, url, headers, body, timeout_ms))
        except Err as e:
            raise _capability_error(e) from None
        return Response(r.status, r.headers, r.body)

    def http_send_all(self, requests, max_in_flight=16):
        from componentize_py_types import Ok
        from wit_world.imports import http

        out = []
        for res in http.send_all([self._request(*q) for q in requests], max_in_flight):
            if isinstance(res, Ok):
                out.append(Response(res.value.status, res.value.headers, res.value.body))
            else:
                out.append(_capability_error(res))
        return out

    def clickhouse_execute(self, sql):
        from componentize_py_types import Err
        from wit_world.imports import clickhouse

        try:
            return clickhouse.execute(sql)
        except Err as e:
            raise _capability_error(e) from None

    def clickhouse_insert_json_rows(self, database, table, rows):
        from componentize_py_types import Err
        from wit_world.imports import clickhouse

        try:
            clickhouse.insert_json_rows(database, table, list(rows))
        except Err as e:
            raise _capability_error(e) from None

    def log(self, level, message):
        from wit_world.imports import log

        log.log(getattr(log.Level, level.upper()), str(message))

    def counter_add(self, name, value=1):
        from wit_world.imports import metrics

        metrics.counter_add(name, int(value))

    def gauge_set(self, name, value):
        from wit_world.imports import metrics

        metrics.gauge_set(name, float(value))


class MockHost(Host):
    """Records every call; Redis is answered by ``redis_handler(commands, atomic)`` when given
    (e.g. a real Redis in tests), else with ``None`` per command. Metric names the host would
    drop raise ``ValueError``."""

    def __init__(self, redis_handler=None):
        self.redis_handler = redis_handler
        self.redis_calls = []
        self.http_requests = []
        self.http_answers = []
        self.clickhouse_rows = []
        self.logs = []
        self.counters = {}
        self.gauges = {}

    def redis_pipeline(self, commands, atomic=False):
        cmds = [[arg_bytes(a) for a in c] for c in commands]
        self.redis_calls.append((cmds, atomic))
        if self.redis_handler is None:
            return [None] * len(cmds)
        return self.redis_handler(cmds, atomic)

    def http_send(self, method, url, headers=(), body=b"", timeout_ms=10_000):
        self.http_requests.append((method, url, list(headers), body, timeout_ms))
        if self.http_answers:
            a = self.http_answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a
        return Response(200, [], b"")

    def http_send_all(self, requests, max_in_flight=16):
        out = []
        for q in requests:
            try:
                out.append(self.http_send(*q))
            except CapabilityError as e:
                out.append(e)
        return out

    def clickhouse_execute(self, sql):
        return ""

    def clickhouse_insert_json_rows(self, database, table, rows):
        self.clickhouse_rows.append((database, table, list(rows)))

    def log(self, level, message):
        self.logs.append((level, message))

    def _check_metric(self, name):
        # The host drops these (the series never appears): fail the test instead.
        if not valid_metric_name(name):
            raise ValueError("metric name %r would be refused by the host: names are "
                             "[a-z_][a-z0-9_]*, at most %d bytes" % (name, METRIC_NAME_MAX_LEN))
        if name not in self.counters and name not in self.gauges and \
                len(self.counters) + len(self.gauges) >= METRIC_NAMES_MAX:
            raise ValueError("metric %r would be refused by the host: at most %d names per plugin"
                             % (name, METRIC_NAMES_MAX))

    def counter_add(self, name, value=1):
        self._check_metric(name)
        self.counters[name] = self.counters.get(name, 0) + value

    def gauge_set(self, name, value):
        self._check_metric(name)
        self.gauges[name] = value
