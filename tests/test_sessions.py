"""The session state machines, driven by shuttling messages between them by hand."""

from __future__ import annotations

import os

import pytest
import torch

from picospec.protocol.codec import SampleRequest, Verdict
from picospec.runtime.model import LanguageModel
from picospec.speculation.drafter import Committed, DrafterSession, ProtocolError
from picospec.speculation.sampler import sample
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import BlockRefused, VerifierSession

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [1, 2, 3, 4]


def _pair(
    target: LanguageModel,
    draft: LanguageModel,
    spec: SpecConfig,
    n: int = 40,
    params: SamplingParams = GREEDY,
) -> tuple[DrafterSession, VerifierSession]:
    sid = os.urandom(16)
    return (
        DrafterSession(draft, sid, PROMPT, params, spec, n),
        VerifierSession(target, sid, PROMPT, params, spec),
    )


def test_pipeline_keeps_lookahead_blocks_in_flight_and_drops_stale_epochs(
    target: LanguageModel, draft: LanguageModel
) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=3)
    d, v = _pair(target, draft, spec)
    while not d.done:
        blocks = d.draft_ready()
        assert 0 < d.inflight <= 3
        # deliver every block in flight; after a rejection the later ones are stale
        for b in blocks:
            for verdict in v.submit(b):
                got = d.on_verdict(verdict)
                if isinstance(got, SampleRequest):
                    got = d.on_correction(sample(got).token)
    assert len(d.generated) == 40 and d.finish_reason == "length"
    assert d.stats.rollbacks > 0 and v.stats.dropped_stale > 0
    assert d.stats.accepted + d.stats.rollbacks >= 40 - 1


def test_verifier_refuses_replays_and_future_epochs_and_buffers_early_blocks(
    target: LanguageModel, draft: LanguageModel
) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=3)
    d, v = _pair(target, target, spec)  # same model: all accepted
    b1, b2, b3 = d.draft_ready()
    assert (b1.pos, b2.pos, b3.pos) == (4, 6, 8)
    assert v.submit(b3) == [] and v.submit(b2) == []  # early: buffered
    verdicts = v.submit(b1)
    assert [x.seq for x in verdicts] == [b1.seq, b2.seq, b3.seq]
    assert all(x.accepted == 2 for x in verdicts)
    with pytest.raises(BlockRefused) as e:
        v.submit(b1)
    assert e.value.reason == "replayed"
    future = b1.model_copy(update={"epoch": 5, "pos": v.cache.length})
    with pytest.raises(BlockRefused) as e:
        v.submit(future)
    assert e.value.reason == "future_epoch"
    other = b1.model_copy(update={"session": os.urandom(16)})
    with pytest.raises(BlockRefused):
        v.submit(other)
    assert v.cache.length == 10, "refused blocks changed nothing"


def test_rollback_leaves_the_verifier_exactly_where_a_fresh_prefill_would(
    target: LanguageModel, draft: LanguageModel
) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=4, lookahead=1)
    d, v = _pair(target, draft, spec)
    for _ in range(6):
        (b,) = d.draft_ready()
        (verdict,) = v.submit(b)
        d.on_verdict(verdict)
        if verdict.accepted < len(b.tokens):
            break
    else:
        pytest.fail("no rejection happened")
    # the verifier holds the committed history minus the unsent correction
    history = d.committed[: len(d.committed) - 1]
    assert v.cache.length == len(history)
    fresh = target.new_cache().extend(history)[-1]
    assert torch.allclose(v.next_logits, fresh, atol=1e-4)
    # ... and the drafter's cache holds a prefix of the committed tokens only
    assert d._cache.length <= len(d.committed) - 1


