"""Faults and load against real processes: nats-server, verifiers, sampler, drafter, tiny models.

Two stacks, one per test class (each torn down when its class is done):

- ``TestSingleServer``: one nats-server, 2 verifiers. Verifier loss (SIGKILL), scale-down
  (SIGTERM drain), a NATS server restart, 32 concurrent streams, clients that go away.
- ``TestEdgeCloud``: a cloud hub and an edge leaf joined through the link emulator, 1 verifier
  with small limits. Partitions (short, long, edge fallback), a hub restart, saturation and
  backpressure, the idle timeout of a session whose drafter died.

The invariant every fault test checks: a streamed answer is either complete and identical to
the target model's greedy output, or it ends with an error event after a prefix of it. Never a
wrong, duplicated or dropped token. Measured figures (stalls, timings, throughput, memory) are
printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from pydantic import ValidationError

from picospec.protocol import subjects
from picospec.protocol.codec import Verdict, VerdictStatus, decode_as
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel
from picospec.services.control import CloseSession, OpenReply, OpenSession
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import SpecConfig
from picospec.tools.loadgen import rss_bytes, run_load, stream_one
from picospec.tools.stack.up import Stack, http_status
from stackutil import (
    StreamResult,
    chat,
    continuation,
    expected,
    gauge,
    metric,
    prompt_ids,
    scrape,
    stack_config,
    stream,
    wait_for,
)


def report(title: str, lines: list[str]) -> None:
    print(f"\n== {title}")
    for line in lines:
        print(f"   {line}")


@pytest.fixture(scope="module")
def draft_model(tiny_dirs: tuple[Path, Path]) -> LanguageModel:
    return load_model(str(tiny_dirs[1]), device="cpu")


def check_clean(res: StreamResult, ref_text: str) -> str:
    """The fault invariant. Returns ``"complete"`` or ``"failed"`` (error event after a prefix)."""
    assert res.exception is None, res.exception
    if res.ok:
        assert res.text == ref_text, "a completed answer must be the reference, token for token"
        return "complete"
    assert res.status == 200 and res.done and res.error is not None, (res.status, res.body)
    assert res.error["code"] == "cloud_unreachable", res.error
    assert ref_text.startswith(res.text), "a failed stream carries only verified tokens"
    return "failed"


async def progressed(results: list[StreamResult], chunks: int, timeout: float) -> None:
    """Wait until every stream has received at least ``chunks`` content chunks."""
    deadline = time.monotonic() + timeout
    while not all(len(r.chunks) >= chunks for r in results):
        assert time.monotonic() < deadline, [len(r.chunks) for r in results]
        await asyncio.sleep(0.05)


async def agauge(stack: Stack, service: str, name: str) -> float:
    """:func:`gauge` off the event loop (a blocking scrape would delay the stream readers)."""
    return await asyncio.to_thread(gauge, stack, service, name)


def open_request(ref: LanguageModel, reply_to: str) -> tuple[str, bytes]:
    sid = (time.time_ns().to_bytes(8, "big") + bytes(8)).hex()
    body = OpenSession(
        session=sid,
        prompt=prompt_ids(ref, "a direct session"),
        params=SamplingParams(temperature=0),
        spec=SpecConfig(),
        vocab_size=ref.vocab_size,
        reply_to=reply_to,
        max_new_tokens=16,
    )
    return sid, body.model_dump_json().encode()


# --------------------------------------------------------------------------------------------
# one nats-server, two verifiers
# --------------------------------------------------------------------------------------------

SINGLE_ENV = {
    "PICOSPEC_REQUEST_TIMEOUT_S": "10",
    "PICOSPEC_DRAIN_GRACE_S": "8",
    "PICOSPEC_EMULATED_EDGES": "true",
    "PICOSPEC_MAX_CONCURRENT_REQUESTS": "72",
    "PICOSPEC_MAX_SESSIONS": "160",
}


@pytest.fixture(scope="class")
def single(tiny_dirs: tuple[Path, Path]) -> Stack:
    with Stack(stack_config(tiny_dirs, env=SINGLE_ENV)) as s:
        yield s


def disrupt_under_streams(
    s: Stack, results: list[StreamResult], n: int, disrupt: Callable[[], object]
) -> tuple[float, float]:
    """Stream every ``results`` prompt for ``n`` tokens; once they have all progressed, run
    ``disrupt`` (blocking, on a thread: a NATS restart, a link cut and restore). Returns when
    the disruption began and when it was over."""

    async def run() -> tuple[float, float]:
        async with aiohttp.ClientSession() as http:
            tasks = [
                asyncio.create_task(stream(s.api_url, r.content, n, http=http, into=r))
                for r in results
            ]
            await progressed(results, 10, 30)
            t0 = time.perf_counter()
            await asyncio.to_thread(disrupt)
            back = time.perf_counter()
            await asyncio.gather(*tasks)
            return t0, back

    return asyncio.run(run())


class TestSingleServer:
    def test_kill9_verifier_sessions_finish_elsewhere_and_the_stall_is_bounded(
        self, single: Stack, reference: LanguageModel
    ) -> None:
        """SIGKILL the replica holding the most of 6 live streams: its sessions re-prefill on
        the other one and every answer is the reference; the stall each stream saw is printed."""
        s, n = single, 400
        prompts = [f"Kill test session {i}" for i in range(6)]
        results = [StreamResult(content=p) for p in prompts]

        async def run() -> tuple[str, int, float]:
            async with aiohttp.ClientSession() as http:
                tasks = [
                    asyncio.create_task(stream(s.api_url, r.content, n, http=http, into=r))
                    for r in results
                ]
                await progressed(results, 10, 30)
                held = {
                    v: await agauge(s, v, "picospec_active_sessions")
                    for v in ("verifier-1", "verifier-2")
                }
                victim = max(held, key=held.get)
                t_kill = time.perf_counter()
                await asyncio.to_thread(s.kill, victim, signal.SIGKILL)
                await asyncio.gather(*tasks)
                return victim, int(held[victim]), t_kill

        victim, victim_sessions, t_kill = asyncio.run(run())
        survivor = "verifier-1" if victim == "verifier-2" else "verifier-2"
        lines, stalls = [], []
        for r in results:
            assert r.ok, (r.status, r.error, r.exception)
            assert r.text == expected(reference, r.content, n), "no token duplicated or dropped"
            assert r.final["usage"]["completion_tokens"] == n
            stats = r.final["picospec"]
            stall = r.stall_around(t_kill)
            if stats["migrations"]:
                assert stats["verifier"] == survivor
                stalls.append(stall)
            lines.append(
                f"{r.content}: migrations={stats['migrations']} ended on {stats['verifier']}; "
                f"stall around the kill {stall:.2f}s (largest gap before it "
                f"{r.max_gap_before(t_kill):.2f}s)"
            )
        assert victim_sessions >= 1 and len(stalls) >= victim_sessions
        # verify_timeout_s (2) + a ping + re-prefill on a 2-core machine under load
        assert max(stalls) < 12.0, stalls
        report(
            f"kill -9 {victim} holding {victim_sessions} of {len(results)} sessions: "
            f"migrated sessions' stall max {max(stalls):.2f}s, mean "
            f"{sum(stalls) / len(stalls):.2f}s",
            lines,
        )
        s.start_service(victim)

    def test_kill9_under_64_emulated_edges_every_stream_completes_identically(
        self, single: Stack, reference: LanguageModel
    ) -> None:
        """64 emulated edge users (per-token acceptance 0.9, paced draft steps) stream at once
        over two verifiers; SIGKILL the one holding more of them: every stream completes, with
        no error, and its text is the target's greedy answer (what ar gave for its prompt)."""
        s, n, users = single, 48, 64
        prompts = [f"Fleet user {i} asks about the weather" for i in range(users)]
        base = {"ignore_eos": True, "min_tokens": n}
        edge = {"acceptance": 0.9, "step_s": 0.002, "seed": 1}

        async def run() -> tuple[list[StreamResult], list[StreamResult], str, int]:
            conn = aiohttp.TCPConnector(limit=users + 8)
            async with aiohttp.ClientSession(connector=conn) as http:
                # the cloud-only answers: what the emulated edges replay, and the reference
                ar = [
                    await stream(s.api_url, p, n, http=http, mode="ar", **base)
                    for p in prompts
                ]  # fmt: skip
                results = [StreamResult(content=p) for p in prompts]
                tasks = [
                    asyncio.create_task(
                        stream(s.api_url, r.content, n, http=http, into=r, timeout=300,
                               mode="picospec", emulated_edge=edge, **base)
                    )
                    for r in results
                ]  # fmt: skip
                await progressed(results, 3, 120)
                held = {
                    v: await agauge(s, v, "picospec_active_sessions")
                    for v in ("verifier-1", "verifier-2")
                }
                victim = max(held, key=held.get)
                await asyncio.to_thread(s.kill, victim, signal.SIGKILL)
                await asyncio.gather(*tasks)
                return ar, results, victim, int(held[victim])

        ar, results, victim, victim_sessions = asyncio.run(run())
        assert all(r.ok for r in ar), [(r.status, r.body) for r in ar if not r.ok][:3]
        bad = [(r.status, r.body, r.error, r.exception) for r in results if not r.ok]
        assert not bad, bad[:3]
        migrated = sum(1 for r in results if r.final["picospec"]["migrations"])
        for r, a in zip(results, ar, strict=True):
            assert r.text == a.text, "an emulated edge's answer must be ar's, token for token"
            assert r.final["usage"]["completion_tokens"] == n
        assert victim_sessions >= 1 and migrated >= 1
        acceptance = [r.final["picospec"]["accepted_by_source"].get("emulated", 0) for r in results]
        assert sum(acceptance) > 0
        off = sum(1 for r in results if r.final["picospec"].get("draft_policy") == "off")
        report(
            f"kill -9 {victim} holding {victim_sessions} of {users} emulated edges: all "
            f"{users} streams complete and equal ar's; {migrated} migrated, {off} stopped "
            "speculating (a saturated verifier)",
            [],
        )
        s.start_service(victim)

    def test_emulated_edges_refuse_what_they_cannot_replay(self, single: Stack) -> None:
        """An emulated edge replays ar's greedy answer: a prompt never sent in ar, a sampled
        request or a mode that does not draft gets a clear 400, and nothing runs."""
        edge = {"emulated_edge": {"acceptance": 0.9, "step_s": 0.0}}
        api = single.api_url
        status, body = chat(api, "never asked in ar", **edge)
        assert status == 400 and "no recorded answer" in body["error"]["message"]
        assert chat(api, "asked in ar", mode="ar", max_tokens=8)[0] == 200
        for extra, words in (
            ({"temperature": 0.7}, "temperature"),
            ({"mode": "ar"}, "does not"),
        ):
            status, body = chat(api, "asked in ar", max_tokens=8, **edge, **extra)
            assert status == 400 and words in body["error"]["message"], body
        status, body = chat(api, "asked in ar", max_tokens=8, **edge)
        assert status == 200, body
        assert body["picospec"]["free_drafts"] > 0 and body["picospec"]["verified"]

    def test_sigterm_drains_takes_no_new_sessions_and_fails_nothing(
        self, single: Stack, reference: LanguageModel
    ) -> None:
        """SIGTERM verifier-2 while it holds API sessions and one direct session whose client
        ignores DRAINING (so the drain lasts its whole grace period). During the drain no new
        session lands on it; the API sessions move at once; nothing fails; it exits with 0."""
        s, n = single, 500
        prompts = [f"Drain test {i}" for i in range(10)]
        results = [StreamResult(content=p) for p in prompts]
        grace = float(SINGLE_ENV["PICOSPEC_DRAIN_GRACE_S"])
        names: dict[str, str] = {}

        async def run() -> dict[str, Any]:
            nc = await nats.connect(s.nats_url)
            out: dict[str, Any] = {}
            sticky_subject = "picospec.v1.verdict.faulttest.sticky"
            verdicts: list[Verdict] = []

            async def on_verdict(msg: Any) -> None:
                verdicts.append(decode_as(msg.data, Verdict))

            await nc.subscribe(sticky_subject, cb=on_verdict)
            # a direct session whose client ignores DRAINING: its replica is the victim
            _, body = open_request(reference, sticky_subject)
            msg = await nc.request(subjects.SESSIONS_OPEN, body, timeout=10)
            victim = names["victim"] = OpenReply.model_validate_json(msg.data).verifier
            names["other"] = "verifier-1" if victim == "verifier-2" else "verifier-2"
            async with aiohttp.ClientSession() as http:
                tasks = []
                # API streams until the victim holds at least one of them too
                for r in results:
                    tasks.append(
                        asyncio.create_task(stream(s.api_url, r.content, n, http=http, into=r))
                    )
                    if len(tasks) >= 3:
                        await progressed(results[: len(tasks)], 5, 30)
                        if await agauge(s, victim, "picospec_active_sessions") >= 2:
                            break
                started = results[: len(tasks)]
                out["started"] = started
                await progressed(started, 10, 30)
                held = await agauge(s, victim, "picospec_active_sessions")
                out["held"] = held
                t_term = time.perf_counter()
                s.kill(victim, signal.SIGTERM)
                # draining: not ready, out of the queue group
                await asyncio.to_thread(
                    wait_for,
                    lambda: http_status(f"{s.services[victim].url}/ready") == 503,
                    5,
                    0.05,
                    "the draining verifier's /ready turning 503",
                )
                # the API sessions leave at once (DRAINING); the direct one stays
                await asyncio.to_thread(
                    wait_for,
                    lambda: gauge(s, victim, "picospec_active_sessions") == 1,
                    grace,
                    0.05,
                    "the API sessions leaving the draining verifier",
                )
                out["moved_after_s"] = time.perf_counter() - t_term
                # new work during the drain: direct opens and API requests
                landed = []
                for _ in range(8):
                    sid, body = open_request(reference, "picospec.v1.verdict.faulttest.other")
                    msg = await nc.request(subjects.SESSIONS_OPEN, body, timeout=10)
                    landed.append(OpenReply.model_validate_json(msg.data).verifier)
                    await nc.publish(
                        subjects.close(landed[-1]),
                        CloseSession(session=sid).model_dump_json().encode(),
                    )
                news = await asyncio.gather(
                    *(stream(s.api_url, f"During the drain {i}", 30, http=http) for i in range(3))
                )
                out["still_draining"] = s.services[victim].proc.poll() is None
                out["landed"], out["news"] = landed, news
                await asyncio.gather(*tasks)
            out["exit_code"] = await asyncio.to_thread(s.services[victim].proc.wait, grace + 10)
            out["exited_after_s"] = time.perf_counter() - t_term
            out["draining_verdicts"] = [v for v in verdicts if v.status is VerdictStatus.DRAINING]
            await nc.close()
            return out

        out = asyncio.run(run())
        victim, other = names["victim"], names["other"]
        assert out["held"] >= 2, "the victim held the direct session and at least one API one"
        assert out["still_draining"], "the new work ran while the victim was still draining"
        assert out["landed"] == [other] * 8, "no new session on a draining verifier"
        for r in out["news"]:
            assert r.ok and r.final["picospec"]["verifier"] == other
            assert r.final["picospec"]["migrations"] == 0
            assert r.text == expected(reference, r.content, 30)
        migrated = 0
        for r in out["started"]:
            assert r.ok, (r.status, r.error)
            assert r.text == expected(reference, r.content, n)
            migrated += r.final["picospec"]["migrations"]
        assert migrated >= 1
        assert out["draining_verdicts"], "the direct session was told to move"
        assert out["exit_code"] == 0
        assert out["exited_after_s"] < grace + 5, (
            "a client that never leaves delays the exit by the grace period at most"
        )
        log = s.log_path(victim).read_text()
        assert '"event": "drained", "left": 1' in log
        report(
            "SIGTERM drain",
            [
                f"{victim} held {out['held']:.0f} sessions; API sessions gone after "
                f"{out['moved_after_s']:.2f}s; exited (code 0) after {out['exited_after_s']:.1f}s "
                f"(grace {grace:.0f}s, one client ignoring DRAINING)",
                f"during the drain: 8/8 direct opens and 3/3 API requests landed on {other}",
                f"{migrated} of {len(out['started'])} API sessions migrated, 0 failed",
            ],
        )
        s.start_service(victim)

    def test_nats_restart_mid_generation_is_retried_or_failed_cleanly(
        self, single: Stack, reference: LanguageModel
    ) -> None:
        """Restart the nats-server (down 1 s) under 6 live streams. Every client reconnects;
        every stream ends, complete and identical or with an error event after a prefix of the
        reference, and none goes without a token (or its end) for longer than its request
        timeout after NATS is back (request_timeout_s bounds the time without progress, not a
        request's length: docs/reliability.md); a new request afterwards is served correctly."""
        s, n = single, 400
        timeout = float(SINGLE_ENV["PICOSPEC_REQUEST_TIMEOUT_S"])
        results = [StreamResult(content=f"Restart test {i}") for i in range(6)]

        t0, back = disrupt_under_streams(s, results, n, lambda: s.restart_nats("nats", 1.0))
        outcomes, lines = [], []
        for r in results:
            ref_text = expected(reference, r.content, n)
            outcome = check_clean(r, ref_text)
            outcomes.append(outcome)
            assert r.t_end > 0, "every stream ended"
            assert r.stall_around(back) < timeout + 10, "never stalled past the request timeout"
            lines.append(
                f"{r.content}: {outcome} ({len(r.text)}/{n} tokens), stall "
                f"{r.stall_around(t0):.2f}s, ended {r.t_end - t0:.1f}s after the restart began"
                + (f", migrations={r.final['picospec']['migrations']}" if r.final else "")
            )
        assert s.exited() == {}
        for name in s.services:
            assert http_status(f"{s.services[name].url}/ready") == 200, name
        after = asyncio.run(stream(s.api_url, "After the restart", 40))
        assert after.ok and after.text == expected(reference, "After the restart", 40)
        for name in ("verifier-1", "verifier-2", "drafter", "sampler"):
            assert metric(scrape(s.services[name].url), "picospec_nats_reconnects_total") >= 1
        report(
            f"NATS restart (down {back - t0:.1f}s): {outcomes.count('complete')} complete, "
            f"{outcomes.count('failed')} failed cleanly",
            lines,
        )

    def test_32_concurrent_streams_sustained_then_memory_is_freed(
        self, single: Stack, reference: LanguageModel
    ) -> None:
        """32 streaming clients for 15 s: zero errors, every answer the reference; afterwards
        every verifier holds no session and no KV cache bytes."""
        s = single
        prompts = [f"Load prompt {i}" for i in range(8)]
        refs = {p: expected(reference, p, 48) for p in prompts}
        verifiers = ("verifier-1", "verifier-2")
        rss_before = {v: rss_bytes(s.pids[v]) for v in verifiers}
        peak: dict[str, float] = {v: 0.0 for v in verifiers}

        async def run() -> dict[str, Any]:
            async def watch() -> None:
                while True:
                    for v in verifiers:
                        peak[v] = max(peak[v], await agauge(s, v, "picospec_active_sessions"))
                    await asyncio.sleep(0.5)

            w = asyncio.create_task(watch())
            try:
                return await run_load(
                    s.api_url,
                    concurrency=32,
                    duration_s=15,
                    max_tokens=48,
                    prompts=prompts,
                    timeout_s=60,
                    check=lambda p, text: text == refs[p],
                )
            finally:
                w.cancel()

        rep = asyncio.run(run())
        rss_after = {v: rss_bytes(s.pids[v]) for v in verifiers}
        assert rep["error_count"] == 0, rep["errors"]
        assert rep["ok"] >= 32 and rep["tokens"] == 48 * rep["ok"]
        for v in verifiers:
            wait_for(
                lambda v=v: (
                    gauge(s, v, "picospec_active_sessions") == 0
                    and gauge(s, v, "picospec_kv_cache_bytes") == 0
                ),
                10,
                what=f"{v} freeing every session",
            )
        assert gauge(s, "drafter", "picospec_num_requests_running") == 0
        ttft, itl = rep["ttft_s"], rep["itl_s"]
        report(
            "load: 32 concurrent streams, 15 s",
            [
                f"requests {rep['requests']} ok {rep['ok']} errors {rep['error_count']}; "
                f"{rep['tokens']} tokens, {rep['tokens_per_s']:.0f} tokens/s, "
                f"{rep['requests_per_s']:.1f} requests/s",
                f"TTFT p50 {ttft['p50'] * 1e3:.0f} ms p99 {ttft['p99'] * 1e3:.0f} ms; "
                f"ITL p50 {itl['p50'] * 1e3:.1f} ms p99 {itl['p99'] * 1e3:.1f} ms",
                "peak sessions held: " + ", ".join(f"{v} {peak[v]:.0f}" for v in verifiers),
                "verifier RSS before -> after: "
                + ", ".join(
                    f"{v} {rss_before[v] / 2**20:.0f} -> {rss_after[v] / 2**20:.0f} MiB"
                    for v in verifiers
                ),
                "after the load: 0 sessions, 0 KV cache bytes on both verifiers",
            ],
        )

    def test_clients_that_go_away_mid_stream_free_their_sessions(self, single: Stack) -> None:
        """6 clients close their connections after 5 chunks of 600-token answers: the drafter
        closes the sessions and the verifiers free their KV caches."""
        s = single

        def total_499() -> float:
            return metric(
                scrape(s.services["drafter"].url), "picospec_requests_total", status="499"
            )

        before_499 = total_499()

        async def run() -> list[Any]:
            async with aiohttp.ClientSession() as http:
                return await asyncio.gather(
                    *(
                        stream_one(http, s.api_url, f"Abort {i}", 600, abort_after_chunks=5)
                        for i in range(6)
                    )
                )

        t0 = time.perf_counter()
        got = asyncio.run(run())
        assert [r.error for r in got] == ["aborted"] * 6
        for v in ("verifier-1", "verifier-2"):
            wait_for(
                lambda v=v: (
                    gauge(s, v, "picospec_active_sessions") == 0
                    and gauge(s, v, "picospec_kv_cache_bytes") == 0
                ),
                10,
                what=f"{v} freeing the aborted sessions",
            )
        freed = time.perf_counter() - t0
        wait_for(lambda: gauge(s, "drafter", "picospec_num_requests_running") == 0, 5)
        aborted = total_499() - before_499
        report(
            "client disconnects",
            [
                f"6 streams aborted after 5 chunks: all sessions freed {freed:.1f}s after the "
                f"requests started; drafter counted {aborted:.0f} as 499"
            ],  # fmt: skip
        )
        assert aborted == 6


