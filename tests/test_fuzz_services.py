"""Hostile and malformed input against the real services, over a real nats-server and HTTP.

Property-based (hypothesis) fuzzing of every NATS handler: the verifier's session opens, draft
blocks, closes and pings, the sampler's sample requests and the drafter's verdict subject. The
messages are built with the codec's own models, then mutated: truncated, bit-flipped, wrong
version or type, huge declared lengths, NaN / negative / unnormalised probabilities,
out-of-vocabulary ids, unknown sessions, stale and future epochs, replayed and out-of-order
blocks. Each hypothesis example publishes a batch. Then the HTTP API's request bodies: wrong
types, huge numbers, giant prompts, invalid UTF-8, unknown fields, nested junk.

Every test checks that no service crashed (alive and ``/ready``), that the bad messages were
refused and counted in ``picospec_rejected_messages_total`` (exactly, where the codec or schema
says a message is bad), that every request got an answer, and that a good session streaming
through the same stack all along kept getting the reference (greedy) answer. The number of
fuzz cases is printed at the end (``-s``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import nats
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from picospec.protocol import subjects
from picospec.protocol.codec import (
    CodecError,
    DraftBlock,
    SampleReply,
    SampleRequest,
    SparseDist,
    ValueCodec,
    Verdict,
    VerdictStatus,
    decode_as,
    encode,
)
from picospec.runtime.model import LanguageModel
from picospec.services.control import CloseSession, OpenReply, OpenSession
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.tools.sse import EventStream
from picospec.tools.stack.up import Stack, http_status
from stackutil import (
    StreamResult,
    drafter_id,
    expected,
    metric,
    prompt_ids,
    scrape,
    stack_config,
    stream,
    wait_for,
)

VERIFIER = "verifier-1"
CASES: Counter[str] = Counter()  # fuzz cases sent, by handler


FUZZ_SCALE = int(os.environ.get("PICOSPEC_FUZZ_SCALE", "1"))  # `make fuzz` raises it


def fuzz(examples: int) -> settings:
    """Hypothesis settings of a fuzz test: ``examples`` (times PICOSPEC_FUZZ_SCALE) batches,
    no deadline, no database."""
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


@pytest.fixture(scope="module")
def stack(tiny_dirs: tuple[Path, Path]) -> Iterator[Stack]:
    env = {"PICOSPEC_MAX_TOKENS_LIMIT": "64", "PICOSPEC_REQUEST_TIMEOUT_S": "15"}
    with Stack(stack_config(tiny_dirs, env=env, verifiers=1)) as s:
        yield s
    total = sum(CASES.values())
    print(f"\n== fuzz cases: {total} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")


class Pump:
    """A NATS client on its own event loop thread, for publishing from hypothesis examples."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self.call(nats.connect(url, max_reconnect_attempts=0))
        self.verdicts: list[bytes] = []
        self.http: aiohttp.ClientSession = self.call(self._http())

    async def _http(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def publish(self, items: list[tuple[str, bytes, str]]) -> None:
        """Publish (subject, payload, reply) in order, then flush."""

        async def run() -> None:
            for subject, payload, reply in items:
                await self.nc.publish(subject, payload, reply=reply)
            await self.nc.flush(timeout=30)

        self.call(run())

    def requests(self, subject: str, payloads: list[bytes], timeout: float = 30) -> list[Any]:
        """Send every payload as a request at once; return each one's reply (None: none)."""

        async def run() -> list[Any]:
            inbox = self.nc.new_inbox()
            replies: list[Any] = [None] * len(payloads)
            got = asyncio.Event()
            count = [0]

            async def on_reply(msg: Any) -> None:
                i = int(msg.subject.rsplit(".", 1)[1])
                if replies[i] is None:
                    count[0] += 1
                replies[i] = msg
                if count[0] == len(payloads):
                    got.set()

            sub = await self.nc.subscribe(f"{inbox}.*", cb=on_reply)
            for i, payload in enumerate(payloads):
                await self.nc.publish(subject, payload, reply=f"{inbox}.{i}")
            await self.nc.flush(timeout=30)
            if payloads:
                try:
                    await asyncio.wait_for(got.wait(), timeout)
                except TimeoutError:
                    pass
            await sub.unsubscribe()
            return replies

        return self.call(run(), timeout + 30)

    def close(self) -> None:
        async def run() -> None:
            await self.http.close()
            await self.nc.close()

        self.call(run())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def pump(stack: Stack) -> Iterator[Pump]:
    p = Pump(stack.nats_url)
    yield p
    p.close()


class GoodTraffic:
    """A well-behaved client streaming through the stack while the fuzzing goes on."""

    def __init__(self, stack: Stack, ref: LanguageModel) -> None:
        self.stack = stack
        self.prompt = "A good session under fire"
        self.want = expected(ref, self.prompt, 40)
        self.results: list[StreamResult] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.results.append(asyncio.run(stream(self.stack.api_url, self.prompt, 40)))

    def check(self) -> None:
        assert self.results, "the good session never finished a request"
        for r in self.results:
            assert r.ok, (r.status, r.error, r.body, r.exception)
            assert r.text == self.want, "a good session got a wrong answer during the fuzzing"


@contextmanager
def good_traffic(stack: Stack, ref: LanguageModel) -> Iterator[GoodTraffic]:
    g = GoodTraffic(stack, ref)
    g.thread.start()
    try:
        yield g
    finally:
        g.stop.set()
        g.thread.join(120)
    g.check()


def rejected(stack: Stack, service: str, role: str, *reasons: str) -> float:
    text = scrape(stack.services[service].url)
    if not reasons:
        return metric(text, "picospec_rejected_messages_total", role=role)
    return sum(
        metric(text, "picospec_rejected_messages_total", role=role, reason=r) for r in reasons
    )


def all_alive(stack: Stack) -> None:
    assert stack.exited() == {}
    for name, svc in stack.services.items():
        assert http_status(f"{svc.url}/ready") == 200, f"{name} is not ready"


# --- strategies: messages built with the codec's models, then mutated -----------------------

U32 = st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
SESSIONS = st.binary(min_size=16, max_size=16)
BAD_F32 = [math.nan, -1.0, math.inf, -math.inf, 2.0, 0.0, -0.0, 1e-45, 1e30]
HUGE_U32 = [0, 1, 2**16, 2**20 + 1, 2**24 + 1, 2**31, 2**32 - 1]

# (offset, struct format, values): header fields worth corrupting, per message type
FIELDS = {
    "draft_block": [
        (30, "<I", HUGE_U32),  # vocab_size
        (34, "<B", [2, 0x80, 0xFF]),  # flags: reserved bits, dense_q without data
        (35, "<B", [65, 200, 255]),  # n_tokens over MAX_DRAFT_TOKENS
        (36, "<I", HUGE_U32),  # n_prefix
    ],
    "verdict": [
        (26, "<B", [4, 255]),  # status
        (27, "<B", [65, 255]),  # accepted
        (28, "<I", HUGE_U32),  # vocab_size
        (32, "<i", [-2, 77, 2**31 - 1]),  # token
        (36, "<B", [1, 2, 0x80]),  # flags (sparse announced without a block)
        (37, "<I", HUGE_U32),  # sparse vocab_size
        (41, "<I", HUGE_U32),  # K
        (45, "<B", [3, 255]),  # value codec
        (46, "<f", BAD_F32),  # tail mass
    ],
    "sample_request": [
        (10, "<I", HUGE_U32),  # sparse vocab_size
        (14, "<I", HUGE_U32),  # K
        (18, "<B", [3, 255]),  # value codec
        (19, "<f", BAD_F32),  # tail mass
    ],
}


@st.composite
def mutated(draw: st.DrawFn, buf: bytes, kind: str, values_from: int | None = None) -> bytes:
    """``buf`` (a valid encoded message of ``kind``) with one hostile change, or unchanged.

    ``values_from``: where the message's f32 arrays start (q, probabilities), so that NaN,
    negative or oversized values land on real values and ids go out of vocabulary."""
    b = bytearray(buf)
    op = draw(
        st.sampled_from(
            [
                "keep",
                "keep",
                "truncate",
                "flip",
                "field",
                "field",
                "values",
                "append",
                "preamble",
                "u32",
            ]
        )
    )
    if op == "truncate":
        return bytes(b[: draw(st.integers(0, max(0, len(b) - 1)))])
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
    elif op == "field":
        off, fmt, values = draw(st.sampled_from(FIELDS[kind]))
        size = struct.calcsize(fmt)
        if off + size <= len(b):
            b[off : off + size] = struct.pack(fmt, draw(st.sampled_from(values)))
    elif op == "values" and values_from is not None and len(b) >= values_from + 4:
        i = draw(st.integers(values_from, len(b) - 4))
        fmt = draw(st.sampled_from(["<f", "<H", "<I"]))
        val = draw(st.sampled_from(BAD_F32)) if fmt == "<f" else draw(st.sampled_from([77, 0xFFFF]))
        b[i : i + struct.calcsize(fmt)] = struct.pack(fmt, val)[: len(b) - i]
    elif op == "append":
        b += draw(st.binary(min_size=1, max_size=32))
    elif op == "preamble":
        b[0] = draw(st.sampled_from([0, 1, 2, 255]))
        b[1] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255]))
    elif op == "u32" and len(b) >= 4:
        i = draw(st.integers(0, len(b) - 4))
        b[i : i + 4] = struct.pack("<I", draw(st.sampled_from(HUGE_U32)))
    return bytes(b)


