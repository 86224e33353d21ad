"""What every service shell shares: logging, the NATS connection, health and metrics endpoints,
and the model thread's CPU priority."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.util import find_spec
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import PROTOCOL_VERSION
from picospec.services import metrics

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


def idle_cpu_priority() -> bool:
    """Put the calling thread at Linux's idle CPU priority (``SCHED_IDLE``), so that any other
    runnable thread on its CPU, such as the service's event loop, runs first.

    A model thread computes for tens of milliseconds at a time; on a CPU it shares with its
    service's event loop, a message that arrives meanwhile (the first token, a verdict) waited
    for the CPU and then for the interpreter lock. Measured on the benchmark's pinned edge CPU,
    12 prompts: the first token came 24-35 ms later in ``picospec`` than in ``ar``, and
    -7 to +11 ms later with the draft thread idle. Returns whether it took effect (not on
    platforms without ``SCHED_IDLE``, nor where the kernel refuses)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except OSError as e:
        log.warning("could not lower the model thread's CPU priority: %s", e)
        return False
    return True


def headers(content_type: str = subjects.CT_BINARY, **extra: str) -> dict[str, str]:
    return {
        subjects.H_VERSION: str(PROTOCOL_VERSION),
        subjects.H_CONTENT_TYPE: content_type,
        **extra,
    }


def redact_url(url: str) -> str:
    """``url`` without the secret of a ``user:password@`` or ``token@`` part (for logs)."""

    def hide(m: re.Match[str]) -> str:
        user, sep, _ = m.group(1).partition(":")
        return f"//{user}:***@" if sep else "//***@"

    return re.sub(r"//([^/@]*)@", hide, url)


def nats_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for NATS: None unless a CA or a client certificate is configured (a
    ``tls://`` URL alone gets nats-py's default context, trusting the system CAs)."""
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.nats_tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
    return ctx


def _read_secret_file(path: str) -> str:
    """A credential from a file (a mounted Secret key): its text without the trailing newline.
    Read at every (re)start, so a rotated Secret takes effect when the pod restarts."""
    with open(path, encoding="utf-8") as f:
        value = f.read().rstrip("\r\n")
    if not value:
        raise ValueError(f"NATS credential file {path} is empty")
    return value


def nats_options(settings: Settings) -> dict[str, Any]:
    """How to authenticate and encrypt: the ``nats.connect`` keyword arguments that come from
    the settings (user/password, credentials file, NKey seed, TLS, inbox prefix)."""
    kwargs: dict[str, Any] = {"inbox_prefix": settings.inbox_prefix()}
    if (settings.nats_creds or settings.nats_nkey_seed) and find_spec("nkeys") is None:
        raise RuntimeError(
            "nats_creds and nats_nkey_seed need the nkeys package: pip install 'nats-py[nkeys]'"
        )
    user = _read_secret_file(settings.nats_user_file) if settings.nats_user_file else None
    user = user or settings.nats_user
    if settings.nats_password_file and not user:
        raise ValueError("nats_password_file needs nats_user or nats_user_file")
    if user:
        kwargs["user"] = user
        if settings.nats_password_file:
            kwargs["password"] = _read_secret_file(settings.nats_password_file)
        elif settings.nats_password is not None:
            kwargs["password"] = settings.nats_password.get_secret_value()
    if settings.nats_creds:
        kwargs["user_credentials"] = settings.nats_creds
    if settings.nats_nkey_seed:
        kwargs["nkeys_seed"] = settings.nats_nkey_seed
    tls = nats_tls_context(settings)
    if tls is not None:
        kwargs["tls"] = tls
    if settings.nats_tls_hostname:
        kwargs["tls_hostname"] = settings.nats_tls_hostname
    return kwargs


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
        **nats_options(settings),
    }
    nc = await nats.connect(**kwargs)
    event(
        "nats_connected",
        url=redact_url(settings.nats_url),
        tls="tls" in kwargs or settings.nats_url.startswith("tls://"),
        auth=next((a for a in ("user_credentials", "nkeys_seed", "user") if a in kwargs), "none"),
    )
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
