"""Batched verification: several sessions' blocks in one forward, exactly as if alone.

Every check compares the batched path with the unbatched one on real tiny models (no mocks):
the logits, the key/value state each session keeps afterwards, the verdicts of whole pipelined
exchanges, and complete greedy generations against a cache-free reference decoding. Both KV
layouts are checked: ``slots`` (the varlen forward over preallocated per-session caches, the
default) and ``copy`` (DynamicCache padded into a temporary batched cache).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from conftest import pooled_chisquare_pvalue, tiny_model
from picospec.protocol.codec import DraftBlock, SampleRequest, Verdict
from picospec.runtime.checkpoints import quantize_int8
from picospec.runtime.model import KVCache, LanguageModel
from picospec.runtime.scheduler import run_batched
from picospec.speculation.drafter import Committed, DrafterSession
from picospec.speculation.sampler import sample
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import BlockRefused, VerifierSession, verify_many
from tinymodels import tiny_arch

V = 16
ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def target() -> LanguageModel:
    """The tiny target with the default (slot) layout."""
    lm = tiny_model(V, seed=21)
    assert lm.effective_kv_layout == "slots"
    return lm


@pytest.fixture(scope="module", params=["slots", "copy"])
def either(request: pytest.FixtureRequest) -> LanguageModel:
    """The same tiny target, once per KV layout."""
    lm = tiny_model(V, seed=21)
    lm.kv_layout = request.param
    assert lm.effective_kv_layout == request.param
    return lm


@pytest.fixture(scope="module")
def draft() -> LanguageModel:
    return tiny_model(V, seed=22)


@contextmanager
def count_forwards(lm: LanguageModel) -> Iterator[list[int]]:
    """Record the number of sessions of every forward of ``lm``'s network: the batch size of
    a transformers forward (copy layout), the sessions of a varlen forward (slot layout)."""
    sizes: list[int] = []
    handle = lm.model.register_forward_hook(
        lambda _m, _args, kwargs, _out: sizes.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    plain = lm._forward_slots

    def varlen(caches: list[KVCache], *args: object) -> list[torch.Tensor]:
        sizes.append(len(caches))
        return plain(caches, *args)  # type: ignore[arg-type]

    lm._forward_slots = varlen  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        handle.remove()
        del lm._forward_slots


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(V) for _ in range(n)]


def _twin_caches(lm: LanguageModel, pasts: list[int], rng: random.Random) -> tuple[list, list]:
    """Two identical sets of session caches holding ``pasts`` tokens each (filled alone)."""
    a, b = [lm.new_cache() for _ in pasts], [lm.new_cache() for _ in pasts]
    for ca, cb, n in zip(a, b, pasts, strict=True):
        if n:
            ids = _ids(rng, n)
            ca.extend(ids)
            cb.extend(ids)
    return a, b


def _assert_same_kv(batched: KVCache, alone: KVCache) -> None:
    assert batched.length == alone.length and batched.layout == alone.layout
    if batched.length == 0:
        return
    for i in range(batched._model.model.config.num_hidden_layers):
        (kx, vx), (ky, vy) = batched.kv(i), alone.kv(i)
        assert kx.shape == ky.shape == vx.shape == vy.shape
        assert kx.shape[-2] == batched.length
        torch.testing.assert_close(kx, ky, atol=ATOL, rtol=0)
        torch.testing.assert_close(vx, vy, atol=ATOL, rtol=0)


# --- forward_batch ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pasts", "news"),
    [
        ([0, 1, 7, 12, 3], [3, 1, 5, 2, 4]),
        ([0, 0, 0], [2, 5, 1]),  # every cache empty: no past at all
        ([1, 9, 4], [1, 1, 1]),  # one token each (a decode step)
    ],
)
def test_forward_batch_equals_each_session_alone(
    either: LanguageModel, pasts: list[int], news: list[int]
) -> None:
    target = either
    assert target.batching_unsupported is None
    rng = random.Random(sum(pasts) * 31 + sum(news))
    batched, alone = _twin_caches(target, pasts, rng)
    toks = [_ids(rng, n) for n in news]
    with count_forwards(target) as sizes:
        got = target.forward_batch(batched, toks)
    assert sizes == [len(pasts)], "all sessions must share one forward"
    want = [c.extend(t) for c, t in zip(alone, toks, strict=True)]
    for g, w, n in zip(got, want, news, strict=True):
        assert g.dtype == torch.float32 and g.device.type == "cpu" and g.shape == (n, V)
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    for cb, ca in zip(batched, alone, strict=True):
        _assert_same_kv(cb, ca)
    # the split-back state serves a later, unbatched forward like a never-batched cache
    for cb, ca in zip(batched, alone, strict=True):
        nxt = _ids(rng, 3)
        torch.testing.assert_close(cb.extend(nxt), ca.extend(nxt), atol=ATOL, rtol=0)


def test_repeated_batched_rounds_with_rejections_stay_equal(either: LanguageModel) -> None:
    target = either
    rng = random.Random(5)
    batched, alone = _twin_caches(target, [0, 1, 6, 3], rng)
    for _ in range(8):
        toks = [_ids(rng, rng.randint(1, 5)) for _ in batched]
        got = target.forward_batch(batched, toks)
        want = [c.extend(t) for c, t in zip(alone, toks, strict=True)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
        for cb, ca in zip(batched, alone, strict=True):
            _assert_same_kv(cb, ca)
            # a rejection: crop to anywhere at or below the length (0 included, now and then)
            keep = rng.choice([0, ca.length, rng.randint(0, ca.length)])
            cb.crop(keep)
            ca.crop(keep)


def test_forward_batch_of_one_takes_the_plain_path(either: LanguageModel) -> None:
    target = either
    one, ref = _twin_caches(target, [4], random.Random(1))
    with count_forwards(target) as sizes:
        got = target.forward_batch(one, [[1, 2]])
    assert sizes == [1]
    torch.testing.assert_close(got[0], ref[0].extend([1, 2]), atol=0, rtol=0)


def test_forward_batch_rejects_bad_calls(target: LanguageModel, draft: LanguageModel) -> None:
    c = target.new_cache()
    with pytest.raises(ValueError, match="at least one token"):
        target.forward_batch([c, target.new_cache()], [[1], []])
    with pytest.raises(ValueError, match="twice"):
        target.forward_batch([c, c], [[1], [2]])
    with pytest.raises(ValueError, match="belong"):
        target.forward_batch([c, draft.new_cache()], [[1], [2]])
    assert c.length == 0


def _tiny_arch(model_type: str, **extra: object) -> LanguageModel:
    return tiny_arch(model_type, V, **extra)


@pytest.mark.parametrize(
    ("make", "batched"),
    [
        (lambda: _tiny_arch("llama", attn_implementation="eager"), True),
        (lambda: _tiny_arch("mistral", sliding_window=None), True),
        (lambda: _tiny_arch("qwen2"), True),
        (lambda: _tiny_arch("qwen3", head_dim=8), True),
        (lambda: _tiny_arch("mistral", sliding_window=4), False),
        (lambda: _tiny_arch("gpt2", n_embd=32, n_layer=2, n_head=4), False),
        (
            lambda: _tiny_arch(
                "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
            ),
            False,
        ),
        (
            lambda: LanguageModel(model=quantize_int8(tiny_model(V, seed=4).model), name="i8"),
            False,
        ),
    ],
    ids=[
        "llama-eager",
        "mistral",
        "qwen2",
        "qwen3",
        "mistral-sliding",
        "gpt2",
        "llama-dynamic-rope",
        "llama-int8",
    ],
)
def test_other_architectures_batch_or_fall_back_and_stay_exact(
    make: Callable[[], LanguageModel], batched: bool
) -> None:
    lm = make()
    assert (lm.batching_unsupported is None) is batched, lm.batching_unsupported
    rng = random.Random(9)
    caches, alone = _twin_caches(lm, [0, 2, 9], rng)
    for _ in range(2):
        toks = [_ids(rng, n) for n in (3, 1, 4)]
        reported: list[int] = []
        with count_forwards(lm) as sizes:
            got = lm.forward_batch(caches, toks, on_forward=reported.append)
        assert sizes == reported == ([3] if batched else [1, 1, 1])
        want = [c.extend(t) for c, t in zip(alone, toks, strict=True)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# --- verify_many against submit, session by session ------------------------------------


def _same_verdicts(a: list[Verdict] | BlockRefused, b: list[Verdict] | BlockRefused) -> None:
    """Equal verdicts; compressed p_j values equal to float tolerance (the batched logits are
    not bit-identical to the unbatched ones), everything else exactly."""
    if isinstance(a, BlockRefused) or isinstance(b, BlockRefused):
        assert isinstance(a, BlockRefused) and isinstance(b, BlockRefused)
        assert a.reason == b.reason
        return
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x.sparse is None or y.sparse is None:
            assert x == y
            continue
        assert x.model_copy(update={"sparse": None}) == y.model_copy(update={"sparse": None})
        np.testing.assert_array_equal(x.sparse.ids, y.sparse.ids)
        np.testing.assert_allclose(x.sparse.probs, y.sparse.probs, atol=1e-5)
        assert x.sparse.tail_mass == pytest.approx(y.sparse.tail_mass, abs=1e-5)


def _apply(d: DrafterSession, verdicts: list[Verdict]) -> None:
    for v in verdicts:
        if d.done:
            return
        got = d.on_verdict(v)
        if isinstance(got, SampleRequest):
            got = d.on_correction(sample(got).token)
        assert got is None or isinstance(got, Committed)


PROMPTS = [[1, 2, 3], [4], [0, 7, 7, 5, 1, 6, 2], [9, 9], [3, 14, 15, 9, 2, 6]]


SAMPLED = SamplingParams()
SAMPLED_TOP_P = SamplingParams(temperature=0.8, top_p=0.9)
HOT = SamplingParams(temperature=1.2)


@pytest.mark.parametrize(
    ("spec", "params", "layout"),
    [
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=3), GREEDY, "slots"),
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=4, top_k=5), SAMPLED, "slots"),
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=4, top_k=5), SAMPLED, "copy"),
        (SpecConfig(mode=Mode.VANILLA, draft_len=3), GREEDY, "slots"),
        (SpecConfig(mode=Mode.VANILLA, draft_len=2), SAMPLED_TOP_P, "slots"),
        (SpecConfig(mode=Mode.DSSD, draft_len=4, top_k=V), HOT, "slots"),
    ],
    ids=[
        "picospec-greedy",
        "picospec-sampled",
        "picospec-sampled-copy",
        "vanilla-greedy",
        "vanilla-sampled",
        "dssd",
    ],
)
def test_verify_many_gives_the_verdicts_of_submit(
    target: LanguageModel,
    draft: LanguageModel,
    spec: SpecConfig,
    params: SamplingParams,
    layout: str,
) -> None:
    """Two identical sets of verifier sessions: one takes every block through ``submit`` one
    by one, the other through ``verify_many`` (blocks of all sessions interleaved, some
    sessions' blocks reversed so they wait in the buffer, stale and refused blocks mixed in)."""
    if layout != target.kv_layout:
        target = tiny_model(V, seed=21)
        target.kv_layout = layout
    drafters, alone, batched = [], [], []
    for k, prompt in enumerate(PROMPTS):
        sid = os.urandom(16)
        p = params.model_copy(update={"seed": 100 + k})
        drafters.append(DrafterSession(draft, sid, prompt, p, spec, 20))
        alone.append(VerifierSession(target, sid, prompt, p, spec))
        batched.append(VerifierSession(target, sid, prompt, p, spec))
    rng = random.Random(7)
    sizes: list[int] = []
    verified: list[list[DraftBlock]] = [[] for _ in PROMPTS]
    rounds = 0
    while not all(d.done for d in drafters):
        rounds += 1
        queues = []
        for k, d in enumerate(drafters):
            blocks = [] if d.done else d.draft_ready()
            if k % 2 and rounds % 2:
                blocks.reverse()  # early blocks wait in the buffer, then run in a chain
            if verified[k] and rng.random() < 0.3:  # a replay: refused, the others go on
                blocks.insert(rng.randrange(len(blocks) + 1), verified[k][-1])
            queues.append(blocks)
            verified[k].extend(blocks)
        items = []
        while any(queues):  # interleave the sessions' blocks, each session in its own order
            k = rng.choice([k for k, q in enumerate(queues) if q])
            items.append((k, queues[k].pop(0)))
        want = []
        for k, b in items:
            try:
                want.append(alone[k].submit(b))
            except BlockRefused as e:
                want.append(e)
        got = verify_many([(batched[k], b) for k, b in items], on_forward=sizes.append)
        assert len(got) == len(items)
        for w, g in zip(want, got, strict=True):
            _same_verdicts(w, g)
        for (k, _), w in zip(items, want, strict=True):
            if not isinstance(w, BlockRefused):
                _apply(drafters[k], w)
        for a, b in zip(alone, batched, strict=True):
            assert (a.epoch, a.cache.length, a.stats) == (b.epoch, b.cache.length, b.stats)
            _assert_same_kv(b.cache, a.cache)
            torch.testing.assert_close(b.next_logits, a.next_logits, atol=ATOL, rtol=0)
    assert sum(sizes) == sum(a.stats.forwards - 1 for a in alone)  # every forward reported
    assert max(sizes) >= 3, "sessions must have shared forwards"
    assert sum(d.stats.rollbacks for d in drafters) > 0, "the draft must disagree sometimes"


def test_verify_many_refusals_are_per_item(target: LanguageModel) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2)
    sessions = [VerifierSession(target, os.urandom(16), [1, 2], GREEDY, spec) for _ in range(3)]

    def block(vs: VerifierSession, **kw: object) -> DraftBlock:
        fields = dict(
            session=vs.session, epoch=0, seq=0, pos=2, prefix=(), tokens=(3, 4), q=(0.5, 0.5)
        )
        return DraftBlock(vocab_size=V, **(fields | kw))

    items = [
        (sessions[0], block(sessions[0], epoch=3)),  # future epoch
        (sessions[1], block(sessions[1])),
        (sessions[2], block(sessions[0])),  # another session's block
        (sessions[2], block(sessions[2], pos=4, seq=1)),  # early: waits
        (sessions[2], block(sessions[2])),  # unblocks the one waiting
        (sessions[1], block(sessions[1])),  # replay
    ]
    got = verify_many(items)
    kinds = [g.reason if isinstance(g, BlockRefused) else [v.seq for v in g] for g in got]
    assert kinds[:4] == ["future_epoch", [0], "wrong_session", []]
    assert kinds[4] in ([0], [0, 1])  # the waiting block follows unless seq 0 was rejected
    # the replay: refused, or merely stale if seq 0 was rejected (a new epoch began)
    assert kinds[5] == ("replayed" if sessions[1].epoch == 0 else [])
    assert sessions[0].cache.length == 2 and sessions[0].stats.forwards == 1  # untouched