@st.composite
def draft_blocks(
    draw: st.DrawFn,
    vocab: int,
    session: bytes | None = None,
    epoch: int | None = None,
    pos: int | None = None,
) -> DraftBlock:
    v = draw(st.sampled_from([vocab, vocab, vocab, 3, 1000, 70000]))
    n = draw(st.integers(0, 8))
    return DraftBlock(
        session=session if session is not None else draw(SESSIONS),
        epoch=epoch if epoch is not None else draw(U32),
        seq=draw(U32),
        pos=pos if pos is not None else draw(U32),
        prefix=tuple(draw(st.lists(st.integers(0, v - 1), max_size=6))),
        tokens=tuple(draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n))),
        q=tuple(draw(st.lists(st.floats(1e-6, 1.0), min_size=n, max_size=n))),
        vocab_size=v,
    )


@st.composite
def sparse_dists(draw: st.DrawFn, vocab: int) -> SparseDist:
    k = draw(st.integers(0, min(vocab, 12)))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k, unique=True))
    raw = np.array(draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)), dtype=np.float64)
    scale = draw(st.sampled_from([0.0, 0.5, 1.0]))
    probs = raw / raw.sum() * scale if raw.sum() > 0 else raw
    tail = draw(st.floats(0, max(0.0, 1.0 - float(probs.sum()))))
    return SparseDist(
        vocab_size=vocab,
        ids=np.array(ids, dtype=np.int64),
        probs=probs.astype(np.float32),
        tail_mass=tail,
        value_codec=draw(st.sampled_from(list(ValueCodec))),
    )


