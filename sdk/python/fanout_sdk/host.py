"""The host's capabilities (Redis, HTTP, ClickHouse, logs, metrics) behind one interface.

:class:`WasmHost` calls the real host through the component's imports (componentize-py's
generated ``wit_world`` bindings, imported only when a call is made, so everything else in
the SDK runs under plain CPython). :class:`MockHost` records calls for unit tests.

Redis replies: nil -> ``None``, integer -> ``int``, data -> ``bytes``, status -> :class:`Status`
(a ``str``), array -> ``list``. Command arguments may be ``str``, ``bytes`` or ``int``.
"""

import json


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


def command(*args):
    """A Redis command as the host takes it: a list of bytes."""
    return [arg_bytes(a) for a in args]


class Host:
    """What a sink can call. Subclasses implement the ``_``-less primitives."""

    def redis_pipeline(self, commands, atomic=False):
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
    def redis(self, *args):
        """One Redis command, one round trip; its reply."""
        return self.redis_pipeline([command(*args)])[0]

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

        cmds = [c if all(isinstance(a, bytes) for a in c) else command(*c) for c in commands]
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
    (e.g. a real Redis in tests), else with ``None`` per command."""

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
        cmds = [command(*c) for c in commands]
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

    def counter_add(self, name, value=1):
        self.counters[name] = self.counters.get(name, 0) + value

    def gauge_set(self, name, value):
        self.gauges[name] = value
