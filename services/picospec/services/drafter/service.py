"""The drafter service: drives :class:`DrafterSession` over NATS for many requests at once.

One :class:`Generation` per request. It opens the session on whichever verifier the queue
group picks, drafts on the model thread (off the event loop; one thread for all requests,
which steps the drafts of every session in one batched forward:
:class:`picospec.runtime.scheduler.ModelThread`), publishes blocks to that replica's
subject, applies verdicts as they arrive on this drafter's subject, asks the edge-local sampler
for corrections, and yields committed tokens. When its verifier is lost (no verdict within
``verify_timeout_s``), drains (``DRAINING``) or forgot the session (``UNKNOWN_SESSION``), it
re-opens the session elsewhere with the committed tokens (re-prefill) and carries on; if the
cloud stays unreachable for ``request_timeout_s`` it fails with :class:`Unavailable`, having
yielded only committed (verified) tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import (
    MAX_DRAFT_TOKENS,
    CodecError,
    DraftBlock,
    SampleReply,
    SampleRequest,
    Verdict,
    VerdictStatus,
    decode_as,
    encode,
)
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import ModelThread, Program
from picospec.services import metrics
from picospec.services.control import CloseSession, ErrorReply, OpenReply, OpenSession
from picospec.services.shell import event, headers, idle_cpu_priority
from picospec.speculation.drafter import Committed, DrafterSession, DrafterStats, ProtocolError
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.tuning import MAX_GAMMA, DraftLenController, SiteEstimates
from picospec.speculation.verifier import VerifierSession

ROLE = "drafter"
T = TypeVar("T")
LOST_AFTER_PINGS = 3  # a live verifier silent for this many verify timeouts: message lost


class Unavailable(RuntimeError):
    """The cloud (verifiers or samplers) could not be reached in time: HTTP 503."""


class BadRequest(ValueError):
    """The verifier refused the request itself (e.g. prompt too long): HTTP 400."""


@dataclass
class Stats:
    """What the API reports in its ``picospec`` object."""

    mode: str
    prompt_tokens: int = 0
    tokens: int = 0
    speculation: DrafterStats = field(default_factory=DrafterStats)  # the session's own
    migrations: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    first_commit_tokens: int = 0  # tokens that arrived with the first (a whole verdict's worth)
    cloud_prefill_s: float | None = None  # the first open's prefill on the verifier (in TTFT)
    elapsed_s: float = 0.0
    verifier: str = ""
    verified: bool = True  # False when (part of) the answer came from the draft model alone
    tuner: DraftLenController | None = None  # adaptive speculation (draft_len "auto")

    def as_dict(self) -> dict[str, object]:
        tuning: dict[str, object] = {}
        if self.tuner is not None:
            tuning = {
                "draft_len": self.tuner.gamma,
                "lookahead": self.tuner.lookahead,
                "draft_len_rounds": {str(g): n for g, n in sorted(self.tuner.history.items())},
            }
        return {
            "mode": self.mode,
            **self.speculation.report(),
            **tuning,
            "migrations": self.migrations,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "ttft_s": self.first_token_s,
            "cloud_prefill_s": self.cloud_prefill_s,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens / self.elapsed_s if self.elapsed_s > 0 else None,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "verifier": self.verifier,
            "verified": self.verified and self.mode != Mode.EDGE.value,
        }

    def decode_tokens_per_s(self) -> float | None:
        """The steady-state rate: tokens after the first commit over the time after it."""
        if self.first_token_s is None:
            return None
        span, rest = self.elapsed_s - self.first_token_s, self.tokens - self.first_commit_tokens
        return rest / span if rest > 0 and span > 0 else None


class DrafterService:
    def __init__(self, settings: Settings, nc: NATS, model: LanguageModel) -> None:
        self.settings = settings
        self.nc = nc
        self.model = model
        self.id = f"drafter-{os.urandom(6).hex()}"
        self.verdict_subject = subjects.verdicts(settings.site, self.id)
        # each session's verdicts, with their size on the wire
        self.inbox: dict[bytes, asyncio.Queue[tuple[Verdict, int]]] = {}
        self.thread = ModelThread(
            "draft",
            settings.max_batch_tokens,
            initializer=idle_cpu_priority if settings.draft_thread_idle else None,
            on_batch=metrics.DRAFT_BATCH_SIZE.observe,
        )
        self.site = SiteEstimates()  # what adaptive speculation has learnt of this site

    async def start(self) -> None:
        await self.nc.subscribe(self.verdict_subject, cb=self.on_verdict)

    async def on_verdict(self, msg: Msg) -> None:
        try:
            verdict = decode_as(msg.data, Verdict, max_vocab=self.model.vocab_size)
        except CodecError as e:
            metrics.REJECTED.labels(ROLE, "malformed").inc()
            event("message_rejected", logging.WARNING, reason="malformed", error=str(e)[:200])
            return
        queue = self.inbox.get(verdict.session)
        if queue is None:
            metrics.REJECTED.labels(ROLE, "unknown_session").inc()
            return
        metrics.LINK_BYTES.labels("downlink").inc(len(msg.data))
        metrics.LINK_MESSAGES.labels("downlink").inc()
        queue.put_nowait((verdict, len(msg.data)))

    def generation(
        self,
        prompt: list[int],
        params: SamplingParams,
        spec: SpecConfig,
        max_tokens: int,
        fallback_edge: bool = False,
        ignore_eos: bool = False,
    ) -> Generation:
        return Generation(self, prompt, params, spec, max_tokens, fallback_edge, ignore_eos)


class Generation:
    """One request's session, driven to completion. Iterate :meth:`tokens` for committed ids."""

    def __init__(
        self,
        svc: DrafterService,
        prompt: list[int],
        params: SamplingParams,
        spec: SpecConfig,
        max_tokens: int,
        fallback_edge: bool = False,
        ignore_eos: bool = False,
    ) -> None:
        self.svc = svc
        # the ids that end the answer (none with ignore_eos: it runs to max_tokens)
        self.eos_ids = frozenset() if ignore_eos else svc.model.eos_ids
        self.fallback_edge = fallback_edge
        self.prompt = prompt
        self.params = params
        self.spec = spec
        self.max_tokens = max_tokens
        self.sid = os.urandom(16)  # the session id: a capability, never shown to clients
        self.request_id = os.urandom(12).hex()  # what the API response calls this request
        self.stats = Stats(mode=spec.mode.value, prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        self.generated: list[int] = []
        self.verifier: str | None = None
        self._queue: asyncio.Queue[tuple[Verdict, int]] = asyncio.Queue()
        self._stop_requested = False
        self._sent_at: dict[int, tuple[float, int, int]] = {}  # seq: (time, fed, drafted)
        self._steps = 0  # draft-model steps run for this request
        self._open_rtt: float | None = None  # the last open's request/reply time
        # adaptive speculation (draft_len "auto"): this session's controller
        self.tuner: DraftLenController | None = None

    def stop(self) -> None:
        """Stop after the current step (a stop string matched, or the client went away)."""
        self._stop_requested = True

    # --- cloud plumbing ----------------------------------------------------------------
    async def _open_sent(self) -> None:
        """Wait until the open request just queued has left for the NATS server (a PING/PONG
        with the local node), before the draft model's prefill takes the edge's CPU: else the
        prefill delays the open, and the first token with it."""
        await asyncio.sleep(0)  # the open task builds its request and queues it
        with contextlib.suppress(Exception):  # a slow or lost connection: the open copes
            await self.svc.nc.flush(timeout=1)

    async def _open(self, committed: list[int], epoch: int, first_token: bool = False) -> OpenReply:
        """Open (or re-open) the session on any verifier, retrying until the deadline; with
        ``first_token`` the reply carries the target's first token from the prefill."""
        s = self.svc.settings
        req = OpenSession(
            session=self.sid.hex(),
            prompt=committed,
            params=self.params,
            spec=self.spec,
            vocab_size=self.svc.model.vocab_size,
            reply_to=self.svc.verdict_subject,
            max_new_tokens=max(1, self.max_tokens - len(self.generated)),
            eos_ids=sorted(self.eos_ids),
            epoch=epoch,
            first_token=first_token,
        )
        body = req.model_dump_json().encode()
        deadline = time.monotonic() + s.request_timeout_s
        last = "no verifier answered"
        while time.monotonic() < deadline:
            timeout = max(0.1, min(s.nats_timeout_s, deadline - time.monotonic()))
            sent = time.monotonic()
            try:
                msg = await self.svc.nc.request(
                    subjects.SESSIONS_OPEN,
                    body,
                    timeout=timeout,
                    headers=headers(subjects.CT_JSON),
                )
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
            ) as e:
                last = f"{type(e).__name__}"
                await asyncio.sleep(0.2)
                continue
            self._count_up(len(body))
            if msg.headers and msg.headers.get(subjects.H_ERROR):
                err = ErrorReply.model_validate_json(msg.data)
                if err.reason in ("bad_prompt", "bad_open"):
                    raise BadRequest(err.error)
                last = err.error
                await asyncio.sleep(0.2)  # draining, full, mismatched replica: try another
                continue
            reply = OpenReply.model_validate_json(msg.data)
            self.verifier = self.stats.verifier = reply.verifier
            self._open_rtt = time.monotonic() - sent
            if self.stats.cloud_prefill_s is None:
                self.stats.cloud_prefill_s = reply.prefill_s
            return reply
        raise Unavailable(
            f"no verifier could take the session within {s.request_timeout_s:.0f}s ({last})"
        )

    async def _close(self) -> None:
        if self.verifier is None:
            return
        body = CloseSession(session=self.sid.hex()).model_dump_json().encode()
        try:
            await self.svc.nc.publish(
                subjects.close(self.verifier), body, headers=headers(subjects.CT_JSON)
            )
        except Exception:  # noqa: BLE001 - closing is best effort; the idle timeout frees it
            pass

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n
        metrics.LINK_BYTES.labels("uplink").inc(n)
        metrics.LINK_MESSAGES.labels("uplink").inc()

    async def _next_verdict(self) -> Verdict | None:
        """The next verdict, or None when the verifier is gone.

        Waiting longer than ``verify_timeout_s`` pings the verifier: a busy replica answers (on
        its event loop, while its model thread works) and we keep waiting, up to
        ``request_timeout_s``; a dead one gets no responders at once and the session moves.
        """
        s = self.svc.settings
        deadline = time.monotonic() + s.request_timeout_s
        reconnects = self.svc.nc.stats["reconnects"]
        for quiet in range(1, 1 << 30):
            try:
                v = self._took(
                    await asyncio.wait_for(self._queue.get(), timeout=s.verify_timeout_s)
                )
            except TimeoutError:
                # NATS is at-most-once: after a reconnect, or when a live replica stays silent
                # for several pings, a block or verdict was probably lost; re-open the session
                # (re-prefill from the committed tokens) rather than wait for nothing
                lost = self.svc.nc.stats["reconnects"] != reconnects or quiet >= LOST_AFTER_PINGS
                if lost or time.monotonic() > deadline or not await self._verifier_alive():
                    return None
                continue
            return v

    def _took(self, item: tuple[Verdict, int]) -> Verdict:
        """A verdict taken from this session's queue, its bytes counted."""
        verdict, size = item
        self.stats.bytes_down += size
        return verdict

    async def _verifier_alive(self) -> bool:
        if self.verifier is None:
            return False
        try:
            await self.svc.nc.request(
                subjects.ping(self.verifier),
                b"",
                timeout=min(2.0, self.svc.settings.nats_timeout_s),
            )
            return True
        except Exception:  # noqa: BLE001 - no responders, timeout, reconnecting: presume lost
            return False

    async def _migrate(self, reason: str, committed: list[int], epoch: int) -> None:
        metrics.MIGRATIONS.labels(reason).inc()
        self.stats.migrations += 1
        event(
            "session_migrating", session=self.sid.hex()[:8], reason=reason, verifier=self.verifier
        )
        await self._close()
        self.verifier = None
        await self._open(committed, epoch)

    async def _sample(self, req: SampleRequest) -> int:
        body = encode(req)
        deadline = time.monotonic() + self.svc.settings.request_timeout_s
        while True:
            t0 = time.perf_counter()
            try:
                msg = await self.svc.nc.request(
                    subjects.SAMPLE,
                    body,
                    headers=headers(),
                    timeout=min(
                        self.svc.settings.nats_timeout_s, self.svc.settings.request_timeout_s
                    ),
                )
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionReconnectingError,
            ) as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"no sampler answered ({type(e).__name__})") from e
                await asyncio.sleep(0.2)
                continue
            metrics.SAMPLER_LATENCY.observe(time.perf_counter() - t0)
            if msg.headers and msg.headers.get(subjects.H_ERROR):
                raise Unavailable(f"sampler refused the request: {msg.data[:200]!r}")
            return decode_as(msg.data, SampleReply).token

    # --- the loop ---------------------------------------------------------------------------
    async def tokens(self) -> AsyncIterator[list[int]]:
        self.svc.inbox[self.sid] = self._queue
        try:
            if self.spec.mode is Mode.EDGE:
                async for chunk in self._edge():
                    yield chunk
                return
            try:
                if self.spec.mode is Mode.AR:
                    await self._open(self.prompt, 0)
                    inner = self._ar()
                else:
                    inner = self._speculate()  # opens the session while it drafts
                async for chunk in inner:
                    yield chunk
            except Unavailable as e:
                if not self.fallback_edge:
                    raise
                self.stats.verified = False
                metrics.DEGRADED.inc()
                event(
                    "degraded_to_edge",
                    logging.WARNING,
                    session=self.sid.hex()[:8],
                    committed=len(self.generated),
                    error=str(e),
                )
                async for chunk in self._edge():
                    yield chunk
        finally:
            self.svc.inbox.pop(self.sid, None)
            await self._close()
            self.stats.tokens = len(self.generated)
            self.stats.elapsed_s = time.perf_counter() - self.stats.started

    async def _edge(self) -> AsyncIterator[list[int]]:
        """The draft model alone continues from the committed tokens (unverified)."""
        model = self.svc.model
        spec = self.spec.model_copy(update={"mode": Mode.EDGE})
        local = VerifierSession(
            model, self.sid, self.prompt + self.generated, self.params, spec, prefill=False
        )
        await self._model_step(local.prefill())
        while len(self.generated) < self.max_tokens and not self._stop_requested:
            token = await self._model_step(local.ar_next())
            yield self._emitted([token])
            if token in self.eos_ids:
                self.finish_reason = "stop"
                return
        self.finish_reason = "stop" if self._stop_requested else "length"

    async def _model_step(self, step: Program[T]) -> T:
        """Run one draft-model step on the model thread (batched with the other sessions'
        steps) and time its compute there: the forward it took part in."""
        job = self.svc.thread.submit(step, key=self.sid)
        out = await job
        seconds = job.compute_s
        if self._steps:  # the first step carries the prompt's prefill
            metrics.DRAFT_STEP.labels(self.spec.mode.value).observe(seconds)
            if self.tuner is not None:
                self.tuner.observe_step(seconds)
        self._steps += 1
        return out

    async def _publish_block(self, block: DraftBlock, data: bytes | None = None) -> None:
        fed = len(block.prefix) + len(block.tokens)
        self._sent_at[block.seq] = (time.perf_counter(), fed, len(block.tokens))
        data = encode(block) if data is None else data
        await self.svc.nc.publish(
            subjects.verify(self.verifier or "-"),
            data,
            reply=self.svc.verdict_subject,
            headers=headers(),
        )
        self._count_up(len(data))

    def _max_draft_len(self) -> int:
        """The longest block the link carries: blocks with full draft distributions (vanilla)
        must fit NATS's max_payload (1 MB by default: 10 tokens at a 49,152-token vocabulary
        in f16). Raises :class:`BadRequest` for a fixed ``draft_len`` above it."""
        if not self.spec.mode.dense_q:
            return MAX_DRAFT_TOKENS
        payload = getattr(self.svc.nc, "max_payload", 0) or 1 << 20
        cap = max(1, (payload - 4096) // (2 * self.svc.model.vocab_size))
        if not self.spec.adaptive and self.spec.draft_len > cap:
            raise BadRequest(
                f"draft_len {self.spec.draft_len} is too long for mode {self.spec.mode.value}: "
                f"its blocks carry full draft distributions, and at most {cap} fit the "
                f"link's {payload}-byte message limit"
            )
        return cap

    def _tune(self, session: DrafterSession, reply: OpenReply | None = None) -> None:
        """Adaptive speculation: learn from the open reply, then set γ and the look-ahead."""
        tuner = self.tuner
        if tuner is None:
            return
        if reply is not None:
            tuner.observe_verify_cost(reply.verify_step_s, reply.verify_per_token_s)
            if self._open_rtt is not None and reply.prefill_s is not None:
                tuner.observe_open(self._open_rtt - reply.prefill_s)
        left = self.max_tokens - len(session.generated)
        session.draft_len, session.lookahead = tuner.choose(tokens_left=left)
        metrics.DRAFT_LEN.labels(self.spec.mode.value).set(session.draft_len)

    def _emitted(self, new: list[int]) -> list[int]:
        if new and self.stats.first_token_s is None:
            self.stats.first_token_s = time.perf_counter() - self.stats.started
            self.stats.first_commit_tokens = len(new)
        self.generated.extend(new)
        return new

    async def _ar(self) -> AsyncIterator[list[int]]:
        """Cloud-only baseline: the verifier streams tokens. Each (re)open starts a new epoch
        whose tokens are numbered from 0, so late tokens of a lost replica are ignored."""
        eos = self.eos_ids
        epoch, base = 0, 0
        last_progress = time.monotonic()
        while len(self.generated) < self.max_tokens and not self._stop_requested:
            v = await self._next_verdict()
            if v is None or v.status is not VerdictStatus.OK:
                if v is not None and v.epoch != epoch:
                    continue
                if time.monotonic() - last_progress > self.svc.settings.request_timeout_s:
                    raise Unavailable("the verifier stopped streaming")
                epoch, base = epoch + 1, len(self.generated)
                reason = "lost" if v is None else v.status.name.lower()
                await self._migrate(reason, self.prompt + self.generated, epoch)
                continue
            if v.token is None or v.epoch != epoch or v.seq != len(self.generated) - base:
                continue
            last_progress = time.monotonic()
            yield self._emitted([v.token])
            if v.token in eos:
                self.finish_reason = "stop"
                return
        self.finish_reason = "stop" if self._stop_requested else "length"

    async def _speculate(self) -> AsyncIterator[list[int]]:
        """Draft, publish, apply verdicts. The session opens on a verifier while the first
        blocks are drafted (they wait in ``held``, bounded by the look-ahead), so the edge's
        prefill and first block overlap the cloud's round trip and prefill."""
        cap = self._max_draft_len()  # before the open: a refused request opens nothing
        opening: asyncio.Task[OpenReply] | None = asyncio.create_task(
            self._open(self.prompt, 0, first_token=True)
        )
        opening.add_done_callback(lambda t: t.cancelled() or t.exception())  # always retrieved
        await self._open_sent()
        held: list[DraftBlock] = []
        streamed_first = False
        try:
            svc = self.svc
            session = DrafterSession(
                svc.model,
                self.sid,
                self.prompt,
                self.params,
                self.spec,
                self.max_tokens,
                self.eos_ids,
            )
            self.stats.speculation = session.stats
            if self.spec.adaptive:
                self.tuner = DraftLenController(
                    pipelined=self.spec.mode.pipelined,
                    prior=svc.site,
                    start_gamma=min(self.spec.draft_len, cap),
                    start_lookahead=self.spec.max_inflight,
                    max_gamma=min(MAX_GAMMA, cap),
                )
                self.stats.tuner = self.tuner
                self._tune(session)
            metrics.DRAFT_LEN.labels(self.spec.mode.value).set(session.draft_len)
            mode = self.spec.mode.value
            last_progress = time.monotonic()
            while not session.done and not self._stop_requested:
                # apply every verdict that has arrived, then draft while allowed, else wait
                verdict: Verdict | None
                if opening is not None and opening.done():
                    reply = opening.result()  # Unavailable or BadRequest end the request here
                    opening = None
                    self._tune(session, reply)
                    if reply.first_token is not None:  # the target's, from the prefill
                        first, held = session.accept_first(reply.first_token)
                        if first.tokens and not streamed_first:
                            yield self._emitted(first.tokens)
                        if session.done or self._stop_requested:
                            break
                    for block in held:
                        await self._publish_block(block)
                    held.clear()
                if not self._queue.empty():
                    verdict = self._took(self._queue.get_nowait())
                elif session.can_draft():
                    step = asyncio.ensure_future(self._model_step(session.draft()))
                    if opening is not None and not streamed_first:
                        # the first token may arrive while the draft model is busy (its first
                        # step carries the prompt's prefill): stream it at once; the session
                        # takes it in once the step is done (it must not change meanwhile)
                        await asyncio.wait({step, opening}, return_when=asyncio.FIRST_COMPLETED)
                        reply = opening.result() if opening.done() else None
                        if reply is not None and reply.first_token is not None:
                            streamed_first = True
                            yield self._emitted([reply.first_token])
                    block = await step
                    if block is not None:
                        if opening is None:
                            await self._publish_block(block)
                        else:
                            held.append(block)
                    continue
                elif opening is not None:
                    await asyncio.wait([opening])
                    continue
                else:
                    verdict = await self._next_verdict()
                if verdict is None or verdict.status is not VerdictStatus.OK:
                    if verdict is not None and verdict.epoch < session.epoch:
                        continue  # an old replica talking about an old epoch
                    timeout = svc.settings.request_timeout_s
                    if time.monotonic() - last_progress > timeout:
                        raise Unavailable(f"no verdict from the cloud within {timeout:.0f}s")
                    session.rebase()
                    await self._migrate(
                        "lost" if verdict is None else verdict.status.name.lower(),
                        session.committed,
                        session.epoch,
                    )
                    continue
                st = session.stats
                before = st.drafted, st.accepted, st.rollbacks, st.wasted
                try:
                    got = session.on_verdict(verdict)
                except ProtocolError as e:
                    metrics.REJECTED.labels(ROLE, "protocol").inc()
                    event("verdict_ignored", logging.WARNING, error=str(e))
                    continue
                if got is None:
                    continue
                sent = self._sent_at.pop(verdict.seq, None)
                if sent is not None:
                    round_trip = time.perf_counter() - sent[0]
                    metrics.VERIFY_RTT.labels(mode).observe(round_trip)
                    if self.tuner is not None:
                        rejected = verdict.accepted < sent[2]
                        self.tuner.observe_round(verdict.accepted, rejected, round_trip, sent[1])
                        self._tune(session)
                if isinstance(got, SampleRequest):
                    metrics.TAIL_MASS.inc(got.sparse.tail_mass)
                    got = session.on_correction(await self._sample(got))
                self._count_round(session, before)
                last_progress = time.monotonic()
                if isinstance(got, Committed) and got.tokens:
                    yield self._emitted(got.tokens)
            self.finish_reason = session.finish_reason or "stop"
        finally:
            if opening is not None:
                opening.cancel()
            if self.tuner is not None:
                self.svc.site = self.tuner.estimates()  # the next sessions start from here

    def _count_round(self, session: DrafterSession, before: tuple[int, int, int, int]) -> None:
        mode, s = self.spec.mode.value, session.stats
        drafted, accepted = s.drafted - before[0], s.accepted - before[1]
        metrics.DRAFTS.labels(mode).inc()
        metrics.DRAFT_TOKENS.labels(mode).inc(drafted)
        metrics.ACCEPTED_TOKENS.labels(mode).inc(accepted)
        for i in range(accepted):
            metrics.ACCEPTED_PER_POS.labels(mode, str(i)).inc()
        metrics.ROLLBACKS.labels(mode).inc(s.rollbacks - before[2])
        metrics.WASTED.labels(mode).inc(s.wasted - before[3])