# --- whole generations through verify_many -----------------------------------------------


_REFERENCE: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


@torch.inference_mode()
def _draft_ready(d: DrafterSession) -> Generator[Any, Any, list[DraftBlock]]:
    """:meth:`DrafterSession.draft_ready` as a program: every draft step one forward."""
    blocks = []
    while d.can_draft():
        block = yield from d.draft()
        if block is not None:
            blocks.append(block)
    return blocks


def _rounds_in_lock_step(
    pairs: list[tuple[DrafterSession, VerifierSession]],
    sizes: list[int],
    draft_sizes: list[int] | None = None,
) -> None:
    """Run every pair to the end: each round, every unfinished session drafts what it may,
    the sessions' draft steps sharing forwards (the drafter's model thread), and all the
    blocks are verified together (``verify_many``); the forward sizes go to ``sizes`` and
    ``draft_sizes``."""
    while not all(d.done for d, _ in pairs):
        live = [(d, v) for d, v in pairs if not d.done]
        drafted = run_batched(
            [(i, _draft_ready(d)) for i, (d, _) in enumerate(live)],
            on_batch=None if draft_sizes is None else draft_sizes.append,
        )
        items = [(v, b) for (_, v), job in zip(live, drafted, strict=True) for b in job.result]
        got = verify_many(items, on_forward=sizes.append)
        for (v, _), verdicts in zip(items, got, strict=True):
            assert not isinstance(verdicts, BlockRefused)
            _apply(next(d for d, vv in pairs if vv is v), verdicts)