def test_verdicts_out_of_order_or_for_other_sessions_are_protocol_errors(
    target: LanguageModel, draft: LanguageModel
) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2)
    d, v = _pair(target, target, spec)
    b1, b2 = d.draft_ready()
    v1, v2 = v.submit(b1) + v.submit(b2)
    with pytest.raises(ProtocolError, match="oldest block"):
        d.on_verdict(v2)
    with pytest.raises(ProtocolError, match="another session"):
        d.on_verdict(v1.model_copy(update={"session": os.urandom(16)}))
    with pytest.raises(ProtocolError, match="accepts"):
        d.on_verdict(v1.model_copy(update={"accepted": 3}))
    assert d.committed == PROMPT, "refused verdicts changed nothing"
    assert isinstance(d.on_verdict(v1), Committed)


def test_verdicts_of_a_stale_epoch_are_ignored(target: LanguageModel, draft: LanguageModel) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=4, lookahead=2)
    d, v = _pair(target, draft, spec)
    for _ in range(10):
        b1, b2 = d.draft_ready()[-2:] if d.inflight == 0 else (None, None)
        (v1,) = v.submit(b1)
        d.on_verdict(v1)
        if v1.accepted < 4:
            break
        for verdict in v.submit(b2):
            d.on_verdict(verdict)
    else:
        pytest.fail("no rejection")
    assert v.submit(b2) == [], "the verifier drops the block drafted before the rejection"
    committed = list(d.committed)
    stale = Verdict(
        session=d.session, epoch=b2.epoch, seq=b2.seq, accepted=4, vocab_size=target.vocab_size
    )
    assert d.on_verdict(stale) is None and d.committed == committed


def test_sampled_rejection_goes_through_the_sampler(
    target: LanguageModel, draft: LanguageModel
) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=1, top_k=4)
    d, v = _pair(target, draft, spec, params=SamplingParams(seed=3))
    for _ in range(20):
        (b,) = d.draft_ready()
        (verdict,) = v.submit(b)
        got = d.on_verdict(verdict)
        if isinstance(got, SampleRequest):
            assert verdict.token is None and verdict.sparse is not None
            assert len(verdict.sparse.ids) <= 4
            assert not d.can_draft(), "drafting waits for the correction"
            with pytest.raises(ProtocolError):
                d.on_verdict(verdict)
            before = len(d.committed)
            done = d.on_correction(sample(got).token)
            assert len(d.committed) == before + verdict.accepted + 1
            assert done.tokens == d.committed[before:]
            return
    pytest.fail("no sampled rejection in 20 blocks")


def test_stops_at_eos_and_trims_to_max_tokens(target: LanguageModel) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=4, lookahead=2)
    sid = os.urandom(16)
    # learn what the target says greedily, then declare its 3rd token EOS
    probe = DrafterSession(target, sid, PROMPT, GREEDY, spec, 8)
    v = VerifierSession(target, sid, PROMPT, GREEDY, spec)
    while not probe.done:
        for b in probe.draft_ready():
            for verdict in v.submit(b):
                probe.on_verdict(verdict)
    assert probe.finish_reason == "length" and len(probe.generated) == 8
    eos = probe.generated[2]
    first = probe.generated.index(eos)
    d = DrafterSession(target, sid, PROMPT, GREEDY, spec, 8, frozenset({eos}))
    v = VerifierSession(target, sid, PROMPT, GREEDY, spec)
    while not d.done:
        for b in d.draft_ready():
            for verdict in v.submit(b):
                d.on_verdict(verdict)
    assert d.finish_reason == "stop" and d.generated == probe.generated[: first + 1]


def test_vanilla_sends_full_distributions_and_gets_bonus_tokens(target: LanguageModel) -> None:
    spec = SpecConfig(mode=Mode.VANILLA, draft_len=3)
    d, v = _pair(target, target, spec, n=7)
    (b,) = d.draft_ready()
    assert b.dense_q is not None and b.dense_q.shape == (3, target.vocab_size)
    (verdict,) = v.submit(b)
    got = d.on_verdict(verdict)
    assert isinstance(got, Committed) and len(got.tokens) == 4  # 3 accepted + bonus
    (b2,) = d.draft_ready()
    assert b2.prefix == (got.tokens[-1],) and b2.pos == len(PROMPT) + 3


