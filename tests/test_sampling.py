"""Sampling maths: processing, standard and separate rejection sampling, compression loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from picospec.protocol.codec import ValueCodec, sparse_from_probs
from picospec.speculation.sampling import (
    Rng,
    SamplingParams,
    correction_distribution,
    output_distribution,
    probs_from_logits,
    residual,
    sample_correction,
    standard_verify,
    total_variation,
    verify_separate,
)

N_SAMPLES = 20_000
P_MIN = 1e-4  # chi-square p-value below which a test fails (false-alarm rate 1e-4 per test)


def _dist(rng: np.random.Generator, vocab: int, zeros: int = 0) -> torch.Tensor:
    w = rng.gamma(0.6, size=vocab)
    if zeros:
        w[rng.choice(vocab, zeros, replace=False)] = 0.0
    return torch.tensor(w / w.sum(), dtype=torch.float32)


def _one_token(p: torch.Tensor, q: torch.Tensor, gen: torch.Generator, k: int) -> int:
    """Draft x ~ q, verify on the 'cloud' with q(x) only, correct on the 'edge'."""
    x = int(torch.multinomial(q, 1, generator=gen))
    params = SamplingParams(temperature=1.0)
    rng = Rng(int(torch.randint(0, 2**62, (), generator=gen)))
    out = verify_separate(p[None], [x], [float(q[x])], params, rng, 0, top_k=k)
    if out.accepted == 1:
        return x
    assert out.sparse is not None and out.token is None
    return sample_correction(out.sparse, q, gen)


def _counts(samples: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(samples), minlength=vocab)


def _chi2_pvalue(counts: np.ndarray, probs: torch.Tensor) -> float:
    expected = probs.double().numpy() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was produced"
    return float(chisquare(counts[keep], expected[keep]).pvalue)


# --- processing ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=40),
    # extremes included: 1e-173 once turned every score into inf and the softmax into NaN
    temperature=st.sampled_from([0.0, 1e-173, 1e-5, 0.3, 1.0, 1.7, 10.0]),
    top_k=st.integers(0, 10),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1, 1e-106]),  # 1e-106 is 0 in float32
    min_p=st.sampled_from([0.0, 0.05]),
)
def test_processing_gives_a_distribution_that_respects_the_cuts(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    x = torch.tensor(logits)
    p = probs_from_logits(x, params)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert abs(float(p.sum()) - 1.0) < 1e-5
    full = torch.softmax(x / max(temperature, 1e-3), -1)
    assert p[full == full.max()].sum() > 0, "the most likely token always survives"
    if params.greedy:
        assert int((p > 0).sum()) == 1
        return
    if top_k and len(set(logits)) == len(logits):  # without ties exactly top_k survive at most
        assert int((p > 0).sum()) <= top_k
    if top_p < 1.0:
        # the kept set is the smallest prefix (by probability) reaching top_p
        if not top_k and not min_p:
            kept = full[p > 0].sum()
            assert kept >= top_p - 1e-5
            assert kept - full[p > 0].min() < top_p + 1e-5


def test_same_processing_for_p_and_q() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    batch = probs_from_logits(logits, params)
    rows = torch.stack([probs_from_logits(r, params) for r in logits])
    assert torch.allclose(batch, rows)


def test_residual_is_the_positive_part_normalised() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.4, 0.1, 0.3])
    assert torch.allclose(residual(p, q).float(), torch.tensor([0.75, 0.0, 0.25, 0.0]))


# --- losslessness of the rejection sampling --------------------------------------------


@pytest.mark.parametrize("case", range(3))
def test_standard_rejection_sampling_reproduces_target(case: int) -> None:
    rng = np.random.default_rng(case)
    vocab = 7
    p, q = _dist(rng, vocab, zeros=case), _dist(rng, vocab)
    gen = torch.Generator().manual_seed(case)
    params = SamplingParams(temperature=1.0)
    out = []
    for i in range(N_SAMPLES):
        x = int(torch.multinomial(q, 1, generator=gen))
        o = standard_verify(p[None], q[None], [x], params, Rng(i), 0)
        out.append(x if o.accepted == 1 else o.token)
    assert _chi2_pvalue(_counts(out, vocab), p) > P_MIN


@pytest.mark.parametrize(
    ("case", "k"),
    [(0, 7), (1, 7), (2, 4)],  # K = vocabulary, and K = support of a truncated p (3 zeros)
)
def test_separate_rejection_sampling_is_lossless_when_k_holds_the_support(
    case: int, k: int
) -> None:
    rng = np.random.default_rng(100 + case)
    vocab = 7
    p = _dist(rng, vocab, zeros=3 if k < vocab else 0)
    q = _dist(rng, vocab)
    assert int((p > 0).sum()) <= k
    assert total_variation(output_distribution(p, q, k), p) < 1e-6
    gen = torch.Generator().manual_seed(case)
    out = [_one_token(p, q, gen, k) for _ in range(N_SAMPLES)]
    assert _chi2_pvalue(_counts(out, vocab), p) > P_MIN


def test_truncated_compression_matches_its_computed_distribution_and_the_bound() -> None:
    """With K below the support the output is *not* p: the Monte-Carlo sample must match the
    analytic output distribution (so the measured TVD table is right), the chi-square test
    against p must fail (so the lossless tests above have power), and TVD <= tail mass."""
    rng = np.random.default_rng(7)
    vocab, k = 12, 2
    p = _dist(rng, vocab)
    q = torch.roll(p, 3)  # disagreeing draft: many rejections land in p's tail
    out_dist = output_distribution(p, q, k)
    tvd = total_variation(out_dist, p)
    sparse = sparse_from_probs(p, k)
    in_tail = torch.ones(vocab, dtype=torch.bool)
    in_tail[torch.tensor(sparse.ids)] = False
    tail_residual = float((p - q).clamp_min(0)[in_tail].sum())
    assert 0.01 < tvd <= sparse.tail_mass + 1e-9
    assert tvd == pytest.approx(tail_residual, rel=1e-4), "TVD is exactly the dropped residual"
    gen = torch.Generator().manual_seed(3)
    counts = _counts([_one_token(p, q, gen, k) for _ in range(N_SAMPLES)], vocab)
    assert _chi2_pvalue(counts, out_dist.float()) > P_MIN
    expected = p.double().numpy() * N_SAMPLES
    assert chisquare(counts, expected).pvalue < 1e-6


def test_correction_with_all_residual_in_the_tail_still_returns_a_valid_token() -> None:
    p = torch.tensor([0.6, 0.2, 0.1, 0.1])
    q = torch.tensor([0.7, 0.3, 0.0, 0.0])
    c = correction_distribution(sparse_from_probs(p, 2), q)  # top-2 ids 0,1: p < q there
    assert torch.isclose(c.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(c[2] + c[3]) == pytest.approx(1.0), "falls back to the tail, where p > q"


def test_greedy_separate_sends_no_vocabulary() -> None:
    params = SamplingParams(temperature=0.0)
    p = probs_from_logits(torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 0.1]]), params)
    ok = verify_separate(p, [1, 0], [1.0, 1.0], params, Rng(0), 5, top_k=2)
    assert ok.accepted == 2 and not ok.rejected and ok.sparse is None
    bad = verify_separate(p, [1, 2], [1.0, 1.0], params, Rng(0), 5, top_k=2)
    assert (bad.accepted, bad.token, bad.sparse) == (1, 0, None)


@pytest.mark.parametrize("codec", [ValueCodec.F16, ValueCodec.U8])
def test_quantised_values_cost_little(codec: ValueCodec) -> None:
    rng = np.random.default_rng(5)
    p, q = _dist(rng, 64), _dist(rng, 64)
    exact = total_variation(output_distribution(p, q, 64, ValueCodec.F32), p)
    lossy = total_variation(output_distribution(p, q, 64, codec), p)
    assert exact < 1e-6
    assert 0 < lossy < (0.01 if codec is ValueCodec.F16 else 0.1)


def test_randomness_is_a_function_of_seed_stream_and_position() -> None:
    a, b = Rng(1), Rng(1)
    assert a.uniform(2, 10) == b.uniform(2, 10)
    draws = {Rng(1).uniform(s, p) for s in (1, 2) for p in range(50)} | {Rng(2).uniform(1, 0)}
    assert len(draws) == 101, "streams, positions and seeds are all independent"


def test_banned_ids_have_no_probability_before_their_position_only() -> None:
    """min_tokens: the ids are banned in the rows that decide positions before ban_before,
    in p and q alike; later rows are untouched."""
    logits = torch.randn(5, 10)
    logits[:, 3] = 20.0  # the banned id would win every row
    params = SamplingParams(temperature=0.7, ban_ids=(3, 7), ban_before=12)
    probs = probs_from_logits(logits, params, pos=10)  # rows decide positions 10..14
    assert torch.all(probs[:2, [3, 7]] == 0)
    assert torch.allclose(probs[:2].sum(-1), torch.ones(2))
    free = probs_from_logits(logits[2:], SamplingParams(temperature=0.7))
    assert torch.equal(probs[2:], free)
    greedy = params.model_copy(update={"temperature": 0.0})
    assert int(probs_from_logits(logits[0], greedy, pos=11).argmax()) != 3
    assert int(probs_from_logits(logits[0], greedy, pos=12).argmax()) == 3
    with pytest.raises(ValueError, match="pass pos"):
        probs_from_logits(logits, params)