@st.composite
def verdicts(draw: st.DrawFn, vocab: int) -> Verdict:
    v = draw(st.sampled_from([vocab, vocab, 5, 1000]))
    return Verdict(
        session=draw(SESSIONS),
        epoch=draw(U32),
        seq=draw(U32),
        status=draw(st.sampled_from(list(VerdictStatus))),
        accepted=draw(st.integers(0, 64)),
        token=draw(st.none() | st.integers(0, v - 1)),
        sparse=draw(st.none() | sparse_dists(v)),
        vocab_size=v,
    )


@st.composite
def sample_requests(draw: st.DrawFn, vocab: int) -> SampleRequest:
    v = draw(st.sampled_from([vocab, vocab, 1, 2, 300]))
    sparse = draw(sparse_dists(v))
    kind = draw(st.sampled_from(["random", "one_hot", "uniform", "equal_to_p"]))
    if kind == "one_hot":  # with p on the same id: a residual of zero everywhere
        q = np.zeros(v, dtype=np.float64)
        q[sparse.ids[0] if sparse.k else 0] = 1.0
    elif kind == "uniform":
        q = np.full(v, 1.0 / v)
    else:
        q = np.array(draw(st.lists(st.floats(0.01, 1), min_size=v, max_size=v)))
        if kind == "equal_to_p":
            q[sparse.ids] = sparse.probs
        q = q / q.sum() if q.sum() > 0 else np.full(v, 1.0 / v)
    return SampleRequest(
        sparse=sparse, q=q.astype(np.float32), seed=draw(st.integers(0, 2**64 - 1))
    )


