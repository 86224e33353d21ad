"""Adaptive speculation: choose the draft length (and the look-ahead) from what a session sees.

The drafter runs a :class:`DraftLenController` per session; the verifier keeps a
:class:`CostLine` of its forwards and tells drafters about it when a session opens.

The best draft length depends on the acceptance, the draft model's step time, the verifier's
forward time and the round trip, and all of them change with the prompt, the site and the
link. :class:`DraftLenController` keeps running estimates of each and picks the ``(γ, k)``
(tokens per block, blocks in flight) that the speed model below predicts is fastest.

The model (:func:`predicted_rate`) refines the first-order rate ``1 / (t_d + (1-α)(W+R))``
with the two limits that formula leaves out: the verifier's own speed (a forward of ``n``
tokens costs ``a + b·(n-1)``, and blocks queue behind each other there) and the bounded
look-ahead (at most ``k`` blocks in flight). It follows one *epoch* (from one rejection to the
next) block by block on a timeline:

- the drafter finishes its current step (half a step on average), then drafts block ``m`` in
  ``γ·t_d`` once fewer than ``k`` blocks are in flight;
- the block crosses half the round trip, waits for the verifier to be free, is verified in
  ``a + b·(n-1)`` (``n = γ``, plus the correction token for the epoch's first block), and its
  verdict crosses back;
- a rejection falls at the epoch's token ``j = mγ+i`` (block ``m``, position ``i``) with
  probability ``h_0·h_1·…·h_(j-1)·(1-h_j)`` and ends the epoch when that verdict arrives, having
  committed ``j + 1`` tokens. ``h_j`` is the acceptance of the epoch's token ``j`` given that every
  token before it in the epoch was accepted (its *hazard* shape); with a constant ``h_j = α`` the
  rejection is geometric, ``α^j(1-α)``.

The rate is E[tokens] / E[time] over the epoch, truncated at the request's remaining tokens
(so a short answer does not pay for a pipeline it cannot fill). The synchronous modes
(``vanilla``, ``dssd``) use the classic round: ``γ·t_d + RTT + a + b·γ`` for
``(1-α^(γ+1)) / (1-α)`` tokens.

Acceptance is estimated per token as ``accepted / (accepted + rejections)`` (the maximum
likelihood estimate of the per-token acceptance: tokens after a rejection were never tested),
with older rounds decaying (a half-life of about three rounds), starting from a prior (the
drafter's recent sessions). Acceptance is not memoryless: a draft that got the last few tokens
right is in text it predicts well and likely gets the next right too (SmolLM2's int8 copy, on
held-out prompts: 0.36 right after a rejection, 0.44 and 0.47 after one and two accepted tokens,
about 0.6 after four). A geometric model then undervalues long drafts. So the controller also
estimates the acceptance *per position since the last rejection* (``HAZARD_POSITIONS`` of them,
the last pooling everything beyond), each shrunk towards the pooled estimate by
``hazard_prior`` tested tokens and kept across sessions (a half-life of about 23 rounds:
most rounds test only the first positions), scaled to the pooled level, which follows the
prompt within a few rounds.
**The cloud's load.** Alone, a session wants the ``(γ, k)`` above. On a saturated verifier its
speculation costs other users time: every draft token the verifier feeds takes its compute,
accepted or not. Every verdict tells the drafter the verifier's busy fraction over the last
second, its sessions per forward ``B`` and its sessions (:class:`LoadMeter`). Once the
replica is busy ``LOAD_HIGH`` of the time the controller drafts for the replica instead
(:func:`capacity_cost`): with a forward of ``n`` tokens of ``m`` sessions costing
``a + b·(n-1) + c·(m-1)`` (:class:`CostLine`), a session's share is ``(a - b - c)/B + c + b·n``
for the ``n`` tokens it feeds, and a block of ``γ`` feeds ``γ`` draft tokens plus, after a
rejection, the correction, and commits the accepted run plus the correction; the ``γ`` that
costs the verifier least per committed token is the one that lets the replica deliver most.
It drafts for its own speed again once the load falls below ``LOAD_LOW`` (hysteresis: the
choice itself moves the load). On a saturated replica shorter blocks waste less of it; where
the fixed cost of a forward dominates, longer blocks amortise it. Where no ``γ`` costs less
than cloud-only decoding (each of the replica's sessions feeding one token per step,
:func:`ar_cost`), a new session does not speculate at all (:func:`speculation_pays`).
**The engine's own decoding.** Where the engine runs each block as a request of its own beside
its decoding steps (vLLM), a block costs ``d`` more than the forward of its tokens
(:class:`CostLine`'s fourth term; 0 on the embedded runtime, whose blocks and steps are the same
forwards). Cloud-only decoding streams a token per one-token step ``a``; where that is
predicted ``CLOUD_ONLY_MARGIN`` faster than the session's best draft length, it stops
speculating too (:func:`cloud_only_faster`).

A session takes the model's choice as soon as it has every input (the starting ``(γ, k)`` is
a default, not a choice, so it gets no advantage); after that the choice changes only when the
predicted gain is at least ``hysteresis`` (5%), so a steady link gives a steady length; a
change in the link or in acceptance moves the estimates within a few rounds, and the length
follows.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

MAX_GAMMA = 12
# the drafter's own time per block beyond its draft steps: sealing, encoding and publishing it
# and applying its verdict, on the edge's CPU. An estimate; `picospec bench --overhead` measures
# a whole round's software cost (docs/benchmark.md)
BLOCK_OVERHEAD_S = 0.003
MAX_LOOKAHEAD = 6
# how far ahead the controller's model looks, in tokens. The model follows the pipeline block
# by block to the end of the answer, for 72 (γ, k) pairs; at acceptance near 1 nothing ends
# the walk early, so its cost grows with the tokens left: 43 ms per choice at 1,024 and 103 ms
# at 4,096 (on the drafter's event loop, once per verdict), against 4 ms at 128. Beyond 128
# tokens the pipeline is in its steady state: on a grid of 540 links, drafts and acceptances,
# the choice made with 128 tokens ahead predicted at most 0.5% less than the one made with the
# whole 512 or 2,048.
PREDICTION_HORIZON = 128
DEFAULT_GAMMA = 4
HAZARD_POSITIONS = 8  # per-position acceptance estimates: 0..6 since a rejection, and 7+
LOAD_HIGH = 0.9  # a verifier busy this much of the time is saturated: draft for its capacity
LOAD_LOW = 0.7  # below this again: draft for the session's own speed
LOAD_FRESH_S = 2.0  # a load told longer ago than this does not decide a new session's path
# a session hands itself over to cloud-only decoding for its own speed only where that is
# predicted this much faster than its best draft length: its estimates after a few rounds are
# noisy (at 0.6 on the embedded runtime, where speculation is ~1.1x, a 5% margin handed over
# most sessions of one user), and the switch is for the rest of its answer
CLOUD_ONLY_MARGIN = 0.25
# on a saturated replica a new session speculates only where that is this much cheaper for
# the replica than cloud-only decoding (a choice near the line would split the sessions)
OPEN_MARGIN = 0.05
MIN_STEP_S = 1e-5  # a one-token step below this is no measurement (CostLine's floor is 1e-6)


class VerifyCost(NamedTuple):
    """The verifier's forward cost line (:class:`CostLine`), as the open reply tells it:
    the one-token step ``a``, each further token ``b``, each further session ``c``, and each
    block's own request ``d`` (None: not known yet)."""

    step: float | None
    per_token: float | None = 0.0
    per_session: float | None = 0.0
    per_round: float | None = 0.0


