"""The size table: representative messages, encoded, with their sizes in bytes.

:func:`message_size_table` is quoted in the :mod:`picospec.protocol.codec` docstring and in
docs/architecture.md; the tests check both quotes and the layout arithmetic against it.
"""

from __future__ import annotations

import numpy as np

from picospec.protocol.binary import encoded_size
from picospec.protocol.layout import SESSION_BYTES, ValueCodec
from picospec.protocol.schemas import (
    DraftBlock,
    Message,
    SampleReply,
    SampleRequest,
    SparseDist,
    Verdict,
    sparse_from_probs,
)


def _example_distribution(vocab_size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(vocab_size) * 3.0
    p = np.exp(logits - logits.max())
    return p / p.sum()


def message_size_table() -> list[tuple[str, int]]:
    """(description, bytes) rows, built by encoding representative messages."""
    session = bytes(range(SESSION_BYTES))
    v, v32 = 49152, 100000
    p = _example_distribution(v)
    p32 = _example_distribution(v32)

    def block(n: int, prefix: int = 0, vocab: int = v, dense: bool = False) -> DraftBlock:
        dense_q = np.tile(p.astype(np.float32), (n, 1)) if dense else None
        return DraftBlock(
            session=session,
            epoch=1,
            seq=7,
            pos=1000,
            prefix=tuple(range(5, 5 + prefix)),
            tokens=tuple(range(10, 10 + n)),
            q=(0.5,) * n,
            dense_q=dense_q,
            vocab_size=vocab,
        )

    def verdict(
        sparse: SparseDist | None = None, token: int | None = None, vocab: int = v
    ) -> Verdict:
        return Verdict(
            session=session,
            epoch=1,
            seq=7,
            accepted=2,
            token=token,
            sparse=sparse,
            vocab_size=vocab,
        )

    def request(codec: ValueCodec) -> SampleRequest:
        return SampleRequest(
            sparse=sparse_from_probs(p, 32, codec), q=p.astype(np.float32), seed=42
        )

    rows: list[tuple[str, Message]] = [
        ("draft_block: 4 draft tokens, no prefix, vocab 49152 (u16 ids)", block(4)),
        ("draft_block: 4 draft tokens + 1 prefix token, vocab 49152", block(4, prefix=1)),
        ("draft_block: 8 draft tokens, no prefix, vocab 49152", block(8)),
        ("draft_block: 4 draft tokens, no prefix, vocab 100000 (u32 ids)", block(4, vocab=v32)),
        ("draft_block: 4 draft tokens + dense_q (f16), vocab 49152", block(4, dense=True)),
        ("verdict: no token, no sparse", verdict()),
        ("verdict: token only (greedy correction)", verdict(token=123)),
        ("verdict: sparse K=32 f32, vocab 49152", verdict(sparse_from_probs(p, 32))),
        (
            "verdict: sparse K=32 f16, vocab 49152",
            verdict(sparse_from_probs(p, 32, ValueCodec.F16)),
        ),
        (
            "verdict: sparse K=32 u8, vocab 49152",
            verdict(sparse_from_probs(p, 32, ValueCodec.U8)),
        ),
        (
            "verdict: sparse K=32 f32, vocab 100000 (u32 ids)",
            verdict(sparse_from_probs(p32, 32), vocab=v32),
        ),
        ("sample_request: sparse K=32 f32 + q f32, vocab 49152", request(ValueCodec.F32)),
        ("sample_request: sparse K=32 f16 + q f32, vocab 49152", request(ValueCodec.F16)),
        ("sample_reply", SampleReply(token=123)),
    ]
    return [(desc, encoded_size(msg)) for desc, msg in rows]