def frames(kind: str, models: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Random bytes, random bytes behind a plausible preamble, or a mutated real message."""
    type_byte = {"draft_block": 1, "verdict": 2, "sample_request": 3}[kind]
    real = models.map(encode).flatmap(
        lambda buf: mutated(
            buf, kind, {"draft_block": 40, "verdict": 37, "sample_request": 10}[kind]
        )
    )
    return st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: bytes([1, type_byte]) + b),
        real,
        real,
        real,
    )


def is_valid(buf: bytes, cls: type, vocab: int) -> bool:
    try:
        decode_as(buf, cls, max_vocab=vocab)
    except CodecError:
        return False
    return True


# --- the NATS handlers ----------------------------------------------------------------------


def test_fuzz_verify_subject_with_malformed_and_unknown_blocks(
    stack: Stack, pump: Pump, reference: LanguageModel
) -> None:
    """Mutated draft blocks (and random bytes) on the verifier's block subject: each is dropped
    and counted, malformed ones as malformed, well-formed ones for unknown sessions as
    unknown_session (with an UNKNOWN_SESSION verdict to the reply subject)."""
    vocab = reference.vocab_size
    subject, reply = subjects.verify(VERIFIER), "picospec.v1.verdict.fuzz.unknown"
    expect: Counter[str] = Counter()
    before = {r: rejected(stack, VERIFIER, "verifier", r) for r in ("malformed", "unknown_session")}

    @fuzz(250)
    @given(st.lists(frames("draft_block", draft_blocks(vocab)), min_size=10, max_size=30))
    def run(batch: list[bytes]) -> None:
        pump.publish([(subject, b, reply) for b in batch])
        for b in batch:
            expect["unknown_session" if is_valid(b, DraftBlock, vocab) else "malformed"] += 1

    with good_traffic(stack, reference):
        run()
    CASES["verifier blocks"] += sum(expect.values())
    for reason in ("malformed", "unknown_session"):
        wait_for(
            lambda r=reason: rejected(stack, VERIFIER, "verifier", r) - before[r] == expect[r],
            10,
            what=f"{expect[reason]} blocks counted as {reason}",
        )
    assert expect["malformed"] > 100 and expect["unknown_session"] > 100, expect
    all_alive(stack)


def test_fuzz_blocks_of_live_sessions_stale_future_replayed(
    stack: Stack, pump: Pump, reference: LanguageModel
) -> None:
    """The fuzzer opens its own sessions like a drafter and sends them blocks from stale and
    future epochs, replays, out-of-order and far-off positions, context overflows, other
    vocabularies. Every block is verified, buffered, dropped (stale) or refused and counted;
    the verifier keeps serving the good session; closing the sessions frees them all."""
    vocab = reference.vocab_size
    prompt = prompt_ids(reference, "fuzz session")
    reply = "picospec.v1.verdict.fuzz.live"
    sessions = [os.urandom(16) for _ in range(4)]
    opens = [
        OpenSession(
            session=sid.hex(),
            prompt=prompt,
            params=SamplingParams(temperature=t),
            spec=SpecConfig(mode=m),
            vocab_size=vocab,
            reply_to=reply,
            max_new_tokens=32,
        )
        .model_dump_json()
        .encode()
        for sid, t, m in zip(
            sessions,
            [0, 0.8, 0, 0.8],
            [Mode.PICOSPEC, Mode.PICOSPEC, Mode.DSSD, Mode.DSSD],
            strict=True,
        )
    ]
    base_sessions = metric(scrape(stack.services[VERIFIER].url), "picospec_active_sessions")
    replies = pump.requests(subjects.SESSIONS_OPEN, opens)
    assert all(
        r is not None and OpenReply.model_validate_json(r.data).verifier == VERIFIER
        for r in replies
    )
    n = len(prompt)
    positions = st.one_of(
        st.integers(max(0, n - 3), n + 12),
        st.sampled_from([0, 1, 1000, 1023, 2**31, 2**32 - 1]),
    )

    @st.composite
    def live_block(draw: st.DrawFn) -> bytes:
        sid = draw(st.sampled_from(sessions))
        epoch = draw(st.sampled_from([0, 0, 1, 2, 3, 2**32 - 1]))
        pos = draw(positions)
        b = draw(draft_blocks(vocab, sid, epoch, pos))
        if draw(st.integers(0, 9)) == 0:  # run past the context
            b = b.model_copy(update={"prefix": tuple([5] * 1100)})
        return encode(b)

    sent = [0]

    @fuzz(80)
    @given(st.lists(live_block(), min_size=5, max_size=20), st.integers(0, 3))
    def run(batch: list[bytes], replays: int) -> None:
        batch = batch + batch[:replays]  # replays: the same bytes again
        pump.publish([(subjects.verify(VERIFIER), b, reply) for b in batch])
        sent[0] += len(batch)

    before = Counter(
        {
            r: rejected(stack, VERIFIER, "verifier", r)
            for r in ("replayed", "future_epoch", "context", "vocab_mismatch", "buffer_full")
        }
    )
    with good_traffic(stack, reference):
        run()
    CASES["verifier live-session blocks"] += sent[0]
    seen = {r: rejected(stack, VERIFIER, "verifier", r) - before[r] for r in before}
    assert seen["future_epoch"] > 0 and seen["replayed"] > 0 and seen["context"] > 0, seen
    # the verifier answered blocks of the live sessions (verdicts on our subject)
    for sid in sessions:
        pump.publish(
            [
                (
                    subjects.close(VERIFIER),
                    CloseSession(session=sid.hex()).model_dump_json().encode(),
                    "",
                )
            ]
        )
    wait_sessions_back(stack, base_sessions, 10, "the fuzzed sessions closed")
    all_alive(stack)
    print(f"\n== live-session blocks: {sent[0]} sent; refusals by reason {seen}")


def wait_sessions_back(stack: Stack, base: float, timeout: float, what: str) -> None:
    """Wait until the verifier holds no more sessions than ``base`` again."""
    wait_for(
        lambda: metric(scrape(stack.services[VERIFIER].url), "picospec_active_sessions") <= base,
        timeout,
        what=what,
    )


def json_junk() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def open_payload_template(vocab: int) -> bytes:
    """A valid session open (JSON), to alter."""
    return json.dumps(
        {
            "session": os.urandom(16).hex(),
            "prompt": [5, 6, 7],
            "params": {"temperature": 0.0},
            "spec": {"mode": "picospec"},
            "vocab_size": vocab,
            "reply_to": "picospec.v1.verdict.fuzz.opens",
            "max_new_tokens": 8,
        }
    ).encode()


@st.composite
def open_payloads(draw: st.DrawFn, vocab: int, max_context: int) -> bytes:
    """Session opens: valid ones, ones with one field replaced by junk or a hostile value,
    missing or unknown fields, and bytes that are not JSON (or not UTF-8)."""
    kind = draw(st.sampled_from(["valid", "field", "field", "field", "drop", "extra", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100) | st.just(b'{"session": "\xff\xfe"}'))
    doc: dict[str, Any] = {
        "session": os.urandom(16).hex(),
        "prompt": draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20)),
        "params": {"temperature": draw(st.sampled_from([0.0, 0.7])), "seed": 3},
        "spec": {"mode": draw(st.sampled_from(["picospec", "dssd", "vanilla", "ar"]))},
        "vocab_size": vocab,
        "reply_to": "picospec.v1.verdict.fuzz.opens",
        "max_new_tokens": draw(st.sampled_from([1, 8, 10**9])),
        "eos_ids": [2],
        "epoch": draw(st.sampled_from([0, 1, 2**32 - 1])),
    }
    hostile = {
        "session": st.sampled_from(["", "zz" * 16, "ab", "A" * 32]) | json_junk(),
        "prompt": st.sampled_from([[], [-1], [vocab], [2**63], [0] * max_context, [-(2**40), 3]])
        | json_junk(),
        "params": st.sampled_from(
            [{"temperature": -1}, {"temperature": 1e308}, {"top_p": 0}, {"seed": -1}, {"x": 1}]
        )
        | json_junk(),
        "spec": st.sampled_from(
            [
                {"mode": "nope"},
                {"draft_len": 0},
                {"draft_len": 10**6},
                {"top_k": 0},
                {"lookahead": -1},
            ]
        )
        | json_junk(),
        "vocab_size": st.sampled_from([0, -1, vocab + 1, 2**40]) | json_junk(),
        "reply_to": st.sampled_from(["", "a b", "x" * 300, "foo.*", ">"]) | json_junk(),
        "max_new_tokens": st.sampled_from([0, -5, 2**70]) | json_junk(),
        "eos_ids": st.sampled_from([[-1], list(range(100)), [2**40]]) | json_junk(),
        "epoch": st.sampled_from([-1, 2**32, 2**64]) | json_junk(),
    }
    if kind == "field":
        key = draw(st.sampled_from(sorted(hostile)))
        doc[key] = draw(hostile[key])
    elif kind == "drop":
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif kind == "extra":
        doc[draw(st.text(min_size=1, max_size=8))] = draw(json_junk())
    return json.dumps(doc).encode()


def test_fuzz_session_opens(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Every open request gets exactly one answer: the replica's OpenReply, or an error reply
    (bad_open for what the schema refuses, bad_prompt, vocab_mismatch...), and every refusal
    is counted. Opened sessions are closed again; none is left behind."""
    vocab, ctx = reference.vocab_size, reference.max_context
    answers: Counter[str] = Counter()
    base_sessions = metric(scrape(stack.services[VERIFIER].url), "picospec_active_sessions")
    before = rejected(stack, VERIFIER, "verifier")

    @fuzz(60)
    @given(st.lists(open_payloads(vocab, ctx), min_size=4, max_size=10))
    def run(batch: list[bytes]) -> None:
        replies = pump.requests(subjects.SESSIONS_OPEN, batch)
        closes = []
        for payload, msg in zip(batch, replies, strict=True):
            assert msg is not None, f"no answer to {payload[:200]!r}"
            err = msg.headers.get(subjects.H_ERROR) if msg.headers else None
            if err:
                answers[err] += 1
                try:
                    OpenSession.model_validate_json(payload)
                except ValidationError:
                    assert err == "bad_open", (err, payload[:200])
            else:
                got = OpenReply.model_validate_json(msg.data)
                assert got.verifier == VERIFIER
                answers["opened"] += 1
                closes.append(CloseSession(session=got.session).model_dump_json().encode())
        pump.publish([(subjects.close(VERIFIER), c, "") for c in closes])

    def explicit(prompt: list[int], vocab_size: int = vocab) -> bytes:
        doc = json.loads(open_payload_template(vocab))
        doc.update(prompt=prompt, vocab_size=vocab_size)
        return json.dumps(doc).encode()

    # the refusals that need a well-formed open, each once for sure
    cases = {
        "negative id": (explicit([5, -1, 6]), "bad_prompt"),
        "id out of vocabulary": (explicit([5, vocab]), "bad_prompt"),
        "prompt over the context": (explicit([5] * ctx), "bad_prompt"),
        "other vocabulary": (explicit([5], vocab + 1), "vocab_mismatch"),
    }
    replies = pump.requests(subjects.SESSIONS_OPEN, [p for p, _ in cases.values()])
    for (name, (_, want)), msg in zip(cases.items(), replies, strict=True):
        assert msg is not None, f"no answer to an open with a {name}"
        assert msg.headers.get(subjects.H_ERROR) == want, name
        answers[want] += 1
    with good_traffic(stack, reference):
        run()
    CASES["verifier opens"] += sum(answers.values())
    refused = sum(v for k, v in answers.items() if k != "opened")
    assert answers["opened"] > 0 and answers["bad_open"] > 0, answers
    wait_for(
        lambda: rejected(stack, VERIFIER, "verifier") - before == refused,
        10,
        what=f"{refused} refused opens counted (answers {dict(answers)})",
    )
    wait_sessions_back(stack, base_sessions, 15, "every fuzz-opened session closed")
    all_alive(stack)
    print(f"\n== session opens: {dict(answers)}")


def test_fuzz_close_and_ping_subjects(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Junk on the close subject is refused and counted (bad_close); closes of unknown
    sessions are no-ops; every ping with a reply subject is answered, whatever its payload."""
    junk = st.one_of(
        st.binary(max_size=80),
        json_junk().map(lambda j: json.dumps(j).encode()),
        st.builds(lambda s: json.dumps({"session": s}).encode(), st.text(max_size=40)),
        st.just(CloseSession(session=os.urandom(16).hex()).model_dump_json().encode()),
    )
    bad = [0]
    pings = [0]
    before = rejected(stack, VERIFIER, "verifier", "bad_close")

    @fuzz(60)
    @given(st.lists(junk, min_size=10, max_size=30))
    def run(batch: list[bytes]) -> None:
        pump.publish([(subjects.close(VERIFIER), b, "") for b in batch])
        for b in batch:
            try:
                CloseSession.model_validate_json(b)
            except ValidationError:
                bad[0] += 1
        replies = pump.requests(subjects.ping(VERIFIER), batch[:5])
        assert all(r is not None and r.data == b"ok" for r in replies)
        pings[0] += len(replies)

    with good_traffic(stack, reference):
        run()
    CASES["verifier closes"] += bad[0]
    CASES["verifier pings"] += pings[0]
    wait_for(
        lambda: rejected(stack, VERIFIER, "verifier", "bad_close") - before == bad[0],
        10,
        what=f"{bad[0]} bad closes counted",
    )
    all_alive(stack)


def test_fuzz_sampler(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Mutated sample requests, random bytes and valid but adversarial ones (a zero residual,
    no probability mass at all): every request gets exactly one reply, a token in range or an
    error; malformed ones are counted."""
    vocab = reference.vocab_size
    counts: Counter[str] = Counter()
    before = rejected(stack, "sampler", "sampler")

    @fuzz(100)
    @given(st.lists(frames("sample_request", sample_requests(vocab)), min_size=5, max_size=20))
    def run(batch: list[bytes]) -> None:
        replies = pump.requests(subjects.SAMPLE, batch)
        for payload, msg in zip(batch, replies, strict=True):
            assert msg is not None, f"no answer to a sample request of {len(payload)} bytes"
            err = msg.headers.get(subjects.H_ERROR) if msg.headers else None
            if err:
                counts[err] += 1
                if err != "malformed":
                    assert is_valid(payload, SampleRequest, 2**24)
                else:
                    assert not is_valid(payload, SampleRequest, 2**24)
            else:
                req = decode_as(payload, SampleRequest)
                assert decode_as(msg.data, SampleReply).token < req.vocab_size
                counts["token"] += 1

    with good_traffic(stack, reference):
        run()
    CASES["sampler"] += sum(counts.values())
    refused = sum(v for k, v in counts.items() if k != "token")
    assert counts["malformed"] > 100 and counts["token"] > 50 and counts["bad_request"], counts
    wait_for(
        lambda: rejected(stack, "sampler", "sampler") - before == refused,
        10,
        what=f"{refused} refused sample requests counted ({dict(counts)})",
    )
    all_alive(stack)
    print(f"\n== sample requests: {dict(counts)}")


def test_fuzz_drafter_verdict_subject(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Mutated verdicts on the drafter's own verdict subject (its id read from its
    picospec_build_info): malformed ones and ones for sessions it does not have are counted,
    and its live sessions are unaffected."""
    vocab = reference.vocab_size
    subject = subjects.verdicts(stack.config.site, drafter_id(stack))
    assert subject in subjects.all_subjects_of("drafter", drafter_id(stack), stack.config.site)
    expect: Counter[str] = Counter()
    before = {r: rejected(stack, "drafter", "drafter", r) for r in ("malformed", "unknown_session")}

    @fuzz(250)
    @given(st.lists(frames("verdict", verdicts(vocab)), min_size=10, max_size=30))
    def run(batch: list[bytes]) -> None:
        pump.publish([(subject, b, "") for b in batch])
        for b in batch:
            expect["unknown_session" if is_valid(b, Verdict, vocab) else "malformed"] += 1

    with good_traffic(stack, reference):
        run()
    CASES["drafter verdicts"] += sum(expect.values())
    for reason in ("malformed", "unknown_session"):
        wait_for(
            lambda r=reason: rejected(stack, "drafter", "drafter", r) - before[r] == expect[r],
            10,
            what=f"{expect[reason]} verdicts counted as {reason}",
        )
    all_alive(stack)


def test_random_bytes_on_every_subject(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Random payloads on every subject each service listens on (subjects.all_subjects_of), as
    plain publishes and as requests: nothing crashes, the good session is unaffected."""
    did = drafter_id(stack)
    targets = (
        subjects.all_subjects_of("verifier", VERIFIER, stack.config.site)
        + subjects.all_subjects_of("sampler", "-", stack.config.site)
        + subjects.all_subjects_of("drafter", did, stack.config.site)
    )
    sent = [0]

    @fuzz(40)
    @given(st.lists(st.binary(max_size=64), min_size=len(targets), max_size=len(targets)))
    def run(payloads: list[bytes]) -> None:
        items = [
            (t, p, "picospec.v1.verdict.fuzz.any") for t, p in zip(targets, payloads, strict=True)
        ]
        pump.publish(items)
        sent[0] += len(items)

    with good_traffic(stack, reference):
        run()
    CASES["all subjects"] += sent[0]
    all_alive(stack)


def test_an_ar_open_cannot_stream_forever(
    stack: Stack, pump: Pump, reference: LanguageModel
) -> None:
    """An ar-mode open asking for 10^9 tokens (and never closed) streams at most what fits the
    model's context, then the verifier's model thread is free again."""
    prompt = prompt_ids(reference, "endless")
    reply = "picospec.v1.verdict.fuzz.endless"
    got: list[int] = []

    async def listen() -> Any:
        async def cb(msg: Any) -> None:
            got.append(1)

        return await pump.nc.subscribe(reply, cb=cb)

    sub = pump.call(listen())
    sid = os.urandom(16).hex()
    body = OpenSession(
        session=sid,
        prompt=prompt,
        params=SamplingParams(temperature=0),
        spec=SpecConfig(mode=Mode.AR),
        vocab_size=reference.vocab_size,
        reply_to=reply,
        max_new_tokens=10**9,
    )
    (msg,) = pump.requests(subjects.SESSIONS_OPEN, [body.model_dump_json().encode()])
    assert msg is not None and not (msg.headers or {}).get(subjects.H_ERROR)
    limit = reference.max_context - len(prompt)

    def settled() -> bool:
        n = len(got)
        time.sleep(1.0)
        return n == len(got) and n > 0

    wait_for(settled, 30, interval=0, what="the ar stream stopping")
    pump.call(sub.unsubscribe())
    pump.publish(
        [(subjects.close(VERIFIER), CloseSession(session=sid).model_dump_json().encode(), "")]
    )
    CASES["verifier opens"] += 1
    assert len(got) <= limit, f"{len(got)} tokens streamed past the context of {limit}"
    all_alive(stack)


# --- the HTTP API -------------------------------------------------------------------------------

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["picospec", "gpt-4", ""]) | json_junk(),
    "messages": st.one_of(
        st.just([{"role": "user", "content": "hi"}]),
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "tool", "x"])
                    | json_junk(),
                    "content": st.text(max_size=40) | json_junk(),
                }  # fmt: skip
            ),
            max_size=3,
        ),
        st.just([{"role": "user", "content": "x" * 5000}]),  # over the context
        json_junk(),
    ),
    "prompt": st.text(max_size=40) | st.just("y" * 5000) | json_junk(),
    "max_tokens": st.integers(-5, 80)
    | st.sampled_from([10**9, 2**63, 10**30, 1.5, "8"])
    | json_junk(),
    "max_completion_tokens": st.integers(-1, 70) | json_junk(),
    "temperature": st.floats(-1, 3) | st.sampled_from([math.nan, math.inf, "hot"]),
    "top_p": st.floats(-1, 2) | json_junk(),
    "top_k": st.integers(-3, 10**6) | json_junk(),
    "min_p": st.floats(-1, 2) | json_junk(),
    "seed": st.integers(-(2**64), 2**64) | json_junk(),
    "stop": st.one_of(
        st.text(max_size=5), st.lists(st.text(max_size=300), max_size=6), json_junk()
    ),
    "stream": st.booleans() | json_junk(),
    "n": st.integers(-1, 3) | json_junk(),
    "user": st.text(max_size=10) | json_junk(),
    "mode": st.sampled_from(["picospec", "dssd", "vanilla", "ar", "edge", "turbo"]) | json_junk(),
    "draft_len": st.integers(-1, 100) | json_junk(),
    "fallback": st.sampled_from(["none", "edge", "cloud"]) | json_junk(),
    "presence_penalty": st.floats(-2, 2) | json_junk(),
    "echo": st.booleans() | json_junk(),
    "stream_options": json_junk(),
}


