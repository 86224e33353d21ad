"""The model thread's scheduler: continuous batching of prefills, draft steps, ``ar`` steps and
verification blocks, on real tiny models (no mocks).

Checked: programs of different sessions share forwards and each gets exactly its own logits;
a session's programs run in order; a long prefill is fed in chunks within the token budget
while decode steps keep going (and its result equals the unchunked prefill); a failing or
cancelled program ends alone; the threaded shell batches every session woken by one
iteration into the next, hands out emitted values in order before the result, and gives each
session the tokens it would get alone. The oneDNN-packed weights follow in-place weight
changes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator
from typing import Any

import pytest
import torch

from conftest import tiny_model
from picospec.config import Settings
from picospec.protocol import subjects
from picospec.protocol.codec import DraftBlock, Verdict
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import Batcher, Forward, Job, ModelThread, run_batched
from picospec.services import metrics
from picospec.services.control import OpenSession
from picospec.services.verifier.service import Held, VerifierService
from picospec.speculation.drafter import DrafterSession
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import VerifierSession

V = 16
ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0)
AR = SpecConfig(mode=Mode.AR)


@pytest.fixture(scope="module")
def target() -> LanguageModel:
    lm = tiny_model(V, seed=31)
    assert lm.effective_kv_layout == "slots"
    return lm


def _session(lm: LanguageModel, prompt: list[int], prefill: bool = True) -> VerifierSession:
    return VerifierSession(lm, os.urandom(16), prompt, GREEDY, AR, prefill=prefill)


def _sizes(lm: LanguageModel) -> tuple[list[int], Any]:
    """Record (sessions, tokens) of every forward of ``lm`` (wraps ``forward_batch``)."""
    seen: list[int] = []
    plain = lm.forward_batch

    def counted(caches: list[Any], tokens: list[list[int]], *args: Any, **kw: Any) -> Any:
        seen.append(sum(len(t) for t in tokens))
        return plain(caches, tokens, *args, **kw)

    lm.forward_batch = counted  # type: ignore[method-assign]
    return seen, lambda: delattr(lm, "forward_batch")


def test_programs_of_different_sessions_share_one_forward(target: LanguageModel) -> None:
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    alone = [_session(target, p) for p in prompts]
    batched = [_session(target, p, prefill=False) for p in prompts]
    sessions: list[int] = []
    jobs = run_batched([(i, s.prefill()) for i, s in enumerate(batched)], on_batch=sessions.append)
    assert sessions == [3]
    assert all(j.done and j.error is None for j in jobs)
    for a, b in zip(alone, batched, strict=True):
        assert b.cache.length == a.cache.length
        assert torch.allclose(a.next_logits, b.next_logits, atol=ATOL)


def test_a_sessions_programs_run_in_order_and_equal_running_them_alone(
    target: LanguageModel,
) -> None:
    ref = _session(target, [3, 1, 4])
    expected = [ref.ar_step() for _ in range(4)]
    one, other = _session(target, [3, 1, 4]), _session(target, [2, 7])
    sessions: list[int] = []
    jobs = run_batched(
        [(1, one.ar_next()) for _ in range(4)] + [(2, other.ar_next()) for _ in range(2)],
        on_batch=sessions.append,
    )
    assert [j.result for j in jobs[:4]] == expected
    # the first step of each needs no forward (the prefill gave its logits); then the two
    # sessions share one forward while both have steps left
    assert sessions == [2, 1, 1]


def test_a_long_prefill_goes_in_chunks_while_a_stream_keeps_decoding(
    target: LanguageModel,
) -> None:
    long_prompt = [(i * 7) % V for i in range(40)]
    whole = _session(target, long_prompt)
    ref = _session(target, [5, 6])
    expected = [ref.ar_step() for _ in range(8)]

    stream = _session(target, [5, 6])
    chunked = _session(target, long_prompt, prefill=False)
    fed, undo = _sizes(target)
    try:
        b = Batcher(max_tokens=8)
        ar: Job[int] = Job(stream.ar_stream(8, eos=()), key="a")
        pre: Job[None] = Job(chunked.prefill(), key="b")
        b.add(ar)
        b.add(pre)
        emitted_while_prefilling = None
        while not b.idle:
            b.step()
            if pre.done and emitted_while_prefilling is None:
                emitted_while_prefilling = len(ar.emitted)
    finally:
        undo()
    assert max(fed) <= 8, "no forward feeds more than the token budget"
    assert emitted_while_prefilling is not None and emitted_while_prefilling >= 4, (
        "the stream kept decoding during the prefill"
    )
    assert ar.emitted == expected and ar.result == 8
    assert pre.done and pre.error is None
    assert chunked.cache.length == len(long_prompt)
    assert torch.allclose(chunked.next_logits, whole.next_logits, atol=ATOL)


def test_a_forward_longer_than_the_budget_alone_goes_whole(target: LanguageModel) -> None:
    """A block whose logits are all needed cannot be split: alone, it runs whole."""
    vs = _session(target, [1, 2])
    block = DraftBlock(
        session=vs.session, epoch=0, seq=0, pos=2, prefix=(), tokens=tuple(range(1, 9)),
        q=(1.0,) * 8, vocab_size=V,
    )  # fmt: skip
    b = Batcher(max_tokens=4)
    job: Job[list[Verdict]] = Job(vs.verify(block))
    b.add(job)
    b.run_all()
    assert job.error is None and len(job.result) == 1


def test_a_failing_program_ends_alone_and_a_cancelled_key_is_closed(
    target: LanguageModel,
) -> None:
    closed: list[str] = []

    def failing(vs: VerifierSession) -> Generator[Forward, torch.Tensor, None]:
        yield Forward(vs.cache, [1], keep=1)
        raise RuntimeError("boom")

    def endless(vs: VerifierSession) -> Generator[Forward, torch.Tensor, None]:
        try:
            while True:
                yield Forward(vs.cache, [2], keep=1)
        finally:
            closed.append("endless")

    a, b, c = (_session(target, [1, 2]) for _ in range(3))
    batcher = Batcher()
    bad, good, forever = Job(failing(a), "a"), Job(b.ar_next(), "b"), Job(endless(c), "c")
    for j in (bad, good, forever):
        batcher.add(j)
    batcher.step()
    batcher.step()
    assert isinstance(bad.error, RuntimeError)
    assert good.done and good.error is None
    assert batcher.cancel("c") == [forever]
    assert forever.cancelled and closed == ["endless"]
    assert batcher.idle


def test_the_thread_steps_every_session_woken_together_in_one_forward(
    target: LanguageModel,
) -> None:
    """Four drafting sessions, each awaiting its step and submitting the next: after the
    first iteration every forward holds all four (their submissions reach the thread
    together), and each session drafts exactly what it drafts alone."""
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=4)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]

    def session(p: list[int]) -> DrafterSession:
        return DrafterSession(target, os.urandom(16), p, GREEDY, spec, 32)

    alone = []
    for p in prompts:
        s = session(p)
        alone.append([b.tokens for b in (s.draft_step() for _ in range(9)) if b is not None])
    sizes: list[int] = []
    thread = ModelThread("test-draft", max_tokens=128, on_batch=sizes.append)

    async def drive(s: DrafterSession) -> list[tuple[int, ...]]:
        blocks = []
        for _ in range(9):
            block = await thread.submit(s.draft(), key=s.session)
            if block is not None:
                blocks.append(block.tokens)
        return blocks

    async def main() -> list[list[tuple[int, ...]]]:
        return await asyncio.gather(*(drive(session(p)) for p in prompts))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        thread.stop()
    assert got == alone
    assert sizes == [4] * 9


def test_the_thread_hands_out_emitted_tokens_in_order_before_the_result(
    target: LanguageModel,
) -> None:
    ref = _session(target, [9, 3, 1])
    expected = [ref.ar_step() for _ in range(6)]
    thread = ModelThread("test-ar")
    out: list[object] = []

    async def main() -> None:
        vs = _session(target, [9, 3, 1])
        job = thread.submit(vs.ar_stream(6, eos=()), key="s", on_emit=out.append)
        out.append(("result", await job))
        out.append(await thread.call(lambda: 42))  # plain functions too, in their turn

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        thread.stop()
    assert out == [*expected, ("result", 6), 42]


def test_the_verifier_service_verifies_ready_sessions_in_one_forward(
    target: LanguageModel,
) -> None:
    """Blocks of three sessions that arrive together share one forward; a block of a session
    freed while it waited is dropped; a replayed block is refused and counted."""
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2)
    svc = VerifierService(Settings(), model=target)

    def observed() -> tuple[float, float, float]:
        s = {x.name: x.value for m in metrics.BATCH_SIZE.collect() for x in m.samples}
        refused = metrics.REJECTED.labels("verifier", "replayed")._value.get()
        return s["picospec_verify_batch_size_count"], s["picospec_verify_batch_size_sum"], refused

    async def main() -> list[tuple[str, Verdict]]:
        helds = []
        for k in range(4):
            sid = os.urandom(16)
            req = OpenSession(
                session=sid.hex(), prompt=[k + 1, 2], params=GREEDY, spec=spec, vocab_size=V,
                reply_to=subjects.verdicts("site", f"drafter-{k}"), max_new_tokens=8,
            )  # fmt: skip
            held = Held(VerifierSession(target, sid, req.prompt, GREEDY, spec), req.reply_to, req)
            svc.sessions[sid] = held
            helds.append(held)
        blocks = []
        for h in helds:  # the target's own greedy tokens: accepted whole
            ref = VerifierSession(target, b"r" * 16, h.open_req.prompt, GREEDY, spec)
            greedy = (ref.ar_step(), ref.ar_step())
            blocks.append(
                DraftBlock(
                    session=h.session.session,
                    epoch=0,
                    seq=0,
                    pos=2,
                    prefix=(),
                    tokens=greedy,
                    q=(1.0, 1.0),
                    vocab_size=V,
                )  # fmt: skip
            )
        for held, block in zip(helds, blocks, strict=True):
            svc.enqueue(held, block)
        svc._free(helds[3].session.session, "closed")  # freed while its block waits
        svc.enqueue(helds[0], blocks[0])  # a replay: refused, counted, skipped
        out = []
        while len(out) < 3:
            out.append(await asyncio.wait_for(svc.outbox.get(), 30))
        await asyncio.sleep(0.2)  # whatever else would come has come by now
        assert svc.outbox.empty()
        return out

    before = observed()
    try:
        out = asyncio.run(main())
    finally:
        svc.backend.stop()
    after = observed()
    assert sorted(subject for subject, _ in out) == [
        subjects.verdicts("site", f"drafter-{k}") for k in range(3)
    ]
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    assert after[2] - before[2] == 1


def test_packed_weights_follow_the_weights_in_place() -> None:
    """The oneDNN-packed copies give the plain forward's logits, and are repacked when a
    weight changes in place (an optimiser step)."""
    lm = tiny_model(V, seed=33)
    plain = tiny_model(V, seed=33)
    plain.packed_weights = False
    prompt = [1, 5, 9, 2]

    def logits(m: LanguageModel) -> torch.Tensor:
        return m.new_cache().extend(prompt, keep=1)

    assert lm._packed(lm.model) is not None, "tiny float32 Llama on the CPU packs"
    assert torch.allclose(logits(lm), logits(plain), atol=ATOL)
    with torch.no_grad():
        for m in (lm, plain):
            m.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert torch.allclose(logits(lm), logits(plain), atol=ATOL)
    assert not torch.allclose(logits(lm), logits(tiny_model(V, seed=33)), atol=ATOL)
