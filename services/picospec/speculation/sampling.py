"""Sampling maths: logits processing, standard and separate rejection sampling, correction draws.

Pure functions over torch tensors; no transport, no models. Every rule that decides which token
comes out lives here, so the drafter, verifier and sampler (and the one-process engine) cannot
disagree.

Notation: ``p`` is the target (verifier) distribution, ``q`` the draft distribution, both *after*
the same processing (temperature, top-k, top-p, min-p) by :func:`probs_from_logits`.

* **Standard rejection sampling** (:func:`standard_verify`, the ``vanilla`` baseline): the cloud
  holds full ``p`` and ``q``; accept ``x`` with ``min(1, p(x)/q(x))``; on the first rejection draw
  from the residual ``norm(max(0, p - q))``; when every draft is accepted, draw a bonus token from
  the next ``p``.
* **Separate rejection sampling** (the PicoSpec path), split in two halves:

  - :func:`verify_separate` runs at the verifier with ``p`` and only the scalars ``q(x)`` of the
    drafted tokens. It returns the accepted count and, at the first rejection ``j``, either the
    greedy correction id or ``p_j`` compressed to its top-K entries.
  - :func:`sample_correction` runs at the sampler (edge) with the compressed ``p_j`` and the full
    ``q_j`` and draws the correction token from the residual.

Tail mass (the part of ``p_j`` outside the top-K) — how it is treated:
    The sampler computes the residual over the K transmitted ids only and drops the tail.
    When ``p_j``'s support fits in K entries (top-k/top-p/min-p already cut it, or K = vocab)
    the tail is exactly 0 and the output distribution equals the target's exactly. Otherwise the
    total-variation distance of that position's output distribution from the target is at most
    ``sum_tail max(0, p - q) <= tail_mass`` (see :func:`correction_distribution`), and the tail mass
    travels with every compressed ``p_j`` so it is counted per rejection (a metric) and measured
    by ``picospec tvd``. If no residual is left on the top-K ids (all the residual lies in the
    tail), the tail mass is spread uniformly over the non-transmitted ids and the residual taken
    against ``q`` there; if that is empty too, the renormalised top-K ``p`` is used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from picospec.protocol.codec import SparseDist, ValueCodec, sparse_from_probs

# Temperatures below this are greedy, as in vLLM: dividing logits by a smaller one overflows
# float32 (a temperature of 1e-173 would turn every score into inf and the softmax into NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    """How tokens are chosen. A temperature below :data:`GREEDY_BELOW_TEMPERATURE` (0 included)
    means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2**63)
    ban_ids: tuple[int, ...] = Field(
        (), max_length=64, description="token ids that cannot be chosen before ban_before"
    )
    ban_before: int = Field(
        0,
        ge=0,
        description="absolute position (prompt included) from which ban_ids may be chosen: "
        "the API's min_tokens bans the end-of-sequence ids before prompt + min_tokens",
    )

    @model_validator(mode="after")
    def _finite(self) -> SamplingParams:
        if not all(np.isfinite([self.temperature, self.top_p, self.min_p])):
            raise ValueError("sampling parameters must be finite")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


# Random streams: each use of randomness draws from its own stream, keyed by the absolute
# position of the token it decides.
STREAM_DRAFT, STREAM_ACCEPT, STREAM_DRAW, STREAM_SAMPLER = 1, 2, 3, 4


@dataclass(frozen=True)
class Rng:
    """Position-indexed randomness of one session.

    Every random number is a pure function of ``(seed, stream, position)``. The committed token
    at position ``i`` depends only on the numbers at ``i`` and the committed prefix, which never
    depends on them, so speculative sampling stays exactly lossless; and because nothing depends
    on how many tokens were drafted ahead or when verdicts arrived, a seeded request gives the
    same output through the asynchronous services as in one process.
    """

    seed: int

    def seed_for(self, stream: int, pos: int) -> int:
        key = f"{self.seed}:{stream}:{pos}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) >> 1

    def gen(self, stream: int, pos: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed_for(stream, pos))
        return g

    def uniform(self, stream: int, pos: int) -> float:
        return float(torch.rand((), generator=self.gen(stream, pos), dtype=torch.float64))


