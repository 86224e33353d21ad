"""Drafts without a model forward (picospec.speculation.proposers) through the session state
machines: point-mass drafts keep greedy output identical and sampled output exact, and the
emulated edge of the capacity benchmark drafts with the acceptance it is given."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from conftest import pooled_chisquare_pvalue, tiny_model
from picospec.runtime.model import LanguageModel
from picospec.speculation.engine import generate
from picospec.speculation.proposers import (
    ContinuationRecorder,
    EmulatedEdge,
    Proposer,
    SuffixCache,
    SuffixDraft,
    point_mass,
)
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from test_lossless import LENGTH, N_RUNS, VOCAB, _exact_sequence_distribution, _reference_greedy

GREEDY = SamplingParams(temperature=0.0)


class Fixed:
    """A point-mass proposer that proposes ``token`` wherever ``when(tokens)`` holds (else
    nothing: the draft model steps), at most ``run`` tokens at a time."""

    name = "suffix"
    step_s = 0.0

    def __init__(self, token: int, when: object = None, run: int = 2) -> None:
        self.token, self.when, self.run = token, when, run

    def propose(self, tokens: Sequence[int], n_prompt: int, limit: int) -> list[int]:
        if self.when is not None and not self.when(tokens):  # type: ignore[operator]
            return []
        return [self.token] * min(limit, self.run)


def test_emulated_edge_drafts_the_answer_with_the_acceptance_it_is_given() -> None:
    rng = np.random.default_rng(0)
    answers = [rng.integers(0, 100, 50).tolist() for _ in range(200)]
    right = tested = 0
    for answer in answers:
        edge = EmulatedEdge(answer, acceptance=0.8, step_s=0.01, vocab_size=100, seed=3)
        drafted = edge.propose([7, 7] + answer[:0], n_prompt=2, limit=50)
        again = edge.propose([7, 7], n_prompt=2, limit=50)
        assert drafted == again  # decided by (seed, answer, position): a re-draft is the same
        for i, (d, a) in enumerate(zip(drafted, answer, strict=True)):
            assert 0 <= d < 100
            right += d == a
            tested += 1
            # from the middle of the answer, the same position gets the same token
            if i == 10:
                assert edge.propose([7, 7, *answer[:10]], 2, 1) == [d]
    # 10,000 positions: within four standard deviations of 0.8
    assert abs(right / tested - 0.8) < 4 * (0.8 * 0.2 / tested) ** 0.5
    other = EmulatedEdge(answers[0], 0.8, 0.01, 100, seed=4).propose([7, 7], 2, 50)
    assert other != EmulatedEdge(answers[0], 0.8, 0.01, 100, seed=3).propose([7, 7], 2, 50)
    # past the recorded answer every draft is wrong; acceptance 0 never drafts a right token
    edge = EmulatedEdge([5, 6], acceptance=1.0, step_s=0.0, vocab_size=100)
    assert edge.propose([1], 1, 4)[:2] == [5, 6]
    assert EmulatedEdge(answers[1], 0.0, 0.0, 100).propose([1], 1, 50) != answers[1][:50]
    assert all(
        d != a for d, a in zip(EmulatedEdge(answers[1], 0.0, 0.0, 100).propose([1], 1, 50),
                               answers[1], strict=True)
    )  # fmt: skip
    for bad in ({"acceptance": 1.5}, {"step_s": -1.0}, {"vocab_size": 1}):
        with pytest.raises(ValueError):
            EmulatedEdge(**{"continuation": [1], "acceptance": 0.5, "step_s": 0.0,
                            "vocab_size": 100, **bad})  # fmt: skip
    # the fleet an edge stands for, whose adaptive estimates the drafter keeps apart: its
    # acceptance and pace, not its answer or seed
    fleet = EmulatedEdge(answers[0], 0.8, 0.01, 100, seed=3).site
    assert fleet == EmulatedEdge(answers[1], 0.8, 0.01, 100, seed=4).site
    assert fleet != EmulatedEdge(answers[0], 0.6, 0.01, 100).site
    assert fleet != EmulatedEdge(answers[0], 0.8, 0.02, 100).site


def test_recorder_keeps_the_longest_answer_of_the_most_recent_prompts() -> None:
    rec = ContinuationRecorder(max_prompts=2)
    rec.record([1, 2], [9, 9, 9])
    rec.record([1, 2], [8])  # shorter: the longer recording stays
    assert rec.get([1, 2]) == [9, 9, 9] and rec.get([2, 1]) is None
    rec.record([3], [1])
    rec.record([4], [1])  # the oldest prompt goes
    assert len(rec) == 2 and rec.get([1, 2]) is None and rec.get([4]) == [1]


def test_point_mass_is_all_on_its_token() -> None:
    q = point_mass(3, 8)
    assert float(q.sum()) == 1.0 and float(q[3]) == 1.0


@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_an_emulated_edge_decodes_the_target_greedy_answer_with_its_acceptance(
    target: LanguageModel, draft_len: int
) -> None:
    prompt = [1, 2, 3]
    want = _reference_greedy(target, prompt, 40)
    edge = EmulatedEdge(want, acceptance=0.7, step_s=0.0, vocab_size=target.vocab_size, seed=2)
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=draft_len, lookahead=3)
    # the draft model is never run: every token is the emulated edge's
    got = generate(target, target, prompt, GREEDY, spec, 40, proposer=edge)
    st = got.speculation
    assert got.tokens == want
    assert st.draft_forwards == 0 and st.free_drafts >= st.drafted > 0
    assert st.accepted_by_source == {"emulated": st.accepted} and st.rollbacks > 0


def test_a_point_mass_proposer_keeps_greedy_identical_beside_the_draft_model(
    target: LanguageModel, draft: LanguageModel
) -> None:
    """The hybrid: a proposer that proposes a (mostly wrong) token after even tokens, the draft
    model elsewhere; both sources draft, and the answer is the target's."""
    prompt = [0, 7, 7, 5, 1, 6, 2]
    want = _reference_greedy(target, prompt, 30)
    hybrid = Fixed(3, when=lambda t: t[-1] % 2 == 0)
    for spec in (SpecConfig(mode=Mode.PICOSPEC, draft_len=4), SpecConfig(mode=Mode.DSSD)):
        got = generate(target, draft, prompt, GREEDY, spec, 30, proposer=hybrid)
        st = got.speculation
        assert got.tokens == want
        assert st.free_drafts > 0 and st.draft_forwards > 0 and st.rollbacks > 0


