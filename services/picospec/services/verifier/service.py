"""The verifier service: a thin asyncio shell around :class:`VerifierSession` on NATS.

* ``picospec.v1.sessions.open`` (queue group ``verifiers``): prefill a session and reply with
  this replica's id; later blocks of the session come to ``picospec.v1.verify.<id>``.
* One model thread schedules all of the target's work
(:class:`picospec.runtime.scheduler.ModelThread`):
  prefills (in chunks of at most ``max_batch_tokens``), every ``ar`` session's decode steps and
  the verification of draft blocks share its forwards (continuous batching), each session's
  work in arrival order. Verdicts and ``ar`` tokens go to the drafter's subject given at open,
  in order, through one publisher.
* Sessions are freed on close, after ``idle_timeout_s``, and — least recently used first — when
  ``max_sessions`` would be exceeded (the drafter then re-prefills elsewhere).
* SIGTERM drains: the replica leaves the queue group, tells each session's drafter to move
  (``DRAINING`` verdict) and exits once they are gone or the grace period ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web
from nats.aio.msg import Msg
from pydantic import ValidationError

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import (
    CodecError,
    DraftBlock,
    Verdict,
    VerdictStatus,
    decode_as,
    encode,
)
from picospec.runtime.kvslots import SLOT_MARGIN
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import ForwardStats, Job, Program
from picospec.services import metrics
from picospec.services.control import CloseSession, ErrorReply, OpenReply, OpenSession
from picospec.services.shell import connect_nats, event, headers, health_routes, serve_http
from picospec.services.verifier.backends import make_backend
from picospec.speculation.spec import Mode
from picospec.speculation.tuning import CostLine, LoadMeter, VerifyCost
from picospec.speculation.verifier import BlockRefused, VerifierSession

ROLE = "verifier"
QUIET_S = 2.0  # a session idle this long may be evicted under the memory cap


@dataclass
class Held:
    session: VerifierSession
    reply_to: str
    open_req: OpenSession
    last_used: float = field(default_factory=time.monotonic)
    ar_sent: int = 0  # ar: tokens streamed so far (their verdicts' seq)
    streaming: bool = False  # its stream (ar, cloud-led) has started


def capacity(req: OpenSession) -> int:
    """The tokens a session's cache reserves at open: its prompt, its answer and a block beyond
    (capped by the model's context; a slot grows past it if a session outlives the estimate)."""
    return len(req.prompt) + req.max_new_tokens + SLOT_MARGIN


def _reject(reason: str, **fields: object) -> None:
    metrics.REJECTED.labels(ROLE, reason).inc()
    event("message_rejected", logging.WARNING, reason=reason, **fields)


class VerifierService:
    def __init__(self, settings: Settings, model: LanguageModel | None = None) -> None:
        self.settings = settings
        self.model: Any = model  # the target: loaded by the backend in main()
        self.id = settings.replica_id or f"{socket.gethostname()[:40]}-{os.urandom(3).hex()}"
        self.id = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.id)[:64]
        self.sessions: dict[bytes, Held] = {}
        self.backend = make_backend(settings, self._on_forward)
        self.outbox: asyncio.Queue[tuple[str, Verdict]] = asyncio.Queue()  # to publish, in order
        self.ready = False
        self.draining = False
        self._open_sub = None
        self.cost = CostLine()  # recent forward cost, told to drafters at open (adaptive γ)
        self.meter = LoadMeter()  # recent busy fraction and batch, told in every verdict
        # opens being prefilled: (epoch, their reply) by session. A drafter whose open timed
        # out while it waited behind a busy replica's queue sends it again; the retry gets the
        # first one's reply instead of a second prefill (which would queue behind the first)
        self._opens: dict[bytes, tuple[int, asyncio.Future[bytes]]] = {}
        self._open_tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- NATS handlers ---------------------------------------------------------------
    async def on_open(self, msg: Msg) -> None:
        """The open subject's callback. nats-py awaits a subscription's callbacks one at a
        time, so each open is handled in a task of its own: the prefills of sessions that open
        together share the model thread's forwards instead of waiting for each other."""
        task = asyncio.create_task(self._on_open(msg))
        self._open_tasks.add(task)
        task.add_done_callback(self._open_tasks.discard)

    async def _on_open(self, msg: Msg) -> None:
        try:
            req = OpenSession.model_validate_json(msg.data)
        except ValidationError as e:
            _reject("bad_open")
            await self._reply_error(msg, "bad_open", f"invalid open request: {e.errors()[:3]}")
            return
        if self.draining:
            await self._reply_error(msg, "draining", "this verifier is draining")
            return
        if req.vocab_size != self.model.vocab_size:
            _reject("vocab_mismatch")
            await self._reply_error(
                msg,
                "vocab_mismatch",
                f"drafter vocabulary {req.vocab_size} != verifier {self.model.vocab_size}",
            )
            return
        if (
            len(req.prompt) >= self.model.max_context
            or min(req.prompt) < 0
            or max(req.prompt) >= self.model.vocab_size
        ):
            _reject("bad_prompt")
            await self._reply_error(msg, "bad_prompt", "prompt too long or ids out of vocabulary")
            return
        sid = bytes.fromhex(req.session)
        same = self._opens.get(sid)
        if same is not None and same[0] == req.epoch:
            body = await asyncio.shield(same[1])
            if body:
                await msg.respond(body)
                return
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._opens[sid] = (req.epoch, done)
        body = b""
        try:
            body = await self._open(req, sid, msg)
        finally:
            if self._opens.get(sid, (0, None))[1] is done:
                del self._opens[sid]
            done.set_result(body)
        if body:
            await msg.respond(body)
            event(
                "session_opened",
                session=req.session[:8],
                mode=req.spec.mode.value,
                prompt_tokens=len(req.prompt),
            )

    async def _open(self, req: OpenSession, sid: bytes, msg: Msg) -> bytes:
        """Prefill the session and make its open reply (empty: refused, answered already)."""
        if sid not in self.sessions and not self._make_room():
            await self._reply_error(msg, "full", f"all {self.settings.max_sessions} sessions busy")
            return b""
        if self.sessions.pop(sid, None) is not None:  # re-opened here: the old one's work ends
            self.backend.cancel(sid)
        t0 = time.perf_counter()
        try:
            vs = VerifierSession(
                self.model,
                sid,
                req.prompt,
                req.params,
                req.spec,
                req.epoch,
                capacity=capacity(req),
                prefill=False,
            )
            want_first = req.first_token and req.spec.mode.speculative and not req.spec.cloud_led
            first = await self.backend.submit(self._opening(vs, want_first), key=sid)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the prefill refuses is a bad prompt
            _reject("bad_prompt", error=str(e)[:200])
            await self._reply_error(msg, "bad_prompt", f"the prompt was refused: {e}"[:1000])
            return b""
        held = Held(vs, req.reply_to, req)
        self.sessions[sid] = held
        self._gauges()
        if req.spec.mode is Mode.AR or req.spec.cloud_led:
            self._start_ar(sid, held)
        prefill_s = time.perf_counter() - t0
        line = self.cost.line() or VerifyCost(None, None, None, None)
        reply = OpenReply(
            verifier=self.id,
            session=req.session,
            first_token=first,
            prefill_s=prefill_s,
            verify_step_s=line.step,
            verify_per_token_s=line.per_token,
            verify_per_session_s=line.per_session,
            verify_per_round_s=line.per_round,
            **self._load(),
        )
        return reply.model_dump_json().encode()

    @staticmethod
    def _opening(vs: VerifierSession, first_token: bool) -> Program[int | None]:
        """Prefill the session (a program for the model thread), and pick its first token
        when asked."""
        yield from vs.prefill()
        return vs.first_token() if first_token else None

    async def on_block(self, msg: Msg) -> None:
        try:
            block = decode_as(msg.data, DraftBlock, max_vocab=self.model.vocab_size)
        except CodecError as e:
            _reject("malformed", error=str(e)[:200])
            return
        held = self.sessions.get(block.session)
        if held is not None and held.session.led:
            held.session.hint = block  # read by its stream at its next step
            held.last_used = time.monotonic()
            return
        if held is None:
            _reject("unknown_session")
            if msg.reply:
                await self._publish(
                    msg.reply,
                    Verdict(
                        session=block.session,
                        epoch=block.epoch,
                        seq=block.seq,
                        status=VerdictStatus.UNKNOWN_SESSION,
                        accepted=0,
                        vocab_size=self.model.vocab_size,
                    ),
                )
            return
        self.enqueue(held, block)

    def enqueue(self, held: Held, block: DraftBlock) -> None:
        """Hand ``block`` to the model thread behind the session's earlier work; its verdicts
        go to the outbox when it is verified."""
        held.last_used = time.monotonic()
        job = self.backend.submit(held.session.verify(block), key=block.session)
        assert job.future is not None
        job.future.add_done_callback(partial(self._verified, held))
        metrics.QUEUE_DEPTH.set(self.backend.waiting)

    def _verified(self, held: Held, done: asyncio.Future[list[Verdict]]) -> None:
        """A block's verification ended: queue its verdicts (in order), or count its refusal."""
        if done.cancelled():  # the session was freed meanwhile
            return
        err = done.exception()
        if isinstance(err, BlockRefused):
            _reject(err.reason, error=str(err))
        elif err is not None:
            _reject("verify_failed", error=str(err)[:200])
        else:
            for v in done.result():
                self.outbox.put_nowait((held.reply_to, v))
            sid = held.session.session
            if held.session.led and not held.streaming and self.sessions.get(sid) is held:
                self._start_ar(sid, held)  # the drafter handed the session over

    async def on_close(self, msg: Msg) -> None:
        try:
            req = CloseSession.model_validate_json(msg.data)
        except ValidationError:
            _reject("bad_close")
            return
        self._free(bytes.fromhex(req.session), "closed")

    # --- the model thread -------------------------------------------------------------------
    def _on_forward(self, f: ForwardStats) -> None:
        """After every forward of the model thread (on that thread): the metrics, and the
        cost line told to drafters (fitted on the event loop)."""
        if not f.shared:
            metrics.VERIFY_FORWARD.observe(f.seconds)
        for wait in f.queue_waits:
            metrics.QUEUE_WAIT.observe(wait)
        if self.ready and self._loop is not None:
            self._loop.call_soon_threadsafe(
                self.cost.observe, f.tokens, f.seconds, f.sessions, f.request
            )
            end = f.end if f.end is not None else time.perf_counter()
            self._loop.call_soon_threadsafe(self.meter.observe, end, f.seconds, f.sessions)

    async def publisher(self) -> None:
        """Publish verdicts and ``ar`` tokens in the order they were decided."""
        while True:
            subject, verdict = await self.outbox.get()
            await self._publish(subject, self._with_load(verdict))

    def _with_load(self, verdict: Verdict) -> Verdict:
        """``verdict`` with this replica's load now, for the drafter's draft-length policy."""
        return verdict.model_copy(update=self._load())

    def _load(self) -> dict[str, Any]:
        """This replica's load now, as verdicts and open replies tell it."""
        busy, batch = self.meter.load(time.perf_counter())
        metrics.VERIFY_BUSY.set(busy)
        return {"busy": busy, "batch": min(batch, 255), "sessions": min(len(self.sessions), 65535)}

    def _start_ar(self, sid: bytes, held: Held) -> None:
        """Cloud-only baseline: the target decodes alone on the model thread, its steps batched
        with every other session's work, and each token is streamed as it comes. A cloud-led
        session streams the same way, taking the edge's hints where they reach it in time."""
        # never past the model's context, whatever the open asked for: an open for 10**9
        # tokens that nobody closes must not hold the model thread forever
        vs = held.session
        room = self.model.max_context - vs.cache.length
        done = vs.cache.length - len(held.open_req.prompt)  # tokens it had before streaming
        n = max(0, min(held.open_req.max_new_tokens - done, room))
        held.streaming = True
        # a handed-over session gets no hints: plain decoding (on vLLM, vLLM's own)
        start = self.backend.start_led if vs.hinted else self.backend.start_ar
        job: Job[int] = start(
            held.session, n, set(held.open_req.eos_ids), sid, partial(self._ar_token, held)
        )
        assert job.future is not None
        job.future.add_done_callback(partial(self._ar_ended, sid, held))

    def _ar_token(self, held: Held, emitted: int | tuple[int, bool]) -> None:
        """One streamed token (``ar``), or ``(token, hinted)`` of a cloud-led session: its
        verdict accepts 1 where the token was the edge's hint, verified."""
        token, hinted = emitted if isinstance(emitted, tuple) else (emitted, False)
        held.last_used = time.monotonic()
        verdict = Verdict(
            session=held.session.session,
            epoch=held.session.epoch,
            seq=held.ar_sent % 2**32,
            accepted=int(hinted),
            token=token,
            vocab_size=self.model.vocab_size,
        )
        held.ar_sent += 1
        self.outbox.put_nowait((held.reply_to, verdict))

    def _ar_ended(self, sid: bytes, held: Held, done: asyncio.Future[int]) -> None:
        if done.cancelled() or done.exception() is None:
            return
        # one broken stream must not go unnoticed
        _reject("ar_failed", error=str(done.exception())[:200])
        if self.sessions.get(sid) is held:
            self._free(sid, "ar_failed")

    # --- housekeeping ---------------------------------------------------------------------
    def _free(self, sid: bytes, reason: str) -> None:
        held = self.sessions.pop(sid, None)
        if held is None:
            return
        self.backend.cancel(sid)  # its queued blocks, its ar stream
        if reason != "closed":
            metrics.EVICTIONS.labels(reason).inc()
        event("session_freed", session=sid.hex()[:8], reason=reason)
        self._gauges()

    def _make_room(self) -> bool:
        """Under the memory cap, free the least recently used session if it has gone quiet
        (its drafter re-prefills it elsewhere if it comes back); False when all are busy. The
        other opens being prefilled count: each will hold a session."""
        while len(self.sessions) + len(self._opens) > self.settings.max_sessions:
            if not self.sessions:
                return False
            lru = min(self.sessions, key=lambda s: self.sessions[s].last_used)
            if time.monotonic() - self.sessions[lru].last_used < QUIET_S:
                return False
            self._free(lru, "memory_cap")
        return True

    async def on_ping(self, msg: Msg) -> None:
        """Liveness for drafters waiting on a verdict: answered on the event loop, so a replica
        busy verifying still answers; a draining one does not (its sessions should move)."""
        if msg.reply and not self.draining:
            await self.nc.publish(msg.reply, b"ok")

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.settings.idle_timeout_s / 2))
            cutoff = time.monotonic() - self.settings.idle_timeout_s
            for sid in [s for s, h in self.sessions.items() if h.last_used < cutoff]:
                self._free(sid, "idle")

    def _gauges(self) -> None:
        metrics.ACTIVE_SESSIONS.set(len(self.sessions))
        metrics.KV_BYTES.set(sum(h.session.cache.nbytes() for h in self.sessions.values()))

    async def _publish(self, subject: str, verdict: Verdict) -> None:
        try:
            await self.nc.publish(subject, encode(verdict), headers=headers())
        except Exception as e:  # noqa: BLE001 - a bad reply subject must not kill the worker
            _reject("bad_reply_subject", error=str(e)[:200])

    async def _reply_error(self, msg: Msg, reason: str, message: str) -> None:
        if msg.reply:
            body = ErrorReply(error=message, reason=reason).model_dump_json().encode()
            await self.nc.publish(
                msg.reply, body, headers=headers(subjects.CT_JSON, **{subjects.H_ERROR: reason})
            )

    # --- lifecycle ---------------------------------------------------------------------------
    async def drain(self) -> None:
        """Leave the queue group, move every session away, wait for them to go."""
        self.draining = True
        self.ready = False
        if self._open_sub is not None:
            await self._open_sub.unsubscribe()
        event("draining", sessions=len(self.sessions))
        for sid, held in list(self.sessions.items()):
            await self._publish(
                held.reply_to,
                Verdict(
                    session=sid,
                    epoch=held.session.epoch,
                    seq=0,
                    status=VerdictStatus.DRAINING,
                    accepted=0,
                    vocab_size=self.model.vocab_size,
                ),
            )
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        event("drained", left=len(self.sessions))

    async def main(self, stop: asyncio.Event) -> None:
        app = web.Application()
        app.add_routes(health_routes(lambda: self.ready))
        runner = await serve_http(app, self.settings.host, self.settings.port)
        self._loop = asyncio.get_running_loop()
        # load after /health is up, so startup probes see a live process
        self.model = await self.backend.load(self.model)
        timed = await self.backend.warm_up()
        for n, seconds in timed:
            self.cost.observe(n, seconds)
        if self.model.pacer is not None:
            self.model.pacer.on_pace = metrics.observe_pace
        metrics.set_build_info(ROLE, self.model.name, self.id, self.settings.site)
        self.nc = await connect_nats(self.settings, f"verifier-{self.id}")
        self._open_sub = await self.nc.subscribe(
            subjects.SESSIONS_OPEN, queue=subjects.VERIFIERS_QUEUE, cb=self.on_open
        )
        await self.nc.subscribe(subjects.verify(self.id), cb=self.on_block)
        await self.nc.subscribe(subjects.close(self.id), cb=self.on_close)
        await self.nc.subscribe(subjects.ping(self.id), cb=self.on_ping)
        tasks = [asyncio.create_task(self.publisher()), asyncio.create_task(self.sweeper())]
        self.ready = True
        event("ready", replica=self.id, model=self.model.name)
        await stop.wait()
        await self.drain()
        for t in tasks:
            t.cancel()
        await self.nc.drain()
        await runner.cleanup()
        self.backend.stop()


def main(settings: Settings) -> int:
    from picospec.services.shell import run

    return run(VerifierService(settings).main)