@st.composite
def api_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/chat/completions", "/completions"]))
    kind = draw(st.sampled_from(["fields", "fields", "fields", "junk", "bytes", "text"]))
    if kind == "bytes":  # not UTF-8, truncated, empty
        body = draw(
            st.binary(max_size=60)
            | st.just(b'{"model": "picospec", "prompt": "\xff\xfe"}')
            | st.just(b'{"model": "picospec", "messages": [')
        )
        return path, body
    if kind == "junk":
        return path, json.dumps(draw(json_junk())).encode()
    if kind == "text":  # JSON with NaN / Infinity literals, duplicate keys
        return path, draw(
            st.sampled_from(
                [
                    b'{"model": "picospec", "prompt": "a", "temperature": NaN}',
                    b'{"model": "picospec", "prompt": "a", "max_tokens": Infinity}',
                    b'{"model": "picospec", "model": 5, "prompt": "a"}',
                    b'{"model": "picospec", "prompt": "a", "max_tokens": 1e400}',
                ]
            )
        )
    body: dict[str, Any] = {"model": "picospec", "max_tokens": 4}
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": "fuzz"}]
    else:
        body["prompt"] = "fuzz"
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=4, unique=True)):
        body[key] = draw(FIELD_VALUES[key])
    if draw(st.integers(0, 5)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(min_size=1, max_size=10))] = draw(json_junk())
    return path, json.dumps(body, allow_nan=True).encode()


