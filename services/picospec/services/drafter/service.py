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
yielded only committed (verified) tokens. Its link to the cloud (opens, blocks, verdict waits,
the sampler) is :class:`picospec.services.drafter.link.CloudLink`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import (
    MAX_DRAFT_TOKENS,
    CodecError,
    DraftBlock,
    SampleRequest,
    Verdict,
    VerdictStatus,
    decode_as,
)
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import ModelThread, Program
from picospec.services import metrics
from picospec.services.control import OpenReply
from picospec.services.drafter.link import BadRequest, CloudLink, Sent, Unavailable
from picospec.services.drafter.stats import Stats
from picospec.services.shell import event, idle_cpu_priority
from picospec.speculation.drafter import Committed, DrafterSession, DrafterStats, ProtocolError
from picospec.speculation.proposers import ContinuationRecorder, Hints, Proposer, SuffixCache
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.tuning import (
    MAX_GAMMA,
    OPEN_MARGIN,
    DraftLenController,
    Saturation,
    SiteEstimates,
    VerifyCost,
    speculation_pays,
)
from picospec.speculation.verifier import VerifierSession

ROLE = "drafter"
HANDOVER_ROUNDS = 2  # rounds of its own acceptance before a session may stop speculating
MAX_DRAFT_KINDS = 16  # kinds of draft whose adaptive estimates a drafter keeps
T = TypeVar("T")


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
        # what adaptive speculation has learnt of this site, per kind of draft (a session
        # starts from what its own kind saw: a suffix draft agrees less often than a model)
        self.sites: dict[Hashable, SiteEstimates] = {}
        self.saturation = Saturation()  # the verifiers' load, as their verdicts tell it
        # emulated edges (a capacity benchmark's): the target's greedy continuations, recorded
        # from this drafter's cloud-only sessions, which emulated edges replay
        self.recorder = ContinuationRecorder() if settings.emulated_edges else None
        # the site's recent answers per tenant, which suffix drafts also match against
        self.suffix_cache = SuffixCache(settings.suffix_cache_answers)

    async def start(self) -> None:
        await self.nc.subscribe(self.verdict_subject, cb=self.on_verdict)

    def site(self, key: Hashable) -> SiteEstimates:
        """What the sessions of ``key``'s kind of draft have learnt here (a session's prior)."""
        return self.sites.get(key) or SiteEstimates()

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
        self.saturation.observe(verdict.busy, verdict.batch, verdict.sessions)
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
        proposer: Proposer | None = None,
        tenant: str | None = None,
    ) -> Generation:
        return Generation(
            self, prompt, params, spec, max_tokens, fallback_edge, ignore_eos, proposer, tenant
        )


