"""Drafts without a model forward: proposers of point-mass draft tokens.

A drafter session asks its :class:`Proposer` (when it has one) for the tokens that come next
before it runs its draft model. A proposed token's draft distribution ``q`` is a point mass
(``q(x) = 1``), so separate rejection sampling stays exact: the verifier accepts ``x`` with
probability ``p(x)``, and on a rejection the residual ``norm(max(0, p - q))`` is ``p`` with ``x``
removed. Greedy verification accepts ``x`` exactly when it is the target's argmax.

- :class:`EmulatedEdge` stands for an edge device in a capacity benchmark (``picospec bench
  --fleet``): it replays the target's own greedy continuation of the prompt, recorded once from
  a cloud-only run (:class:`ContinuationRecorder`), with each position replaced by a wrong token
  with probability ``1 - acceptance`` (seeded by position), and it costs ``step_s`` of emulated
  device time per token and no compute. Its drafts are EMULATED: a report must say so.

A proposer is plain, transport-free code; the drafter session
(:class:`picospec.speculation.drafter.DrafterSession`) keeps the proposed run until it is used
or speculation is voided (a rejection, a move to another verifier).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import numpy as np
import torch


class Proposer(Protocol):
    """What a drafter session asks of a model-free draft."""

    name: str  # the draft source, in metrics and reports ("emulated", "suffix")
    step_s: float  # emulated device time per proposed token (0: free)
    # the kind of draft whose adaptive estimates its sessions share at a drafter (a session
    # starts from what earlier sessions of its kind saw)
    site: Hashable

    def propose(self, tokens: Sequence[int], n_prompt: int, limit: int) -> list[int]:
        """Up to ``limit`` tokens to draft after ``tokens`` (prompt, committed and speculative
        ones; the first ``n_prompt`` are the prompt); empty when this proposer has none."""
        ...


def point_mass(token: int, vocab_size: int) -> torch.Tensor:
    """The draft distribution of a proposed token: all its mass on ``token``."""
    q = torch.zeros(vocab_size, dtype=torch.float32)
    q[token] = 1.0
    return q


def prompt_key(prompt: Sequence[int]) -> bytes:
    """A fixed-size key of a prompt's token ids."""
    return hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=16).digest()


class ContinuationRecorder:
    """The target's greedy continuations of recent prompts, as cloud-only (``ar``) sessions
    produced them: what emulated edges replay. Bounded: the oldest are forgotten first."""

    def __init__(self, max_prompts: int = 4096) -> None:
        self.max_prompts = max_prompts
        self._by_prompt: OrderedDict[bytes, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_prompt)

    def record(self, prompt: Sequence[int], continuation: Sequence[int]) -> None:
        """Keep ``continuation`` for ``prompt``, unless a longer one is known already."""
        key = prompt_key(prompt)
        known = self._by_prompt.get(key)
        if known is None or len(continuation) > len(known):
            self._by_prompt[key] = list(continuation)
        self._by_prompt.move_to_end(key)
        while len(self._by_prompt) > self.max_prompts:
            self._by_prompt.popitem(last=False)

    def get(self, prompt: Sequence[int]) -> list[int] | None:
        return self._by_prompt.get(prompt_key(prompt))


