"""The services as real processes on a real nats-server, on tiny models saved to disk.

A module-wide stack (2 verifiers, a sampler, a drafter) serves most tests; the topology and
failure tests start their own.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from picospec.protocol import subjects
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.tools.promtext import series_sum
from picospec.tools.sse import EventStream
from picospec.tools.stack.up import Stack, StackConfig

ENV = {
    "PICOSPEC_VERIFY_TIMEOUT_S": "2",
    "PICOSPEC_REQUEST_TIMEOUT_S": "20",
    "PICOSPEC_THREADS": "1",
    "PICOSPEC_IDLE_TIMEOUT_S": "60",
}


def _config(tiny_dirs: tuple[Path, Path], **kw: Any) -> StackConfig:
    base = {
        "verifiers": 2,
        "drafter_model": str(tiny_dirs[1]),
        "verifier_model": str(tiny_dirs[0]),
        "env": dict(ENV),
        "ready_timeout": 180.0,
    }
    base.update(kw)
    return StackConfig(**base).with_free_ports()


@pytest.fixture(scope="module")
def stack(tiny_dirs: tuple[Path, Path]) -> Stack:
    with Stack(_config(tiny_dirs)) as s:
        yield s


def post(url: str, body: dict[str, Any] | bytes, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(api: str, content: str, **kw: Any) -> tuple[int, dict]:
    body = {
        "model": "picospec",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 48,
        **kw,
    }
    return post(f"{api}/chat/completions", body)


def expected(ref: LanguageModel, content: str, n: int) -> str:
    prompt = ref.encode_chat([{"role": "user", "content": content}])
    out = generate(ref, None, prompt, SamplingParams(temperature=0), SpecConfig(mode=Mode.AR), n)
    return ref.decode(out.tokens)


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` in one scrape (0 where none)."""
    return series_sum(text, name, **labels) or 0.0


async def stream_chat(api: str, content: str, max_tokens: int, **kw: Any) -> tuple[str, dict]:
    body = {
        "model": "picospec",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        **kw,
    }
    text, final = [], {}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{api}/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)
        ) as r:
            assert r.status == 200
            events = EventStream()
            async for obj in events.aevents(r.content):
                delta = obj["choices"][0]["delta"].get("content")
                if delta:
                    text.append(delta)
                if obj["choices"][0]["finish_reason"]:
                    final = obj
            events.check()  # no error event, and [DONE] at the end
    return "".join(text), final


# --- correctness through the stack -------------------------------------------------------


def test_edge_mode_is_the_draft_model_alone_and_says_so(
    stack: Stack, tiny_dirs: tuple[Path, Path]
) -> None:
    draft = load_model(str(tiny_dirs[1]), device="cpu")
    status, body = chat(stack.api_url, "Edge only", mode="edge", max_tokens=30)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected(draft, "Edge only", 30)
    assert body["picospec"]["verified"] is False and body["picospec"]["bytes_up"] == 0


@pytest.mark.parametrize("mode", ["ar", "vanilla", "dssd", "picospec"])
def test_greedy_through_the_stack_matches_the_verifier_alone(
    stack: Stack, reference: LanguageModel, mode: str
) -> None:
    status, body = chat(stack.api_url, "Tell me a story", mode=mode, max_tokens=60)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected(reference, "Tell me a story", 60)
    assert body["usage"]["completion_tokens"] == 60
    assert body["choices"][0]["finish_reason"] == "length"
    stats = body["picospec"]
    assert stats["mode"] == mode and stats["bytes_up"] > 0 and stats["bytes_down"] > 0
    if mode != "ar":
        assert stats["rounds"] > 0 and 0 <= stats["acceptance_rate"] <= 1
        # draft_len "auto" is the default: the lengths chosen, round by round, are reported
        assert sum(stats["draft_len_rounds"].values()) == stats["rounds"]
        assert 1 <= stats["draft_len"] <= 12 and 1 <= stats["lookahead"] <= 6
    # the steady-state rate leaves out the first commit and the time before it
    assert 0 < stats["ttft_s"] < stats["elapsed_s"]
    # the first token waited for the verifier's prefill: part of TTFT, on the cloud's clock
    assert 0 < stats["cloud_prefill_s"] < stats["ttft_s"]
    assert stats["decode_tokens_per_s"] * (stats["elapsed_s"] - stats["ttft_s"]) < 60


def _batch_sizes(stack: Stack) -> dict[str, tuple[float, float]]:
    """(forwards, sessions) so far of the drafter's draft forwards and every verifier's."""
    out = {"drafter": (0.0, 0.0), "verifiers": (0.0, 0.0)}
    for name, svc in stack.services.items():
        if name == "drafter":
            text, key, hist = scrape(svc.url), "drafter", "picospec_draft_batch_size"
        elif name.startswith("verifier"):
            text, key, hist = scrape(svc.url), "verifiers", "picospec_verify_batch_size"
        else:
            continue
        n, total = out[key]
        out[key] = (n + metric(text, f"{hist}_count"), total + metric(text, f"{hist}_sum"))
    return out