@dataclass(frozen=True)
class Inputs:
    """What the speed model needs; all times in seconds."""

    t_d: float  # one draft step (edge)
    rtt_s: float  # the network round trip, without the verifier's compute
    verify_step_s: float  # a verifier forward of one token
    verify_per_token_s: float  # each further token of a forward
    alpha: float  # per-token acceptance
    pipelined: bool = True
    tokens_left: int = 256
    block_s: float = BLOCK_OVERHEAD_S  # the edge's own work per block (seal, encode, publish)
    # acceptance of the epoch's token j given all before it accepted (the last entry holds for
    # every later j); empty: ``alpha`` at every position (geometric)
    hazard: tuple[float, ...] = ()
    verify_per_session_s: float = 0.0  # each further session of a batched forward
    # what a block costs beyond the forward of its tokens where the engine runs each block as a
    # request of its own (vLLM: the request's setup and its prompt rows); 0 where blocks and
    # cloud-only steps are the same forwards (the embedded runtime)
    verify_per_round_s: float = 0.0

    def accept_at(self, j: int) -> float:
        h = self.hazard[min(j, len(self.hazard) - 1)] if self.hazard else self.alpha
        return min(max(h, 0.0), 1.0)


def _verify_s(inp: Inputs, n: int) -> float:
    return inp.verify_step_s + inp.verify_per_round_s + inp.verify_per_token_s * max(0, n - 1)