@pytest.mark.parametrize(
    ("spec", "when"),
    [
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2, top_k=VOCAB), None),
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=2, top_k=VOCAB), "odd"),
        (SpecConfig(mode=Mode.VANILLA, draft_len=2), "odd"),
    ],
    ids=["picospec-point-mass", "picospec-hybrid", "vanilla-hybrid"],
)
def test_point_mass_drafts_keep_sampled_output_exact(spec: SpecConfig, when: str | None) -> None:
    """Separate rejection sampling with q a point mass: accept x with p(x), else draw from p
    without x. Whole continuations over many seeds follow the target's distribution."""
    target, draft = tiny_model(VOCAB, seed=11), tiny_model(VOCAB, seed=12)
    proposer = Fixed(2, when=(lambda t: t[-1] % 2 == 1) if when else None)
    counts, expected, accepted, rejected = _sampled_runs(
        target, draft, [1, 3], spec, lambda: proposer
    )
    assert accepted > N_RUNS // 25 and rejected > N_RUNS // 4, "both outcomes must be tested"
    assert counts[expected == 0].sum() == 0, "produced a continuation the target never would"
    assert pooled_chisquare_pvalue(counts, expected) > 1e-4


def _sampled_runs(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt: list[int],
    spec: SpecConfig,
    proposer: Callable[[], Proposer],
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``N_RUNS`` sampled continuations of ``LENGTH`` tokens (seeds 0, 1, ...; each run's
    proposer from ``proposer()``): how many of each outcome, how many the target's exact
    distribution expects, and over all runs the tokens taken from the proposer and the
    rollbacks."""
    params = SamplingParams()
    exact = _exact_sequence_distribution(target, prompt, params)
    outcomes = list(itertools.product(range(VOCAB), repeat=LENGTH))
    index = {o: i for i, o in enumerate(outcomes)}
    counts = np.zeros(len(outcomes))
    accepted = rejected = 0
    for seed in range(N_RUNS):
        seeded = params.model_copy(update={"seed": seed})
        run = generate(target, draft, prompt, seeded, spec, LENGTH, proposer=proposer())
        counts[index[tuple(run.tokens)]] += 1
        accepted += run.speculation.accepted_by_source.get("suffix", 0)
        rejected += run.speculation.rollbacks
    expected = np.array([exact.get(o, 0.0) for o in outcomes]) * N_RUNS
    return counts, expected, accepted, rejected


def test_proposed_tokens_outside_the_vocabulary_are_refused(target: LanguageModel) -> None:
    from picospec.speculation.drafter import DrafterSession, ProtocolError

    s = DrafterSession(target, os.urandom(16), [1, 2], GREEDY, SpecConfig(), 8, proposer=Fixed(99))
    with pytest.raises(ProtocolError, match="outside the vocabulary"):
        s.draft_step()


# --- the suffix draft ---------------------------------------------------------------------


def test_suffix_draft_proposes_what_followed_the_longest_latest_match() -> None:
    s = SuffixDraft(min_match=2)
    #          a  b  c  d  e  a  b  c  x  a  b  c
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2, 3]
    assert s.propose(tokens, 0, 4) == [9, 1, 2, 3] and s.last_match == 3  # the latest wins
    assert s.propose([1, 2, 3, 4, 1, 2, 3], 0, 2) == [4, 1] and s.last_match == 3
    assert s.propose([1, 2, 3, 4, 5, 6], 0, 4) == []  # nothing repeats
    assert SuffixDraft(min_match=4).propose([1, 2, 3, 4, 1, 2, 3], 0, 4) == []  # too short
    assert s.propose([7, 7, 7], 0, 3) == [7]  # a run predicts itself
    assert SuffixDraft(min_match=2, max_run=2).propose(tokens, 0, 9) == [9, 1]
    # the site's answers: matched too, but a match in the session's own text of the same
    # length wins
    past = np.array([8, 1, 2, 3, 6, 6, 6])
    assert SuffixDraft(min_match=2, history=[past]).propose([5, 1, 2, 3], 0, 3) == [6, 6, 6]
    assert SuffixDraft(min_match=2, history=[past]).propose([2, 3, 0, 2, 3], 0, 3) == [0, 2, 3]
    with pytest.raises(ValueError):
        SuffixDraft(min_match=0)


def test_suffix_cache_is_per_tenant_and_bounded() -> None:
    cache = SuffixCache(max_answers=2, max_tenants=2)
    cache.add("alice", [1, 2, 3])
    cache.add("bob", [4, 5, 6])
    assert [a.tolist() for a in cache.answers("alice")] == [[1, 2, 3]]
    assert [a.tolist() for a in cache.answers("bob")] == [[4, 5, 6]]
    assert cache.answers("carol") == []
    # alice's answers never reach bob's draft
    assert SuffixDraft(min_match=2, history=cache.answers("bob")).propose([9, 1, 2], 0, 1) == []
    assert SuffixDraft(min_match=2, history=cache.answers("alice")).propose([9, 1, 2], 0, 1) == [3]
    for i in range(3):
        cache.add("alice", [i])
    assert [a.tolist() for a in cache.answers("alice")] == [[1], [2]]  # the newest two
    cache.add("carol", [7])  # a third tenant: the least recently used (bob) goes
    assert cache.answers("bob") == [] and cache.answers("carol")
    SuffixCache(max_answers=0).add("x", [1])  # off: keeps nothing


def _repetitive_prompt(target: LanguageModel) -> list[int]:
    """A prompt whose greedy answer repeats what came before (tiny random models loop)."""
    return [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]


def test_cloud_led_suffix_draft_is_the_target_greedy_answer_and_takes_hints(
    target: LanguageModel,
) -> None:
    prompt = _repetitive_prompt(target)
    want = _reference_greedy(target, prompt, 40)
    spec = SpecConfig(mode=Mode.PICOSPEC, cloud_led=True)
    got = generate(target, None, prompt, GREEDY, spec, 40, proposer=SuffixDraft(min_match=2))
    st = got.speculation
    assert got.tokens == want
    assert st.rounds > 0 and st.accepted > 0 and st.accepted_by_source == {"suffix": st.accepted}
    # verified hints save forwards: fewer than one per token
    assert got.verifier_forwards < 40


def test_cloud_led_sampled_output_follows_the_target_distribution() -> None:
    """Sampled: hints taken only where the target's own draw is the hinted token, so whole
    continuations over many seeds follow the target's distribution (chi-square)."""
    target = tiny_model(VOCAB, seed=11)
    spec = SpecConfig(mode=Mode.PICOSPEC, cloud_led=True)
    counts, expected, accepted, rejected = _sampled_runs(
        target, None, [1, 3, 2, 1, 3], spec, lambda: SuffixDraft(min_match=1)
    )
    assert accepted > N_RUNS // 25 and rejected > N_RUNS // 25, "both outcomes must be tested"
    assert counts[expected == 0].sum() == 0, "produced a continuation the target never would"
    assert pooled_chisquare_pvalue(counts, expected) > 1e-4


def test_hybrid_model_and_suffix_draft_is_the_target_greedy_answer(
    target: LanguageModel, draft: LanguageModel
) -> None:
    prompt = _repetitive_prompt(target)
    want = _reference_greedy(target, prompt, 40)
    spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=4)
    got = generate(target, draft, prompt, GREEDY, spec, 40, proposer=SuffixDraft(min_match=2))
    st = got.speculation
    assert got.tokens == want
    assert st.free_drafts > 0 and st.draft_forwards > 0
    assert st.accepted_by_source.get("suffix", 0) > 0
