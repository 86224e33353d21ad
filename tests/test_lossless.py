"""End to end through the session state machines: speculative output == target output.

Greedy: token-identical to the target decoding alone, recomputed from scratch without any KV
cache (so the reference shares no code path with what it checks). Sampled: the empirical
distribution of whole continuations over many seeds matches the exact target distribution,
enumerated from the target's conditionals (chi-square).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import pooled_chisquare_pvalue, tiny_model
from picospec.runtime.model import LanguageModel, VocabularyMismatch
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams, probs_from_logits
from picospec.speculation.spec import Mode, SpecConfig

PROMPTS = [[1, 2, 3], [4], [0, 7, 7, 5, 1, 6, 2]]
SPECS = [
    SpecConfig(mode=Mode.VANILLA, draft_len=3),
    SpecConfig(mode=Mode.DSSD, draft_len=3),
    SpecConfig(mode=Mode.PICOSPEC, draft_len=3, lookahead=3),
    SpecConfig(mode=Mode.PICOSPEC, draft_len=1, lookahead=4),
    SpecConfig(mode=Mode.PICOSPEC, draft_len=5, lookahead=2),
]


@torch.inference_mode()
def _full_logits(model: LanguageModel, ids: list[int]) -> torch.Tensor:
    """Next-token logits from a fresh forward over the whole sequence (no cache)."""
    return model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _reference_greedy(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_full_logits(model, ids).argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode.value}-g{s.draft_len}")
def test_greedy_is_token_identical_to_the_target_alone(
    target: LanguageModel, draft: LanguageModel, spec: SpecConfig
) -> None:
    params = SamplingParams(temperature=0.0)
    rollbacks = 0
    for prompt in PROMPTS:
        want = _reference_greedy(target, prompt, 24)
        got = generate(target, draft, prompt, params, spec, 24)
        assert got.tokens == want
        assert got.finish_reason == "length"
        rollbacks += got.speculation.rollbacks
        assert got.speculation.accepted <= got.speculation.drafted and got.speculation.rounds > 0
    assert rollbacks > 0, "the draft must disagree sometimes, or nothing was tested"


@pytest.mark.parametrize("mode", [Mode.AR, Mode.DSSD, Mode.PICOSPEC])
def test_greedy_with_banned_ids_is_the_target_alone_under_the_same_ban(
    target: LanguageModel, draft: LanguageModel, mode: Mode
) -> None:
    """min_tokens bans ids before a position: the target's greedy choice among the rest, in
    every mode, token for token."""
    prompt = PROMPTS[2]
    free = _reference_greedy(target, prompt, 24)
    banned = tuple(sorted(set(free[:12])))[:3]  # ids the target would choose early on
    params = SamplingParams(temperature=0.0, ban_ids=banned, ban_before=len(prompt) + 12)
    ids = list(prompt)
    for _ in range(24):
        logits = _full_logits(target, ids).clone()
        if len(ids) < params.ban_before:
            logits[list(banned)] = float("-inf")
        ids.append(int(logits.argmax()))
    want = ids[len(prompt) :]
    got = generate(target, draft, prompt, params, SpecConfig(mode=mode, draft_len=3), 24)
    assert got.tokens == want != free
    assert not set(want[:12]) & set(banned)


def test_ar_mode_is_the_target_alone(target: LanguageModel) -> None:
    params = SamplingParams(temperature=0.0)
    got = generate(target, None, PROMPTS[0], params, SpecConfig(mode=Mode.AR), 16)
    assert got.tokens == _reference_greedy(target, PROMPTS[0], 16)
    assert got.verifier_forwards == 16


def test_greedy_with_the_target_as_its_own_draft_accepts_everything(target: LanguageModel) -> None:
    got = generate(
        target, target, PROMPTS[2], SamplingParams(temperature=0.0), SpecConfig(draft_len=4), 20
    )
    # the first token comes from the verifier's prefill; every one after it is drafted
    assert (
        got.speculation.rollbacks == 0 and got.speculation.accepted == got.speculation.drafted == 19
    )
    assert got.tokens == _reference_greedy(target, PROMPTS[2], 20)


# --- sampled: exact distributional equality --------------------------------------------

VOCAB, LENGTH = 5, 3
N_RUNS = 2500


def _exact_sequence_distribution(
    model: LanguageModel, prompt: list[int], params: SamplingParams
) -> dict[tuple[int, ...], float]:
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(LENGTH):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, pr in probs.items():
            if pr == 0.0:
                continue
            pos = len(prompt) + len(seq)
            p = probs_from_logits(_full_logits(model, prompt + list(seq)), params, pos).double()
            for t in range(VOCAB):
                nxt[seq + (t,)] = pr * float(p[t])
        probs = nxt
    return probs


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        (SpecConfig(mode=Mode.PICOSPEC, draft_len=1, lookahead=3, top_k=VOCAB), SamplingParams()),
        (
            SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2, top_k=3),
            SamplingParams(temperature=0.8, top_k=3),
        ),  # top-k already cuts p to K: lossless
        (SpecConfig(mode=Mode.DSSD, draft_len=2, top_k=VOCAB), SamplingParams(temperature=1.3)),
        (SpecConfig(mode=Mode.VANILLA, draft_len=2), SamplingParams(temperature=0.9, top_p=0.9)),
        (
            SpecConfig(mode=Mode.PICOSPEC, draft_len=2, lookahead=2, top_k=VOCAB),
            SamplingParams(ban_ids=(0, 2), ban_before=4),
        ),  # min_tokens: ids 0 and 2 banned in the first two positions, in p and q alike
    ],
    ids=["picospec-g1", "picospec-topk", "dssd", "vanilla-topp", "picospec-min-tokens"],
)
def test_sampled_continuations_follow_the_target_distribution(
    spec: SpecConfig, params: SamplingParams
) -> None:
    target, draft = tiny_model(VOCAB, seed=11), tiny_model(VOCAB, seed=12)
    prompt = [1, 3]
    exact = _exact_sequence_distribution(target, prompt, params)
    outcomes = list(itertools.product(range(VOCAB), repeat=LENGTH))
    index = {o: i for i, o in enumerate(outcomes)}
    counts = np.zeros(len(outcomes))
    rollbacks = 0
    for seed in range(N_RUNS):
        run = generate(
            target, draft, prompt, params.model_copy(update={"seed": seed}), spec, LENGTH
        )
        counts[index[tuple(run.tokens)]] += 1
        rollbacks += run.speculation.rollbacks
    assert rollbacks > N_RUNS // 4, "draft and target must disagree often for the test to bite"
    expected = np.array([exact.get(o, 0.0) for o in outcomes]) * N_RUNS
    assert counts[expected == 0].sum() == 0, "produced a continuation the target never would"
    assert pooled_chisquare_pvalue(counts, expected) > 1e-4


def test_a_wrong_draft_distribution_is_detected() -> None:
    """Power check: sampling from the *draft* alone must fail the same test."""
    target, draft = tiny_model(VOCAB, seed=11), tiny_model(VOCAB, seed=12)
    prompt, params = [1, 3], SamplingParams()
    exact = _exact_sequence_distribution(target, prompt, params)
    wrong = _exact_sequence_distribution(draft, prompt, params)
    outcomes = list(exact)
    rng = np.random.default_rng(0)
    w = np.array([wrong[o] for o in outcomes])
    draws = rng.choice(len(outcomes), N_RUNS, p=w / w.sum())
    counts = np.bincount(draws, minlength=len(outcomes))
    expected = np.array([exact[o] for o in outcomes]) * N_RUNS
    assert chisquare(counts, expected * counts.sum() / expected.sum()).pvalue < 1e-6


def test_vocabulary_mismatch_is_refused(target: LanguageModel) -> None:
    with pytest.raises(VocabularyMismatch, match="shared"):
        generate(target, tiny_model(vocab=9), [1], SamplingParams(), SpecConfig(), 4)
