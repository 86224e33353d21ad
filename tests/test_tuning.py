"""Adaptive speculation: the speed model against a simulation of the pipeline, the choices it
makes, and the controller's stability and reaction. No wall-clock timing: every time here is
an input."""

from __future__ import annotations

import random

import pytest

from picospec.speculation import tuning
from picospec.speculation.tuning import (
    LOAD_FRESH_S,
    LOAD_HIGH,
    LOAD_LOW,
    OPEN_MARGIN,
    PREDICTION_HORIZON,
    CostLine,
    DraftLenController,
    Inputs,
    LoadMeter,
    Saturation,
    SiteEstimates,
    VerifyCost,
    ar_cost,
    best_capacity_choice,
    best_choice,
    capacity_cost,
    cloud_only_faster,
    predicted_rate,
    speculation_pays,
)

PAPER = dict(t_d=0.0317, rtt_s=0.06, verify_step_s=0.1456, verify_per_token_s=0.0052)


def simulate(inp: Inputs, gamma: int, k: int, tokens: int = 20000, seed: int = 0) -> float:
    """A direct event simulation of the pipelined drafter and the verifier, with random
    acceptance: the tokens/s the model should predict."""
    rnd = random.Random(seed)
    t = 0.5 * inp.t_d
    committed, clock = 0, 0.0
    verifier_free = 0.0
    while committed < tokens:
        # one epoch from time `clock`: draft blocks, verify them in order until a rejection
        drafted, arrivals, m = clock + 0.5 * inp.t_d, [], 0
        verifier_free = max(verifier_free, clock)
        while True:
            start = drafted if m < k else max(drafted, arrivals[m - k])
            drafted = start + gamma * inp.t_d + inp.block_s
            n = gamma + (1 if m == 0 else 0)
            verifier_free = max(drafted + inp.rtt_s / 2, verifier_free) + (
                inp.verify_step_s + inp.verify_per_token_s * (n - 1)
            )
            arrivals.append(verifier_free + inp.rtt_s / 2)
            accepted = 0
            while accepted < gamma and rnd.random() < inp.accept_at(m * gamma + accepted):
                accepted += 1
            if accepted < gamma:
                committed += accepted + 1
                clock = arrivals[-1]
                break
            committed += gamma
            m += 1
    del t
    return committed / clock


@pytest.mark.parametrize("alpha", [0.3, 0.7, 0.9])
@pytest.mark.parametrize("gamma,k", [(2, 2), (4, 3), (6, 2)])
def test_the_model_predicts_a_simulated_pipeline(alpha: float, gamma: int, k: int) -> None:
    inp = Inputs(alpha=alpha, tokens_left=100000, **PAPER)
    assert predicted_rate(inp, gamma, k) == pytest.approx(simulate(inp, gamma, k), rel=0.05)


# acceptance that grows along a run of accepted tokens (the shape of SmolLM2's int8 draft)
RISING = (0.36, 0.44, 0.47, 0.5, 0.6, 0.65, 0.7, 0.75)


@pytest.mark.parametrize("gamma,k", [(2, 3), (4, 3), (8, 2)])
def test_the_model_predicts_a_pipeline_whose_acceptance_depends_on_the_run(gamma, k) -> None:
    inp = Inputs(alpha=0.45, hazard=RISING, tokens_left=100000, **PAPER)
    assert predicted_rate(inp, gamma, k) == pytest.approx(simulate(inp, gamma, k), rel=0.05)
    flat = Inputs(alpha=0.45, hazard=(0.45,), tokens_left=100000, **PAPER)
    assert predicted_rate(flat, gamma, k) == pytest.approx(
        predicted_rate(Inputs(alpha=0.45, tokens_left=100000, **PAPER), gamma, k)
    )


def test_the_controller_learns_the_runs_shape() -> None:
    """Rounds of 6 tokens whose acceptance rises along the run since the last rejection: the
    per-position estimates find the rise (a geometric estimate is flat), at the pooled level."""
    rnd = random.Random(3)
    c = DraftLenController(prior=SiteEstimates(verify_step_s=0.1456, verify_per_token_s=0.0052))
    truth = Inputs(alpha=0.45, hazard=RISING, tokens_left=100000, **PAPER)
    run = 0
    for _ in range(400):
        accepted = 0
        while accepted < 6 and rnd.random() < truth.accept_at(run + accepted):
            accepted += 1
        c.observe_round(accepted, accepted < 6, 0.3, 6)
        run = 0 if accepted < 6 else run + accepted
    h = c.hazard
    assert len(h) == 8 and sum(h[3:]) / 5 > 1.25 * h[0], h
    assert min(h) <= c.alpha <= max(h)
    # the next session starts from the shape learnt here
    assert DraftLenController(prior=c.estimates()).hazard == pytest.approx(h, rel=0.3)
    fresh = DraftLenController()
    assert fresh.hazard == () and fresh.inputs() is None


