"""The verifier's session state machine: transport-free, one per session and replica.

It owns the target model's KV cache of the session. Invariants:

* ``cache.length`` tokens are verified; ``next_logits`` is the target's distribution for the
  token after them (the "previous block's last position").
* Blocks are processed strictly in position order: a block must start at ``cache.length``.
  Blocks that arrive early wait in a small buffer; blocks of a stale epoch are dropped; a block
  that starts before ``cache.length`` (a replay or duplicate) is refused. No token is verified
  twice or skipped.
* A block carries ``prefix`` tokens (committed at the edge but unseen here: the correction or
  bonus token, or the whole history on re-prefill) ahead of its draft ``tokens``.
* On the first rejection the cache is cropped to the accepted tokens and the epoch advances;
  the drafter starts the new epoch with the correction token as the next block's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from picospec.config import Mode, SpecConfig
from picospec.models import LanguageModel
from picospec.protocol.codec import DraftBlock, Verdict, VerdictStatus
from picospec.sampling import (
    STREAM_DRAW,
    Rng,
    SamplingParams,
    pick,
    probs_from_logits,
    standard_verify,
    verify_separate,
)

MAX_BUFFERED_BLOCKS = 64


class BlockRefused(ValueError):
    """A block this session cannot take; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class VerifierStats:
    forwards: int = 0
    verified_tokens: int = 0
    dropped_stale: int = 0


class VerifierSession:
    def __init__(
        self,
        model: LanguageModel,
        session: bytes,
        prompt: list[int],
        params: SamplingParams,
        spec: SpecConfig,
        epoch: int = 0,
    ) -> None:
        if not prompt:
            raise ValueError("a session needs a non-empty prompt")
        if len(prompt) >= model.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds context {model.max_context}")
        self.model = model
        self.session = session
        self.params = params
        self.spec = spec
        self.epoch = epoch  # a re-opened session continues the drafter's epoch count
        self.cache = model.new_cache()
        self.next_logits = self.cache.extend(prompt)[-1]
        self.stats = VerifierStats(forwards=1)
        self._rng = Rng(params.seed)
        self._waiting: dict[int, DraftBlock] = {}
        self._ar_pending: int | None = None

    # --- speculative modes ------------------------------------------------------------
    def submit(self, block: DraftBlock) -> list[Verdict]:
        """Take one block; return the verdicts it made ready (zero, one, or several when it
        unblocked buffered ones). Raises :class:`BlockRefused` for blocks it must not take."""
        if block.session != self.session:
            raise BlockRefused("wrong_session", "block belongs to another session")
        if block.vocab_size != self.model.vocab_size:
            raise BlockRefused(
                "vocab_mismatch",
                f"block vocabulary {block.vocab_size} != model {self.model.vocab_size}",
            )
        if block.epoch < self.epoch:
            self.stats.dropped_stale += 1
            return []
        if block.epoch > self.epoch:
            raise BlockRefused("future_epoch", f"epoch {block.epoch} > current {self.epoch}")
        if block.pos < self.cache.length:
            raise BlockRefused(
                "replayed", f"block at {block.pos} is behind verified length {self.cache.length}"
            )
        if block.pos + len(block.prefix) + len(block.tokens) >= self.model.max_context:
            raise BlockRefused("context", "block runs past the model's context")
        if block.pos > self.cache.length:
            if len(self._waiting) >= MAX_BUFFERED_BLOCKS or block.pos in self._waiting:
                raise BlockRefused("buffer_full", "too many out-of-order blocks")
            self._waiting[block.pos] = block
            return []
        verdicts = [self._verify(block)]
        while self.cache.length in self._waiting:
            nxt = self._waiting.pop(self.cache.length)
            if nxt.epoch == self.epoch:
                verdicts.append(self._verify(nxt))
        # anything still waiting from an old epoch can never become current
        self._waiting = {k: b for k, b in self._waiting.items() if b.epoch == self.epoch}
        return verdicts

    def _verify(self, block: DraftBlock) -> Verdict:
        inputs = list(block.prefix) + list(block.tokens)
        start = self.cache.length
        n_pre, n = len(block.prefix), len(block.tokens)
        if inputs:
            out = self.cache.extend(inputs)
            self.stats.forwards += 1
            # row i predicts input i: the first from the previous forward's last position
            predict = torch.cat([self.next_logits[None], out[:-1]])
            last = out[-1]
        else:
            predict, last = self.next_logits[None], self.next_logits
        p = probs_from_logits(predict[n_pre : n_pre + n], self.params)
        bonus_p = probs_from_logits(last, self.params) if self.spec.bonus else None
        if self.spec.mode is Mode.VANILLA:
            if block.dense_q is None:
                raise BlockRefused("missing_dense_q", "vanilla blocks carry full draft dists")
            q = torch.tensor(block.dense_q, dtype=torch.float32)
            outcome = standard_verify(
                p, q, list(block.tokens), self.params, self._rng, start + n_pre, bonus_p
            )
        else:
            outcome = verify_separate(
                p,
                list(block.tokens),
                list(block.q),
                self.params,
                self._rng,
                start + n_pre,
                self.spec.top_k,
                self.spec.value_codec,
                bonus_p,
            )
        self.stats.verified_tokens += n
        epoch = self.epoch
        if outcome.rejected:
            j = outcome.accepted
            self.cache.crop(start + n_pre + j)
            self.next_logits = predict[n_pre + j]
            self.epoch += 1
        else:
            self.next_logits = last
        return Verdict(
            session=self.session,
            epoch=epoch,
            seq=block.seq,
            status=VerdictStatus.OK,
            accepted=outcome.accepted,
            token=outcome.token,
            sparse=outcome.sparse,
            vocab_size=self.model.vocab_size,
        )

    # --- cloud-only autoregressive mode ------------------------------------------------
    def ar_step(self) -> int:
        """Decode one token with the target alone (the ``ar`` baseline)."""
        if self._ar_pending is not None:
            self.next_logits = self.cache.extend([self._ar_pending])[-1]
            self.stats.forwards += 1
        probs = probs_from_logits(self.next_logits, self.params)
        token = pick(probs, self.params, self._rng, STREAM_DRAW, self.cache.length)
        self._ar_pending = token
        return token
