"""The verifier on vLLM (``PICOSPEC_VERIFIER_BACKEND=vllm``), on vLLM's CPU build and the
embedded SmolLM2 in float32. Runs in vLLM's own environment: ``make test-vllm`` (in ``make
test``, without vLLM, this module is skipped).

- In one process: the rows the backend builds from vLLM's prompt log-probabilities give the
  embedded runtime's distributions; and a statistical check that speculative sampling verified
  on those rows outputs exactly the target's distribution. A greedy session asks vLLM for its
  top-1 rows only, yet every row keeps the true argmax and the draft token's probability; rows
  are read from the end of vLLM's prompt log-probabilities; each session's requests carry a
  cache salt of their own, so sessions with the same content never re-run a round.
- Through real services (NATS, a drafter with the int8 draft, two verifiers each running vLLM):
  greedy answers identical to vLLM's own greedy decoding (``ar`` on vLLM) with rollbacks;
  concurrent sessions in vLLM's batches; a verifier killed mid-answer, its sessions finishing
  identically on the other.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM backend's tests run in vLLM's environment")

from conftest import pooled_chisquare_pvalue
from picospec.config import Settings
from picospec.protocol.codec import DraftBlock, SampleRequest
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import Forward
from picospec.runtime.vllm_engine import dense_row, prompt_rows
from picospec.speculation.sampler import sample
from picospec.speculation.sampling import Rng, SamplingParams, probs_from_logits
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import VerifierSession
from picospec.tools.stack.up import Stack, StackConfig
from stackutil import gauge, metric, scrape, stream

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
CPU_VLLM = {
    "verifier_backend": "vllm",
    "vllm_dtype": "float32",
    "vllm_enforce_eager": True,
    "vllm_block_size": 32,
    "vllm_cpu_kv_cache_gib": 1,
    "vllm_max_model_len": 2048,
}
PROMPTS = ["Describe a walk by the river.", "Why do cats purr?", "List three uses of copper."]


@pytest.fixture(scope="module")
def target() -> Any:
    from picospec.runtime.vllm_engine import VllmRunner, VllmTarget

    settings = Settings(**CPU_VLLM)
    loop = asyncio.new_event_loop()
    vt = loop.run_until_complete(VllmTarget.start(settings))
    yield vt, VllmRunner(vt), loop
    vt.shutdown()
    loop.close()


@pytest.fixture(scope="module")
def embedded() -> LanguageModel:
    return load_model("smollm2", threads=1)


def test_rows_are_the_targets_distributions(target: Any, embedded: LanguageModel) -> None:
    """A block's rows from vLLM (top-K log-probs, the rest spread evenly) give the embedded
    runtime's distribution at every position: the same argmax, the same probabilities on the
    top entries, and the draft tokens' own probabilities."""
    vt, runner, loop = target
    prompt = embedded.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    block = embedded.encode(" The river was quiet and green")[:6]
    vs = VerifierSession(vt, b"r" * 16, prompt, SamplingParams(), SpecConfig(), prefill=False)

    async def rows() -> torch.Tensor:
        await runner.submit(vs.prefill(), key="r")
        from picospec.runtime.scheduler import Forward

        def program() -> Any:
            return (yield Forward(vs.cache, block, keep=len(block)))

        return await runner.submit(program(), key="r")

    got = loop.run_until_complete(rows())
    want = embedded.new_cache().extend(prompt + block)[len(prompt) :]
    p_got, p_want = torch.softmax(got, -1), torch.softmax(want, -1)
    assert torch.equal(p_got.argmax(-1), p_want.argmax(-1))
    top = p_want.topk(20, dim=-1).indices
    assert torch.allclose(p_got.gather(1, top), p_want.gather(1, top), atol=2e-3)
    for i, tok in enumerate(block[1:]):  # each next block token's own probability, exact
        assert abs(float(p_got[i, tok]) - float(p_want[i, tok])) < 2e-3
    assert vs.cache.length == len(prompt) + len(block)