# --- the first token from the verifier's prefill ----------------------------------------------


def _reference_greedy(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    cache, out = model.new_cache(), []
    logits = cache.extend(prompt)[-1]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = cache.extend([out[-1]])[-1]
    return out


def _run(d: DrafterSession, v: VerifierSession, blocks: list) -> None:
    """Shuttle ``blocks`` (and whatever the drafter drafts next) until the session is done."""
    pending = list(blocks)
    while not d.done:
        pending += d.draft_ready()
        for verdict in v.submit(pending.pop(0)):
            got = d.on_verdict(verdict)
            if isinstance(got, SampleRequest):
                d.on_correction(sample(got).token)


@pytest.mark.parametrize("same_model", [True, False])
def test_first_token_from_the_prefill_reconciles_with_blocks_drafted_meanwhile(
    target: LanguageModel, draft: LanguageModel, same_model: bool
) -> None:
    """The drafter drafts while the session opens; the open's first token then either matches
    its first draft token (speculation kept, blocks renumbered) or not (rolled back)."""
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=2)
    model = target if same_model else draft
    # a prompt on which the other draft's first guess is wrong, so both branches are covered
    prompt = next(
        p
        for p in ([1, 2, 3, 4], [5, 1, 1], [2, 2], [7, 3, 0, 6], [4], [6, 6, 1], [3, 5])
        if same_model or _reference_greedy(draft, p, 1) != _reference_greedy(target, p, 1)
    )
    sid = os.urandom(16)
    d = DrafterSession(model, sid, prompt, GREEDY, spec, 30)
    v = VerifierSession(target, sid, prompt, GREEDY, spec)
    held = d.draft_ready()  # drafted before the open's reply arrived; none sent
    drafted = [t for b in held for t in b.tokens]
    first = v.first_token()
    assert first == _reference_greedy(target, prompt, 1)[0]
    got, blocks = d.accept_first(first)
    assert got == Committed(tokens=[first], done=False) and d.generated == [first]
    if same_model:
        # the speculation after the first token survives, re-sealed from seq 0 at the prompt's
        # end with the first token as prefix
        assert drafted[0] == first
        assert [t for b in blocks for t in b.tokens] == drafted[1:]
        assert [b.seq for b in blocks] == list(range(len(blocks)))
        assert blocks[0].pos == len(prompt) and blocks[0].prefix == (first,)
        assert all(b.prefix == () for b in blocks[1:])
        assert all(
            a.pos + len(a.prefix) + len(a.tokens) == b.pos
            for a, b in zip(blocks, blocks[1:], strict=False)
        )
    else:
        assert drafted[0] != first
        assert blocks == [] and d.stats.wasted == len(drafted)
    assert d.stats.sent == sum(len(b.tokens) for b in blocks)
    _run(d, v, blocks)
    assert d.generated == _reference_greedy(target, prompt, 30)
    if same_model:
        assert d.stats.rollbacks == 0 and d.stats.accepted == d.stats.drafted == 29
    with pytest.raises(ProtocolError, match="first token"):
        d.accept_first(first)


def test_the_first_token_can_end_the_session(target: LanguageModel) -> None:
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=2)
    d, v = _pair(target, target, spec, n=1)
    d.draft_ready()
    got, blocks = d.accept_first(v.first_token())
    assert got.done and blocks == [] and d.finish_reason == "length" and len(d.generated) == 1
    sid = os.urandom(16)
    first = VerifierSession(target, sid, PROMPT, GREEDY, spec).first_token()
    d = DrafterSession(target, sid, PROMPT, GREEDY, spec, 10, eos_ids=frozenset({first}))
    d.draft_ready()
    got, blocks = d.accept_first(first)
    assert got.done and blocks == [] and d.finish_reason == "stop"
    d = DrafterSession(target, sid, PROMPT, GREEDY, spec, 10)
    with pytest.raises(ProtocolError, match="outside the vocabulary"):
        d.accept_first(target.vocab_size)


