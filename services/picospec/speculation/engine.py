"""One-process runner: drafter, verifier and sampler sessions wired back to back.

It is what ``picospec generate`` uses without ``--url``: the same session state machines as the
services, with every message passed through the binary codec (so byte counts are the real wire
sizes) but no network. It holds no decoding logic of its own: it only moves messages.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from picospec.protocol.codec import DraftBlock, SampleRequest, Verdict, decode_as, encode
from picospec.runtime.model import LanguageModel, check_vocabulary
from picospec.runtime.scheduler import run as run_program
from picospec.speculation.drafter import Committed, DrafterSession, DrafterStats
from picospec.speculation.proposers import Hints, Proposer
from picospec.speculation.sampler import sample
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import VerifierSession

M = TypeVar("M", DraftBlock, Verdict, SampleRequest)


@dataclass
class Wire:
    """Byte counters per link direction; every message is really encoded and decoded."""

    up: int = 0  # edge -> cloud (draft blocks)
    down: int = 0  # cloud -> edge (verdicts, ar tokens)
    edge: int = 0  # edge-local (sampler requests and replies)

    def carry(self, msg: M, direction: str) -> M:
        buf = encode(msg)
        setattr(self, direction, getattr(self, direction) + len(buf))
        return decode_as(buf, type(msg))


@dataclass
class Result:
    mode: Mode
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str
    elapsed_s: float
    wire: Wire
    speculation: DrafterStats = field(default_factory=DrafterStats)
    verifier_forwards: int = 0

    def summary(self) -> dict[str, Any]:
        n = len(self.tokens)
        return {
            "mode": self.mode.value,
            "prompt_tokens": self.prompt_tokens,
            "tokens": n,
            "finish_reason": self.finish_reason,
            **self.speculation.report(),
            "verifier_forwards": self.verifier_forwards,
            "accepted_per_pos": self.speculation.accepted_per_pos,
            "bytes_up": self.wire.up,
            "bytes_down": self.wire.down,
            "bytes_edge_local": self.wire.edge,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": n / self.elapsed_s if self.elapsed_s > 0 else None,
        }


def _cloud_only(
    verifier: VerifierSession,
    max_new_tokens: int,
    eos: Collection[int],
    stop: Callable[[list[int]], bool] | None,
    wire: Wire,
) -> tuple[list[int], str]:
    """The target decoding alone (``ar``), a token id streamed to the edge per step: the
    tokens and why they ended."""
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        tokens.append(verifier.ar_step())
        wire.down += 4
        if tokens[-1] in eos or (stop and stop(tokens)):
            return tokens, "stop"
    return tokens, "length"


def generate(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt: list[int],
    params: SamplingParams,
    spec: SpecConfig,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None = None,
    proposer: Proposer | None = None,
) -> Result:
    """Generate up to ``max_new_tokens`` after ``prompt``; ``stop(generated)`` may end it early.
    ``proposer``: a model-free draft ahead of ``draft``'s (:mod:`picospec.speculation.proposers`).
    """
    session = os.urandom(16)
    eos = target.eos_ids
    wire = Wire()
    t0 = time.perf_counter()
    if spec.mode is Mode.EDGE:  # the draft model decoding alone, through the same machinery
        if draft is None:
            raise ValueError("mode edge needs a draft model")
        target = draft
    verifier = VerifierSession(target, session, prompt, params, spec)
    if spec.cloud_led:
        if proposer is None:
            raise ValueError("a cloud-led session drafts with a proposer")
        return _cloud_led(verifier, proposer, prompt, spec, max_new_tokens, stop, wire, t0)
    if not spec.mode.speculative:
        tokens, reason = _cloud_only(verifier, max_new_tokens, eos, stop, wire)
        return Result(
            spec.mode,
            len(prompt),
            tokens,
            reason,
            time.perf_counter() - t0,
            wire,
            verifier_forwards=verifier.stats.forwards,
        )
    if draft is None:
        raise ValueError(f"mode {spec.mode.value} needs a draft model")
    check_vocabulary(draft, target)
    drafter = DrafterSession(draft, session, prompt, params, spec, max_new_tokens, eos, proposer)
    # the first token comes from the verifier's prefill (the open reply carries it)
    first, _ = drafter.accept_first(verifier.first_token())
    wire.down += 4
    if stop and not first.done and stop(drafter.generated):
        drafter.finish("stop")
    to_cloud: deque[DraftBlock] = deque()
    while not drafter.done:
        to_cloud.extend(wire.carry(block, "up") for block in drafter.draft_ready())
        if not to_cloud:
            raise RuntimeError("drafter stalled with nothing in flight")  # a bug, never input
        for verdict in verifier.submit(to_cloud.popleft()):
            got = drafter.on_verdict(wire.carry(verdict, "down"))
            if isinstance(got, SampleRequest):
                reply = sample(wire.carry(got, "edge"))
                wire.edge += len(encode(reply))
                got = drafter.on_correction(reply.token)
            if isinstance(got, Committed) and not got.done and stop and stop(drafter.generated):
                drafter.finish("stop")
            if drafter.done:
                break
    return Result(
        spec.mode,
        len(prompt),
        drafter.generated,
        drafter.finish_reason or "length",
        time.perf_counter() - t0,
        wire,
        speculation=drafter.stats,
        verifier_forwards=verifier.stats.forwards,
    )


def _cloud_led(
    verifier: VerifierSession,
    proposer: Proposer,
    prompt: list[int],
    spec: SpecConfig,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None,
    wire: Wire,
    t0: float,
) -> Result:
    """A cloud-led session (a draft with no model): the verifier decodes as in ``ar``; after
    every token the edge's :class:`Hints` may send a block of proposed tokens, which the
    verifier verifies at its next step."""
    stats = DrafterStats()
    hints = Hints(proposer, stats)
    tokens: list[int] = []
    vocab = verifier.model.vocab_size

    def on_token(emitted: tuple[int, bool]) -> None:
        token, hinted = emitted
        wire.down += 4
        tokens.append(token)
        if stop and stop(tokens):
            raise _Stopped
        run = hints.on_token(prompt + tokens, len(prompt), hinted)
        if run:
            block = DraftBlock(
                session=verifier.session, epoch=0, seq=0, pos=len(prompt) + len(tokens),
                prefix=(), tokens=tuple(run), q=(1.0,) * len(run), vocab_size=vocab,
            )  # fmt: skip
            verifier.hint = wire.carry(block, "up")

    reason = "length"
    try:
        run_program(verifier.led_stream(max_new_tokens, verifier.model.eos_ids), on_token)
    except _Stopped:
        reason = "stop"
    if tokens and tokens[-1] in verifier.model.eos_ids:
        reason = "stop"
    return Result(
        spec.mode, len(prompt), tokens, reason, time.perf_counter() - t0, wire,
        speculation=stats, verifier_forwards=verifier.stats.forwards,
    )  # fmt: skip


class _Stopped(Exception):
    """``stop`` ended a cloud-led session."""