def test_the_model_has_the_first_order_limits() -> None:
    # α = 1 and a fast verifier: the draft model's own speed
    fast = Inputs(t_d=0.02, rtt_s=0.05, verify_step_s=0.001, verify_per_token_s=0.0,
                  alpha=1.0, tokens_left=100000, block_s=0.0)  # fmt: skip
    assert predicted_rate(fast, 8, 4) == pytest.approx(1 / 0.02, rel=0.02)
    # α = 1 and a slow verifier: γ tokens per verifier forward
    slow = Inputs(alpha=1.0, tokens_left=100000, **PAPER)
    assert predicted_rate(slow, 4, 6) == pytest.approx(4 / (0.1456 + 3 * 0.0052), rel=0.02)
    # synchronous rounds: (1 - α^(γ+1)) / (1 - α) tokens per γ·t_d + RTT + a + b·γ
    sync = Inputs(alpha=0.5, pipelined=False, block_s=0.002, **PAPER)
    rate = (1 - 0.5**5) / 0.5 / (4 * 0.0317 + 0.002 + 0.06 + 0.1456 + 4 * 0.0052)
    assert predicted_rate(sync, 4) == pytest.approx(rate)


def test_longer_drafts_pay_with_acceptance_and_shorter_with_rejections() -> None:
    choices = {a: best_choice(Inputs(alpha=a, **PAPER))[0] for a in (0.2, 0.6, 0.9, 1.0)}
    assert choices[0.2] <= choices[0.6] <= choices[0.9] <= choices[1.0]
    assert choices[0.2] <= 3 and choices[1.0] >= 5
    # and the best choice is at least as fast as every fixed length in the model
    inp = Inputs(alpha=0.8, **PAPER)
    g, k, rate = best_choice(inp)
    assert all(rate >= 0.98 * predicted_rate(inp, x, y) for x in range(1, 13) for y in (1, 3, 6))


def _feed(c: DraftLenController, alpha: float, rtt: float, rounds: int, rnd: random.Random):
    """Rounds of the controller's current γ with acceptance ``alpha`` on a link of ``rtt``."""
    chosen = []
    for _ in range(rounds):
        g, _ = c.choose(tokens_left=200)
        c.observe_step(0.0317)
        accepted = 0
        while accepted < g and rnd.random() < alpha:
            accepted += 1
        c.observe_round(accepted, accepted < g, rtt + 0.1456 + 0.0052 * (g - 1), g)
        chosen.append(c.choose(tokens_left=200)[0])
    return chosen


def test_the_controller_is_steady_on_a_steady_link_and_follows_a_change() -> None:
    rnd = random.Random(7)
    c = DraftLenController(prior=SiteEstimates(verify_step_s=0.1456, verify_per_token_s=0.0052))
    c.observe_verify_cost(VerifyCost(0.1456, 0.0052))
    steady = _feed(c, 0.95, 0.06, 60, rnd)
    # after a short settling, no oscillation
    changes = sum(a != b for a, b in zip(steady[10:], steady[11:], strict=False))
    assert changes <= 1, steady
    high = steady[-1]
    # acceptance collapses: the length drops within a few rounds
    low = _feed(c, 0.2, 0.06, 12, rnd)
    assert low[-1] < high and min(low[:5]) < high, low
    # the link slows down a lot: the estimates follow within a few rounds too
    assert c.inputs().rtt_s == pytest.approx(0.06, abs=0.01)
    _feed(c, 0.2, 0.5, 8, rnd)
    assert c.inputs().rtt_s == pytest.approx(0.5, abs=0.05)


def test_the_first_session_starts_from_what_the_site_learnt() -> None:
    learnt = SiteEstimates(t_d=0.0317, rtt_s=0.06, verify_step_s=0.1456,
                           verify_per_token_s=0.0052, alpha=0.98)  # fmt: skip
    c = DraftLenController(prior=learnt)
    g, k = c.choose()
    assert g == best_choice(c.inputs(PREDICTION_HORIZON))[0] and g > 4
    assert c.estimates().alpha == pytest.approx(0.98)