def test_sampled_output_through_vllm_rows_is_the_targets_distribution(target: Any) -> None:
    """One verified position, many seeds: a draft token from a deliberately different q,
    verified on vLLM's rows (separate rejection sampling, the sampler's correction from the
    compressed p_j), is distributed as the target's top-5 distribution (top_k 5 <= K: exact)."""
    vt, runner, loop = target
    tok = vt.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    params = SamplingParams(temperature=1.0, top_k=5)
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=1, top_k=256)
    prefix = prompt[-1:]  # the block re-sends the prompt's last token as its prefix
    base = prompt[:-1]
    n = 600

    async def one(seed: int) -> tuple[int, torch.Tensor, bool]:
        p = params.model_copy(update={"seed": seed})
        vs = VerifierSession(vt, seed.to_bytes(16, "big"), base, p, spec, prefill=False)
        await runner.submit(vs.prefill(), key=seed)
        q = draft_q
        x = int(torch.multinomial(q, 1, generator=Rng(seed).gen(1, len(prompt))))
        block = DraftBlock(
            session=vs.session, epoch=0, seq=0, pos=len(base), prefix=tuple(prefix),
            tokens=(x,), q=(float(q[x]),), vocab_size=vt.vocab_size,
        )  # fmt: skip
        (verdict,) = await runner.submit(vs.verify(block), key=seed)
        if verdict.accepted == 1:
            return x, q, False
        req = SampleRequest(
            sparse=verdict.sparse, q=q.numpy().astype(np.float32),
            seed=Rng(seed).seed_for(4, len(prompt)),
        )  # fmt: skip
        return sample(req).token, q, True

    # the target's processed distribution at the position, from one vLLM row
    ref = VerifierSession(vt, b"x" * 16, base, params, spec, prefill=False)
    from picospec.runtime.scheduler import Forward

    def row() -> Any:
        yield from ref.prefill()
        return (yield Forward(ref.cache, prefix, keep=1))

    async def ref_row() -> torch.Tensor:
        return await runner.submit(row(), key="ref")

    target_row = loop.run_until_complete(ref_row())[-1]
    p = probs_from_logits(target_row, params, len(prompt)).double()
    support = torch.nonzero(p).flatten().tolist()
    assert len(support) == 5
    # q: most of its mass where p has little, some outside p's support
    draft_q = torch.zeros(vt.vocab_size, dtype=torch.float32)
    weights = torch.linspace(1.0, 3.0, 5)
    draft_q[torch.tensor(support)] = weights / weights.sum() * 0.8
    draft_q[torch.tensor([int(i) for i in range(100, 105)])] += 0.04

    async def all_runs() -> list[tuple[int, torch.Tensor, bool]]:
        return await asyncio.gather(*(one(s) for s in range(n)))

    out = loop.run_until_complete(all_runs())
    tokens = [t for t, _, _ in out]
    rejections = sum(r for *_, r in out)
    assert rejections > n // 10, "the draft must be rejected often for the test to bite"
    assert set(tokens) <= set(support), "a token the target's distribution excludes"
    observed = np.array([tokens.count(t) for t in support], dtype=float)
    expected = np.array([float(p[t]) for t in support]) * n
    assert pooled_chisquare_pvalue(observed, expected) > 1e-4


# --- the rows: what a round asks of vLLM, and what it makes of the answer --------------------


def test_top1_rows_keep_the_argmax_and_the_draft_tokens_probability() -> None:
    """A greedy row is vLLM's top 1 plus the draft token's own log-prob, the rest of the mass
    spread evenly: its argmax is the true one, strictly above every spread id, and ``p(x)`` is
    exact, from peaked rows to nearly uniform ones; and where the spread would tie the top
    (a uniform row) it stays below it."""
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    for trial in range(300):
        temp = (0.05, 1.0, 30.0)[trial % 3]
        true = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) / temp, -1)
        top = int(true.argmax())
        x = int(torch.randint(vocab, (1,), generator=gen))
        row = dense_row({top: float(true[top]), x: float(true[x])}, vocab, 1)
        assert int(row.argmax()) == top
        assert int((row >= row[top]).sum()) == 1
        assert float(row[x]) == float(true[x].float())
        spread = row[[i for i in range(vocab) if i not in (top, x)]]
        assert torch.all(spread == spread[0])  # the rest, evenly
    uniform = math.log(1 / 10)
    row = dense_row({3: uniform, 7: uniform}, 10, 1)  # 0.8 left for 8 ids: 0.1 each, a tie
    assert int(row.argmax()) == 3
    assert all(row[i] < row[3] for i in range(10) if i not in (3, 7))


def test_greedy_rows_with_banned_ids_keep_the_argmax_after_the_ban() -> None:
    """With ids banned (``min_tokens``), a greedy row needs the top ``1 + len(ban_ids)``: the
    argmax after the ban is among them and every spread id stays below them."""
    gen = torch.Generator().manual_seed(1)
    vocab = 64
    for _ in range(200):
        true = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 3, -1)
        order = true.argsort(descending=True).tolist()
        params = SamplingParams(temperature=0.0, ban_ids=(order[0],), ban_before=10)
        known = {i: float(true[i]) for i in order[:2]}
        row = dense_row(known, vocab, 2)
        assert int(probs_from_logits(row, params, 0).argmax()) == order[1]
        assert int(probs_from_logits(true.float(), params, 0).argmax()) == order[1]