async def send_raw(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict, bytes]:
    async with http.post(
        url,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        return r.status, dict(r.headers), await r.read()


def check_api_answer(status: int, headers: dict, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    if status == 200:
        if headers.get("Content-Type", "").startswith("text/event-stream"):
            sse = EventStream()
            lines = iter(raw.decode().split("\n"))
            chunks = list(sse.events(lines))
            after = [obj for ln in lines if (obj := sse.feed(ln)) is not None]
            assert sse.done and not after, raw[-200:]  # [DONE] is the last event
            assert sse.error is None, sse.error
            for obj in chunks:
                assert obj["object"] in ("chat.completion.chunk", "text_completion")
                assert isinstance(obj["choices"], list) and obj["choices"][0]["index"] == 0
            last = chunks[-1]
            assert last["usage"]["completion_tokens"] >= 0 and "picospec" in last
        else:
            obj = json.loads(raw)
            assert obj["object"] in ("chat.completion", "text_completion")
            choice = obj["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert isinstance(text, str) and choice["finish_reason"] in ("stop", "length")
            assert obj["usage"]["total_tokens"] == (
                obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"]
            )
            assert isinstance(obj["picospec"], dict)
        return
    assert 400 <= status < 500, status
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def test_fuzz_http_api(stack: Stack, pump: Pump, reference: LanguageModel) -> None:
    """Hostile request bodies on both endpoints: every answer is a 4xx in OpenAI's error shape
    or a well-formed 200 (JSON or event stream), never a 5xx; the server stays ready."""
    statuses: Counter[int] = Counter()

    @fuzz(300)
    @given(api_bodies())
    def run(case: tuple[str, bytes]) -> None:
        path, body = case
        status, headers, raw = pump.call(send_raw(pump.http, stack.api_url + path, body))
        statuses[status] += 1
        check_api_answer(status, headers, raw)

    with good_traffic(stack, reference):
        run()
        # one oversized body (413) and one giant prompt under the body limit (400)
        big = json.dumps({"model": "picospec", "prompt": "z" * (5 << 20)}).encode()
        status, headers, raw = pump.call(send_raw(pump.http, stack.api_url + "/completions", big))
        assert status == 413
        check_api_answer(status, headers, raw)
        giant = json.dumps({"model": "picospec", "prompt": "z" * (1 << 20)}).encode()
        status, headers, raw = pump.call(send_raw(pump.http, stack.api_url + "/completions", giant))
        assert status == 400
        check_api_answer(status, headers, raw)
    CASES["http"] += sum(statuses.values()) + 2
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if k >= 400) > 100, statuses
    all_alive(stack)
    print(f"\n== HTTP API fuzz: statuses {dict(sorted(statuses.items()))}")


def test_deeply_nested_json_is_a_400(stack: Stack, pump: Pump) -> None:
    body = b'{"model": "picospec", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, headers, raw = pump.call(send_raw(pump.http, stack.api_url + "/chat/completions", body))
    check_api_answer(status, headers, raw)


def test_lone_surrogate_in_the_prompt_is_a_400(stack: Stack, pump: Pump) -> None:
    body = b'{"model": "picospec", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, headers, raw = pump.call(send_raw(pump.http, stack.api_url + "/chat/completions", body))
    check_api_answer(status, headers, raw)