class EmulatedEdge:
    """An emulated edge device's draft (module docstring): the recorded continuation, each
    position right with probability ``acceptance``, decided by ``(seed, answer, position)``
    alone, so a position drafted again after a rollback gets the same token, and every run of
    the same answer and seed drafts the same tokens. Past the recording it drafts a wrong
    token."""

    name = "emulated"

    def __init__(
        self,
        continuation: Sequence[int],
        acceptance: float,
        step_s: float,
        vocab_size: int,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        if step_s < 0:
            raise ValueError(f"step_s must be >= 0, got {step_s}")
        if vocab_size < 2:
            raise ValueError("a wrong token needs a vocabulary of two tokens or more")
        self.continuation = list(continuation)
        self.acceptance = acceptance
        self.step_s = step_s
        self.vocab_size = vocab_size
        self.seed = seed
        # the fleet it stands for: the drafter's adaptive estimates are kept per fleet, as a
        # real site's are per site (a bench that runs fleets of another acceptance one after
        # the other on one drafter must not start each from the last one's)
        self.site = ("emulated", acceptance, step_s)
        # which positions are wrong differs from answer to answer (not every user of a fleet
        # rejects at the same positions), and is the same for every run of this answer
        self._key = int.from_bytes(prompt_key(self.continuation)[:8], "little")

    def token_at(self, i: int, previous: int) -> int:
        """The draft for the ``i``-th token of the answer (``previous``: the token before)."""
        u, v = np.random.default_rng([self.seed, self._key, i]).random(2)
        right = self.continuation[i] if i < len(self.continuation) else previous
        if i < len(self.continuation) and u < self.acceptance:
            return right
        return (right + 1 + int(v * (self.vocab_size - 1))) % self.vocab_size

    def propose(self, tokens: Sequence[int], n_prompt: int, limit: int) -> list[int]:
        out: list[int] = []
        previous = tokens[-1]
        for i in range(len(tokens) - n_prompt, len(tokens) - n_prompt + limit):
            previous = self.token_at(i, previous)
            out.append(previous)
        return out


def longest_suffix_match(
    hay: np.ndarray, suffix: np.ndarray, min_len: int, max_len: int
) -> tuple[int, int]:
    """Where the longest tail of ``suffix`` (``min_len`` to ``max_len`` tokens) last occurs in
    ``hay`` with at least one token after it: ``(end, length)``, ``end`` the index just past
    the occurrence (the first token it predicts), or ``(-1, 0)`` when no tail of ``min_len``
    occurs. Of equally long matches the latest wins (recent text predicts best). When
    ``suffix`` is the end of ``hay`` itself, that trivial occurrence has no token after it and
    is never found."""
    n = len(hay)
    if len(suffix) < min_len or n <= min_len:
        return -1, 0
    # candidate ends: positions e (min_len <= e < n) with hay[e - min_len:e] == the last min_len
    ends = np.arange(min_len, n)
    ok = np.ones(len(ends), dtype=bool)
    for j in range(1, min_len + 1):
        ok &= hay[ends - j] == suffix[-j]
    cands = ends[ok]
    if not len(cands):
        return -1, 0
    best_end, best_len = -1, 0
    limit = min(max_len, len(suffix))
    for e in cands[::-1]:  # latest first
        length = min_len
        while length < limit and e - length - 1 >= 0 and hay[e - length - 1] == suffix[-length - 1]:
            length += 1
        if length > best_len:
            best_end, best_len = int(e), length
            if length == limit:
                break
    return best_end, best_len


class SuffixCache:
    """Recent answers of one edge site, per tenant (an API key, or the open API's one tenant):
    what a suffix draft may also match against. Bounded: ``max_answers`` per tenant and
    ``max_tenants`` tenants, the least recently used going first. A tenant never sees another
    tenant's answers."""

    def __init__(self, max_answers: int = 64, max_tenants: int = 256) -> None:
        self.max_answers = max_answers
        self.max_tenants = max_tenants
        self._by_tenant: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def add(self, tenant: str, tokens: Sequence[int]) -> None:
        if not tokens or self.max_answers < 1:
            return
        answers = self._by_tenant.setdefault(tenant, [])
        answers.append(np.asarray(tokens, dtype=np.int64))
        del answers[: -self.max_answers]
        self._by_tenant.move_to_end(tenant)
        while len(self._by_tenant) > self.max_tenants:
            self._by_tenant.popitem(last=False)

    def answers(self, tenant: str) -> list[np.ndarray]:
        """The tenant's recent answers, newest last (a copy of the list)."""
        return list(self._by_tenant.get(tenant, ()))


class SuffixDraft:
    """Suffix decoding at the edge (after prompt lookup and Arctic Inference's suffix
    decoding): where the text's last tokens occurred before (in the prompt, the answer so far
    or, with a :class:`SuffixCache`, the site's recent answers of the same tenant), propose the
    tokens that followed them. It proposes only where the match is at least ``min_match``
    tokens long (a short match predicts little; the draft model, if any, drafts elsewhere),
    and at most ``max_run`` tokens at a time. Free: no model, no device time."""

    name = "suffix"
    site = "suffix"
    step_s = 0.0

    def __init__(
        self,
        min_match: int = 3,
        max_match: int = 32,
        max_run: int = 16,
        history: Sequence[np.ndarray] = (),
    ) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError("need 1 <= min_match <= max_match")
        self.min_match, self.max_match, self.max_run = min_match, max_match, max_run
        self.history = list(history)
        self.last_match = 0  # the length of the match behind the last proposal (0: none)

    def propose(self, tokens: Sequence[int], n_prompt: int, limit: int) -> list[int]:
        arr = np.asarray(tokens, dtype=np.int64)
        tail = arr[-self.max_match :]
        n = min(limit, self.max_run)
        end, length = longest_suffix_match(arr, tail, self.min_match, self.max_match)
        source = arr
        for past in reversed(self.history):  # the site's answers: only a longer match wins
            e, m = longest_suffix_match(past, tail, max(self.min_match, length + 1), self.max_match)
            if m > length:
                end, length, source = e, m, past
        self.last_match = length
        if end < 0:
            return []
        return [int(t) for t in source[end : end + n]]


class Hints:
    """The edge's half of a cloud-led session (``SpecConfig.cloud_led``): the verifier
    decodes on its own and streams every token; after each, this proposes the tokens that come
    next (``proposer``), to be sent as a hint whenever no earlier hint is still ahead of the
    stream. A hint is used up when the stream passes its end, and dead when the stream
    contradicts it. Counts into ``stats`` as rounds (hints), drafted (their tokens), accepted
    (tokens the verifier took from a hint) and rollbacks (contradicted hints)."""

    def __init__(self, proposer: Proposer, stats: Any, limit: int = 16) -> None:
        self.proposer, self.stats, self.limit = proposer, stats, limit
        self._pos = self._end = 0  # the live hint's positions [pos, end), none when equal
        self._tokens: list[int] = []

    def on_token(self, tokens: Sequence[int], n_prompt: int, hinted: bool) -> list[int]:
        """The stream's next token arrived (the last of ``tokens``; ``hinted``: the verifier
        took it from a hint). Returns the tokens of a new hint starting after it, or []."""
        st, at = self.stats, len(tokens) - 1
        if hinted:
            st.accepted += 1
            st.accepted_by_source[self.proposer.name] = (
                st.accepted_by_source.get(self.proposer.name, 0) + 1
            )
        if self._pos <= at < self._end and self._tokens[at - self._pos] != tokens[-1]:
            st.rollbacks += 1
            st.wasted += self._end - at
            self._end = self._pos  # contradicted: no longer ahead
        if len(tokens) < self._end:
            return []
        run = self.proposer.propose(tokens, n_prompt, self.limit)
        if run:
            self._pos, self._end, self._tokens = len(tokens), len(tokens) + len(run), run
            st.rounds += 1
            st.blocks += 1
            st.sent += len(run)
            st.drafted += len(run)
            st.free_drafts += len(run)
        return run

    def restart(self) -> None:
        """The session moved to another verifier: no hint is live there."""
        self._pos = self._end = 0