def test_prompt_rows_are_read_from_the_end() -> None:
    """The rows a round reads are the last of vLLM's prompt log-probabilities, whether they
    come a row per prompt token (vLLM 0.32, the first ``None``), only the computed ones, or
    flat; too few rows, or rows that do not hold their tokens, are errors that say so."""
    from vllm.logprobs import FlatLogprobs, Logprob

    prompt = [5, 6, 7, 8, 9]

    def pos(token: int) -> dict[int, Logprob]:
        return {token: Logprob(-2.0, rank=2), 100 + token: Logprob(-0.5, rank=1)}

    full: list[Any] = [None, pos(6), pos(7), pos(8), pos(9)]
    flat = FlatLogprobs()
    for p in full:
        flat.append(p)
    want = [{8: -2.0, 108: -0.5}, {9: -2.0, 109: -0.5}]
    for got in (full, full[-2:], flat, flat[-3:]):
        assert prompt_rows(got, prompt, 2) == want
    assert prompt_rows(full, prompt, 0) == []
    with pytest.raises(RuntimeError, match="returned 2 prompt log-probability rows"):
        prompt_rows(full[-2:], prompt, 3)
    with pytest.raises(RuntimeError, match="returned 0"):
        prompt_rows(None, prompt, 1)
    with pytest.raises(RuntimeError, match="misaligned"):
        prompt_rows(full[:-1], prompt, 2)  # the rows of a prompt one token shorter


def test_rows_are_as_wide_as_the_sampling_needs(target: Any) -> None:
    """A session's rows: the top 1 when greedy (and one more per banned id), ``top_k`` when
    it bounds the support, else all ``vllm_max_logprobs``."""
    vt, _, _ = target
    spec, prompt = SpecConfig(), [1, 2, 3]

    def top(**params: Any) -> int:
        vs = VerifierSession(vt, b"w" * 16, prompt, SamplingParams(**params), spec, prefill=False)
        return vs.cache.top

    assert top(temperature=0.0) == 1
    assert top(temperature=0.0, ban_ids=(2, 3), ban_before=9) == 3
    assert top(temperature=0.7, top_k=5) == 5
    assert top(temperature=0.7, top_k=5000) == vt.rows_k
    assert top(temperature=0.7, top_p=0.9) == vt.rows_k


def test_greedy_rounds_ask_for_top1_rows_and_alike_sessions_never_rerun(
    target: Any, embedded: LanguageModel
) -> None:
    """Two greedy sessions with the same content, one after the other: every request asks vLLM
    for top-1 rows, flat, under its session's cache salt; the second session's rounds hit only
    its own blocks (never the first's), so no round is re-run, and its rows are the first's. A
    third session made to share the first's salt does hit the first's blocks: the guard re-runs
    those rounds without the cache, and the rows are still the same."""
    vt, runner, loop = target
    prompt = embedded.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    text = (
        " Copper carries electricity in wires and cables, it is used in plumbing pipes"
        " and roofs, and it is alloyed into the bronze and brass of coins and bells. It"
        " conducts heat well, so it lines the bottoms of good pans and kettles."
    )
    cont = embedded.encode(text)[:40]
    assert len(cont) == 40  # 8 rounds: past at least one KV block's end (32 tokens on a CPU)
    greedy = SamplingParams(temperature=0.0)
    seen: list[tuple[Any, ...]] = []
    generate = vt.engine.generate

    def spy(prompt_: Any, params: Any, rid: str, *args: Any, **kwargs: Any) -> Any:
        seen.append((prompt_.get("cache_salt"), params.logprobs, params.prompt_logprobs,
                     params.flat_logprobs))  # fmt: skip
        return generate(prompt_, params, rid, *args, **kwargs)

    def session(name: bytes, salt: str | None = None) -> tuple[VerifierSession, list[Any]]:
        vs = VerifierSession(vt, name * 16, prompt, greedy, SpecConfig(), prefill=False)
        if salt is not None:
            vs.cache.salt = salt

        def program() -> Any:
            yield from vs.prefill()
            rows = []
            for i in range(0, 40, 5):
                rows.append((yield Forward(vs.cache, cont[i : i + 5], keep=5)))
            return rows

        async def run() -> list[Any]:
            return await runner.submit(program(), key=name)

        return vs, loop.run_until_complete(run())

    vt.engine.generate = spy
    try:
        reruns = vt.reruns
        a, rows_a = session(b"a")
        b, rows_b = session(b"b")
        assert vt.reruns == reruns, "a session re-ran a round: it hit another session's blocks"
        assert {s for s, *_ in seen} == {a.cache.salt, b.cache.salt}
        assert a.cache.salt != b.cache.salt
        assert all(lp == 1 and plp in (None, 1) and flat for _, lp, plp, flat in seen)
        _, rows_c = session(b"c", salt=a.cache.salt)
        assert vt.reruns > reruns, "the shared salt should have hit the first session's blocks"
    finally:
        del vt.engine.generate  # the engine's own method again
    want = embedded.new_cache().extend(prompt + cont)[len(prompt) :]
    # the prompt rows hold the next fed token's own log-prob (a round's last row, the position
    # after it, holds the argmax only)
    fed = [j for j in range(len(cont) - 1) if j % 5 != 4]
    nxt = torch.tensor([cont[j + 1] for j in fed])[:, None]
    for rows in (rows_a, rows_b, rows_c):
        got = torch.cat(rows)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        p_got = torch.softmax(got[fed], -1).gather(1, nxt)
        assert torch.allclose(p_got, torch.softmax(want[fed], -1).gather(1, nxt), atol=2e-3)


