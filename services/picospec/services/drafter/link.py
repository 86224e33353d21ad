"""A drafter session's link to the cloud: opening it on a verifier (and again elsewhere),
publishing its blocks, waiting for verdicts with liveness pings, the sampler's corrections,
closing it. :class:`~picospec.services.drafter.service.Generation` drives a session over it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import nats.errors

from picospec.protocol import subjects
from picospec.protocol.codec import (
    DraftBlock,
    SampleReply,
    SampleRequest,
    Verdict,
    decode_as,
    encode,
)
from picospec.services import metrics
from picospec.services.control import CloseSession, ErrorReply, OpenReply, OpenSession
from picospec.services.shell import event, headers
from picospec.speculation.spec import Mode, SpecConfig

if TYPE_CHECKING:
    from picospec.services.drafter.stats import Stats
    from picospec.speculation.proposers import Proposer
    from picospec.speculation.sampling import SamplingParams

LOST_AFTER_PINGS = 3  # a live verifier silent for this many verify timeouts: message lost


class Unavailable(RuntimeError):
    """The cloud (verifiers or samplers) could not be reached in time: HTTP 503."""


class BadRequest(ValueError):
    """The verifier refused the request itself (e.g. prompt too long): HTTP 400."""


class Sent(NamedTuple):
    """A block on its way to its verdict: when it was sent, the tokens it feeds the verifier
    (its prefix and its drafts) and its draft tokens."""

    at: float
    fed: int
    drafted: int


class CloudLink:
    """The cloud side of one request's session (module docstring); the attributes are set by
    :class:`~picospec.services.drafter.service.Generation`."""

    svc: Any  # the DrafterService: its settings, NATS client, model, verdict subject
    sid: bytes
    params: SamplingParams
    spec: SpecConfig
    proposer: Proposer | None
    max_tokens: int
    eos_ids: frozenset[int]
    generated: list[int]
    verifier: str | None
    stats: Stats
    _queue: asyncio.Queue[tuple[Verdict, int]]
    _open_rtt: float | None
    _sent_at: dict[int, Sent]

    async def _open_sent(self) -> None:
        """Wait until the open request just queued has left for the NATS server (a PING/PONG
        with the local node), before the draft model's prefill takes the edge's CPU: else the
        prefill delays the open, and the first token with it."""
        await asyncio.sleep(0)  # the open task builds its request and queues it
        with contextlib.suppress(Exception):  # a slow or lost connection: the open copes
            await self.svc.nc.flush(timeout=1)

    def _open_spec(self) -> SpecConfig:
        """What the open asks for: a cloud-led session with no draft to hint from (its
        speculation turned off) is cloud-only decoding, so the verifier's engine decodes it on
        its own (on vLLM: vLLM's decoding, not one round per token)."""
        if self.spec.cloud_led and self.proposer is None:
            return self.spec.model_copy(update={"mode": Mode.AR, "cloud_led": False})
        return self.spec

    async def _open(self, committed: list[int], epoch: int, first_token: bool = False) -> OpenReply:
        """Open (or re-open) the session on any verifier, retrying until the deadline; with
        ``first_token`` the reply carries the target's first token from the prefill."""
        s = self.svc.settings
        req = OpenSession(
            session=self.sid.hex(),
            prompt=committed,
            params=self.params,
            spec=self._open_spec(),
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
            self.svc.saturation.observe(reply.busy, reply.batch, reply.sessions)
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

    async def _publish_block(
        self, block: DraftBlock, data: bytes | None = None, track: bool = True
    ) -> None:
        """Send ``block`` to the session's verifier; ``track``: time it until its verdict (a
        cloud-led session's hints have none of their own)."""
        if track:
            fed = len(block.prefix) + len(block.tokens)
            self._sent_at[block.seq] = Sent(time.perf_counter(), fed, len(block.tokens))
        data = encode(block) if data is None else data
        await self.svc.nc.publish(
            subjects.verify(self.verifier or "-"),
            data,
            reply=self.svc.verdict_subject,
            headers=headers(),
        )
        self._count_up(len(data))
