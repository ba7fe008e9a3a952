#!/usr/bin/env python3
"""Mock of the external HTTP API that the team does not control (SPEC 5.C).

A real HTTP server (FastAPI + uvicorn) that records every request it gets and
can be told, at run time, to be slow or to fail. State is kept per *namespace*
so that tests running at the same time do not see each other's requests:

  POST /events                 record + answer (namespace "default")
  POST /ns/{ns}/events         record + answer (namespace ns)
  GET  /received               recorded requests of "default"
  GET  /ns/{ns}/received       recorded requests of ns
  POST /control                change behaviour of "default"
  POST /ns/{ns}/control        change behaviour of ns, JSON body (all optional):
                                 {"delay_ms": int, "fail_status": int|null,
                                  "fail_count": int|null (null = every request),
                                  "retry_after": int|null (seconds)}
  GET  /ns/{ns}/control        current behaviour of ns
  GET  /stats, /ns/{ns}/stats  {"received", "distinct_keys", "in_flight", "max_in_flight"}:
                               max_in_flight = most requests of the namespace being
                               answered at the same time (shows a client's concurrency)
  POST /reset, /ns/{ns}/reset  forget requests and behaviour of the namespace
  GET  /ns/{ns}/seen?after=N   compact record of every request since the N-th (load tests):
                               {"next": M, "items": [[received_at_ms, status, key, [ids]]]},
                               ids = the event_id of each event in the JSON body
  GET  /healthz                liveness
  GET  /log                    recent requests of all namespaces, for humans
                               (text/plain; ?format=json for JSON)

Run: python mock_api.py [--host 127.0.0.1] [--port 58080]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

DEFAULT_NS = "default"
LOG_SIZE = 500


class Control(BaseModel):
    """Run-time behaviour of one namespace."""

    delay_ms: int = 0
    fail_status: Optional[int] = None
    fail_count: Optional[int] = None
    retry_after: Optional[int] = None
    # False: keep only the compact record (/seen), not headers and bodies: a load test sends
    # millions of requests.
    record_bodies: bool = True


@dataclass
class Namespace:
    """Recorded requests and configured behaviour of one namespace."""

    control: Control = field(default_factory=Control)
    received: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    # [received_at_ms, status, idempotency key, [event ids]] per request, in arrival order.
    seen: list[list[Any]] = field(default_factory=list)


def _event_ids(body: Any) -> list[Any]:
    """The event_id of every event in a request body (one event or a list of them)."""
    events = body if isinstance(body, list) else [body]
    return [e.get("event_id") for e in events if isinstance(e, dict)]


app = FastAPI(title="external API mock")
namespaces: dict[str, Namespace] = collections.defaultdict(Namespace)
recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_SIZE)


def _should_fail(ns: Namespace) -> bool:
    """Decide whether the current request fails, consuming one from fail_count."""
    ctl = ns.control
    if ctl.fail_status is None:
        return False
    if ctl.fail_count is None:
        return True
    if ctl.fail_count > 0:
        ctl.fail_count -= 1
        return True
    return False


async def _handle_event(ns_name: str, request: Request) -> JSONResponse:
    """Record a POSTed request, apply delay/failure behaviour and answer."""
    arrived = time.time()
    ns = namespaces[ns_name]
    raw = await request.body()
    try:
        body: Any = json.loads(raw) if raw else None
        body_is_json = True
    except ValueError:
        body, body_is_json = raw.decode("utf-8", "replace"), False
    ns.seq += 1
    entry: dict[str, Any] = {
        "seq": ns.seq,
        "ns": ns_name,
        "method": request.method,
        "path": request.url.path,
        "headers": dict(request.headers),
        "idempotency_key": request.headers.get("idempotency-key"),
        "body": body,
        "body_is_json": body_is_json,
        "received_at": datetime.fromtimestamp(arrived, timezone.utc).isoformat(),
        "received_at_ms": int(arrived * 1000),
    }
    fail = _should_fail(ns)
    ctl = ns.control
    entry["failed"] = fail
    entry["status"] = ctl.fail_status if fail else 200
    # Record at arrival, so a slow answer is still visible while pending.
    if ctl.record_bodies:
        ns.received.append(entry)
    recent.append(entry)
    ns.seen.append(
        [entry["received_at_ms"], entry["status"], entry["idempotency_key"], _event_ids(body)]
    )
    # Single event loop: no lock needed around the counters.
    ns.in_flight += 1
    ns.max_in_flight = max(ns.max_in_flight, ns.in_flight)
    try:
        if ctl.delay_ms > 0:
            await asyncio.sleep(ctl.delay_ms / 1000.0)
    finally:
        ns.in_flight -= 1
    if fail:
        headers = {}
        if ctl.retry_after is not None:
            headers["Retry-After"] = str(ctl.retry_after)
        return JSONResponse(
            {"ok": False, "error": "injected failure"},
            status_code=entry["status"],
            headers=headers,
        )
    return JSONResponse({"ok": True})


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    """Liveness probe."""
    return {"ok": True}


@app.post("/events")
async def post_events_default(request: Request) -> JSONResponse:
    return await _handle_event(DEFAULT_NS, request)


@app.post("/ns/{ns}/events")
async def post_events(ns: str, request: Request) -> JSONResponse:
    return await _handle_event(ns, request)


@app.get("/received")
async def received_default() -> list[dict[str, Any]]:
    return namespaces[DEFAULT_NS].received


@app.get("/ns/{ns}/received")
async def received(ns: str) -> list[dict[str, Any]]:
    return namespaces[ns].received


def _apply_control(ns_name: str, ctl: Control) -> dict[str, Any]:
    namespaces[ns_name].control = ctl
    return {"ok": True, "ns": ns_name, "control": ctl.model_dump()}


@app.post("/control")
async def control_default(ctl: Control) -> dict[str, Any]:
    return _apply_control(DEFAULT_NS, ctl)


@app.post("/ns/{ns}/control")
async def control(ns: str, ctl: Control) -> dict[str, Any]:
    return _apply_control(ns, ctl)


@app.get("/ns/{ns}/control")
async def get_control(ns: str) -> dict[str, Any]:
    return namespaces[ns].control.model_dump()


def _stats(ns_name: str) -> dict[str, Any]:
    ns = namespaces[ns_name]
    keys = {e["idempotency_key"] for e in ns.received}
    return {
        "received": len(ns.received),
        "distinct_keys": len(keys),
        "in_flight": ns.in_flight,
        "max_in_flight": ns.max_in_flight,
    }


@app.get("/stats")
async def stats_default() -> dict[str, Any]:
    return _stats(DEFAULT_NS)


@app.get("/ns/{ns}/stats")
async def stats(ns: str) -> dict[str, Any]:
    return _stats(ns)


@app.get("/ns/{ns}/seen")
async def seen(ns: str, after: int = 0, limit: int = 50000) -> dict[str, Any]:
    items = namespaces[ns].seen[after : after + limit]
    return {"next": after + len(items), "items": items}


def _reset(ns_name: str) -> dict[str, Any]:
    namespaces.pop(ns_name, None)
    return {"ok": True, "ns": ns_name}


@app.post("/reset")
async def reset_default() -> dict[str, Any]:
    return _reset(DEFAULT_NS)


@app.post("/ns/{ns}/reset")
async def reset(ns: str) -> dict[str, Any]:
    return _reset(ns)


@app.get("/log")
async def log(format: str = "text", limit: int = 100):
    """Recent requests of all namespaces, newest last."""
    entries = list(recent)[-limit:]
    if format == "json":
        return JSONResponse(entries)
    lines = []
    for e in entries:
        body = json.dumps(e["body"], separators=(",", ":"))
        if len(body) > 200:
            body = body[:197] + "..."
        lines.append(
            f'{e["received_at"]} ns={e["ns"]} {e["method"]} {e["path"]} '
            f'status={e["status"]} idem={e["idempotency_key"]} body={body}'
        )
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=58080)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