def probs_from_logits(
    logits: torch.Tensor, params: SamplingParams, pos: int | None = None
) -> torch.Tensor:
    """Turn logits ``[..., V]`` into processed probabilities (float32), identically for p and q.

    ``pos`` is the absolute position of the token the first row decides (the rows of a 2-D
    ``logits`` decide consecutive positions); it is needed, and only used, when the params ban
    ids before a position (``ban_ids``/``ban_before``): those ids get probability 0 there, in
    p and q alike, so speculation stays exact for the banned distribution.
    """
    logits = logits.float()
    if params.ban_ids and (pos is None or pos < params.ban_before):
        if pos is None:
            raise ValueError("these sampling params ban ids before a position: pass pos")
        rows = logits.shape[0] if logits.dim() > 1 else 1
        banned = min(rows, params.ban_before - pos)  # the first rows lie before ban_before
        ids = torch.tensor(params.ban_ids, dtype=torch.long, device=logits.device)
        logits = logits.clone()
        if logits.dim() == 1:
            logits[ids] = float("-inf")
        else:
            logits[:banned, ids] = float("-inf")
    if params.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return out
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p; the most likely
        # token always stays (a top_p that rounds to 0 in float32 would otherwise drop them all)
        drop_sorted = (cum - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        cutoff = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < cutoff, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a 1-D probability vector (drawn on the CPU, where the position-keyed
    generators live, so a draw is the same whichever device computed ``probs``)."""
    return int(torch.multinomial(probs.detach().to("cpu", torch.float64), 1, generator=gen).item())


def sparse_top_k(p: torch.Tensor, k: int, value_codec: ValueCodec = ValueCodec.F32) -> SparseDist:
    """:func:`~picospec.protocol.codec.sparse_from_probs`, selected where ``p`` lives.

    The top-``k`` non-zero entries are chosen on ``p``'s device (a stable descending sort:
    ties keep the smaller ids, the order is decreasing probability then increasing id, as
    ``sparse_from_probs`` orders them) and only those ``k`` ids and values leave it; the tail
    mass is summed on the host from the same float64 values in the same order, so the result
    is identical to ``sparse_from_probs(p, k)`` on any device.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if p.dim() != 1 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty 1-D vector, got shape {tuple(p.shape)}")
    values, ids = torch.sort(p.detach(), descending=True, stable=True)
    nnz, largest, smallest = torch.stack(
        [(values > 0).sum().double(), values[0].double(), values[-1].double()]
    ).tolist()  # NaN sorts first, -inf/negatives last
    if not (np.isfinite(largest) and np.isfinite(smallest)) or smallest < 0.0:
        raise ValueError("probs must be finite and >= 0")
    n = min(k, int(nnz))
    head = torch.stack([values[:n].double(), ids[:n].double()]).cpu().numpy()
    kept, keep = head[0], head[1].astype(np.int64)
    tail = min(1.0, max(0.0, 1.0 - float(kept.sum())))
    return SparseDist(
        vocab_size=int(p.shape[0]),
        ids=keep,
        probs=kept.astype(np.float32),
        tail_mass=tail,
        value_codec=ValueCodec(value_codec),
    )


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``; falls back to ``p`` in the degenerate case ``p <= q`` everywhere."""
    r = (p.double() - q.double()).clamp_min(0.0)
    total = r.sum()
    if total <= 0:
        return p.double() / p.double().sum()
    return r / total


def pick(probs: torch.Tensor, params: SamplingParams, rng: Rng, stream: int, pos: int) -> int:
    """The token at ``pos`` from processed probabilities: argmax when greedy, else a draw."""
    if params.greedy:
        return int(probs.argmax().item())
    return draw(probs, rng.gen(stream, pos))


@dataclass(frozen=True)
class Outcome:
    """The verifier's decision on one block of draft tokens."""

    accepted: int
    rejected: bool = False
    token: int | None = None  # greedy correction, or a token the cloud sampled (vanilla / bonus)
    sparse: SparseDist | None = None  # compressed p_j at a sampled rejection


def standard_verify(
    p: torch.Tensor,
    q: torch.Tensor,
    tokens: list[int],
    params: SamplingParams,
    rng: Rng,
    pos: int,
    bonus_p: torch.Tensor | None = None,
) -> Outcome:
    """Standard speculative sampling with full ``p [n, V]`` and ``q [n, V]`` (the vanilla path).

    ``tokens[i]`` sits at absolute position ``pos + i``. Returns the accepted count and the
    correction token (drawn from the residual) at the first rejection, or a bonus token drawn
    from ``bonus_p`` when all are accepted and it is given.
    """
    for i, x in enumerate(tokens):
        px, qx = float(p[i, x]), float(q[i, x])
        if params.greedy:
            ok = px > 0.5
        else:
            ok = qx > 0 and rng.uniform(STREAM_ACCEPT, pos + i) < min(1.0, px / qx)
        if not ok:
            if params.greedy:
                token = int(p[i].argmax().item())
            else:
                token = draw(residual(p[i], q[i]), rng.gen(STREAM_DRAW, pos + i))
            return Outcome(accepted=i, token=token, rejected=True)
    n = len(tokens)
    token = None if bonus_p is None else pick(bonus_p, params, rng, STREAM_DRAW, pos + n)
    return Outcome(accepted=n, token=token)