@pytest.mark.parametrize("mode", ["picospec", "ar"])
def test_eight_concurrent_streams_complete_correctly_in_shared_forwards(
    stack: Stack, reference: LanguageModel, mode: str
) -> None:
    """Concurrent sessions share forwards (the drafter's draft steps; the verifiers' blocks
    or ar steps) and each answer is exactly the target's alone."""
    prompts = [f"Question number {i}?" for i in range(8)]

    async def all_streams() -> list[tuple[str, dict]]:
        return await asyncio.gather(
            *(stream_chat(stack.api_url, p, 80, mode=mode) for p in prompts)
        )

    before = _batch_sizes(stack)
    results = asyncio.run(all_streams())
    after = _batch_sizes(stack)
    for p, (text, final) in zip(prompts, results, strict=True):
        assert text == expected(reference, p, 80)
        assert final["usage"]["completion_tokens"] == 80
        assert final["picospec"]["rounds"] > 0 or mode == "ar"
    sides = ["verifiers"] if mode == "ar" else ["drafter", "verifiers"]
    for side in sides:
        forwards = after[side][0] - before[side][0]
        sessions = after[side][1] - before[side][1]
        assert forwards > 0 and sessions / forwards > 1.5, (side, forwards, sessions)


@pytest.mark.parametrize("mode", ["ar", "picospec"])
def test_ignore_eos_and_min_tokens_fix_the_answers_length(stack: Stack, mode: str) -> None:
    """The extensions benchmark clients send: an answer that ends at EOS early runs to
    max_tokens with ignore_eos, and past min_tokens with min_tokens."""
    sampled = {"mode": mode, "temperature": 1.8, "max_tokens": 64}
    for seed in range(60):  # a sampled answer that ends early
        status, body = chat(stack.api_url, "Once upon a time", seed=seed, **sampled)
        assert status == 200, body
        if body["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.fail("no sampled answer ended at EOS: the check would not bite")
    early = body["usage"]["completion_tokens"]
    assert early < 64
    status, full = chat(
        stack.api_url, "Once upon a time", seed=seed, ignore_eos=True, min_tokens=64, **sampled
    )
    assert status == 200, full
    assert full["usage"]["completion_tokens"] == 64
    assert full["choices"][0]["finish_reason"] == "length"
    status, longer = chat(
        stack.api_url, "Once upon a time", seed=seed, min_tokens=early + 5, **sampled
    )
    assert status == 200, longer
    assert longer["usage"]["completion_tokens"] >= early + 5
    status, err = chat(stack.api_url, "Hi", min_tokens=65, max_tokens=64)
    assert status == 400 and err["error"]["param"] == "min_tokens"


def test_continuous_usage_stats_say_how_many_tokens_each_chunk_carried(stack: Stack) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far, so a
    client can tell the tokens of each chunk (a verdict commits several at once)."""

    async def run() -> list[dict[str, Any]]:
        body = {
            "model": "picospec",
            "messages": [{"role": "user", "content": "Count the chunks"}],
            "temperature": 0,
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        chunks = []
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.api_url}/chat/completions", json=body) as r:
                assert r.status == 200
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
        return chunks

    chunks = asyncio.run(run())
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks) and counts == sorted(counts)
    assert counts[-1] == 40 and any(b - a > 1 for a, b in zip(counts, counts[1:], strict=False))


@pytest.mark.parametrize("draft", ["suffix", "model+suffix"])
def test_the_suffix_draft_through_the_stack_is_the_target_greedy_answer(
    stack: Stack, reference: LanguageModel, draft: str
) -> None:
    """``draft: suffix`` (no draft model: the verifier leads and takes the edge's suffix
    proposals where they reach it) and ``model+suffix`` (both draft): the answer is the target's
    alone, and proposals from suffix matches are verified and taken. (A fixed γ: with ``auto``,
    a tiny draft as slow as its target hands its session over to cloud-only decoding.)"""
    taken = 0
    for content in ["Repeat after me: la la la", "Count: one two one two one"]:
        status, body = chat(stack.api_url, content, max_tokens=60, draft=draft, draft_len=4)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected(reference, content, 60)
        stats = body["picospec"]
        assert stats["mode"] == "picospec" and stats["verified"]
        taken += stats["accepted_by_source"].get("suffix", 0)
    assert taken > 0, "no suffix proposal was taken: the check would not bite"
    status, err = chat(stack.api_url, "x", draft="suffix", mode="dssd")
    assert status == 400 and err["error"]["param"] == "draft"
    assert chat(stack.api_url, "x", draft="suffix", mode="ar", max_tokens=4)[0] == 200


def test_openai_client_streams_a_chat_completion(stack: Stack, reference: LanguageModel) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=stack.api_url, api_key="unused")
    assert [m.id for m in client.models.list()] == ["picospec"]
    chunks = client.chat.completions.create(
        model="picospec",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=30,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(reference, "Hi", 30)


def test_stop_strings_and_sampling(stack: Stack, reference: LanguageModel) -> None:
    full = expected(reference, "Stop test", 60)
    stop = full[20:23]
    status, body = chat(stack.api_url, "Stop test", max_tokens=60, stop=[stop])
    assert status == 200
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    a = chat(stack.api_url, "Sample", temperature=0.9, seed=7, top_k=20)[1]
    b = chat(stack.api_url, "Sample", temperature=0.9, seed=7, top_k=20)[1]
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


# --- errors -----------------------------------------------------------------------------------


def test_api_errors_have_the_openai_shape_and_status(stack: Stack) -> None:
    api = stack.api_url
    cases = [
        (post(f"{api}/chat/completions", b"{not json"), 400),
        (chat(api, "x", model="gpt-9"), 404),
        (chat(api, "x" * 1100), 400),  # prompt over the 1024-token context
        (chat(api, "x", max_tokens=0), 400),
        (chat(api, "x", max_tokens=10**9), 400),
        (chat(api, "x", temperature="hot"), 400),
        (chat(api, "x", frobnicate=True), 400),
        (post(f"{api}/completions", {"model": "picospec"}), 400),
        (chat(api, "x", draft_len=0), 400),
        (chat(api, "x", draft_len=65), 400),
        (chat(api, "x", draft_len=True), 400),
        (chat(api, "x", draft_len="fast"), 400),
        # emulated edges are a benchmark's, off unless the drafter's setting allows them
        (chat(api, "x", emulated_edge={"acceptance": 0.9, "step_s": 0.01}), 400),
        (chat(api, "x", emulated_edge={"acceptance": 1.5, "step_s": 0.01}), 400),
    ]
    for (status, body), want in cases:
        assert status == want, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert chat(api, "still fine", max_tokens=5)[0] == 200
    assert chat(api, "fixed", max_tokens=5, draft_len=3)[0] == 200
    assert chat(api, "adaptive", max_tokens=5, draft_len="auto")[0] == 200


def test_malformed_messages_on_every_subject_are_dropped_and_counted(
    stack: Stack, reference: LanguageModel
) -> None:
    drafter_id = re.search(
        r'replica="(drafter-[0-9a-f]+)"', scrape(stack.services["drafter"].url)
    ).group(1)

    async def attack() -> list[bytes]:
        nc = await nats.connect(stack.nats_url)
        replies = []
        for payload in (b"", b"\x00\x01garbage", b"\x01\x02" + b"\xff" * 60, b'{"session": 1}'):
            for subject in (subjects.SESSIONS_OPEN, subjects.SAMPLE):
                try:
                    msg = await nc.request(subject, payload, timeout=5)
                    replies.append(msg.headers.get(subjects.H_ERROR, "") if msg.headers else "")
                except nats.errors.TimeoutError:
                    replies.append("timeout")
            for subject in (
                subjects.verify("verifier-1"),
                subjects.close("verifier-1"),
                subjects.verdicts(stack.config.site, drafter_id),
            ):
                await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()
        return replies

    replies = asyncio.run(attack())
    assert all(r in ("bad_open", "malformed") for r in replies), replies
    time.sleep(0.5)
    for name, role in (("verifier-1", "verifier"), ("sampler", "sampler"), ("drafter", "drafter")):
        assert (
            metric(scrape(stack.services[name].url), "picospec_rejected_messages_total", role=role)
            > 0
        ), name
    status, body = chat(stack.api_url, "after the attack", max_tokens=40)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected(reference, "after the attack", 40)


def _disrupt_while_streaming(
    stack: Stack, sig: int, prompts: list[str], max_tokens: int
) -> tuple[str, list[tuple[str, dict]]]:
    """Stream ``prompts`` concurrently; once a verifier holds a session, send ``sig`` to the
    one holding the most (the queue group may have put them all on either). Returns the
    victim and the streams' results."""
    replicas = ("verifier-1", "verifier-2")

    async def run() -> tuple[str, list[tuple[str, dict]]]:
        tasks = [asyncio.create_task(stream_chat(stack.api_url, p, max_tokens)) for p in prompts]
        for _ in range(200):
            held = {
                v: metric(scrape(stack.services[v].url), "picospec_active_sessions")
                for v in replicas
            }
            if max(held.values()) > 0:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no verifier ever held a session")
        victim = max(held, key=held.get)
        stack.kill(victim, sig)
        return victim, await asyncio.gather(*tasks)

    return asyncio.run(run())


def test_killed_verifier_sessions_move_and_finish_identically(
    stack: Stack, reference: LanguageModel
) -> None:
    prompts = [f"Long answer {i}" for i in range(4)]
    victim, results = _disrupt_while_streaming(stack, signal.SIGKILL, prompts, 700)
    for p, (text, _) in zip(prompts, results, strict=True):
        assert text == expected(reference, p, 700), "no token duplicated, dropped or changed"
    assert sum(f["picospec"]["migrations"] for _, f in results) >= 1
    stack.start_service(victim)


def test_sigterm_drains_a_verifier_without_failing_a_request(
    stack: Stack, reference: LanguageModel
) -> None:
    prompts = [f"Drain {i}" for i in range(4)]
    victim, results = _disrupt_while_streaming(stack, signal.SIGTERM, prompts, 600)
    for p, (text, _) in zip(prompts, results, strict=True):
        assert text == expected(reference, p, 600)
    assert sum(f["picospec"]["migrations"] for _, f in results) >= 1
    proc = stack.services[victim].proc
    assert proc is not None and proc.wait(timeout=30) == 0, "drained and exited cleanly"
    assert '"event": "drained", "left": 0' in stack.log_path(victim).read_text()
    stack.start_service(victim)


# --- other topologies -----------------------------------------------------------------------


def test_leaf_and_hub_through_an_emulated_wan(
    tiny_dirs: tuple[Path, Path], reference: LanguageModel
) -> None:
    cfg = _config(tiny_dirs, topology="edge-cloud", verifiers=1, rtt_ms=20)
    with Stack(cfg) as s:
        for mode in ("picospec", "ar"):
            status, body = chat(s.api_url, "Over the WAN", mode=mode, max_tokens=40)
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == expected(
                reference, "Over the WAN", 40
            )


def test_cloud_unreachable_gives_a_clean_503(tiny_dirs: tuple[Path, Path]) -> None:
    env = {
        **ENV,
        "PICOSPEC_REQUEST_TIMEOUT_S": "2",
        "PICOSPEC_NATS_TIMEOUT_S": "1",
        "PICOSPEC_MAX_CONCURRENT_REQUESTS": "1",
        "PICOSPEC_QUEUE_TIMEOUT_S": "0.5",
    }
    cfg = _config(tiny_dirs, verifiers=0, sampler=False, env=env)
    with Stack(cfg) as s:
        t0 = time.monotonic()
        status, body = chat(s.api_url, "anyone there?")
        assert status == 503 and body["error"]["code"] == "cloud_unreachable"
        assert time.monotonic() - t0 < 15

        # backpressure: one slot, so a second request while the first waits gets 429
        async def two() -> list[tuple[int, str | None]]:
            async with aiohttp.ClientSession() as http:

                async def one() -> tuple[int, str | None]:
                    async with http.post(
                        f"{s.api_url}/chat/completions",
                        json={
                            "model": "picospec",
                            "max_tokens": 4,
                            "messages": [{"role": "user", "content": "busy?"}],
                        },
                    ) as r:
                        return r.status, r.headers.get("Retry-After")

                return await asyncio.gather(one(), one())

        assert sorted(asyncio.run(two())) == [(429, "1"), (503, "5")]
        # opt-in degraded mode: the draft model alone, marked unverified everywhere
        draft = load_model(str(tiny_dirs[1]), device="cpu")
        req = urllib.request.Request(
            f"{s.api_url}/chat/completions",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {
                    "model": "picospec",
                    "temperature": 0,
                    "max_tokens": 20,
                    "fallback": "edge",
                    "messages": [{"role": "user", "content": "anyone?"}],
                }
            ).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers["X-Picospec-Verified"] == "false"
            body = json.loads(r.read())
        assert body["picospec"]["verified"] is False
        assert body["choices"][0]["message"]["content"] == expected(draft, "anyone?", 20)
        assert metric(scrape(s.services["drafter"].url), "picospec_degraded_responses_total") == 1


@pytest.mark.parametrize("idle", [True, False])
def test_the_draft_model_thread_yields_the_cpu_to_the_services_io(idle: bool) -> None:
    """PICOSPEC_DRAFT_THREAD_IDLE: the drafter's model thread runs at SCHED_IDLE (the event
    loop, which streams the first token and applies verdicts, stays at the normal priority)."""
    import asyncio
    import os

    from picospec.config import Settings
    from picospec.services.drafter.service import DrafterService

    svc = DrafterService(Settings(draft_thread_idle=idle), nc=None, model=None)  # type: ignore[arg-type]
    try:
        policy = asyncio.run(asyncio.wait_for(svc.thread.call(os.sched_getscheduler, 0), 10))
    finally:
        svc.thread.stop()
    assert policy == (os.SCHED_IDLE if idle else os.SCHED_OTHER)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