class Generation(CloudLink):
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
        proposer: Proposer | None = None,
        tenant: str | None = None,
    ) -> None:
        self.svc = svc
        # a model-free draft: ahead of the draft model, or (cloud-led) the only one
        self.proposer = proposer
        # whose estimates this session starts from and adds to: its kind of draft (an
        # emulated edge: the fleet of edges it stands for, by its acceptance and pace)
        self.site_key: Hashable = proposer.site if proposer is not None else "model"
        self.tenant = tenant  # whose answers the site's suffix cache keeps this one with
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
        self._sent_at: dict[int, Sent] = {}  # by block seq: blocks awaiting their verdicts
        self._steps = 0  # draft-model steps run for this request
        self._open_rtt: float | None = None  # the last open's request/reply time
        # adaptive speculation (draft_len "auto"): this session's controller
        self.tuner: DraftLenController | None = None
        self._edge_free_at = 0.0  # when an emulated edge device finishes its current step

    def stop(self) -> None:
        """Stop after the current step (a stop string matched, or the client went away)."""
        self._stop_requested = True

    # --- the loop ---------------------------------------------------------------------------
    async def tokens(self) -> AsyncIterator[list[int]]:
        self.svc.inbox[self.sid] = self._queue
        try:
            if self.spec.mode is Mode.EDGE:
                async for chunk in self._edge():
                    yield chunk
                return
            try:
                if self._speculation_off():
                    self._turn_speculation_off()
                if self.spec.mode is Mode.AR or self.spec.cloud_led:
                    await self._open(self.prompt, 0)
                    hints = None
                    if self.spec.cloud_led and self.proposer is not None:
                        hints = Hints(self.proposer, self.stats.speculation)
                    inner = self._ar(hints)
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
            if self.tenant is not None and self.stats.verified:
                self.svc.suffix_cache.add(self.tenant, self.generated)
            self.stats.tokens = len(self.generated)
            self.stats.elapsed_s = time.perf_counter() - self.stats.started

    def _speculation_off(self) -> bool:
        """Whether this session should not speculate at all: an adaptive picospec session
        while the verifiers' verdicts or open replies of the last seconds say they are
        saturated (:meth:`~picospec.speculation.tuning.Saturation.fresh`) and no draft length,
        at the
        acceptance this site's sessions saw, costs them at least 5% less per token than
        cloud-only decoding (:func:`~picospec.speculation.tuning.speculation_pays`). It then runs
        cloud-led without drafts, as ``ar`` does; sessions opened once the load falls below
        the threshold speculate again."""
        spec, sat = self.spec, self.svc.saturation
        if spec.mode is not Mode.PICOSPEC or not spec.adaptive or spec.cloud_led:
            return False
        if self._reproducible:
            return False
        if not sat.saturated or sat.load is None or not sat.fresh():
            return False
        inp = DraftLenController(prior=self.svc.site(self.site_key)).inputs()
        _, batch, sessions = sat.load
        return inp is not None and not speculation_pays(inp, batch, sessions, margin=OPEN_MARGIN)

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

    async def _free_step(self, session: DrafterSession) -> tuple[bool, DraftBlock | None]:
        """Draft the next token with the proposer, if it has one (:meth:`DrafterSession.
        free_draft`), taking the emulated device time it costs, if any."""
        drafted, block = session.free_draft()
        if drafted and session.proposer is not None:
            seconds = session.proposer.step_s
            if seconds > 0:
                now = time.perf_counter()
                self._edge_free_at = max(self._edge_free_at, now) + seconds
                await asyncio.sleep(self._edge_free_at - now)
                metrics.DRAFT_STEP.labels(self.spec.mode.value).observe(seconds)
            if self.tuner is not None:  # a free token lowers the draft's mean step: auto
                self.tuner.observe_step(seconds)  # drafts longer where matches are many
        return drafted, block

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
            tuner.observe_verify_cost(
                VerifyCost(
                    reply.verify_step_s,
                    reply.verify_per_token_s,
                    reply.verify_per_session_s,
                    reply.verify_per_round_s,
                )
            )
            if self._open_rtt is not None and reply.prefill_s is not None:
                tuner.observe_open(self._open_rtt - reply.prefill_s)
            tuner.observe_load(reply.busy, reply.batch, reply.sessions)
        left = self.max_tokens - len(session.generated)
        session.draft_len, session.lookahead = tuner.choose(tokens_left=left)
        metrics.DRAFT_LEN.labels(self.spec.mode.value).set(session.draft_len)

    def _emitted(self, new: list[int]) -> list[int]:
        if new and self.stats.first_token_s is None:
            self.stats.first_token_s = time.perf_counter() - self.stats.started
            self.stats.first_commit_tokens = len(new)
        self.generated.extend(new)
        return new

    async def _ar(self, hints: Hints | None = None, epoch: int = 0) -> AsyncIterator[list[int]]:
        """Cloud-only baseline: the verifier streams tokens. Each (re)open starts a new epoch
        whose tokens are numbered from 0, so late tokens of a lost replica are ignored. With
        ``hints`` (a cloud-led session) the edge also sends, after each token, the tokens its
        model-free draft proposes next, which the verifier verifies where they reach it in
        time. A session handed over to the verifier streams from here on (``epoch``: its
        epoch then)."""
        eos = self.eos_ids
        base = len(self.generated)
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
                if hints is not None:
                    hints.restart()
                continue
            if v.token is None or v.epoch != epoch or v.seq != len(self.generated) - base:
                continue
            last_progress = time.monotonic()
            yield self._emitted([v.token])
            if v.token in eos:
                self.finish_reason = "stop"
                break
            if hints is not None:
                await self._hint(hints, bool(v.accepted), epoch)
        else:
            self.finish_reason = "stop" if self._stop_requested else "length"
        if self.svc.recorder is not None and self.params.greedy and not self._stop_requested:
            self.svc.recorder.record(self.prompt, self.generated)

    def _stop_speculating(self, session: DrafterSession) -> bool:
        """Whether this session should stop speculating and hand itself over to the verifier,
        at the acceptance it sees (after a few rounds of it) with enough of the answer left
        for it to matter: where the verifier is saturated, when no draft length costs it less
        per token than cloud-only decoding; otherwise, when cloud-only decoding would serve
        the session itself faster than its best draft length."""
        tuner = self.tuner
        if tuner is None or session.stats.rounds < HANDOVER_ROUNDS or self._reproducible:
            return False
        load, inp = tuner.saturation.load, tuner.inputs()
        left = self.max_tokens - len(session.generated)
        if inp is None or left < HANDOVER_ROUNDS:
            return False
        if tuner.saturation.saturated and load is not None:
            return not speculation_pays(inp, load[1], load[2])
        return tuner.prefers_cloud_only()

    @property
    def _reproducible(self) -> bool:
        """A sampled request with a ``seed`` keeps the path it started on: the same seed then
        gives the same answer. (Speculation and cloud-only decoding each sample exactly from
        the target, but not the same draw; greedy answers are the same either way.)"""
        return self.params.seed is not None and not self.params.greedy

    def _turn_speculation_off(self) -> None:
        """From here on the verifier decodes this session on its own, without hints (an open
        or re-open asks for ``ar``: :meth:`~picospec.services.drafter.link.CloudLink._open_spec`),
        and the response and metrics say so."""
        self.spec = self.spec.model_copy(update={"cloud_led": True})
        self.proposer = None
        self.stats.draft_policy = "off"
        metrics.SPECULATION_OFF.inc()

    async def _hand_over(self, session: DrafterSession) -> AsyncIterator[list[int]]:
        """Hand the session over (its speculation stopped and nothing in flight): the verifier
        decodes the rest on its own, as in ``ar``, streaming each token."""
        await self._publish_block(session.hand_over(), track=False)
        self._turn_speculation_off()
        async for chunk in self._ar(None, session.epoch):
            yield chunk

    async def _hint(self, hints: Hints, hinted: bool, epoch: int) -> None:
        """After a cloud-led session's token: send the next hint, if the draft has one."""
        tokens = self.prompt + self.generated
        mode = self.spec.mode.value
        if hinted:  # a hint's token the verifier took: an accepted draft token
            metrics.ACCEPTED_TOKENS.labels(mode).inc()
            metrics.ACCEPTED_BY_SOURCE.labels(hints.proposer.name).inc()
        run = hints.on_token(tokens, len(self.prompt), hinted)
        if run:
            metrics.DRAFTS.labels(mode).inc()
            metrics.DRAFT_TOKENS.labels(mode).inc(len(run))
            block = DraftBlock(
                session=self.sid,
                epoch=epoch,
                seq=0,
                pos=len(tokens),
                prefix=(),
                tokens=tuple(run),
                q=(1.0,) * len(run),
                vocab_size=self.svc.model.vocab_size,
            )
            await self._publish_block(block, track=False)

    async def _speculate(self) -> AsyncIterator[list[int]]:
        """Draft, publish, apply verdicts. The session opens on a verifier while the first
        blocks are drafted (they wait in ``held``, bounded by the look-ahead), so the edge's
        prefill and first block overlap the cloud's round trip and prefill."""
        cap = self._max_draft_len()  # before the open: a refused request opens nothing
        opening = _Opening(asyncio.create_task(self._open(self.prompt, 0, first_token=True)))
        opening.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        await self._open_sent()
        try:
            session = self._new_session(cap)
            last_progress = time.monotonic()
            while not session.done and not self._stop_requested:
                # apply every verdict that has arrived, then draft while allowed, else wait
                verdict: Verdict | None
                if not session.speculating and not session.inflight and opening.task is None:
                    break  # speculation stopped and nothing left in flight: hand over
                if opening.task is not None and opening.task.done():
                    first = self._opened(session, opening)
                    if first:
                        yield self._emitted(first)
                    if session.done or self._stop_requested:
                        break
                    for block in opening.held:
                        await self._publish_block(block)
                    opening.held.clear()
                    continue  # speculation may have stopped at the open: nothing to wait for
                if not self._queue.empty():
                    verdict = self._took(self._queue.get_nowait())
                elif session.can_draft():
                    async for first in self._draft(session, opening):
                        yield first
                    continue
                elif opening.task is not None:
                    await asyncio.wait([opening.task])
                    continue
                else:
                    verdict = await self._next_verdict()
                if verdict is None or verdict.status is not VerdictStatus.OK:
                    await self._lost(session, verdict, last_progress)
                    continue
                committed = await self._apply(session, verdict)
                if committed is None:
                    continue  # not a verdict this session can use
                last_progress = time.monotonic()
                if committed:
                    yield self._emitted(committed)
            if not session.speculating and not session.done and not self._stop_requested:
                async for chunk in self._hand_over(session):
                    yield chunk
                return
            self.finish_reason = session.finish_reason or "stop"
        finally:
            if opening.task is not None:
                opening.task.cancel()
            self._keep_estimates()

    def _new_session(self, cap: int) -> DrafterSession:
        """The edge's session state machine, with its draft-length controller if adaptive."""
        svc, spec = self.svc, self.spec
        session = DrafterSession(
            svc.model, self.sid, self.prompt, self.params, spec, self.max_tokens, self.eos_ids,
            self.proposer,
        )  # fmt: skip
        self.stats.speculation = session.stats
        if spec.adaptive:
            self.tuner = DraftLenController(
                pipelined=spec.mode.pipelined,
                prior=svc.site(self.site_key),
                start_gamma=min(spec.draft_len, cap),
                start_lookahead=spec.max_inflight,
                max_gamma=min(MAX_GAMMA, cap),
            )
            self.stats.tuner = self.tuner
            self._tune(session)
        metrics.DRAFT_LEN.labels(spec.mode.value).set(session.draft_len)
        return session

    def _opened(self, session: DrafterSession, opening: _Opening) -> list[int]:
        """The open reply has come (Unavailable or BadRequest end the request here): learn
        from it, and take in the target's first token from the prefill, with the blocks
        drafted meanwhile that still hold. Where the reply says the replica is saturated and
        speculating does not pay there, speculation stops at once (the blocks already drafted
        get their verdicts, then the session is handed over). Returns the first token where it
        is still to be streamed."""
        assert opening.task is not None
        reply = opening.task.result()
        opening.task = None
        self._tune(session, reply)
        first: list[int] = []
        if reply.first_token is not None:
            got, opening.held = session.accept_first(reply.first_token)
            first = [] if opening.streamed_first else list(got.tokens)
        if session.speculating and not session.done and self._speculation_off():
            session.stop_speculating()
        return first

    async def _draft(self, session: DrafterSession, opening: _Opening) -> AsyncIterator[list[int]]:
        """One draft step, a free one (the proposer's) or the draft model's, and the block it
        sealed sent (or held while the session opens). The first token may arrive while the
        draft model is busy (its first step carries the prompt's prefill): it is streamed at
        once, and the session takes it in once the step is done (it must not change
        meanwhile)."""
        drafted, block = await self._free_step(session)
        if not drafted:
            step = asyncio.ensure_future(self._model_step(session.draft()))
            if opening.task is not None and not opening.streamed_first:
                await asyncio.wait({step, opening.task}, return_when=asyncio.FIRST_COMPLETED)
                reply = opening.task.result() if opening.task.done() else None
                if reply is not None and reply.first_token is not None:
                    opening.streamed_first = True
                    yield self._emitted([reply.first_token])
            block = await step
        if block is not None and opening.task is None:
            await self._publish_block(block)
        elif block is not None:
            opening.held.append(block)

    async def _lost(
        self, session: DrafterSession, verdict: Verdict | None, last_progress: float
    ) -> None:
        """No verdict in time, or a verifier that drains or forgot the session: re-open it
        elsewhere from the committed tokens, or fail once the cloud has made no progress for
        ``request_timeout_s``. A verdict about an old epoch (an old replica's) is ignored."""
        if verdict is not None and verdict.epoch < session.epoch:
            return
        timeout = self.svc.settings.request_timeout_s
        if time.monotonic() - last_progress > timeout:
            raise Unavailable(f"no verdict from the cloud within {timeout:.0f}s")
        session.rebase()
        reason = "lost" if verdict is None else verdict.status.name.lower()
        await self._migrate(reason, session.committed, session.epoch)

    async def _apply(self, session: DrafterSession, verdict: Verdict) -> list[int] | None:
        """Apply an OK verdict: the tokens it commits (after the sampler's correction where it
        asks for one), or None where the session cannot use it (counted and logged)."""
        before = _Tally.of(session.stats)
        try:
            got = session.on_verdict(verdict)
        except ProtocolError as e:
            metrics.REJECTED.labels(ROLE, "protocol").inc()
            event("verdict_ignored", logging.WARNING, error=str(e))
            return None
        if got is None:
            return None
        sent = self._sent_at.pop(verdict.seq, None)
        if sent is not None:
            round_trip = time.perf_counter() - sent.at
            metrics.VERIFY_RTT.labels(self.spec.mode.value).observe(round_trip)
            self._learn(session, verdict, sent, round_trip)
        if isinstance(got, SampleRequest):
            metrics.TAIL_MASS.inc(got.sparse.tail_mass)
            got = session.on_correction(await self._sample(got))
        self._count_round(session, before)
        return list(got.tokens) if isinstance(got, Committed) else []

    def _learn(self, session: DrafterSession, verdict: Verdict, sent: Sent, rtt: float) -> None:
        """Adaptive speculation: what the round tells the controller (acceptance, round trip,
        the replica's load), the next (γ, k), and whether to stop speculating."""
        tuner = self.tuner
        if tuner is None:
            return
        tuner.observe_round(verdict.accepted, verdict.accepted < sent.drafted, rtt, sent.fed)
        tuner.observe_load(verdict.busy, verdict.batch, verdict.sessions)
        metrics.DRAFT_POLICY_ROUNDS.labels(tuner.policy).inc()
        if verdict.busy is not None:
            metrics.DRAFT_POLICY_LOAD.set(verdict.busy)
        self._tune(session)
        if session.speculating and self._stop_speculating(session):
            session.stop_speculating()

    def _keep_estimates(self) -> None:
        """The next sessions of this kind of draft start from this one's estimates (the
        latest kinds kept: an emulated edge's kind comes from its request)."""
        if self.tuner is None:
            return
        self.svc.sites.pop(self.site_key, None)
        self.svc.sites[self.site_key] = self.tuner.estimates()
        while len(self.svc.sites) > MAX_DRAFT_KINDS:
            self.svc.sites.pop(next(iter(self.svc.sites)))

    def _count_round(self, session: DrafterSession, before: _Tally) -> None:
        mode, s = self.spec.mode.value, session.stats
        drafted, accepted = s.drafted - before.drafted, s.accepted - before.accepted
        for source, n in s.accepted_by_source.items():
            if n > before.by_source.get(source, 0):
                metrics.ACCEPTED_BY_SOURCE.labels(source).inc(n - before.by_source.get(source, 0))
        metrics.DRAFTS.labels(mode).inc()
        metrics.DRAFT_TOKENS.labels(mode).inc(drafted)
        metrics.ACCEPTED_TOKENS.labels(mode).inc(accepted)
        for i in range(accepted):
            metrics.ACCEPTED_PER_POS.labels(mode, str(i)).inc()
        metrics.ROLLBACKS.labels(mode).inc(s.rollbacks - before.rollbacks)
        metrics.WASTED.labels(mode).inc(s.wasted - before.wasted)


@dataclass
class _Opening:
    """A session's open request while its first blocks are drafted: the request, the blocks
    that wait for its reply, and whether its first token already went out."""

    task: asyncio.Task[OpenReply] | None
    held: list[DraftBlock] = field(default_factory=list)
    streamed_first: bool = False


@dataclass(frozen=True)
class _Tally:
    """A session's counts before a verdict, for the metrics of what the verdict changed."""

    drafted: int
    accepted: int
    rollbacks: int
    wasted: int
    by_source: dict[str, int]

    @classmethod
    def of(cls, st: DrafterStats) -> _Tally:
        return cls(st.drafted, st.accepted, st.rollbacks, st.wasted, dict(st.accepted_by_source))
