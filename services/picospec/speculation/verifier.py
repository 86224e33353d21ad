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

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from picospec.protocol.codec import DraftBlock, Verdict, VerdictStatus
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import Emit, Forward, Program, run, run_batched
from picospec.speculation.sampling import (
    STREAM_DRAW,
    Rng,
    SamplingParams,
    pick,
    probs_from_logits,
    standard_verify,
    verify_separate,
)
from picospec.speculation.spec import Mode, SpecConfig

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
        capacity: int | None = None,
        prefill: bool = True,
    ) -> None:
        """``capacity``: the tokens the session is expected to reach (prompt, answer and a
        block beyond), reserved at once where the model keeps slot caches. ``prefill=False``
        leaves the prompt's prefill to :meth:`prefill`, a program for the model thread's
        scheduler (:mod:`picospec.runtime.scheduler`)."""
        if not prompt:
            raise ValueError("a session needs a non-empty prompt")
        if len(prompt) >= model.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds context {model.max_context}")
        self.model = model
        self.session = session
        self.params = params
        self.spec = spec
        self.epoch = epoch  # a re-opened session continues the drafter's epoch count
        self.cache = model.new_cache(capacity)
        if hasattr(self.cache, "use_sampling"):  # vLLM's: rows as wide as the sampling needs
            self.cache.use_sampling(params)
        self.stats = VerifierStats()
        self._prompt = list(prompt)
        self._rng = Rng(params.seed)
        self._waiting: dict[int, DraftBlock] = {}
        self._ar_pending: int | None = None
        self.hint: DraftBlock | None = None  # cloud-led: the edge's latest proposed tokens
        self.led = spec.cloud_led  # the verifier decodes on its own (from the open, or a lead)
        self.hinted = spec.cloud_led  # ... taking the edge's hints (a lead block sends none)
        self.next_logits = torch.empty(0)
        if prefill:
            run(self.prefill())

    def prefill(self) -> Program[None]:
        """Feed the prompt; ``next_logits`` becomes the first position's distribution (kept on
        the model's device: the verdicts are decided there, see
        :mod:`picospec.speculation.sampling`)."""
        if self.cache.length:
            raise ValueError("the session is already prefilled")
        logits = yield Forward(self.cache, self._prompt, keep=1, on_device=True)
        assert logits is not None
        self.next_logits = logits[-1]
        self.stats.forwards += 1

    def first_token(self) -> int:
        """The target's token at the first position after the prompt, from the prefill alone.

        Chosen exactly as cloud-only decoding chooses it (argmax when greedy, else a draw keyed
        by the seed and the position), so it is the target's own output, and the same token
        ``ar`` would give. The drafter commits it at once and sends it as the first block's
        prefix, like a correction token; nothing here changes, so the prefix mechanism keeps
        the order and epoch rules as they are.
        """
        if self.stats.verified_tokens or self._ar_pending is not None:
            raise ValueError("the first token comes before any block is verified")
        probs = probs_from_logits(self.next_logits, self.params, self.cache.length)
        return pick(probs, self.params, self._rng, STREAM_DRAW, self.cache.length)

    # --- speculative modes ------------------------------------------------------------
    def submit(self, block: DraftBlock) -> list[Verdict]:
        """Take one block; return the verdicts it made ready (zero, one, or several when it
        unblocked buffered ones). Raises :class:`BlockRefused` for blocks it must not take."""
        return run(self.verify(block))

    def verify(self, block: DraftBlock) -> Program[list[Verdict]]:
        """:meth:`submit` as a program (:mod:`picospec.runtime.scheduler`): yields the forward of
        each block it makes ready and returns the verdicts. Raises :class:`BlockRefused` before
        touching any state. Lets the model thread share one forward among the blocks of
        several sessions (and their ``ar`` steps and prefills)."""
        if not self._admit(block):
            return []
        if block.lead:  # handed over: feed what the edge committed, then lead from there
            if block.prefix:
                logits = yield Forward(self.cache, list(block.prefix), keep=1, on_device=True)
                assert logits is not None
                self.next_logits = logits[-1]
                self.stats.forwards += 1
            self.led = True
            self._waiting.clear()
            return []
        verdicts = []
        ready: DraftBlock | None = block
        while ready is not None:
            tokens = self.plan(ready)
            logits = None
            if tokens:
                logits = yield Forward(self.cache, tokens, self.rows(ready), on_device=True)
            verdicts.append(self.finish(ready, logits))
            ready = self._next_waiting()
        # anything still waiting from an old epoch can never become current
        self._waiting = {k: b for k, b in self._waiting.items() if b.epoch == self.epoch}
        return verdicts

    def _admit(self, block: DraftBlock) -> bool:
        """Order, epoch and buffer checks. True: the block is next and must be verified now;
        False: it was dropped (stale epoch) or buffered (early). Raises :class:`BlockRefused`."""
        if block.session != self.session:
            raise BlockRefused("wrong_session", "block belongs to another session")
        if block.vocab_size != self.model.vocab_size:
            raise BlockRefused(
                "vocab_mismatch",
                f"block vocabulary {block.vocab_size} != model {self.model.vocab_size}",
            )
        if block.epoch < self.epoch:
            self.stats.dropped_stale += 1
            return False
        if block.epoch > self.epoch:
            raise BlockRefused("future_epoch", f"epoch {block.epoch} > current {self.epoch}")
        if block.pos < self.cache.length:
            raise BlockRefused(
                "replayed", f"block at {block.pos} is behind verified length {self.cache.length}"
            )
        if block.pos + len(block.prefix) + len(block.tokens) >= self.model.max_context:
            raise BlockRefused("context", "block runs past the model's context")
        if self.spec.mode is Mode.VANILLA and block.dense_q is None and not block.lead:
            raise BlockRefused("missing_dense_q", "vanilla blocks carry full draft dists")
        if block.pos > self.cache.length:
            if len(self._waiting) >= MAX_BUFFERED_BLOCKS or block.pos in self._waiting:
                raise BlockRefused("buffer_full", "too many out-of-order blocks")
            self._waiting[block.pos] = block
            return False
        return True

    def _next_waiting(self) -> DraftBlock | None:
        """The buffered block that starts where the verified tokens end, if one of the current
        epoch waits there."""
        while self.cache.length in self._waiting:
            nxt = self._waiting.pop(self.cache.length)
            if nxt.epoch == self.epoch:
                return nxt
        return None

    def plan(self, block: DraftBlock) -> list[int]:
        """The tokens to feed the target for ``block`` (which must start at ``cache.length``,
        as :meth:`submit` ensures): its prefix then its draft tokens."""
        return list(block.prefix) + list(block.tokens)

    @staticmethod
    def rows(block: DraftBlock) -> int:
        """How many last rows of :meth:`plan`'s forward :meth:`finish` reads: one per draft
        token, plus the last prefix token's row (the first draft token's distribution) when
        there is a prefix; a re-prefill's history needs no logits."""
        return len(block.tokens) + (1 if block.prefix else 0)

    def finish(self, block: DraftBlock, logits: torch.Tensor | None) -> Verdict:
        """Decide ``block`` from ``logits``, the last :meth:`rows` rows (or more) of feeding
        :meth:`plan`'s tokens (None when there were none) to this session's cache, which must
        already hold them: the acceptance test, then on a rejection the crop and the next
        epoch."""
        n_pre, n = len(block.prefix), len(block.tokens)
        start = self.cache.length - (0 if logits is None else n_pre + n)
        if logits is not None:
            self.stats.forwards += 1
            if len(logits) < self.rows(block):
                raise ValueError(f"finish() needs the last {self.rows(block)} rows")
            # predict[i] is the distribution of draft token i (the first from the previous
            # forward's last position, or the last prefix token's row); predict[n] the next
            if n_pre:
                predict = logits[len(logits) - n - 1 :]
            else:
                predict = torch.cat([self.next_logits[None], logits[len(logits) - n :]])
            last = predict[n]
            predict = predict[:n]
        else:
            predict, last = self.next_logits[None], self.next_logits
        p = probs_from_logits(predict, self.params, start + n_pre)
        bonus_p = (
            probs_from_logits(last, self.params, start + n_pre + n) if self.spec.bonus else None
        )
        if self.spec.mode is Mode.VANILLA:
            if block.dense_q is None:
                raise BlockRefused("missing_dense_q", "vanilla blocks carry full draft dists")
            q = torch.tensor(block.dense_q, dtype=torch.float32, device=p.device)
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
            self.next_logits = predict[j]
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
        return run(self.ar_next())

    def ar_next(self) -> Program[int]:
        """:meth:`ar_step` as a program: the forward of the last token, then the pick."""
        if self._ar_pending is not None:
            logits = yield Forward(self.cache, [self._ar_pending], keep=1, on_device=True)
            assert logits is not None
            self.next_logits = logits[-1]
            self.stats.forwards += 1
        probs = probs_from_logits(self.next_logits, self.params, self.cache.length)
        token = pick(probs, self.params, self._rng, STREAM_DRAW, self.cache.length)
        self._ar_pending = token
        return token

    def ar_stream(self, max_tokens: int, eos: Collection[int]) -> Program[int]:
        """Cloud-only decoding as one program: emits each token as it is picked, up to
        ``max_tokens`` or an EOS; returns how many it emitted."""
        for i in range(max_tokens):
            token = yield from self.ar_next()
            yield Emit(token)
            if token in eos:
                return i + 1
        return max_tokens

    # --- cloud-led: ar with the edge's hints ----------------------------------------------
    def led_stream(self, max_tokens: int, eos: Collection[int]) -> Program[int]:
        """Cloud-led decoding, for a session whose edge drafts without a model (suffix
        matches): the target decodes on its own as in ``ar``; wherever the edge's latest hint
        (:attr:`hint`, a block of proposed tokens) covers the next positions, one forward
        verifies them all. Every token is picked exactly as ``ar`` picks it (the argmax, or the
        draw keyed by seed and position) and a hinted token is taken only where it is that
        token. With a point-mass draft that is rejection sampling (accept ``x`` with ``p(x)``,
        else a draw from ``p`` without ``x``), and the output is ``ar``'s token for token,
        greedy or sampled. Emits ``(token, hinted)``; returns how many it emitted."""
        start = self.cache.length + (1 if self._ar_pending is not None else 0)
        out: list[int] = []
        while len(out) < max_tokens:
            nxt = start + len(out)
            tokens = self._hinted(nxt, out, start, max_tokens - len(out))
            if not tokens or self._ar_pending is None:
                token = yield from self.ar_next()
                out.append(token)
                yield Emit((token, False))
                if token in eos:
                    break
                continue
            fed = self.cache.length
            logits = yield Forward(
                self.cache, [self._ar_pending, *tokens], keep=len(tokens) + 1, on_device=True
            )
            assert logits is not None
            self.stats.forwards += 1
            self.stats.verified_tokens += len(tokens)
            for i in range(len(tokens) + 1):
                probs = probs_from_logits(logits[i], self.params, nxt + i)
                token = pick(probs, self.params, self._rng, STREAM_DRAW, nxt + i)
                hinted = i < len(tokens) and token == tokens[i]
                out.append(token)
                yield Emit((token, hinted))
                if not hinted or token in eos or len(out) >= max_tokens:
                    break
            self.cache.crop(fed + 1 + i)  # the pending token and the hinted ones taken
            self._ar_pending = token
            self.next_logits = logits[i]
            if token in eos:
                break
        return len(out)

    def _hinted(self, nxt: int, out: list[int], start: int, room: int) -> list[int]:
        """The hint's tokens for positions ``nxt`` on, where its tokens before ``nxt`` (if it
        began earlier) are the ones already decoded there; else none."""
        h = self.hint
        if h is None or h.epoch != self.epoch or not h.pos <= nxt < h.pos + len(h.tokens):
            return []
        if h.pos < start or list(h.tokens[: nxt - h.pos]) != out[h.pos - start :]:
            return []
        room = min(room, self.model.max_context - nxt - 1)
        return list(h.tokens[nxt - h.pos :][: max(0, room)])


