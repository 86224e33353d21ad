"""The drafter's session state machine: transport-free, one per request.

The drafter owns the truth: ``committed`` (prompt + accepted output) lives here, so any verifier
can pick the session up again by re-prefill. Ahead of ``committed`` run the *speculative* tokens:
blocks in flight to the verifier, tagged ``(epoch, seq, pos)``, plus the block being drafted.

Cycle of the pipelined mode (``picospec``):

1. :meth:`draft_step` drafts one token (optimistically assuming everything in flight passes) and
   returns a :class:`DraftBlock` whenever ``draft_len`` tokens are ready; drafting pauses once
   ``max_inflight`` blocks are in flight (the bounded look-ahead).
2. :meth:`on_verdict` applies the verifier's verdict on the oldest block in flight: accepted
   tokens become committed; on a rejection it returns either the cloud's correction (greedy) or a
   :class:`SampleRequest` for the sampler, whose answer goes to :meth:`on_correction`.
3. A rejection rolls back: every speculative token after it is discarded, the draft KV cache is
   cropped to the committed length, and a new epoch starts whose first block carries the
   correction token as ``prefix``. Verdicts of stale epochs are ignored.

The synchronous modes are the same machine with one block in flight and a bonus token.

A session may also have a model-free :class:`~picospec.speculation.proposers.Proposer`: where
it proposes the next tokens, :meth:`DrafterSession.free_draft` drafts them with a point-mass
``q`` and no forward (the draft model catches up on them at its next forward); where it has
none, the draft model steps (:meth:`DrafterSession.draft`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from picospec.protocol.codec import DraftBlock, SampleRequest, Verdict, VerdictStatus
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import Forward, Program, run
from picospec.speculation.proposers import Proposer, point_mass
from picospec.speculation.sampling import (
    STREAM_DRAFT,
    STREAM_SAMPLER,
    Rng,
    SamplingParams,
    pick,
    probs_from_logits,
)
from picospec.speculation.spec import Mode, SpecConfig


class ProtocolError(RuntimeError):
    """A verdict that does not fit this session's state (wrong block, bad status)."""