def test_the_first_token_is_what_ar_decodes_with_the_same_seed(target: LanguageModel) -> None:
    """Sampled: the verifier draws it with ar's own position-keyed randomness."""
    for seed in range(20):
        params = SamplingParams(temperature=1.0, seed=seed)
        sid = os.urandom(16)
        spec = SpecConfig(mode=Mode.PICOSPEC)
        first = VerifierSession(target, sid, PROMPT, params, spec).first_token()
        ar = VerifierSession(target, sid, PROMPT, params, SpecConfig(mode=Mode.AR))
        assert first == ar.ar_step()


@pytest.mark.parametrize("mode", [Mode.PICOSPEC, Mode.DSSD, Mode.VANILLA])
def test_a_session_handed_over_to_the_verifier_ends_with_the_target_answer(
    target: LanguageModel, draft: LanguageModel, mode: Mode
) -> None:
    """Speculation stops in the middle of an answer (a saturated verifier where no draft length
    pays): the blocks in flight still get their verdicts, then a lead block hands the session
    over and the verifier decodes the rest on its own. The answer is the target's alone."""
    from picospec.runtime.scheduler import run
    from picospec.speculation.engine import generate

    n = 40
    want = generate(target, None, PROMPT, GREEDY, SpecConfig(mode=Mode.AR), n).tokens
    spec = SpecConfig(mode=mode, draft_len=3, lookahead=2)
    d, v = _pair(target, draft, spec, n)
    d.accept_first(v.first_token())
    for _ in range(3):  # a few rounds of speculation, blocks left in flight
        for b in d.draft_ready():
            for verdict in v.submit(b):
                d.on_verdict(verdict)
    blocks = d.draft_ready()
    assert blocks and d.inflight
    d.stop_speculating()
    assert not d.can_draft()
    with pytest.raises(ProtocolError, match="in flight"):
        d.hand_over()
    for b in blocks:  # the in-flight blocks' verdicts
        for verdict in v.submit(b):
            got = d.on_verdict(verdict)
            assert not isinstance(got, SampleRequest)
    lead = d.hand_over()
    assert lead.lead and not lead.tokens and lead.pos + len(lead.prefix) == len(d.committed)
    assert v.submit(lead) == [] and v.led  # a vanilla lead carries no draft distributions
    assert not v.hinted  # no hints follow a hand-over: the verifier decodes as in ar
    streamed: list[int] = []
    left = n - len(d.generated)
    run(v.ar_stream(left, set()), streamed.append)
    assert d.generated + streamed == want


@pytest.mark.parametrize("drafted", [0, 1, 5])
def test_a_session_handed_over_as_it_opens_ends_with_the_target_answer(
    target: LanguageModel, draft: LanguageModel, drafted: int
) -> None:
    """The open reply says the replica is saturated and speculating does not pay there:
    speculation stops before any block was sent, with the blocks drafted while the session
    opened (none, one being drafted, several sealed) still to verify. They are verified, then
    the lead block hands the session over. The answer is the target's alone."""
    from picospec.runtime.scheduler import run
    from picospec.speculation.engine import generate

    n = 24
    want = generate(target, None, PROMPT, GREEDY, SpecConfig(mode=Mode.AR), n).tokens
    d, v = _pair(target, draft, SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=3), n)
    for _ in range(drafted):  # what the draft model did while the open was on its way
        run(d.draft(), lambda _b: None)
    _, held = d.accept_first(v.first_token())
    d.stop_speculating()
    for b in held:
        for verdict in v.submit(b):
            d.on_verdict(verdict)
    assert not d.inflight
    lead = d.hand_over()
    assert v.submit(lead) == [] and v.led
    streamed: list[int] = []
    run(v.ar_stream(n - len(d.generated), set()), streamed.append)
    assert d.generated + streamed == want