def warm_up(model: LanguageModel) -> list[tuple[int, float]]:
    """Run what the first request would, before the verifier reports ready: a prefill, a few
    decode steps, and one batched verification of two sessions (first-touch costs of torch's
    kernels and allocator are paid here, not by a user). Returns ``(tokens, seconds)`` of the
    forwards after the first (paced like any other, under a device profile)."""
    import time

    from picospec.protocol.codec import DraftBlock

    timed: list[tuple[int, float]] = []
    prompt = model.warm_up_prompt()
    params = SamplingParams(temperature=0.0)
    ar = VerifierSession(model, b"\0" * 16, prompt, params, SpecConfig(mode=Mode.AR))
    for _ in range(4):
        t0 = time.perf_counter()
        ar.ar_step()
        if ar.stats.forwards > 1:
            timed.append((1, time.perf_counter() - t0))
    sessions = [
        VerifierSession(model, bytes([i]) * 16, prompt[: len(prompt) - i], params, SpecConfig())
        for i in range(2)
    ]
    blocks = [
        DraftBlock(
            session=vs.session,
            epoch=0,
            seq=0,
            pos=vs.cache.length,
            prefix=(),
            tokens=tuple(prompt[:4]),
            q=(1.0,) * len(prompt[:4]),
            vocab_size=model.vocab_size,
        )
        for vs in sessions
    ]
    t0 = time.perf_counter()
    verify_many(list(zip(sessions, blocks, strict=True)))
    timed.append((sum(len(b.tokens) for b in blocks), time.perf_counter() - t0))
    return timed