# --- through the services -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Any:
    cfg = StackConfig(
        topology="single",
        verifiers=2,
        verifier_backend="vllm",
        quantize_draft="int8",  # a draft that disagrees: rejections and rollbacks
        env={
            "PICOSPEC_VERIFY_TIMEOUT_S": "5",
            "PICOSPEC_REQUEST_TIMEOUT_S": "60",
            "PICOSPEC_VLLM_CPU_KV_CACHE_GIB": "1",
            "PICOSPEC_VLLM_MAX_MODEL_LEN": "2048",
        },
        ready_timeout=600.0,
    ).with_free_ports()
    with Stack(cfg) as s:
        yield s


def _answers(stack: Stack, mode: str, n: int = 48) -> list[Any]:
    async def go() -> list[Any]:
        return await asyncio.gather(*(stream(stack.api_url, p, n, mode=mode) for p in PROMPTS))

    return asyncio.run(go())


def test_greedy_on_vllm_is_vllms_own_greedy_decoding_with_rollbacks(stack: Stack) -> None:
    """picospec with the int8 draft, verified on vLLM, answers exactly what vLLM decodes alone
    (``ar`` on the vLLM backend), with real rejections and rollbacks; the sessions of both
    modes share vLLM's batches."""
    ar = _answers(stack, "ar")
    spec = _answers(stack, "picospec")
    for a, s in zip(ar, spec, strict=True):
        assert a.ok and s.ok, (a.error, s.error)
        assert s.text == a.text
        assert a.final["usage"]["completion_tokens"] == s.final["usage"]["completion_tokens"]
    assert sum(s.final["picospec"]["rollbacks"] for s in spec) > 0
    # vLLM's own metrics on the verifiers' /metrics: its engine ran several requests per step
    steps = tokens = 0.0
    for name in ("verifier-1", "verifier-2"):
        text = scrape(stack.services[name].url)
        steps += metric(text, "vllm:iteration_tokens_total_count")
        tokens += metric(text, "vllm:iteration_tokens_total_sum")
    assert steps > 0 and tokens / steps > 1.0


def test_a_killed_vllm_verifier_moves_its_sessions_and_nothing_changes(stack: Stack) -> None:
    """SIGKILL the verifier holding a live session: the drafter re-opens it on the other
    vLLM verifier (re-prefill from the committed tokens) and the answer is the same."""
    ref = _answers(stack, "picospec", 96)

    async def go() -> list[Any]:
        tasks = [asyncio.create_task(stream(stack.api_url, p, 96)) for p in PROMPTS]
        await asyncio.sleep(3.0)
        held = {v: gauge(stack, v, "picospec_active_sessions") for v in
                ("verifier-1", "verifier-2")}  # fmt: skip
        victim.append(max(held, key=held.__getitem__))
        stack.kill(victim[0], signal.SIGKILL)
        return await asyncio.gather(*tasks)

    victim: list[str] = []
    try:
        got = asyncio.run(go())
    finally:
        if victim:
            stack.start_service(victim[0])
    for r, want in zip(got, ref, strict=True):
        assert r.ok and r.text == want.text
    assert sum(r.final["picospec"]["migrations"] for r in got) >= 1