# --------------------------------------------------------------------------------------------
# edge leaf + cloud hub through the link emulator; one verifier with small limits
# --------------------------------------------------------------------------------------------

EDGE_ENV = {
    "PICOSPEC_REQUEST_TIMEOUT_S": "4",
    "PICOSPEC_VERIFY_TIMEOUT_S": "1",
    "PICOSPEC_NATS_TIMEOUT_S": "2",
    "PICOSPEC_IDLE_TIMEOUT_S": "3",
    "PICOSPEC_MAX_SESSIONS": "3",
    "PICOSPEC_MAX_CONCURRENT_REQUESTS": "5",
    "PICOSPEC_QUEUE_TIMEOUT_S": "1",
}


@pytest.fixture(scope="class")
def edge(tiny_dirs: tuple[Path, Path]) -> Stack:
    cfg = stack_config(
        tiny_dirs, env=EDGE_ENV, topology="edge-cloud", verifiers=1, emulate_link=True
    )
    with Stack(cfg) as s:
        yield s


def split_verified(
    text: str, ref_text: str, prompt: list[int], draft: LanguageModel, n: int
) -> int:
    """For an answer that degraded to the edge: check it is a prefix of the reference followed
    by the draft model's greedy continuation of exactly that prefix; return the prefix length."""
    k = 0
    while k < min(len(text), len(ref_text)) and text[k] == ref_text[k]:
        k += 1
    ids = draft.encode(text)
    assert draft.decode(ids) == text and len(ids) == len(text)  # one token per character
    rest = continuation(draft, prompt + ids[:k], n - k)
    assert draft.decode(rest) == text[k:], "after the verified prefix: the draft model alone"
    return k