def predicted_rate(inp: Inputs, gamma: int, lookahead: int = 1) -> float:
    """Expected committed tokens per second for draft length ``gamma`` and ``lookahead``
    blocks in flight (the module docstring's model)."""
    if not inp.pipelined:
        # a round commits its accepted run plus one token (correction or bonus)
        tokens, alive = 1.0, 1.0
        for i in range(gamma):
            alive *= inp.accept_at(i)
            tokens += alive
        return tokens / (gamma * inp.t_d + inp.block_s + inp.rtt_s + _verify_s(inp, gamma + 1))
    half = inp.rtt_s / 2
    arrivals: list[float] = []
    verifier_free = 0.0
    drafted = 0.5 * inp.t_d  # the drafter finishes the step it is in when the epoch starts
    alive = 1.0  # probability that no rejection happened before this block
    e_tokens = e_time = 0.0
    blocks = max(1, -(-max(1, inp.tokens_left) // gamma))
    for m in range(blocks):
        start = drafted if m < lookahead else max(drafted, arrivals[m - lookahead])
        drafted = start + gamma * inp.t_d + inp.block_s
        n = gamma + (1 if m == 0 else 0)
        verifier_free = max(drafted + half, verifier_free) + _verify_s(inp, n)
        arrivals.append(verifier_free + half)
        # within the block: P(reject at i | alive) and E[committed tokens; reject in block]
        through = 1.0  # P(tokens 0..i-1 of this block accepted | alive)
        s1 = 0.0
        for i in range(gamma):
            h = inp.accept_at(m * gamma + i)
            s1 += through * (1 - h) * (m * gamma + i + 1)
            through *= h
        e_tokens += alive * s1
        e_time += alive * (1 - through) * arrivals[-1]
        alive *= through
        if alive < 1e-6:
            break
    if alive >= 1e-6:  # the request ends before a rejection: everything drafted commits
        e_tokens += alive * len(arrivals) * gamma
        e_time += alive * arrivals[-1]
    return e_tokens / e_time if e_time > 0 else 0.0


def best_choice(
    inp: Inputs, max_gamma: int = MAX_GAMMA, max_lookahead: int = MAX_LOOKAHEAD
) -> tuple[int, int, float]:
    """The fastest ``(γ, k, rate)``; of near-equals (within 2%) the longest γ (the model leaves
    out costs that grow with the number of blocks: every message's hops and handling) with
    the fewest blocks in flight."""
    ks = range(1, max_lookahead + 1) if inp.pipelined else (1,)
    scored = [(predicted_rate(inp, g, k), g, k) for g in range(1, max_gamma + 1) for k in ks]
    top = max(r for r, _, _ in scored)
    rate, g, k = min(
        ((r, g, k) for r, g, k in scored if r >= 0.98 * top), key=lambda x: (-x[1], x[2])
    )
    return g, k, rate


def _shared(inp: Inputs, batch: int, block: bool = True) -> float:
    """A session's share of what a forward costs whatever it feeds: the one-token step less
    its token and its session, divided among ``batch`` sessions, plus its own session (and,
    for a block, its own request where the engine runs blocks as requests)."""
    fixed = max(0.0, inp.verify_step_s - inp.verify_per_token_s - inp.verify_per_session_s)
    own = inp.verify_per_round_s if block else 0.0
    return fixed / max(1, batch) + inp.verify_per_session_s + own


def capacity_cost(inp: Inputs, gamma: int, batch: int) -> float:
    """The verifier's seconds per committed token when every session drafts blocks of
    ``gamma`` and ``batch`` sessions share each forward (the module docstring's model; as if
    every block began after a rejection, where the acceptance depends on the run)."""
    through, committed = 1.0, 0.0
    for i in range(gamma):
        through *= inp.accept_at(i)
        committed += through  # E[accepted run]
    committed += 1 - through  # the correction, after a rejection
    fed = gamma + (1 - through)  # the block, and the correction before the next one
    return (_shared(inp, batch) + inp.verify_per_token_s * fed) / committed


def best_capacity_choice(
    inp: Inputs, batch: int, max_gamma: int = MAX_GAMMA, max_lookahead: int = MAX_LOOKAHEAD
) -> tuple[int, int]:
    """The ``(γ, k)`` that lets a saturated verifier deliver most: the ``γ`` of least
    :func:`capacity_cost` (of near-equals within 2%, the shortest: it wastes least when the
    acceptance drops), with the look-ahead that is fastest for the session at that ``γ``."""
    costs = {g: capacity_cost(inp, g, batch) for g in range(1, max_gamma + 1)}
    low = min(costs.values())
    gamma = min(g for g, c in costs.items() if c <= 1.02 * low)
    ks = range(1, max_lookahead + 1) if inp.pipelined else (1,)
    k = max(ks, key=lambda k: (predicted_rate(inp, gamma, k), -k))
    return gamma, k


def ar_cost(inp: Inputs, batch: int) -> float:
    """The verifier's seconds per token of cloud-only decoding (one token fed per token) with
    ``batch`` sessions sharing each forward: what :func:`capacity_cost` is weighed against."""
    return _shared(inp, batch, block=False) + inp.verify_per_token_s


def cloud_only_faster(inp: Inputs, rate: float, margin: float = CLOUD_ONLY_MARGIN) -> bool:
    """Whether cloud-only decoding, which streams a token per one-token step (``1 / a``),
    would serve the session faster by ``margin`` than speculating at the predicted ``rate``
    (its best). Where a block costs a request of its own (vLLM), a poor acceptance makes
    speculation slower than the engine's own decoding."""
    if inp.verify_step_s < MIN_STEP_S:
        return False  # not a measurement (a fit pressed against its floor)
    return rate * (1 + margin) < 1.0 / inp.verify_step_s


def speculation_pays(
    inp: Inputs, batch: int, sessions: int, max_gamma: int = MAX_GAMMA, margin: float = 0.0
) -> bool:
    """Whether some draft length costs a saturated verifier less per token than cloud-only
    decoding would, by ``margin``: speculating sessions share forwards ``batch`` at a time
    (what the verifier reports), cloud-only ones all ``sessions`` of the replica at every step.
    Where none pays, a new session does not speculate (it runs cloud-led, as ``ar``; a new
    one asks for a margin of ``OPEN_MARGIN``, so that a choice near the line does not split
    the sessions between two ways of serving that each cost about the same) and a running one
    hands itself over."""
    best = min(capacity_cost(inp, g, batch) for g in range(1, max_gamma + 1))
    return best * (1 + margin) < ar_cost(inp, max(batch, sessions))


@dataclass
class Saturation:
    """Whether the verifier is saturated, from the load its verdicts report, with hysteresis:
    saturated from ``LOAD_HIGH`` busy, and again not below ``LOAD_LOW``. A replica that holds
    one session does not become saturated: it is busy with that session's own work, which
    takes nobody's share (one user decoding cloud-only keeps a CPU replica busy all the time).
    A saturated one stays so while it is down to one session for less than ``alone_s``: when
    a wave of answers ends together, the first of the next wave opens alone for a moment, and
    the others then open on the same busy replica."""

    saturated: bool = False
    load: tuple[float, int, int] | None = None  # (busy, batch, sessions), as last told
    alone_s: float = 1.0
    seen: float | None = None  # when the load was last told (time.monotonic())
    _alone_since: float | None = None  # when the replica was last seen down to one session

    def fresh(self, now: float | None = None) -> bool:
        """Whether the load was told recently enough to decide on (within a load window and
        the hold): a drafter whose sessions have all ended keeps the last load it was told,
        which says nothing of the replica minutes later."""
        now = time.monotonic() if now is None else now
        return self.seen is not None and now - self.seen <= LOAD_FRESH_S

    def observe(
        self,
        busy: float | None,
        batch: int | None,
        sessions: int | None = None,
        now: float | None = None,
    ) -> None:
        if busy is None or batch is None:
            return  # a verifier that does not say
        sessions = sessions if sessions is not None else batch
        now = time.monotonic() if now is None else now
        self.load, self.seen = (busy, batch, sessions), now
        if sessions > 1:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        alone = self._alone_since is not None and (
            not self.saturated or now - self._alone_since >= self.alone_s
        )
        if busy < LOAD_LOW or alone:
            self.saturated = False
        elif busy >= LOAD_HIGH:
            self.saturated = True


@dataclass
class _Windowed:
    """A running mean that follows change: exponentially weighted, seeded by a prior."""

    value: float
    weight: float = 0.25

    def add(self, x: float) -> None:
        self.value += self.weight * (x - self.value)


@dataclass
class SiteEstimates:
    """What a drafter has learnt of its site across sessions (the next session's prior)."""

    t_d: float | None = None
    rtt_s: float | None = None
    verify_step_s: float | None = None
    verify_per_token_s: float = 0.0
    alpha: float = 0.7
    # per position since a rejection: (accepted, tested) decayed counts, HAZARD_POSITIONS long
    hazard_counts: tuple[tuple[float, float], ...] = ()
    verify_per_session_s: float = 0.0
    verify_per_round_s: float = 0.0


@dataclass
class DraftLenController:
    """Per session: feed it what happens, ask it for ``(γ, k)`` (module docstring)."""

    pipelined: bool = True
    prior: SiteEstimates = field(default_factory=SiteEstimates)
    start_gamma: int = DEFAULT_GAMMA
    start_lookahead: int = 3
    max_gamma: int = MAX_GAMMA
    max_lookahead: int = MAX_LOOKAHEAD
    hysteresis: float = 0.05
    decay: float = 0.8  # per round, of the acceptance evidence (a half-life of ~3 rounds)
    prior_tokens: float = 8.0  # how many tested tokens the prior's acceptance is worth
    hazard_decay: float = 0.97  # per round, of the per-position evidence (the shape)
    hazard_prior: float = 4.0  # tested tokens of the pooled level each position starts from

    def __post_init__(self) -> None:
        p = self.prior
        self.gamma, self.lookahead = self.start_gamma, self.start_lookahead
        self._t_d = _Windowed(p.t_d) if p.t_d is not None else None
        self._rtt: deque[float] = deque(maxlen=8)  # the minimum filters queueing out
        self._rtt_prior = p.rtt_s
        self._verify = VerifyCost(
            p.verify_step_s, p.verify_per_token_s, p.verify_per_session_s, p.verify_per_round_s
        )
        # decayed counts of accepted and rejected (tested) tokens, seeded by the prior
        self._accepted = p.alpha * self.prior_tokens
        self._rejected = (1 - p.alpha) * self.prior_tokens
        # per position since the last rejection: decayed accepted and tested counts
        counts = p.hazard_counts or ((0.0, 0.0),) * HAZARD_POSITIONS
        self._pos_acc = [a for a, _ in counts]
        self._pos_tested = [t for _, t in counts]
        self._run = 0  # tokens accepted since the last rejection (the epoch's next position)
        self._informed = False  # whether the model has chosen yet (the start is a default)
        self.best_rate: float | None = None  # the latest latency choice's best predicted rate
        self.history: dict[int, int] = {}  # γ -> rounds drafted with it
        self.saturation = Saturation()  # the verifier's load, as its verdicts tell it

    # --- observations ------------------------------------------------------------------
    def observe_step(self, seconds: float) -> None:
        """One draft-model step's time."""
        if self._t_d is None:
            self._t_d = _Windowed(seconds)
        else:
            self._t_d.add(seconds)

    def observe_open(self, network_rtt_s: float) -> None:
        """The open's round trip less the verifier's prefill: a first look at the network."""
        if not self._rtt and network_rtt_s >= 0:
            self._rtt_prior = network_rtt_s

    def observe_verify_cost(self, cost: VerifyCost) -> None:
        """The verifier's own forward cost line (from the open reply)."""
        if cost.step:
            self._verify = VerifyCost(
                cost.step, cost.per_token or 0.0, cost.per_session or 0.0, cost.per_round or 0.0
            )

    def observe_load(
        self, busy: float | None, batch: int | None, sessions: int | None = None
    ) -> None:
        """The verifier's load, as a verdict told it (None: the verifier did not say)."""
        self.saturation.observe(busy, batch, sessions)

    @property
    def policy(self) -> str:
        """``capacity`` while the verifier is saturated (draft for its throughput), else
        ``latency`` (draft for the session's own speed)."""
        return "capacity" if self.saturation.saturated else "latency"

    def observe_round(
        self, accepted: int, rejected: bool, round_trip_s: float | None, n_fed: int
    ) -> None:
        """One verdict: its accepted count, whether it rejected, and the block's round trip
        (send to verdict) for a forward of ``n_fed`` tokens."""
        self._accepted = self._accepted * self.decay + accepted
        self._rejected = self._rejected * self.decay + int(rejected)
        last = HAZARD_POSITIONS - 1
        self._pos_acc = [x * self.hazard_decay for x in self._pos_acc]
        self._pos_tested = [x * self.hazard_decay for x in self._pos_tested]
        for j in range(self._run, self._run + accepted + int(rejected)):
            self._pos_tested[min(j, last)] += 1
            if j < self._run + accepted:
                self._pos_acc[min(j, last)] += 1
        self._run = 0 if rejected else self._run + accepted
        self.history[self.gamma] = self.history.get(self.gamma, 0) + 1
        step, per_token, _, per_round = self._verify
        if round_trip_s is not None and step is not None:
            # what is left after the verifier's compute is the network (plus any queueing;
            # the minimum over recent blocks filters the queueing out)
            compute = step + per_round + per_token * max(0, n_fed - 1)
            self._rtt.append(max(0.0, round_trip_s - compute))

    # --- estimates ---------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """Per-token acceptance: accepted over tested tokens, recent rounds weighing most."""
        return self._accepted / (self._accepted + self._rejected)

    @property
    def hazard(self) -> tuple[float, ...]:
        """Acceptance per position since the last rejection. The shape comes from the
        per-position evidence (long memory: the first positions are tested in most rounds,
        the later ones rarely), each shrunk towards the same evidence pooled; the level is the
        pooled estimate's (short memory: it follows the prompt)."""
        tested_all = sum(self._pos_tested)
        if tested_all < 1e-9:
            return ()
        slow = sum(self._pos_acc) / tested_all
        if slow <= 1e-9:
            return ()
        c, scale = self.hazard_prior, self.alpha / slow
        return tuple(
            min(1.0, scale * (acc + c * slow) / (tested + c))
            for acc, tested in zip(self._pos_acc, self._pos_tested, strict=True)
        )

    def inputs(self, tokens_left: int = 256) -> Inputs | None:
        """The model's inputs, or None while something is still unknown."""
        rtt = min(self._rtt) if self._rtt else self._rtt_prior
        step, per_token, per_session, per_round = self._verify
        if self._t_d is None or rtt is None or step is None:
            return None
        return Inputs(
            t_d=self._t_d.value,
            rtt_s=rtt,
            verify_step_s=step,
            verify_per_token_s=per_token,
            verify_per_session_s=per_session,
            verify_per_round_s=per_round,
            alpha=self.alpha,
            pipelined=self.pipelined,
            tokens_left=tokens_left,
            hazard=self.hazard,
        )

    def estimates(self) -> SiteEstimates:
        """This session's view, for the next sessions' prior."""
        inp = self.inputs()
        counts = tuple(zip(self._pos_acc, self._pos_tested, strict=True))
        if inp is None:
            return replace(self.prior, alpha=self.alpha, hazard_counts=counts)
        return SiteEstimates(
            inp.t_d,
            inp.rtt_s,
            inp.verify_step_s,
            inp.verify_per_token_s,
            inp.alpha,
            counts,
            inp.verify_per_session_s,
            inp.verify_per_round_s,
        )

    def prefers_cloud_only(self) -> bool:
        """Whether cloud-only decoding is predicted ``CLOUD_ONLY_MARGIN`` faster for the session
        than its best draft length (:func:`cloud_only_faster`), compared in the steady state
        (near the end of an answer any pipeline's predicted rate falls: its next epoch cannot
        fill, while cloud-only decoding keeps streaming) and at the better of the session's
        acceptance and its site's (a few rounds of a session are noisy evidence, and it asks
        again at every verdict: at 0.6 on the embedded runtime, where speculation is ~1.1x, its
        own estimate alone handed half of the sessions over). The latest choice's rate (for the
        tokens left, at the session's own acceptance) rules most cases out without a second
        prediction."""
        inp = self.inputs(PREDICTION_HORIZON)
        if self.best_rate is None or inp is None or not cloud_only_faster(inp, self.best_rate):
            return False
        if self.prior.alpha > inp.alpha:
            inp = replace(inp, alpha=self.prior.alpha, hazard=())
        _, _, steady = best_choice(inp, self.max_gamma, self.max_lookahead if self.pipelined else 1)
        return cloud_only_faster(inp, steady)

    # --- the choice ----------------------------------------------------------------------
    def choose(self, tokens_left: int = 256) -> tuple[int, int]:
        """The ``(γ, k)`` to draft with now: the model's first choice once it has every input,
        then unchanged unless the model predicts a gain of at least ``hysteresis`` over it."""
        inp = self.inputs(min(tokens_left, PREDICTION_HORIZON))
        if inp is None:
            return self.gamma, self.lookahead
        max_k = self.max_lookahead if self.pipelined else 1
        load = self.saturation.load
        if self.saturation.saturated and load is not None:
            # no hysteresis on γ here: the load it reacts to has its own
            self.gamma, self.lookahead = best_capacity_choice(inp, load[1], self.max_gamma, max_k)
            self._informed, self.best_rate = True, None
            return self.gamma, self.lookahead
        g, k, rate = best_choice(inp, self.max_gamma, self.max_lookahead if self.pipelined else 1)
        self.best_rate = rate
        current = predicted_rate(inp, self.gamma, self.lookahead if self.pipelined else 1)
        if not self._informed or rate > current * (1 + self.hysteresis):
            self.gamma, self.lookahead = g, k
            self._informed = True
        return self.gamma, self.lookahead


@dataclass
class CostLine:
    """The verifier's forward cost ``a + b·(n-1) + c·(m-1) + d·r`` for ``n`` tokens of ``m``
    sessions, fitted by exponentially weighted least squares over recent work (so it follows
    load and emulation alike). ``a`` is one session's one-token step, ``b`` each further token,
    ``c`` each further session (its attention, its rows): what a batch of single-token steps
    pays per session that a block of the same tokens does not. ``d`` is what a block costs as
    a request of its own (``r`` = 1), where the engine runs blocks as requests beside its own
    decoding (vLLM); the embedded runtime's blocks and steps are the same forwards (``r`` = 0
    always, ``d`` = 0). Where the work seen does not tell a term apart from the others (one
    kind of forward only), it is 0."""

    decay: float = 0.97
    _w: float = 0.0
    _xy: np.ndarray = field(default_factory=lambda: np.zeros(4))  # Σw·x·y, x = (1, n-1, m-1, r)
    _xx: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))  # Σw·x·xᵀ

    def observe(
        self, n_tokens: int, seconds: float, sessions: int = 1, request: bool = False
    ) -> None:
        x = np.array([1.0, max(0, n_tokens - 1), max(0, sessions - 1), float(request)])
        self._w = self._w * self.decay + 1.0
        self._xx = self._xx * self.decay + np.outer(x, x)
        self._xy = self._xy * self.decay + x * seconds

    def line(self) -> VerifyCost | None:
        """``(a, b, c, d)``, or None before any work was seen."""
        if self._w <= 0:
            return None
        free = [0] + [i for i in (1, 2, 3) if self._xx[i, i] > 1e-9 * self._w]
        while True:  # least squares over the slopes the data tells, none negative
            sub = self._xx[np.ix_(free, free)]
            if np.linalg.cond(sub) > 1e9:
                free.pop()  # the last slope is not told apart from the others
                continue
            coef = np.linalg.solve(sub, self._xy[free])
            bad = [f for f, v in zip(free[1:], coef[1:], strict=True) if v < 0]
            if not bad:
                break
            free.remove(bad[0])
        out = [0.0, 0.0, 0.0, 0.0]
        for f, v in zip(free, coef, strict=True):
            out[f] = float(v)
        return VerifyCost(max(1e-6, out[0]), out[1], out[2], out[3])