def test_the_start_is_a_default_that_the_first_informed_choice_replaces() -> None:
    """The hysteresis keeps a steady choice steady; it must not keep the starting default.
    At acceptance 1 on a fast link every γ >= 4 is within a few percent in the model: the
    first informed choice is the longest near-equal one, not the start's γ = 4."""
    lan = dict(t_d=0.02, rtt_s=0.001, verify_step_s=0.04, verify_per_token_s=0.002)
    c = DraftLenController(prior=SiteEstimates(**lan, alpha=1.0))
    assert (c.gamma, c.lookahead) == (4, 3)
    inp = c.inputs()
    g, k, rate = best_choice(inp)
    assert rate < predicted_rate(inp, 4, 3) * (1 + c.hysteresis)  # the old rule kept γ = 4
    assert c.choose() == (g, k) and g > 8
    # the start is replaced once: later choices keep the hysteresis (a model that now
    # prefers γ = 4 by less than 5% does not move it back)
    c.gamma, c.lookahead = 4, 3
    assert c.choose() == (4, 3)


def test_the_controller_looks_a_bounded_horizon_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long answer does not make every choice slower: the model sees at most
    ``PREDICTION_HORIZON`` tokens ahead (at acceptance 1 nothing else bounds its walk), and
    the tokens left when fewer."""
    seen: list[int] = []

    def spy(inp: Inputs, *args: int) -> tuple[int, int, float]:
        seen.append(inp.tokens_left)
        return best_choice(inp, *args)

    monkeypatch.setattr(tuning, "best_choice", spy)
    lan = dict(t_d=0.02, rtt_s=0.001, verify_step_s=0.04, verify_per_token_s=0.002)
    c = DraftLenController(prior=SiteEstimates(**lan, alpha=1.0))
    c.choose(tokens_left=100_000)
    c.choose(tokens_left=40)
    assert seen == [PREDICTION_HORIZON, 40]
    # and the horizon costs little: at acceptance 1 the choice for a long answer, under the
    # full model, predicts within 1% of the choice made with the whole answer in view
    full = c.inputs(tokens_left=2048)
    g, k, best = best_choice(full)
    assert predicted_rate(full, c.gamma, c.lookahead) >= 0.99 * best


def test_cost_line_fits_the_verifiers_forwards() -> None:
    line = CostLine()
    assert line.line() is None
    for n in (1, 5, 40, 5, 1, 9, 5):
        line.observe(n, 0.1456 + 0.0052 * (n - 1))
    a, b, c, d = line.line()
    assert a == pytest.approx(0.1456, rel=1e-6) and b == pytest.approx(0.0052, rel=1e-6)
    assert c == 0.0  # one session per forward: nothing tells the per-session cost
    assert d == 0.0  # blocks and steps are the same forwards
    one = CostLine()
    one.observe(5, 0.2)  # one kind of forward only: no slope to fit
    assert one.line() == (pytest.approx(0.2), 0.0, 0.0, 0.0)
    # batched forwards: the per-session cost (attention, rows) apart from the per-token one
    both = CostLine()
    for n, m in ((1, 1), (4, 4), (16, 4), (64, 64), (64, 16), (8, 1), (32, 8)):
        both.observe(n, 0.024 + 0.0013 * (n - 1) + 0.0011 * (m - 1), sessions=m)
    assert both.line() == pytest.approx((0.024, 0.0013, 0.0011, 0.0), rel=1e-6)


def test_cost_line_tells_a_blocks_own_request_from_the_engines_decoding_steps() -> None:
    # vLLM: blocks are requests of their own (each with its setup), beside the engine's own
    # decoding steps; requests in flight share the engine's steps
    truth = (0.030, 0.004, 0.002, 0.040)

    def cost(n: int, m: int, request: bool) -> float:
        return truth[0] + truth[1] * (n - 1) + truth[2] * (m - 1) + truth[3] * request

    line = CostLine()
    for n, m, r in ((1, 1, False), (5, 1, True), (1, 4, False), (9, 4, True), (13, 2, True)):
        line.observe(n, cost(n, m, r), sessions=m, request=r)
    assert line.line() == pytest.approx(truth, rel=1e-6)
    # blocks alone: their request is not told apart from the one-token step
    blocks = CostLine()
    for n, m in ((5, 1), (9, 4), (13, 2), (2, 1)):
        blocks.observe(n, cost(n, m, True), sessions=m, request=True)
    a, b, c, d = blocks.line()
    assert (b, c, d) == pytest.approx(truth[1:3] + (0.0,), rel=1e-6)
    assert a == pytest.approx(truth[0] + truth[3], rel=1e-6)


def test_a_session_hands_over_where_its_blocks_cost_more_than_the_engines_own_steps() -> None:
    # the fleet's figures: a 30 ms one-token step, 6.5 ms draft steps, loopback. Where blocks
    # are forwards (the embedded runtime, d = 0), speculation at 0.6 serves the session faster
    # than cloud-only decoding (measured 1.21x); where each block is a request of 40 ms more
    # (vLLM), it does not at 0.6 (measured 0.71x) and does at 0.9 (measured 1.59x)
    def faster_alone(per_round_s: float, alpha: float) -> bool:
        step = {"verify_step_s": 0.030, "verify_per_token_s": 0.001}
        inp = Inputs(0.0065, 0.001, **step, alpha=alpha, verify_per_round_s=per_round_s)
        return not cloud_only_faster(inp, best_choice(inp)[2])

    assert faster_alone(0.0, 0.6) and faster_alone(0.0, 0.9)
    assert not faster_alone(0.040, 0.6) and faster_alone(0.040, 0.9)
    # a step at the cost line's floor (a fit gone wrong) is no evidence for cloud-only decoding
    floor = Inputs(0.0065, 0.001, verify_step_s=1e-6, verify_per_token_s=0.0, alpha=0.6)
    assert not cloud_only_faster(floor, 1.0)


# --- the cloud's load -------------------------------------------------------------------------


def test_load_meter_is_the_busy_fraction_of_the_last_window() -> None:
    m = LoadMeter(window_s=1.0)
    assert m.load(5.0) == (0.0, 0)
    m.observe(10.0, 0.3, 4)
    m.observe(10.5, 0.2, 2)
    # busy 0.5 s of the 0.8 s since the window's first forward (the idle before it is the
    # time before the load came)
    assert m.load(10.5) == pytest.approx((0.5 / 0.8, 3))
    # overlapping forwards (vLLM's concurrent requests) count once; a long one is clipped to
    # the window
    m.observe(10.6, 0.5, 1)
    assert m.load(10.6)[0] == pytest.approx((0.3 + 0.5) / 0.9)
    assert m.load(12.0) == (0.0, 0)  # everything left the window


def test_load_meter_reads_a_wave_on_an_idle_replica_from_its_first_forward() -> None:
    m = LoadMeter(window_s=1.0, lead_s=0.25)
    m.observe(20.3, 0.3, 4)  # a replica idle for long, then one long forward (a prefill)
    assert m.load(20.3)[0] == pytest.approx(0.3)  # one forward is not a load
    m = LoadMeter(window_s=1.0, lead_s=0.25)
    readings = []
    for i in range(1, 61):  # continuous work from 20.0 on, read after every forward
        m.observe(20.0 + 0.03 * i, 0.03, 4)
        readings.append(m.load(20.0 + 0.03 * i)[0])
    assert readings[1] == pytest.approx(0.06 / 0.25)  # two forwards: over at least lead_s
    assert all(r == pytest.approx(1.0) for r in readings[8:])  # from 0.25 s on: saturated
    assert readings == sorted(readings)  # rises with the load and never steps back down
    # a steady load whose gaps are short reads within one gap of the whole window's fraction
    m = LoadMeter(window_s=1.0, lead_s=0.25)
    for i in range(30):
        m.observe(40.092 + 0.1 * i, 0.092, 2)
    assert 0.92 - 1e-9 <= m.load(42.992)[0] <= 0.92 / 0.9
    with pytest.raises(ValueError, match="lead_s"):
        LoadMeter(window_s=1.0, lead_s=0.0)


def test_a_load_told_long_ago_decides_nothing() -> None:
    sat = Saturation()
    assert not sat.fresh(now=5.0)
    sat.observe(1.0, 4, 4, now=10.0)
    assert sat.saturated and sat.fresh(now=10.0 + LOAD_FRESH_S)
    assert not sat.fresh(now=10.0 + LOAD_FRESH_S + 0.01)


def simulate_capacity(inp: Inputs, gamma: int, batch: int, blocks: int = 200_000) -> float:
    """A direct simulation of a session's blocks on a saturated verifier: the verifier's
    seconds (its share of each forward) per committed token."""
    rnd = random.Random(1)
    fixed = inp.verify_step_s - inp.verify_per_token_s - inp.verify_per_session_s
    cost = committed = 0.0
    prefix = 0
    for _ in range(blocks):
        # its share of one forward of `batch` sessions: the fixed cost, its session, its tokens
        cost += fixed / batch + inp.verify_per_session_s
        cost += inp.verify_per_token_s * (gamma + prefix)
        run = 0
        while run < gamma and rnd.random() < inp.alpha:
            run += 1
        committed += run + (run < gamma)
        prefix = int(run < gamma)  # the correction goes out with the next block
    return cost / committed


@pytest.mark.parametrize("alpha", [0.5, 0.9])
@pytest.mark.parametrize("gamma,batch", [(1, 16), (4, 4), (8, 1)])
def test_capacity_cost_is_a_saturated_verifiers_seconds_per_token(alpha, gamma, batch) -> None:
    inp = Inputs(alpha=alpha, t_d=0.005, rtt_s=0.0, verify_step_s=0.024,
                 verify_per_token_s=0.0012, verify_per_session_s=0.001)  # fmt: skip
    assert capacity_cost(inp, gamma, batch) == pytest.approx(
        simulate_capacity(inp, gamma, batch), rel=0.02
    )


def test_a_saturated_verifier_gets_longer_blocks_the_more_they_agree() -> None:
    """Where a forward's fixed cost is shared by many sessions, what is left is the tokens
    fed: rejected ones waste it, so poor drafts get short blocks; good drafts amortise the
    fixed cost over long ones."""
    cpu = dict(t_d=0.005, rtt_s=0.001, verify_step_s=0.024, verify_per_token_s=0.0012)
    poor, good = Inputs(alpha=0.5, **cpu), Inputs(alpha=0.95, **cpu)
    assert best_capacity_choice(poor, batch=32)[0] == 1
    assert best_capacity_choice(good, batch=1)[0] > best_capacity_choice(good, batch=32)[0] > 1
    assert best_capacity_choice(good, batch=1)[0] > best_capacity_choice(poor, batch=1)[0]


def test_the_controller_drafts_for_the_replica_while_it_is_saturated() -> None:
    c = DraftLenController(
        prior=SiteEstimates(
            t_d=0.005, rtt_s=0.001, verify_step_s=0.024, verify_per_token_s=0.0012, alpha=0.6
        )  # fmt: skip
    )
    alone = c.choose()
    assert c.policy == "latency"
    c.observe_load(None, None)  # a verifier that does not say: nothing changes
    assert c.policy == "latency" and c.choose() == alone
    c.observe_load(LOAD_HIGH, 32)
    inp = c.inputs(PREDICTION_HORIZON)
    assert inp is not None
    assert c.policy == "capacity" and c.choose() == best_capacity_choice(inp, 32)
    assert c.choose()[0] < alone[0]  # a busy replica gets shorter blocks of a poor draft
    c.observe_load((LOAD_HIGH + LOAD_LOW) / 2, 32)  # between the thresholds: it stays
    assert c.policy == "capacity"
    c.observe_load(LOAD_LOW - 0.01, 2)
    assert c.policy == "latency" and c.choose() == alone


def test_a_new_session_does_not_speculate_where_no_draft_length_pays() -> None:
    """On a saturated CPU verifier (a forward's fixed cost small against each token's and each
    session's), a draft accepted 0.6 per token costs more per token than cloud-only decoding
    at any γ, one accepted 0.9 less: only the first stops speculating. A lone session always
    speculates (the fixed cost is all its own)."""
    cpu = dict(t_d=0.005, rtt_s=0.001, verify_step_s=0.024, verify_per_token_s=0.0013,
               verify_per_session_s=0.0011)  # fmt: skip
    poor, good = Inputs(alpha=0.6, **cpu), Inputs(alpha=0.9, **cpu)
    assert not speculation_pays(poor, batch=31, sessions=64)
    assert not speculation_pays(poor, batch=2, sessions=4)
    assert speculation_pays(good, batch=18, sessions=64)
    assert speculation_pays(good, batch=2, sessions=4)
    assert speculation_pays(poor, batch=1, sessions=1)
    # near the line (0.992x cloud-only's cost at 0.65), a new session asks for a margin
    near = Inputs(alpha=0.65, **cpu)
    assert speculation_pays(near, batch=2, sessions=4)
    assert not speculation_pays(near, batch=2, sessions=4, margin=OPEN_MARGIN)
    assert speculation_pays(good, batch=2, sessions=4, margin=OPEN_MARGIN)
    # the cost of cloud-only decoding is the same model with one token per step
    assert ar_cost(poor, 8) == pytest.approx(capacity_cost(Inputs(alpha=1.0, **cpu), 1, 8))


def test_saturation_has_hysteresis_and_ignores_silent_verifiers() -> None:
    sat = Saturation()
    sat.observe(None, None)
    assert not sat.saturated and sat.load is None
    sat.observe(LOAD_HIGH, 4, 9)
    assert sat.saturated and sat.load == (LOAD_HIGH, 4, 9)
    sat.observe(LOAD_LOW, 4)  # at the low threshold: still saturated; sessions default to batch
    assert sat.saturated and sat.load == (LOAD_LOW, 4, 4)
    sat.observe(LOAD_LOW - 0.01, 4)
    assert not sat.saturated
    # one session keeps a replica busy with its own work: that is nobody else's share
    sat.observe(1.0, 1, 1, now=10.0)
    assert not sat.saturated
    sat.observe(1.0, 1, 2, now=10.1)
    assert sat.saturated
    # a wave of answers that ended together: the next wave's first session opens alone for
    # a moment, the others join it on the same busy replica, which stays saturated
    sat.observe(1.0, 1, 1, now=11.0)
    sat.observe(1.0, 1, 1, now=11.0 + sat.alone_s / 2)
    assert sat.saturated
    sat.observe(1.0, 4, 4, now=11.0 + sat.alone_s * 0.9)
    assert sat.saturated
    # down to one session for a while: that user alone again, not saturated
    sat.observe(1.0, 1, 1, now=20.0)
    assert sat.saturated
    sat.observe(1.0, 1, 1, now=20.0 + sat.alone_s)
    assert not sat.saturated


def test_the_session_prefers_cloud_only_by_its_steady_rate_not_its_last_tokens() -> None:
    """Near the end of an answer the pipeline's predicted rate falls (its next epoch cannot
    fill) while cloud-only decoding keeps streaming: the comparison is made in the steady
    state, so a session whose speculation pays does not hand over for its last tokens."""

    def controller(per_round_s: float, alpha: float, rtt_s: float = 0.001) -> DraftLenController:
        step = {"verify_step_s": 0.030, "verify_per_token_s": 0.001}
        prior = SiteEstimates(0.0065, rtt_s, **step, alpha=alpha, verify_per_round_s=per_round_s)
        return DraftLenController(prior=prior, prior_tokens=1e6)  # the prior's acceptance holds

    # over a 60 ms link at 0.8, the pipeline about matches cloud-only decoding in its steady
    # state (0.99x), but for the last 3 tokens of an answer it predicts 0.79x
    pays = controller(0.0, 0.8, rtt_s=0.060)
    pays.choose(tokens_left=3)
    inp = pays.inputs(3)
    assert inp is not None and pays.best_rate is not None
    assert cloud_only_faster(inp, pays.best_rate)  # for its last 3 tokens
    assert not pays.prefers_cloud_only()  # but not in the steady state
    costly = controller(0.040, 0.6)  # a block as a request of its own (vLLM), at 0.6
    costly.choose(tokens_left=64)
    assert costly.prefers_cloud_only()
    good = controller(0.040, 0.9)
    good.choose(tokens_left=64)
    assert not good.prefers_cloud_only()
    saturated = controller(0.040, 0.6)
    saturated.observe_load(1.0, 4, 4)
    saturated.choose(tokens_left=64)  # drafting for the replica: its own rules apply
    assert saturated.best_rate is None and not saturated.prefers_cloud_only()


def test_a_few_poor_rounds_alone_do_not_hand_a_session_over() -> None:
    """The hand-over for the session's own speed asks the site's acceptance too: a session
    whose first 4 rounds were rejected at once (its own estimate falls to about 0.3) keeps
    speculating where its site's drafts are accepted 0.6 of the time, and hands over where
    they are not."""

    def after_poor_rounds(site_alpha: float) -> DraftLenController:
        step = {"verify_step_s": 0.027, "verify_per_token_s": 0.0013}
        c = DraftLenController(prior=SiteEstimates(0.0059, 0.001, **step, alpha=site_alpha))
        for _ in range(4):
            c.observe_round(0, True, 0.03, 4)
        c.choose(tokens_left=64)
        return c

    noisy = after_poor_rounds(0.6)
    inp = noisy.inputs()
    assert inp is not None and noisy.best_rate is not None
    assert noisy.alpha < 0.35 and cloud_only_faster(inp, noisy.best_rate)  # its own view
    assert not noisy.prefers_cloud_only()  # with its site's, it speculates on
    assert after_poor_rounds(0.3).prefers_cloud_only()