def verify_separate(
    p: torch.Tensor,
    tokens: list[int],
    q_x: list[float],
    params: SamplingParams,
    rng: Rng,
    pos: int,
    top_k: int,
    value_codec: ValueCodec = ValueCodec.F32,
    bonus_p: torch.Tensor | None = None,
) -> Outcome:
    """The verifier's half of separate rejection sampling.

    ``p [n, V]`` are the target distributions at the drafted positions ``pos, pos+1, …``, ``q_x``
    the draft probabilities of the drafted tokens (scalars). At the first rejection ``j`` a
    greedy run returns ``argmax p_j``; a sampled run returns ``p_j`` compressed to its ``top_k``
    largest entries for the sampler. ``bonus_p`` (synchronous modes) yields a bonus token when
    all pass.

    ``p`` stays on its device: what leaves it is ``p(x)`` of the drafted tokens (one transfer
    of ``n`` values), and at a rejection the argmax or the top-K entries (:func:`sparse_top_k`).
    """
    rows = torch.arange(len(tokens), device=p.device)
    ids = torch.tensor(tokens, dtype=torch.long, device=p.device)
    p_x = p[rows, ids].tolist() if tokens else []
    for i, px in enumerate(p_x):
        if params.greedy:
            if px > 0.5:
                continue
            return Outcome(accepted=i, token=int(p[i].argmax().item()), rejected=True)
        if rng.uniform(STREAM_ACCEPT, pos + i) < min(1.0, px / q_x[i]):
            continue
        sparse = sparse_top_k(p[i], top_k, value_codec)
        return Outcome(accepted=i, sparse=sparse, rejected=True)
    n = len(tokens)
    token = None if bonus_p is None else pick(bonus_p, params, rng, STREAM_DRAW, pos + n)
    return Outcome(accepted=n, token=token)


def correction_distribution(sparse: SparseDist, q: torch.Tensor) -> torch.Tensor:
    """The distribution the sampler draws the correction from, given compressed ``p_j`` and ``q_j``.

    Exactly ``norm(max(0, p_j - q_j))`` when the sparse ``p_j`` holds all of ``p_j``'s support;
    otherwise the tail treatment documented in this module's docstring.
    """
    vocab = q.shape[-1]
    if sparse.vocab_size != vocab:
        raise ValueError(f"compressed p has vocabulary {sparse.vocab_size}, q has {vocab}")
    q64 = q.double()
    ids = torch.tensor(np.asarray(sparse.ids), dtype=torch.int64)
    p_top = torch.tensor(np.asarray(sparse.probs), dtype=torch.float64)
    out = torch.zeros(vocab, dtype=torch.float64)
    r = (p_top - q64[ids]).clamp_min(0.0)
    if r.sum() > 0:
        out[ids] = r
        return out / out.sum()
    n_tail = vocab - len(ids)
    if sparse.tail_mass > 0 and n_tail > 0:
        tail = torch.full((vocab,), sparse.tail_mass / n_tail, dtype=torch.float64)
        tail[ids] = 0.0
        r_tail = (tail - q64).clamp_min(0.0)
        r_tail[ids] = 0.0
        if r_tail.sum() > 0:
            return r_tail / r_tail.sum()
    if p_top.sum() <= 0:
        raise ValueError("compressed p carries no probability mass")
    out[ids] = p_top
    return out / out.sum()


def sample_correction(sparse: SparseDist, q: torch.Tensor, gen: torch.Generator) -> int:
    """The sampler's half: the correction token from compressed ``p_j`` and full ``q_j``."""
    return draw(correction_distribution(sparse, q), gen)


def output_distribution(
    p: torch.Tensor, q: torch.Tensor, top_k: int, value_codec: ValueCodec = ValueCodec.F32
) -> torch.Tensor:
    """Exact distribution of one token produced by separate rejection sampling with top-K ``p``.

    ``P(y) = min(p, q)(y) + (1 - sum min(p, q)) * c(y)`` with ``c`` the sampler's correction
    distribution. Equals ``p`` when lossless; used to measure the loss of truncated settings.
    """
    p64, q64 = p.double(), q.double()
    accept = torch.minimum(p64, q64)
    reject_mass = 1.0 - float(accept.sum())
    if reject_mass <= 1e-15:
        return accept
    c = correction_distribution(sparse_from_probs(p, top_k, value_codec), q)
    return accept + reject_mass * c


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())