def verify_many(
    items: list[tuple[VerifierSession, DraftBlock]],
    on_forward: Callable[[int], None] | None = None,
) -> list[list[Verdict] | BlockRefused]:
    """Submit many blocks of many sessions, sharing the target's forwards among the sessions.

    The result for ``items[i]`` is what ``session.submit(block)`` would return (its verdicts),
    or the :class:`BlockRefused` it would raise: refusals are reported per item, never raised.
    The blocks of one session are taken in their order in ``items``, one forward at a time (a
    later block depends on the earlier one's outcome). In each round every session with a
    block ready contributes it to ONE :meth:`LanguageModel.forward_batch` per model (the
    scheduler's :func:`~picospec.runtime.scheduler.run_batched`), so the verdicts are those of
    submitting session by session (with logits equal to float tolerance). ``on_forward(n)`` is
    called with the number of sessions of every forward run (1 each where the model cannot
    batch, see :attr:`LanguageModel.batching_unsupported`).
    """
    jobs = run_batched([(id(vs), vs.verify(block)) for vs, block in items], on_batch=on_forward)
    out: list[list[Verdict] | BlockRefused] = []
    for job in jobs:
        if isinstance(job.error, BlockRefused):
            out.append(job.error)
        elif job.error is not None:
            raise job.error
        else:
            out.append(job.result)
    return out