def _reference_greedy(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    """The target alone, recomputed from scratch with no KV cache at every step."""
    key = (model.name, tuple(prompt), n)
    if key not in _REFERENCE:
        _REFERENCE[key] = _greedy_from_scratch(model, prompt, n)
    return _REFERENCE[key]


def _greedy_from_scratch(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=3),
        SpecConfig(mode=Mode.PICOSPEC, draft_len=1, lookahead=4),
        SpecConfig(mode=Mode.VANILLA, draft_len=4),
    ],
    ids=lambda s: f"{s.mode.value}-g{s.draft_len}",
)
def test_batched_generations_equal_the_target_alone(
    target: LanguageModel, draft: LanguageModel, spec: SpecConfig
) -> None:
    n = 24
    pairs = []
    for prompt in PROMPTS:
        sid = os.urandom(16)
        pairs.append(
            (
                DrafterSession(draft, sid, prompt, GREEDY, spec, n),
                VerifierSession(target, sid, prompt, GREEDY, spec),
            )
        )
    sizes: list[int] = []
    _rounds_in_lock_step(pairs, sizes)
    for (d, _), prompt in zip(pairs, PROMPTS, strict=True):
        assert d.finish_reason == "length"
        assert d.generated == _reference_greedy(target, prompt, n)
    assert max(sizes) == len(PROMPTS), "every session must have shared a forward"
    assert sum(d.stats.rollbacks for d, _ in pairs) > 0