@dataclass
class _Spec:
    """Speculative tokens of one block: drafted ids, their draft dists (None: a point mass, a
    proposer's token) and which source drafted each."""

    block: DraftBlock | None  # None while still being drafted
    tokens: list[int] = field(default_factory=list)
    dists: list[torch.Tensor | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


@dataclass
class DrafterStats:
    sent: int = 0  # draft tokens sent for verification
    drafted: int = 0  # draft tokens in blocks whose verdict was applied (acceptance denominator)
    accepted: int = 0  # draft tokens the verifier accepted
    rounds: int = 0  # verdicts applied
    rollbacks: int = 0  # rejections (each starts a new epoch)
    wasted: int = 0  # drafted tokens thrown away (rejected, or drafted after a rejection)
    draft_forwards: int = 0
    free_drafts: int = 0  # draft tokens a proposer gave, without a forward
    blocks: int = 0
    tail_mass: float = 0.0  # sum over sampled rejections of the compressed p_j's tail mass
    accepted_per_pos: list[int] = field(default_factory=list)
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # "model", a proposer's

    def report(self) -> dict[str, Any]:
        """The speculation figures every report (CLI, API, benchmark) shows, one definition:
        acceptance = accepted / drafted, mean accepted length = 1 + accepted / rounds (vLLM)."""
        return {
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_len": 1 + self.accepted / self.rounds if self.rounds else None,
            "rounds": self.rounds,
            "rollbacks": self.rollbacks,
            "wasted_tokens": self.wasted,
            "tail_mass": self.tail_mass,
            "free_drafts": self.free_drafts,
            "accepted_by_source": dict(self.accepted_by_source),
        }


@dataclass(frozen=True)
class Committed:
    """Tokens a verdict (or correction) committed; ``done`` once the session has finished."""

    tokens: list[int]
    done: bool


class DrafterSession:
    def __init__(
        self,
        model: LanguageModel,
        session: bytes,
        prompt: list[int],
        params: SamplingParams,
        spec: SpecConfig,
        max_new_tokens: int,
        eos_ids: frozenset[int] = frozenset(),
        proposer: Proposer | None = None,
    ) -> None:
        if spec.mode is Mode.AR:
            raise ValueError("the ar mode has no drafter session")
        if not prompt:
            raise ValueError("a session needs a non-empty prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.model = model
        self.session = session
        self.params = params
        self.spec = spec
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.committed: list[int] = list(prompt)
        self.n_prompt = len(prompt)
        self.epoch = 0
        self.finish_reason: str | None = None
        self.stats = DrafterStats(accepted_per_pos=[0] * spec.draft_len)
        # γ and the look-ahead of the blocks drafted from now on (adaptive speculation may
        # change them between blocks; the verifier takes blocks of any length)
        self.draft_len = spec.draft_len
        self.lookahead = spec.max_inflight
        self._seq = 0
        self._cache = model.new_cache()
        self._pending: list[int] = list(prompt)  # fed to the draft model before the next draw
        self._specs: deque[_Spec] = deque()  # blocks in flight, then the one being drafted
        self._unsent: list[int] = []  # committed tokens the verifier has not seen yet
        self._awaiting_sample: int | None = None  # accepted count of a rejection being sampled
        self._rng = Rng(params.seed)
        self.proposer = proposer
        self._proposed: deque[int] = deque()  # the proposer's run, not drafted yet
        self.speculating = True  # False once it stops, to hand the session over (hand_over)

    # --- views ----------------------------------------------------------------------------
    @property
    def generated(self) -> list[int]:
        return self.committed[self.n_prompt :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def inflight(self) -> int:
        return sum(1 for s in self._specs if s.block is not None)

    def _n_spec(self) -> int:
        return sum(len(s.tokens) for s in self._specs)

    def _drafted_eos(self) -> bool:
        return any(t in self.eos_ids for s in self._specs for t in s.tokens)

    def can_draft(self) -> bool:
        """May :meth:`draft_step` run now? (Not done, look-ahead not exhausted, budget left.)"""
        if not self.speculating or self.done or self._awaiting_sample is not None:
            return False
        if self._drafted_eos():
            return False
        if len(self.generated) + self._n_spec() >= self.max_new_tokens:
            return False
        building = self._specs and self._specs[-1].block is None
        return building or self.inflight < self.lookahead

    # --- drafting -------------------------------------------------------------------------
    def draft_step(self) -> DraftBlock | None:
        """Draft one token (the proposer's, else the model's); return a block to send when one
        is complete."""
        drafted, block = self.free_draft()
        return block if drafted else run(self.draft())

    def free_draft(self) -> tuple[bool, DraftBlock | None]:
        """Draft the next token without a forward, if the proposer has one for it:
        ``(True, block to send or None)``; ``(False, None)`` when the draft model must step
        (:meth:`draft`)."""
        if self.proposer is None:
            return False, None
        if not self.can_draft():
            raise ProtocolError("free_draft() called while drafting is not allowed")
        if not self._proposed:
            tokens = self.committed + [t for s in self._specs for t in s.tokens]
            limit = self.draft_len * self.lookahead
            self._proposed.extend(self.proposer.propose(tokens, self.n_prompt, limit))
            if not self._proposed:
                return False, None
        token = self._proposed.popleft()
        if not 0 <= token < self.model.vocab_size:
            raise ProtocolError(f"proposed token {token} is outside the vocabulary")
        self._pending.append(token)  # the draft model reads it at its next forward
        self.stats.free_drafts += 1
        return True, self._add(token, None, self.proposer.name)

    def draft(self) -> Program[DraftBlock | None]:
        """:meth:`draft_step` as a program (:mod:`picospec.runtime.scheduler`), so the drafter's
        model thread steps the drafts of all its sessions in one forward. The session must not
        change while it runs."""
        if not self.can_draft():
            raise ProtocolError("draft_step() called while drafting is not allowed")
        out = yield Forward(self._cache, self._pending, keep=1)
        assert out is not None
        logits = out[-1]
        self.stats.draft_forwards += 1
        pos = len(self.committed) + self._n_spec()
        q = probs_from_logits(logits, self.params, pos)
        token = pick(q, self.params, self._rng, STREAM_DRAFT, pos)
        self._pending = [token]
        self._proposed.clear()  # the model drafted past the proposer's run
        return self._add(token, q, "model")

    def _add(self, token: int, q: torch.Tensor | None, source: str) -> DraftBlock | None:
        """Append a drafted token to the block being drafted; seal it when it is complete."""
        if not self._specs or self._specs[-1].block is not None:
            self._specs.append(_Spec(block=None))
        cur = self._specs[-1]
        cur.tokens.append(token)
        cur.dists.append(q)
        cur.sources.append(source)
        full = len(cur.tokens) >= self.draft_len
        budget_spent = len(self.generated) + self._n_spec() >= self.max_new_tokens
        if full or budget_spent or token in self.eos_ids:
            return self._seal(cur)
        return None

    def draft_ready(self) -> list[DraftBlock]:
        """Draft until the look-ahead or the budget stops it; return the blocks sealed on the
        way (for callers with nothing else to do between steps: the one-process engine)."""
        blocks = []
        while self.can_draft():
            block = self.draft_step()
            if block is not None:
                blocks.append(block)
        return blocks

    def _seal(self, cur: _Spec) -> DraftBlock:
        pos = (
            len(self.committed)
            - len(self._unsent)
            + sum(len(s.tokens) for s in self._specs if s is not cur)
        )
        block = self._block(cur, pos)
        self.stats.sent += len(cur.tokens)
        self.stats.blocks += 1
        return block

    def _block(self, cur: _Spec, pos: int) -> DraftBlock:
        """Make ``cur``'s block at ``pos``, carrying the unsent committed tokens as prefix."""
        dense = None
        if self.spec.mode.dense_q:
            dense = torch.stack([self._dist(cur, i) for i in range(len(cur.tokens))]).numpy()
        block = DraftBlock(
            session=self.session,
            epoch=self.epoch,
            seq=self._seq,
            pos=pos,
            prefix=tuple(self._unsent),
            tokens=tuple(cur.tokens),
            q=tuple(
                1.0 if d is None else max(float(d[t]), 1e-30)
                for d, t in zip(cur.dists, cur.tokens, strict=True)
            ),
            dense_q=dense,
            vocab_size=self.model.vocab_size,
        )
        self._seq = (self._seq + 1) % 2**32
        self._unsent = []
        cur.block = block
        return block

    def _dist(self, spec: _Spec, i: int) -> torch.Tensor:
        """The draft distribution of ``spec``'s token ``i`` (a proposer's: a point mass)."""
        d = spec.dists[i]
        return point_mass(spec.tokens[i], self.model.vocab_size) if d is None else d

    # --- the first token --------------------------------------------------------------------
    def accept_first(self, token: int) -> tuple[Committed, list[DraftBlock]]:
        """Commit the target's first token, chosen by the verifier from its prefill.

        It must come before any block was sent (the drafter holds the blocks it drafts while
        the session opens). If the draft guessed the same token, the speculation after it
        stays; otherwise it is dropped and the draft cache rolls back, as after a rejection.
        Either way the token goes to the verifier as the next block's prefix. Returns the
        commit and the blocks to send in place of those sealed so far (renumbered from 0).
        The first token is not a drafted token: acceptance counts leave it out.
        """
        if len(self.committed) != self.n_prompt or self.epoch or self.done:
            raise ProtocolError("the first token comes before anything else is committed")
        if not 0 <= token < self.model.vocab_size:
            raise ProtocolError(f"first token {token} is outside the vocabulary")
        sealed = [s for s in self._specs if s.block is not None]
        self.stats.sent -= sum(len(s.tokens) for s in sealed)
        self.stats.blocks -= len(sealed)
        before = len(self.committed)
        head = self._specs[0] if self._specs else None
        if head is not None and head.tokens[0] == token:
            head.tokens.pop(0)
            head.dists.pop(0)
            head.sources.pop(0)
            if not head.tokens:
                self._specs.popleft()
            self.committed.append(token)
            self._unsent = [token]
            self._check_finished(before)
            got = Committed(tokens=self.committed[before:], done=self.done)
        else:
            got = self._commit(before, [token])
        if self.done:
            self._specs.clear()
            return got, []
        self._seq = 0
        pos, blocks = before, []
        for spec in self._specs:
            if spec.block is None:
                break
            blocks.append(self._block(spec, pos))
            pos += len(blocks[-1].prefix) + len(spec.tokens)
        self.stats.sent += sum(len(b.tokens) for b in blocks)
        self.stats.blocks += len(blocks)
        return got, blocks

    # --- verdicts -------------------------------------------------------------------------
    def on_verdict(self, verdict: Verdict) -> Committed | SampleRequest | None:
        """Apply a verdict. Returns what it committed, a request for the sampler (sampled
        rejection), or None for a stale verdict (older epoch), which changes nothing."""
        if verdict.session != self.session:
            raise ProtocolError("verdict for another session")
        if verdict.epoch < self.epoch:
            return None
        if verdict.status is not VerdictStatus.OK:
            raise ProtocolError(f"verifier refused the block: {verdict.status.name}")
        if self._awaiting_sample is not None:
            raise ProtocolError("a verdict arrived while a correction is being sampled")
        if not self._specs or self._specs[0].block is None:
            raise ProtocolError("verdict with no block in flight")
        head = self._specs[0]
        assert head.block is not None
        if verdict.epoch != self.epoch or verdict.seq != head.block.seq:
            raise ProtocolError(
                f"verdict for (epoch {verdict.epoch}, seq {verdict.seq}) but the oldest block in "
                f"flight is (epoch {self.epoch}, seq {head.block.seq})"
            )
        n = verdict.accepted
        if n > len(head.tokens):
            raise ProtocolError(f"verdict accepts {n} of {len(head.tokens)} tokens")
        self.stats.rounds += 1
        self.stats.drafted += len(head.tokens)
        self.stats.accepted += n
        if n > len(self.stats.accepted_per_pos):
            self.stats.accepted_per_pos.extend([0] * (n - len(self.stats.accepted_per_pos)))
        for i in range(n):
            self.stats.accepted_per_pos[i] += 1
            src = head.sources[i]
            self.stats.accepted_by_source[src] = self.stats.accepted_by_source.get(src, 0) + 1
        if n == len(head.tokens):
            self._specs.popleft()
            before = len(self.committed)
            self.committed.extend(head.tokens)
            return self._commit(before, [] if verdict.token is None else [verdict.token])
        if verdict.token is not None:
            return self._reject(n, verdict.token)
        if verdict.sparse is None:
            raise ProtocolError("a rejection carries neither a correction nor p_j")
        self.stats.tail_mass += verdict.sparse.tail_mass
        self._awaiting_sample = n
        q_j = self._dist(head, n).numpy().astype(np.float32)
        seed = self._rng.seed_for(STREAM_SAMPLER, len(self.committed) + n)
        return SampleRequest(sparse=verdict.sparse, q=q_j, seed=seed)

    def on_correction(self, token: int) -> Committed:
        """The sampler's correction token for the pending sampled rejection."""
        if self._awaiting_sample is None:
            raise ProtocolError("no rejection is waiting for a correction")
        if not 0 <= token < self.model.vocab_size:
            raise ProtocolError(f"correction token {token} is outside the vocabulary")
        n, self._awaiting_sample = self._awaiting_sample, None
        return self._reject(n, token)

    def _reject(self, n: int, correction: int) -> Committed:
        head = self._specs.popleft()
        accepted = head.tokens[:n]
        self.stats.rollbacks += 1
        self.stats.wasted += len(head.tokens) - n + self._n_spec()
        self._specs.clear()
        before = len(self.committed)
        self.committed.extend(accepted)
        self.epoch += 1
        return self._commit(before, [correction])

    def _commit(self, before: int, extra: list[int]) -> Committed:
        """Finish a commit: ``committed[before:]`` holds the accepted tokens; ``extra`` are
        tokens the cloud or sampler decided (correction, bonus) that the verifier has not seen."""
        if extra:
            # speculation beyond an extra token is void: roll the draft cache back to history
            self.committed.extend(extra)
            self._unsent = list(extra)
            self.stats.wasted += self._n_spec()
            self._specs.clear()
            self._proposed.clear()
            keep = min(self._cache.length, len(self.committed) - 1)
            self._cache.crop(keep)
            self._pending = self.committed[keep:]
        self._check_finished(before)
        return Committed(tokens=self.committed[before:], done=self.done)

    def _check_finished(self, before: int) -> None:
        """Stop at the first EOS among the tokens committed from ``before`` on (the earlier
        ones held none, or the session would have finished), or at the token budget."""
        for i in range(before, len(self.committed)):
            if self.committed[i] in self.eos_ids:
                del self.committed[i + 1 :]
                self.finish_reason = "stop"
                return
        if len(self.generated) >= self.max_new_tokens:
            del self.committed[self.n_prompt + self.max_new_tokens :]
            self.finish_reason = "length"

    def rebase(self) -> None:
        """The session moves to another verifier, which re-prefills ``committed``: forget all
        speculation and start a new epoch (verdicts of the old replica become stale)."""
        self.stats.wasted += self._n_spec()
        self._specs.clear()
        self._proposed.clear()
        self._unsent = []
        self._awaiting_sample = None
        self.epoch += 1
        keep = min(self._cache.length, len(self.committed) - 1)
        self._cache.crop(keep)
        self._pending = self.committed[keep:]

    # --- handing the session over to the verifier -----------------------------------------
    def stop_speculating(self) -> None:
        """Draft no more (the block being drafted is dropped): the blocks in flight still get
        their verdicts, then :meth:`hand_over`."""
        self.speculating = False
        if self._specs and self._specs[-1].block is None:
            self.stats.wasted += len(self._specs.pop().tokens)
        self._proposed.clear()

    def hand_over(self) -> DraftBlock:
        """The block that hands the session to the verifier (``lead``): it feeds the committed
        tokens it has not seen and from then on decodes on its own, as in ``ar``. Only once
        speculation stopped and nothing is in flight or being sampled."""
        if self.speculating or self._specs or self._awaiting_sample is not None:
            raise ProtocolError("hand_over() needs speculation stopped and nothing in flight")
        block = DraftBlock(
            session=self.session,
            epoch=self.epoch,
            seq=self._seq,
            pos=len(self.committed) - len(self._unsent),
            prefix=tuple(self._unsent),
            tokens=(),
            q=(),
            vocab_size=self.model.vocab_size,
            lead=True,
        )
        self._seq = (self._seq + 1) % 2**32
        self._unsent = []
        return block

    def finish(self, reason: str) -> None:
        """End the session early (a stop string matched, the client went away)."""
        if not self.done:
            self.finish_reason = reason


def warm_up(model: LanguageModel) -> None:
    """Run what the first request would, before the drafter reports ready: the chat template
    and tokenizer, a prefill and a few draft steps, greedy and sampled (first-touch costs of
    torch's kernels and allocator are paid here, not by a user)."""
    prompt = model.warm_up_prompt()
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)):
        DrafterSession(model, b"\0" * 16, prompt, params, SpecConfig(), 8).draft_ready()
