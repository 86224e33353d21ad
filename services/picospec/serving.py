"""What every service shell shares: logging, the NATS connection, health and metrics endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from picospec import metrics
from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import PROTOCOL_VERSION

log = logging.getLogger("picospec")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``role``, ``event`` and the event's fields."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "role": self.role,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "aiohttp.access", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, name, extra={"fields": fields})


def headers(content_type: str = subjects.CT_BINARY, **extra: str) -> dict[str, str]:
    return {
        subjects.H_VERSION: str(PROTOCOL_VERSION),
        subjects.H_CONTENT_TYPE: content_type,
        **extra,
    }


async def connect_nats(settings: Settings, name: str) -> NATS:
    """Connect with reconnect handling; every (dis/re)connect is logged and counted."""

    async def on_error(e: Exception) -> None:
        event("nats_error", logging.WARNING, error=str(e))

    async def on_disconnect() -> None:
        metrics.NATS_DISCONNECTS.inc()
        event("nats_disconnected", logging.WARNING)

    async def on_reconnect() -> None:
        metrics.NATS_RECONNECTS.inc()
        event("nats_reconnected")

    kwargs: dict[str, Any] = {
        "servers": [settings.nats_url],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
    }
    if settings.nats_user:
        kwargs.update(user=settings.nats_user, password=settings.nats_password)
    if settings.nats_creds:
        kwargs["user_credentials"] = settings.nats_creds
    nc = await nats.connect(**kwargs)
    event("nats_connected", url=settings.nats_url)
    return nc


def health_routes(ready: Callable[[], bool]) -> list[web.RouteDef]:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readiness(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def prom(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return [web.get("/health", health), web.get("/ready", readiness), web.get("/metrics", prom)]


async def serve_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    event("http_listening", host=host, port=port)
    return runner


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a service's ``main(stop)``; SIGTERM/SIGINT set ``stop`` for a graceful shutdown."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    t0 = time.monotonic()
    asyncio.run(runner())
    event("stopped", uptime_s=round(time.monotonic() - t0, 1))
    return 0