class TestEdgeCloud:
    def test_short_partition_sessions_resume_identically(
        self, edge: Stack, reference: LanguageModel
    ) -> None:
        """Cut the leaf link for 2 s (under the 4 s request timeout) mid-generation: both
        streams resume after the link heals, by re-opening on the verifier, and finish as the
        reference."""
        s, n = edge, 300
        results = [StreamResult(content=f"Partition test {i}") for i in range(2)]

        def cut_for_2s() -> None:
            s.link.cut()
            time.sleep(2.0)
            s.link.restore()

        t_cut, t_restore = disrupt_under_streams(s, results, n, cut_for_2s)
        lines = []
        for r in results:
            assert r.ok, (r.status, r.error)
            assert r.text == expected(reference, r.content, n)
            assert r.final["picospec"]["migrations"] >= 1
            lines.append(
                f"{r.content}: stall {r.stall_around(t_cut):.2f}s "
                f"(link down {t_restore - t_cut:.1f}s), migrations "
                f"{r.final['picospec']['migrations']}"
            )
        report("partition of 2 s: sessions resumed, output identical", lines)

    def test_long_partition_gives_503_or_the_edge_fallback(
        self, edge: Stack, reference: LanguageModel, draft_model: LanguageModel
    ) -> None:
        """Cut the link for longer than the request timeout. A stream in progress ends with a
        cloud_unreachable error event after a prefix of the reference; one with fallback edge
        continues on the draft model alone, marked unverified; a new request gets a plain 503,
        or with fallback edge a 200 marked X-Picospec-Verified: false. After the link heals,
        requests are served (and verified) again."""
        s, n = edge, 300
        degraded_before = metric(
            scrape(s.services["drafter"].url), "picospec_degraded_responses_total"
        )
        plain, fallback = StreamResult(content="Long cut plain"), StreamResult("Long cut edge")

        async def run() -> tuple[StreamResult, StreamResult, float, float]:
            async with aiohttp.ClientSession() as http:
                tasks = [
                    asyncio.create_task(stream(s.api_url, plain.content, n, http=http, into=plain)),
                    asyncio.create_task(
                        stream(
                            s.api_url,
                            fallback.content,
                            n,
                            http=http,
                            into=fallback,
                            fallback="edge",
                        )  # fmt: skip
                    ),
                ]
                await progressed([plain, fallback], 10, 30)
                t_cut = time.perf_counter()
                await asyncio.to_thread(s.link.cut)
                new_plain, new_edge = await asyncio.gather(
                    stream(s.api_url, "New during the cut", 20, http=http),
                    stream(s.api_url, "New edge during the cut", 20, http=http, fallback="edge"),
                )
                await asyncio.gather(*tasks)
                down = time.perf_counter() - t_cut
                await asyncio.to_thread(s.link.restore)
                return new_plain, new_edge, t_cut, down

        new_plain, new_edge, t_cut, down = asyncio.run(run())
        ref_plain = expected(reference, plain.content, n)
        assert check_clean(plain, ref_plain) == "failed"
        assert plain.t_end - t_cut < 4 + 1 + 6, "failed within the request timeout"
        # the fallback stream: verified prefix, then the draft model alone
        assert fallback.ok, (fallback.error, fallback.status)
        assert fallback.final["picospec"]["verified"] is False
        assert fallback.headers["X-Picospec-Verified"] == "true", "known only after the start"
        k = split_verified(
            fallback.text,
            expected(reference, fallback.content, n),
            prompt_ids(reference, fallback.content),
            draft_model,
            n,
        )
        assert k >= 10
        # new requests while the cloud is unreachable
        assert new_plain.status == 503 and new_plain.body["error"]["code"] == "cloud_unreachable"
        assert set(new_plain.body["error"]) == {"message", "type", "param", "code"}
        assert new_edge.ok and new_edge.headers["X-Picospec-Verified"] == "false"
        assert new_edge.final["picospec"]["verified"] is False
        assert new_edge.text == expected(draft_model, new_edge.content, 20)
        degraded = metric(scrape(s.services["drafter"].url), "picospec_degraded_responses_total")
        assert degraded - degraded_before == 2
        # healed: served and verified again (the leaf redials within about a second)
        s.nats["nats-edge"].wait_leafnodes(1, timeout=15)
        after = asyncio.run(stream(s.api_url, "After the long cut", 30))
        assert after.ok and after.text == expected(reference, "After the long cut", 30)
        assert after.final["picospec"]["verified"] is True
        report(
            f"partition of {down:.1f}s (request timeout 4 s)",
            [
                f"stream in progress: error event cloud_unreachable after {len(plain.text)} "
                f"verified tokens, {plain.t_end - t_cut:.1f}s after the cut",
                f"stream in progress with fallback edge: {k} verified tokens then "
                f"{len(fallback.text) - k} from the draft model, verified=false",
                "new request: HTTP 503 cloud_unreachable after "
                f"{new_plain.t_end - new_plain.t_sent:.1f}s "
                f"(Retry-After: {new_plain.headers.get('Retry-After')})",
                "new request with fallback edge: 200, X-Picospec-Verified: false, the draft "
                "model's greedy answer",
                f"picospec_degraded_responses_total +{degraded - degraded_before:.0f}",
            ],
        )

    def test_hub_restart_mid_generation_is_retried_or_failed_cleanly(
        self, edge: Stack, reference: LanguageModel
    ) -> None:
        """Restart the cloud hub (down 1 s) under 3 live streams: the verifier reconnects to the
        hub, the leaf rejoins, and every stream is complete and identical or failed cleanly."""
        s, n = edge, 300
        results = [StreamResult(content=f"Hub restart {i}") for i in range(3)]

        t0, back = disrupt_under_streams(s, results, n, lambda: s.restart_nats("nats-hub", 1.0))
        lines, outcomes = [], []
        for r in results:
            outcome = check_clean(r, expected(reference, r.content, n))
            outcomes.append(outcome)
            assert r.t_end - back < 4 + 10
            lines.append(
                f"{r.content}: {outcome} ({len(r.text)}/{n}), stall {r.stall_around(t0):.2f}s"
                + (f", migrations={r.final['picospec']['migrations']}" if r.final else "")
            )
        assert s.exited() == {}
        after = asyncio.run(stream(s.api_url, "After the hub restart", 30))
        assert after.ok and after.text == expected(reference, "After the hub restart", 30)
        report(
            f"hub restart (hub and leaf back after {back - t0:.1f}s): "
            f"{outcomes.count('complete')} complete, {outcomes.count('failed')} failed cleanly",
            lines,
        )

    def test_saturation_waits_or_refuses_cleanly_and_nothing_grows(
        self, edge: Stack, reference: LanguageModel
    ) -> None:
        """14 concurrent streams against 5 drafter slots (queue timeout 1 s) and a verifier
        with 3 session slots: each request completes identically, or gets 429 with Retry-After
        (no slot within 1 s), or 503 (no verifier slot within the request timeout). The
        verifier never holds more than 3 sessions; every gauge returns to 0. (A fixed γ: with
        ``auto`` the tiny models' sessions hand over to cloud-only decoding, which frees the
        slots within the queue timeout.)"""
        s, n = edge, 150
        prompts = [f"Saturate {i}" for i in range(14)]
        peak = {"sessions": 0.0, "running": 0.0, "waiting": 0.0}

        async def run() -> list[Any]:
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    peak["sessions"] = max(
                        peak["sessions"], await agauge(s, "verifier-1", "picospec_active_sessions")
                    )
                    for key, name in (("running", "picospec_num_requests_running"),
                                      ("waiting", "picospec_num_requests_waiting")):  # fmt: skip
                        peak[key] = max(peak[key], await agauge(s, "drafter", name))
                    await asyncio.sleep(0.1)

            w = asyncio.create_task(watch())
            async with aiohttp.ClientSession() as http:
                got = await asyncio.gather(
                    *(stream(s.api_url, p, n, http=http, draft_len=4) for p in prompts)
                )
            stop.set()
            await w
            return got

        got = asyncio.run(run())
        codes: dict[int, int] = {}
        for r in got:
            codes[r.status] = codes.get(r.status, 0) + 1
            if r.status == 200:
                check_clean(r, expected(reference, r.content, n))
            elif r.status == 429:
                assert r.headers.get("Retry-After") == "1"
                assert r.body["error"]["code"] == "overloaded"
            else:
                assert r.status == 503, (r.status, r.body)
                assert r.body["error"]["code"] == "cloud_unreachable"
            if r.status != 200:
                assert set(r.body["error"]) == {"message", "type", "param", "code"}
        assert codes.get(429, 0) >= 1 and codes.get(200, 0) >= 3, codes
        assert peak["sessions"] <= 3 and peak["running"] <= 5
        wait_for(lambda: gauge(s, "verifier-1", "picospec_active_sessions") == 0, 10)
        assert gauge(s, "verifier-1", "picospec_kv_cache_bytes") == 0
        assert gauge(s, "drafter", "picospec_num_requests_running") == 0
        assert gauge(s, "drafter", "picospec_num_requests_waiting") == 0
        report(
            "saturation: 14 streams, 5 drafter slots, 3 verifier sessions",
            [
                f"status counts {dict(sorted(codes.items()))}",
                f"peaks: verifier sessions {peak['sessions']:.0f}, drafter running "
                f"{peak['running']:.0f}, waiting {peak['waiting']:.0f}; all 0 afterwards",
            ],
        )

    def test_an_open_sent_again_while_it_is_prefilled_gets_the_same_reply(
        self, edge: Stack, reference: LanguageModel
    ) -> None:
        """A drafter whose open timed out behind a busy replica's queue sends it again: the
        replica answers the retry with the first open's reply instead of prefilling again."""

        async def run() -> list[bytes]:
            nc = await nats.connect(edge.nats_url)
            sid, body = open_request(reference, "picospec.v1.verdict.faulttest.dup")
            replies = await asyncio.gather(
                *(nc.request(subjects.SESSIONS_OPEN, body, timeout=10) for _ in range(3))
            )
            await nc.publish(
                subjects.close(OpenReply.model_validate_json(replies[0].data).verifier),
                CloseSession(session=sid).model_dump_json().encode(),
            )
            await nc.close()
            return [r.data for r in replies]

        replies = asyncio.run(run())
        # one prefill: its measured time (to the microsecond) is in every reply
        assert len(set(replies)) == 1, replies
        reply = OpenReply.model_validate_json(replies[0])
        assert reply.prefill_s is not None
        # the replica's load as it opened the session (it held this one at least), which a
        # drafter takes as a verdict's; the three travel together
        assert reply.sessions is not None and reply.sessions >= 1
        assert reply.busy is not None and 0 <= reply.busy <= 1 and reply.batch is not None
        with pytest.raises(ValidationError, match="go together"):
            OpenReply.model_validate({**reply.model_dump(), "batch": None})

    def test_503_carries_retry_after(self, edge: Stack) -> None:
        s = edge
        s.link.cut()
        try:
            r = asyncio.run(stream(s.api_url, "Retry after?", 10))
        finally:
            s.link.restore()
            s.nats["nats-edge"].wait_leafnodes(1, timeout=15)
        assert r.status == 503
        assert r.headers.get("Retry-After")

    def test_idle_timeout_frees_the_sessions_of_a_dead_drafter(self, edge: Stack) -> None:
        """SIGKILL the drafter mid-stream: nobody closes its sessions, and the verifier frees
        them after the idle timeout (3 s here), KV cache included."""
        s = edge
        evicted_before = metric(
            scrape(s.services["verifier-1"].url), "picospec_session_evictions_total", reason="idle"
        )
        results = [StreamResult(content=f"Orphan {i}") for i in range(2)]

        async def run() -> float:
            async with aiohttp.ClientSession() as http:
                tasks = [
                    asyncio.create_task(stream(s.api_url, r.content, 600, http=http, into=r))
                    for r in results
                ]
                await progressed(results, 5, 30)
                await asyncio.to_thread(
                    wait_for, lambda: gauge(s, "verifier-1", "picospec_active_sessions") == 2, 5
                )
                t_kill = time.perf_counter()
                await asyncio.to_thread(s.kill, "drafter", signal.SIGKILL)
                await asyncio.gather(*tasks)
                return t_kill

        t_kill = asyncio.run(run())
        assert all(not r.done for r in results), "the streams broke with the drafter"
        wait_for(
            lambda: (
                gauge(s, "verifier-1", "picospec_active_sessions") == 0
                and gauge(s, "verifier-1", "picospec_kv_cache_bytes") == 0
            ),
            12,
            what="the idle timeout freeing the orphaned sessions",
        )
        freed_after = time.perf_counter() - t_kill
        evicted = (
            metric(
                scrape(s.services["verifier-1"].url),
                "picospec_session_evictions_total",
                reason="idle",
            )
            - evicted_before
        )
        assert evicted == 2
        report(
            "idle timeout",
            [
                f"drafter killed with 2 sessions open: the verifier freed both (idle timeout 3 s) "
                f"{freed_after:.1f}s later; evictions{{reason=idle}} +{evicted:.0f}"
            ],  # fmt: skip
        )


def test_reports_are_json_serialisable() -> None:
    """The load generator's report is plain JSON (the soak prints it)."""
    from picospec.tools.loadgen import RequestResult
    from picospec.tools.loadgen import report as load_report

    rep = load_report([RequestResult("p", 200, "abc", 3, 0.1, [0.01, 0.02])], 1.0, 1)
    assert json.loads(json.dumps(rep))["tokens_per_s"] == 3.0