@pytest.mark.slow
def test_smollm2_batches_for_real_and_exactly(smollm2: LanguageModel) -> None:
    assert smollm2.batching_unsupported is None
    rng = random.Random(3)
    vocab = smollm2.vocab_size
    pasts, news = [0, 3, 17, 9], [4, 1, 5, 3]
    batched, alone = [smollm2.new_cache() for _ in pasts], [smollm2.new_cache() for _ in pasts]
    for cb, ca, n in zip(batched, alone, pasts, strict=True):
        if n:
            ids = [rng.randrange(vocab) for _ in range(n)]
            cb.extend(ids)
            ca.extend(ids)
    for _ in range(2):
        toks = [[rng.randrange(vocab) for _ in range(n)] for n in news]
        with count_forwards(smollm2) as sizes:
            got = smollm2.forward_batch(batched, toks)
        assert sizes == [len(pasts)]
        for g, w in zip(got, [c.extend(t) for c, t in zip(alone, toks, strict=True)], strict=True):
            torch.testing.assert_close(g, w, atol=1e-3, rtol=0)
            assert torch.equal(g.argmax(-1), w.argmax(-1))


# --- sampled output through batched rounds: exactly the target's distribution --------------


def test_sampled_continuations_through_batched_rounds_follow_the_target() -> None:
    """The statistical losslessness check of test_lossless, with every run's draft steps and
    verifications in batched rounds of ``BATCH`` sessions (different seeds: the drafter's and
    the verifier's model threads batch them so), and the first token from the prefill as the
    services do."""

    from test_lossless import LENGTH, VOCAB, _exact_sequence_distribution

    target, draft = tiny_model(VOCAB, seed=11), tiny_model(VOCAB, seed=12)
    assert target.effective_kv_layout == "slots"
    prompt, params = [1, 3], SamplingParams()
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2, top_k=VOCAB)
    exact = _exact_sequence_distribution(target, prompt, params)
    counts: dict[tuple[int, ...], int] = {}
    sizes: list[int] = []
    draft_sizes: list[int] = []
    rollbacks = 0
    batch, runs = 25, 1500
    for first_seed in range(0, runs, batch):
        pairs = []
        for seed in range(first_seed, first_seed + batch):
            sid, p = os.urandom(16), params.model_copy(update={"seed": seed})
            d = DrafterSession(draft, sid, prompt, p, spec, LENGTH)
            v = VerifierSession(target, sid, prompt, p, spec)
            d.accept_first(v.first_token())
            pairs.append((d, v))
        _rounds_in_lock_step(pairs, sizes, draft_sizes)
        for d, _ in pairs:
            key = tuple(d.generated)
            counts[key] = counts.get(key, 0) + 1
            rollbacks += d.stats.rollbacks
    assert max(sizes) == batch, "the sessions must have shared forwards"
    assert max(draft_sizes) == batch, "the sessions' draft steps must have shared forwards"
    assert rollbacks > runs // 4, "draft and target must disagree often for the test to bite"
    outcomes = sorted(exact)
    expected = np.array([exact[o] for o in outcomes]) * runs
    observed = np.array([counts.get(o, 0) for o in outcomes], dtype=float)
    assert sum(counts.values()) == observed.sum(), "produced a continuation the target never would"
    assert pooled_chisquare_pvalue(observed, expected) > 1e-4
