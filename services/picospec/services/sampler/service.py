"""The sampler service: stateless, a queue group member on ``picospec.v1.sample``."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from nats.aio.msg import Msg

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import CodecError, SampleRequest, decode_as, encode
from picospec.services import metrics
from picospec.services.shell import connect_nats, event, headers, health_routes, run, serve_http
from picospec.speculation.sampler import sample, warm_up

ROLE = "sampler"


class SamplerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sample")
        self.ready = False

    async def on_sample(self, msg: Msg) -> None:
        try:
            req = decode_as(msg.data, SampleRequest)
        except CodecError as e:
            metrics.REJECTED.labels(ROLE, "malformed").inc()
            event("message_rejected", logging.WARNING, reason="malformed", error=str(e)[:200])
            if msg.reply:
                await self.nc.publish(
                    msg.reply,
                    str(e).encode()[:1000],
                    headers=headers(subjects.CT_JSON, **{subjects.H_ERROR: "malformed"}),
                )
            return
        t0 = time.perf_counter()
        try:
            reply = await asyncio.get_running_loop().run_in_executor(self.pool, sample, req)
        except Exception as e:  # noqa: BLE001 - e.g. no probability mass left to draw from
            # a well-formed request it cannot serve: refuse it like a malformed one (counted,
            # answered), instead of leaving the drafter to time out
            metrics.REJECTED.labels(ROLE, "bad_request").inc()
            event("message_rejected", logging.WARNING, reason="bad_request", error=str(e)[:200])
            if msg.reply:
                await self.nc.publish(
                    msg.reply,
                    str(e).encode()[:1000],
                    headers=headers(subjects.CT_JSON, **{subjects.H_ERROR: "bad_request"}),
                )
            return
        metrics.SAMPLE_SECONDS.observe(time.perf_counter() - t0)
        if msg.reply:
            await self.nc.publish(msg.reply, encode(reply), headers=headers())

    async def main(self, stop: asyncio.Event) -> None:
        app = web.Application()
        app.add_routes(health_routes(lambda: self.ready))
        runner = await serve_http(app, self.settings.host, self.settings.port)
        metrics.set_build_info(ROLE, "-", self.settings.replica_id or "-", self.settings.site)
        self.nc = await connect_nats(self.settings, "sampler")
        await asyncio.get_running_loop().run_in_executor(self.pool, warm_up)
        await self.nc.subscribe(subjects.SAMPLE, queue=subjects.SAMPLERS_QUEUE, cb=self.on_sample)
        self.ready = True
        event("ready")
        await stop.wait()
        self.ready = False
        await self.nc.drain()
        await runner.cleanup()


def main(settings: Settings) -> int:
    return run(SamplerService(settings).main)