@dataclass
class LoadMeter:
    """The verifier's load over the last ``window_s`` seconds: the fraction of the time its
    engine was running forwards (overlapping forwards counted once), and the sessions per
    forward. What every verdict tells its drafter (``Verdict.busy``, ``Verdict.batch``).

    The idle time at the window's start, before its first forward, is the time before the load
    came, not part of it: with two forwards or more in the window, the fraction is taken from
    the first one on (over at least ``lead_s``). So a wave of sessions that meets an idle
    replica reads as saturated after a quarter of a second of continuous work, not after a
    whole window, and the reading rises with the load instead of stepping; a steady load reads
    within one of its gaps of the whole window's fraction; a single forward, however long (a
    long prompt's prefill), is not a load."""

    window_s: float = 1.0
    lead_s: float = 0.25
    _forwards: deque[tuple[float, float, int]] = field(default_factory=deque)  # end, s, sessions

    def __post_init__(self) -> None:
        if not 0 < self.lead_s <= self.window_s:
            raise ValueError(
                f"LoadMeter: 0 < lead_s <= window_s, got {self.lead_s}, {self.window_s}"
            )

    def observe(self, end: float, seconds: float, sessions: int) -> None:
        self._forwards.append((end, seconds, sessions))
        self._prune(end)

    def _prune(self, now: float) -> None:
        while self._forwards and self._forwards[0][0] < now - self.window_s:
            self._forwards.popleft()

    def load(self, now: float) -> tuple[float, int]:
        """``(busy fraction, sessions per forward)`` over the window ending at ``now``."""
        self._prune(now)
        start = now - self.window_s
        spans = sorted((max(start, end - s), end) for end, s, _ in self._forwards)
        busy, covered = 0.0, start
        for begin, end in spans:
            if end > covered:
                busy += end - max(begin, covered)
                covered = end
        span = self.window_s
        if len(spans) > 1 and spans[0][0] > start:  # the load came within the window
            span = max(self.lead_s, now - spans[0][0])
        n = len(self._forwards)
        batch = round(sum(f[2] for f in self._forwards) / n) if n else 0
        return min(1.0, busy / span), batch
