"""Tests for the PicoSpec binary wire codec (picospec.protocol.codec)."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from picospec.protocol import codec
from picospec.protocol.codec import (
    MAX_DRAFT_TOKENS,
    MAX_MESSAGE_BYTES,
    MAX_PREFIX_TOKENS,
    MAX_VOCAB,
    PROTOCOL_VERSION,
    CodecError,
    DraftBlock,
    Message,
    SampleReply,
    SampleRequest,
    SparseDist,
    ValueCodec,
    Verdict,
    VerdictStatus,
    decode,
    decode_as,
    encode,
    encoded_size,
    message_size_table,
    message_type_name,
    sparse_from_probs,
)

SESSION = bytes(range(16))
V16 = 49152  # u16 ids
V32 = 100000  # u32 ids

F16_REL = 2.0**-11  # f16 relative error bound for normal values
F16_ABS = 2.0**-25  # f16 absolute error bound below the normal range
F16_MIN_NORMAL = 2.0**-14
U8_REL = 2.0 ** (1 / 32) - 1
U8_ZERO = 2.0**-15.90625


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def dist(vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """A random float64 probability vector (sums to 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(vocab) * scale
    p = np.exp(logits - logits.max())
    return p / p.sum()


def block(
    n: int = 4,
    *,
    prefix: tuple[int, ...] = (),
    vocab: int = V16,
    dense: bool = False,
    seed: int = 0,
) -> DraftBlock:
    rng = np.random.default_rng(seed)
    tokens = tuple(int(t) for t in rng.integers(0, vocab, size=n))
    q = tuple(float(x) for x in rng.uniform(0.01, 1.0, size=n))
    dense_q = None
    if dense:
        dense_q = np.stack([dist(vocab, seed + i) for i in range(n)]).astype(np.float32)
    return DraftBlock(
        session=SESSION,
        epoch=3,
        seq=17,
        pos=1234,
        prefix=prefix,
        tokens=tokens,
        q=q,
        dense_q=dense_q,
        vocab_size=vocab,
    )


def verdict(
    *,
    vocab: int = V16,
    token: int | None = None,
    k: int | None = None,
    value_codec: ValueCodec = ValueCodec.F32,
    status: VerdictStatus = VerdictStatus.OK,
    accepted: int = 2,
    seed: int = 0,
) -> Verdict:
    sparse = None if k is None else sparse_from_probs(dist(vocab, seed), k, value_codec)
    return Verdict(
        session=SESSION,
        epoch=3,
        seq=17,
        status=status,
        accepted=accepted,
        token=token,
        sparse=sparse,
        vocab_size=vocab,
    )


def request(
    *, vocab: int = V16, k: int = 32, value_codec: ValueCodec = ValueCodec.F32, seed: int = 0
) -> SampleRequest:
    p = dist(vocab, seed)
    q = dist(vocab, seed + 1000).astype(np.float32)
    return SampleRequest(sparse=sparse_from_probs(p, k, value_codec), q=q, seed=2**63 + seed)


# Expected sizes from the documented layout (module docstring), computed independently here.
def id_w(vocab: int) -> int:
    return 2 if vocab <= 65536 else 4


VALUE_W = {ValueCodec.F32: 4, ValueCodec.F16: 2, ValueCodec.U8: 1}


def layout_size(msg: Message) -> int:
    if isinstance(msg, DraftBlock):
        n, p, v = len(msg.tokens), len(msg.prefix), msg.vocab_size
        return 40 + (p + n) * id_w(v) + 4 * n + (2 * n * v if msg.dense_q is not None else 0)
    if isinstance(msg, Verdict):
        return 37 + (0 if msg.sparse is None else sparse_layout_size(msg.sparse))
    if isinstance(msg, SampleRequest):
        return 10 + sparse_layout_size(msg.sparse) + 4 * msg.sparse.vocab_size
    assert isinstance(msg, SampleReply)
    return 6


def sparse_layout_size(sp: SparseDist) -> int:
    return 13 + len(sp.ids) * (id_w(sp.vocab_size) + VALUE_W[sp.value_codec])


def small_corpus() -> list[tuple[str, Message]]:
    """Valid messages of every type and shape, small enough for exhaustive byte-level tests."""
    out: list[tuple[str, Message]] = [
        ("block_u16", block(4)),
        ("block_u16_prefix", block(3, prefix=(7, 8, 9))),
        ("block_u32", block(5, prefix=(99999,), vocab=V32)),
        ("block_empty", block(0)),
        ("block_dense_small", block(3, vocab=40, dense=True)),
        ("verdict_bare", verdict()),
        ("verdict_token", verdict(token=V16 - 1, status=VerdictStatus.DRAINING)),
        ("verdict_u32_token", verdict(vocab=V32, token=V32 - 1, accepted=MAX_DRAFT_TOKENS)),
        ("reply", SampleReply(token=5)),
        ("request_small_u8", request(vocab=50, k=8, value_codec=ValueCodec.U8)),
        ("request_small_f16", request(vocab=300, k=16, value_codec=ValueCodec.F16)),
    ]
    for vc in ValueCodec:
        out.append((f"verdict_sparse_{vc.value}", verdict(k=32, value_codec=vc)))
        out.append((f"verdict_sparse_u32_{vc.value}", verdict(vocab=V32, k=16, value_codec=vc)))
    return out


CORPUS = small_corpus()
CORPUS_IDS = [name for name, _ in CORPUS]
CORPUS_MSGS = [msg for _, msg in CORPUS]
CORPUS_BYTES = [encode(m) for m in CORPUS_MSGS]
# What the receiver sees: equal to CORPUS_MSGS except for f16/u8-quantised values.
CORPUS_DECODED = [decode(b) for b in CORPUS_BYTES]


def decode_checked(buf: bytes | bytearray | memoryview) -> Message | None:
    """Decode; return None on CodecError. A successful decode must be canonical (re-encodes to
    the same bytes) and every other exception type fails the test."""
    try:
        msg = decode(buf)
    except CodecError:
        return None
    assert encode(msg) == bytes(buf)
    return msg


def assert_codec_error(buf: bytes | bytearray | memoryview, match: str | None = None) -> None:
    with pytest.raises(CodecError, match=match):
        decode(buf)


def patch(buf: bytes, offset: int, fmt: str, *values: object) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [V16, V32])
@pytest.mark.parametrize("prefix", [(), (11,), tuple(range(100, 140))])
def test_draft_block_roundtrip(vocab: int, prefix: tuple[int, ...]) -> None:
    msg = block(7, prefix=prefix, vocab=vocab, seed=vocab)
    buf = encode(msg)
    out = decode(buf)
    assert isinstance(out, DraftBlock)
    assert out == msg
    assert out.tokens == msg.tokens and out.prefix == prefix and out.q == msg.q
    assert out.dense_q is None
    assert len(buf) == layout_size(msg)
    # The id width on the wire is u16/u32 as documented: read prefix+tokens back from offset 40.
    dtype = "<u2" if vocab <= 65536 else "<u4"
    ids = np.frombuffer(buf, dtype=dtype, count=len(prefix) + 7, offset=40)
    assert tuple(ids.tolist()) == prefix + msg.tokens


def test_draft_block_q_rounds_to_float32_and_roundtrips_exactly() -> None:
    q = (0.1, 1.0, 1e-40)  # 1e-40 is a float32 subnormal, still > 0
    msg = DraftBlock(
        session=SESSION, epoch=0, seq=0, pos=0, prefix=(), tokens=(1, 2, 3), q=q, vocab_size=10
    )
    assert msg.q == tuple(float(np.float32(x)) for x in q)
    assert msg.q[0] != 0.1  # really rounded
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("vocab", [V16, V32])
def test_draft_block_dense_q_roundtrip_f16(vocab: int) -> None:
    msg = block(4, vocab=vocab, dense=True, seed=5)
    assert msg.dense_q is not None
    buf = encode(msg)
    assert len(buf) == 40 + 4 * id_w(vocab) + 16 + 2 * 4 * vocab
    out = decode(buf)
    assert isinstance(out, DraftBlock) and out.dense_q is not None
    assert out.dense_q.dtype == np.float32 and out.dense_q.shape == (4, vocab)
    # Exactly the f16 rounding of the original ...
    np.testing.assert_array_equal(out.dense_q, msg.dense_q.astype(np.float16).astype(np.float32))
    # ... which is within the documented f16 error.
    err = np.abs(out.dense_q.astype(np.float64) - msg.dense_q)
    bound = np.maximum(F16_REL * msg.dense_q, F16_ABS)
    assert (err <= bound).all()
    assert out.tokens == msg.tokens and out.q == msg.q
    assert encode(out) == buf  # f16 data re-encodes identically
    assert out != msg  # lossy: the f32 originals are not all f16-representable


@pytest.mark.parametrize("vocab", [V16, V32])
@pytest.mark.parametrize("token", [None, 0, 12345])
@pytest.mark.parametrize("status", list(VerdictStatus))
def test_verdict_roundtrip_without_sparse(
    vocab: int, token: int | None, status: VerdictStatus
) -> None:
    msg = verdict(vocab=vocab, token=token, status=status, accepted=5)
    buf = encode(msg)
    assert len(buf) == 37
    out = decode(buf)
    assert isinstance(out, Verdict)
    assert out == msg
    assert out.token == token and out.status is status and out.sparse is None
    assert struct.unpack_from("<i", buf, 32)[0] == (-1 if token is None else token)


@pytest.mark.parametrize("vocab", [V16, V32])
@pytest.mark.parametrize("token", [None, 77])
def test_verdict_roundtrip_sparse_f32_exact(vocab: int, token: int | None) -> None:
    msg = verdict(vocab=vocab, token=token, k=32, seed=vocab)
    out = decode(encode(msg))
    assert isinstance(out, Verdict) and out.sparse is not None and msg.sparse is not None
    assert out == msg
    np.testing.assert_array_equal(out.sparse.ids, msg.sparse.ids)
    np.testing.assert_array_equal(out.sparse.probs, msg.sparse.probs)
    assert out.sparse.tail_mass == msg.sparse.tail_mass
    assert out.sparse.ids.dtype == np.int64 and out.sparse.probs.dtype == np.float32


@pytest.mark.parametrize("vocab", [V16, V32])
@pytest.mark.parametrize("value_codec", [ValueCodec.F16, ValueCodec.U8])
def test_verdict_roundtrip_sparse_lossy(vocab: int, value_codec: ValueCodec) -> None:
    msg = verdict(vocab=vocab, k=32, value_codec=value_codec, seed=1, token=None)
    buf = encode(msg)
    out = decode(buf)
    assert isinstance(out, Verdict) and out.sparse is not None and msg.sparse is not None
    sent, got = msg.sparse.probs.astype(np.float64), out.sparse.probs.astype(np.float64)
    np.testing.assert_array_equal(out.sparse.ids, msg.sparse.ids)
    assert out.sparse.value_codec is value_codec
    assert out.sparse.tail_mass == msg.sparse.tail_mass  # tail is f32, exact
    if value_codec is ValueCodec.F16:
        assert (np.abs(got - sent) <= np.maximum(F16_REL * sent, F16_ABS)).all()
    else:
        big = sent >= U8_ZERO
        assert (np.abs(got[big] - sent[big]) <= U8_REL * sent[big] * (1 + 1e-6)).all()
        assert (got[~big] == 0).all()
    assert not np.array_equal(got, sent)  # really quantised
    assert encode(out) == buf  # quantisation is idempotent


def test_u8_code_definition_and_error_bound() -> None:
    codes = np.arange(256, dtype=np.uint8)
    table = codec.dequantize_u8(codes)
    assert table[0] == 0.0 and table[255] == 1.0
    np.testing.assert_allclose(table[1:], 2.0 ** (-(255 - codes[1:].astype(np.float64)) / 16))
    np.testing.assert_array_equal(codec.quantize_u8(table), codes)  # table values are fixed points
    p = np.geomspace(U8_ZERO, 1.0, 200001)
    back = codec.dequantize_u8(codec.quantize_u8(p)).astype(np.float64)
    rel = np.abs(back - p) / p
    assert rel.max() <= U8_REL * (1 + 1e-6)
    assert rel.max() > 0.99 * U8_REL  # the documented bound is tight, not loose
    tiny = np.array([0.0, 1e-9, U8_ZERO * 0.999])
    np.testing.assert_array_equal(codec.quantize_u8(tiny), [0, 0, 0])
    assert codec.U8_MAX_RELATIVE_ERROR == pytest.approx(U8_REL)
    assert codec.U8_ZERO_THRESHOLD == pytest.approx(U8_ZERO)


@pytest.mark.parametrize("vocab", [V16, V32])
@pytest.mark.parametrize("value_codec", list(ValueCodec))
def test_sample_request_roundtrip(vocab: int, value_codec: ValueCodec) -> None:
    msg = request(vocab=vocab, k=32, value_codec=value_codec, seed=3)
    buf = encode(msg)
    assert len(buf) == layout_size(msg)
    out = decode(buf)
    assert isinstance(out, SampleRequest)
    np.testing.assert_array_equal(out.q, msg.q)  # q is f32 on the wire: exact
    assert out.q.dtype == np.float32 and out.seed == msg.seed == 2**63 + 3
    np.testing.assert_array_equal(out.sparse.ids, msg.sparse.ids)
    if value_codec is ValueCodec.F32:
        assert out == msg
    assert encode(out) == buf


def test_sample_reply_roundtrip() -> None:
    for token in (0, 1, 65535, 65536, MAX_VOCAB - 1):
        buf = encode(SampleReply(token=token))
        assert len(buf) == 6
        assert decode(buf) == SampleReply(token=token)


def test_extreme_field_values_roundtrip() -> None:
    u32 = 2**32 - 1
    msg = DraftBlock(
        session=b"\xff" * 16,
        epoch=u32,
        seq=u32,
        pos=u32,
        prefix=(0, 65535),
        tokens=tuple(range(MAX_DRAFT_TOKENS)),
        q=(1.0,) * MAX_DRAFT_TOKENS,
        vocab_size=65536,  # the largest vocab with u16 ids
    )
    buf = encode(msg)
    assert len(buf) == 40 + (2 + 64) * 2 + 4 * 64
    assert decode(buf) == msg
    msg32 = msg.model_copy(update={"vocab_size": 65537})  # model_copy skips validation
    msg32 = DraftBlock(**dict(msg32))
    assert len(encode(msg32)) == 40 + (2 + 64) * 4 + 4 * 64
    assert decode(encode(msg32)) == msg32
    req = SampleRequest(
        sparse=SparseDist(vocab_size=1, ids=[0], probs=[1.0], tail_mass=0.0),
        q=np.ones(1, np.float32),
        seed=2**64 - 1,
    )
    assert decode(encode(req)) == req


def test_max_prefix_roundtrip() -> None:
    prefix = np.arange(MAX_PREFIX_TOKENS, dtype=np.int64) % V16
    msg = DraftBlock(
        session=SESSION, epoch=1, seq=1, pos=0, prefix=prefix, tokens=(), q=(), vocab_size=V16
    )
    buf = encode(msg)
    assert len(buf) == 40 + 2 * MAX_PREFIX_TOKENS
    out = decode(buf)
    assert isinstance(out, DraftBlock) and len(out.prefix) == MAX_PREFIX_TOKENS
    assert out == msg
    with pytest.raises(ValidationError):
        DraftBlock(
            session=SESSION,
            epoch=1,
            seq=1,
            pos=0,
            prefix=np.zeros(MAX_PREFIX_TOKENS + 1, dtype=np.int64),
            tokens=(),
            q=(),
            vocab_size=V16,
        )


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_buffer_types(kind: type) -> None:
    for msg, buf in zip(CORPUS_DECODED, CORPUS_BYTES, strict=True):
        assert decode(kind(buf)) == msg
        assert encode(msg) == buf


def test_decode_from_bytearray_does_not_alias_buffer() -> None:
    msg = request(vocab=100, k=5)
    buf = bytearray(encode(msg))
    out = decode(buf)
    assert isinstance(out, SampleRequest)
    buf[-4:] = b"\x00\x00\x00\x00"  # mutate the source buffer after decoding
    np.testing.assert_array_equal(out.q, msg.q)
    assert not out.q.flags.writeable and not out.sparse.probs.flags.writeable


def test_decode_as_and_message_type_name() -> None:
    names = {DraftBlock: "draft_block", Verdict: "verdict"}
    names |= {SampleRequest: "sample_request", SampleReply: "sample_reply"}
    for msg, buf in zip(CORPUS_DECODED, CORPUS_BYTES, strict=True):
        cls = type(msg)
        assert message_type_name(buf) == names[cls]
        assert decode_as(buf, cls) == msg
        for other in names:
            if other is not cls:
                with pytest.raises(CodecError, match=f"expected a {names[other]}"):
                    decode_as(buf, other)
    with pytest.raises(CodecError):
        decode_as(b"", Verdict)
    with pytest.raises(CodecError, match="version"):
        decode_as(b"\x02\x02" + CORPUS_BYTES[0][2:], Verdict)


@pytest.mark.parametrize(
    "buf",
    [b"", b"\x01", b"\x02\x01", b"\x01\x00", b"\x01\x05", b"\x00\x02" * 20, None, 123, "ab"],
)
def test_message_type_name_unknown(buf: object) -> None:
    assert message_type_name(buf) == "unknown"


# ------------------------------------------------------------------------------------------------
# Hypothesis strategies and property round trips
# ------------------------------------------------------------------------------------------------

VOCABS = st.sampled_from([1, 2, 7, 300, 65536, 65537, V32])


@st.composite
def sparse_dists(draw: st.DrawFn, vocab: int | None = None) -> SparseDist:
    v = vocab if vocab is not None else draw(VOCABS)
    k = draw(st.integers(0, min(v, 40)))
    ids = draw(st.lists(st.integers(0, v - 1), min_size=k, max_size=k, unique=True))
    raw = np.array(draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)), dtype=np.float64)
    mass = draw(st.floats(0, 1))
    probs = raw / raw.sum() * mass if raw.sum() > 0 else raw
    tail = draw(st.floats(0, max(0.0, 1.0 - float(probs.sum()))))
    vc = draw(st.sampled_from(list(ValueCodec)))
    return SparseDist(vocab_size=v, ids=ids, probs=probs, tail_mass=tail, value_codec=vc)


@st.composite
def draft_blocks(draw: st.DrawFn) -> DraftBlock:
    v = draw(VOCABS)
    n = draw(st.integers(0, MAX_DRAFT_TOKENS))
    ids = st.integers(0, v - 1)
    dense_q = None
    if v <= 300 and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dense_q = rng.dirichlet(np.ones(v), size=n).astype(np.float32).reshape(n, v)
    return DraftBlock(
        session=draw(st.binary(min_size=16, max_size=16)),
        epoch=draw(st.integers(0, 2**32 - 1)),
        seq=draw(st.integers(0, 2**32 - 1)),
        pos=draw(st.integers(0, 2**32 - 1)),
        prefix=tuple(draw(st.lists(ids, max_size=30))),
        tokens=tuple(draw(st.lists(ids, min_size=n, max_size=n))),
        q=tuple(draw(st.lists(st.floats(1e-38, 1.0), min_size=n, max_size=n))),
        dense_q=dense_q,
        vocab_size=v,
    )


@st.composite
def verdicts(draw: st.DrawFn) -> Verdict:
    v = draw(VOCABS)
    return Verdict(
        session=draw(st.binary(min_size=16, max_size=16)),
        epoch=draw(st.integers(0, 2**32 - 1)),
        seq=draw(st.integers(0, 2**32 - 1)),
        status=draw(st.sampled_from(list(VerdictStatus))),
        accepted=draw(st.integers(0, MAX_DRAFT_TOKENS)),
        token=draw(st.none() | st.integers(0, v - 1)),
        sparse=draw(st.none() | sparse_dists(vocab=v)),
        vocab_size=v,
    )


@st.composite
def sample_requests(draw: st.DrawFn) -> SampleRequest:
    v = draw(st.sampled_from([1, 3, 300, 65537]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.dirichlet(np.ones(v)).astype(np.float32)
    return SampleRequest(
        sparse=draw(sparse_dists(vocab=v)), q=q, seed=draw(st.integers(0, 2**64 - 1))
    )


messages = st.one_of(
    draft_blocks(),
    verdicts(),
    sample_requests(),
    st.builds(SampleReply, token=st.integers(0, MAX_VOCAB - 1)),
)


def is_lossy(msg: Message) -> bool:
    """True when the message holds data that the wire quantises (f16 / u8)."""
    if isinstance(msg, DraftBlock):
        return msg.dense_q is not None
    sparse = getattr(msg, "sparse", None)
    return sparse is not None and sparse.value_codec is not ValueCodec.F32


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_property_roundtrip(msg: Message) -> None:
    buf = encode(msg)
    assert len(buf) == layout_size(msg) == encoded_size(msg)
    out = decode(buf)
    assert type(out) is type(msg)
    if not is_lossy(msg):
        assert out == msg
        assert hash(out) == hash(msg)
    assert encode(out) == buf  # decoded messages are canonical
    assert decode(encode(out)) == out


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------


def test_concrete_sizes() -> None:
    assert len(encode(block(4))) == 40 + 4 * 2 + 4 * 4 == 64
    assert len(encode(block(4, prefix=(1,)))) == 66
    assert len(encode(block(4, vocab=V32))) == 40 + 4 * 4 + 4 * 4 == 72
    assert len(encode(verdict())) == 37
    assert len(encode(verdict(token=5))) == 37
    assert len(encode(verdict(k=32))) == 37 + 13 + 32 * (2 + 4) == 242
    assert len(encode(verdict(k=32, value_codec=ValueCodec.F16))) == 37 + 13 + 32 * 4 == 178
    assert len(encode(verdict(k=32, value_codec=ValueCodec.U8))) == 37 + 13 + 32 * 3 == 146
    assert len(encode(verdict(k=32, vocab=V32))) == 37 + 13 + 32 * 8 == 306
    assert len(encode(request(k=32))) == 10 + 13 + 32 * 6 + 4 * V16 == 196823
    assert len(encode(SampleReply(token=1))) == 6
    assert encoded_size(verdict(k=32)) == 242


EXPECTED_TABLE = [
    ("draft_block: 4 draft tokens, no prefix, vocab 49152 (u16 ids)", 40 + 4 * 2 + 4 * 4),
    ("draft_block: 4 draft tokens + 1 prefix token, vocab 49152", 40 + 5 * 2 + 4 * 4),
    ("draft_block: 8 draft tokens, no prefix, vocab 49152", 40 + 8 * 2 + 8 * 4),
    ("draft_block: 4 draft tokens, no prefix, vocab 100000 (u32 ids)", 40 + 4 * 4 + 4 * 4),
    ("draft_block: 4 draft tokens + dense_q (f16), vocab 49152", 64 + 2 * 4 * V16),
    ("verdict: no token, no sparse", 37),
    ("verdict: token only (greedy correction)", 37),
    ("verdict: sparse K=32 f32, vocab 49152", 37 + 13 + 32 * 6),
    ("verdict: sparse K=32 f16, vocab 49152", 37 + 13 + 32 * 4),
    ("verdict: sparse K=32 u8, vocab 49152", 37 + 13 + 32 * 3),
    ("verdict: sparse K=32 f32, vocab 100000 (u32 ids)", 37 + 13 + 32 * 8),
    ("sample_request: sparse K=32 f32 + q f32, vocab 49152", 10 + 13 + 32 * 6 + 4 * V16),
    ("sample_request: sparse K=32 f16 + q f32, vocab 49152", 10 + 13 + 32 * 4 + 4 * V16),
    ("sample_reply", 6),
]


def test_message_size_table_matches_layout() -> None:
    table = message_size_table()
    assert table == EXPECTED_TABLE
    assert dict(table)["verdict: sparse K=32 f32, vocab 49152"] == 242


def test_module_docstring_quotes_the_size_table() -> None:
    doc = codec.__doc__
    assert doc is not None
    for desc, size in message_size_table():
        assert re.search(rf"^{re.escape(desc)}\s+{size}\s*$", doc, re.MULTILINE), desc


# ------------------------------------------------------------------------------------------------
# Malformed input
# ------------------------------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_codec_error(data: bytes) -> None:
    decode_checked(data)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=200))
def test_random_bodies_never_raise_anything_but_codec_error(msg_type: int, body: bytes) -> None:
    decode_checked(bytes([PROTOCOL_VERSION, msg_type]) + body)


@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_random_byte_mutations(data: st.DataObject) -> None:
    buf = bytearray(data.draw(st.sampled_from(CORPUS_BYTES)))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    decode_checked(buf)


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=CORPUS_IDS)
def test_every_single_byte_flip(index: int) -> None:
    """Every byte of every small valid message, xored with several masks: CodecError or a valid
    (canonical) message. Both outcomes must occur, so the test cannot pass vacuously."""
    buf = CORPUS_BYTES[index]
    rng = random.Random(index)
    outcomes = {"error": 0, "valid": 0}
    for pos in range(len(buf)):
        for mask in (0x01, 0x80, 0xFF, rng.randrange(1, 256)):
            mutated = bytearray(buf)
            mutated[pos] ^= mask
            outcomes["valid" if decode_checked(mutated) is not None else "error"] += 1
    assert outcomes["error"] > 0 and outcomes["valid"] > 0, outcomes
    # any change of the version byte is an error
    for mask in range(1, 256):
        mutated = bytearray(buf)
        mutated[0] ^= mask
        assert decode_checked(mutated) is None


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=CORPUS_IDS)
def test_every_truncation_is_an_error(index: int) -> None:
    buf = CORPUS_BYTES[index]
    view = memoryview(buf)
    for n in range(len(buf)):
        with pytest.raises(CodecError):
            decode(view[:n])
    assert decode(view) == CORPUS_DECODED[index]


LARGE = {
    "request_u32": lambda: request(vocab=65537, k=64),
    "block_dense": lambda: block(64, dense=True, vocab=3000),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_truncations_of_large_messages(name: str) -> None:
    buf = encode(LARGE[name]())
    view = memoryview(buf)
    for n in range(len(buf)):
        with pytest.raises(CodecError):
            decode(view[:n])


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=CORPUS_IDS)
def test_trailing_bytes_are_an_error(index: int) -> None:
    buf = CORPUS_BYTES[index]
    for extra in (b"\x00", b"\xff" * 7):
        assert_codec_error(buf + extra, "trailing")


def test_empty_and_tiny_buffers() -> None:
    assert_codec_error(b"", "empty")
    assert_codec_error(b"\x01", "truncated")
    assert_codec_error(b"\x01\x02", "truncated")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    for buf in CORPUS_BYTES:
        with pytest.raises(CodecError, match=f"expected {PROTOCOL_VERSION}, got {version}"):
            decode(bytes([version]) + buf[1:])


@pytest.mark.parametrize("msg_type", [0, 5, 6, 255])
def test_unknown_type(msg_type: int) -> None:
    assert_codec_error(bytes([PROTOCOL_VERSION, msg_type]) + b"\x00" * 40, "unknown message type")


@pytest.mark.parametrize("bad", [None, 12, "text", [1, 2]])
def test_non_buffer_input_is_codec_error(bad: object) -> None:
    with pytest.raises(CodecError):
        decode(bad)  # type: ignore[arg-type]


def test_oversized_buffer_rejected_before_parsing() -> None:
    buf = encode(SampleReply(token=1)) + bytes(MAX_MESSAGE_BYTES)
    assert_codec_error(buf, "MAX_MESSAGE_BYTES")


def _hostile_headers() -> list[tuple[str, bytes]]:
    verdict_hdr = struct.pack("<BB16sIIBBIiB", 1, 2, SESSION, 0, 0, 0, 0, V16, -1, 1)
    draft_hdr = struct.Struct("<BB16sIIIIBBI")
    return [
        # Verdict with a sparse block declaring K = 2**31 (vocab 2**24), in ~50 bytes
        ("verdict_k_2_31", verdict_hdr + struct.pack("<IIBf", V16, 2**31, 0, 0.0)),
        (
            "verdict_k_huge_max_vocab",
            struct.pack("<BB16sIIBBIiB", 1, 2, SESSION, 0, 0, 0, 0, MAX_VOCAB, -1, 1)
            + struct.pack("<IIBf", MAX_VOCAB, MAX_VOCAB, 0, 0.0),
        ),
        # SampleRequest declaring vocab 2**32-1 and K 2**32-1
        (
            "sample_request_vocab_u32max",
            struct.pack("<BBQ", 1, 3, 0) + struct.pack("<IIBf", 2**32 - 1, 2**32 - 1, 0, 0.0),
        ),
        # SampleRequest with MAX_VOCAB: q alone would be 64 MiB
        (
            "sample_request_vocab_max",
            struct.pack("<BBQ", 1, 3, 0) + struct.pack("<IIBf", MAX_VOCAB, 10, 0, 0.0),
        ),
        # DraftBlock with a 2**32-1 token prefix
        (
            "draft_prefix_u32max",
            draft_hdr.pack(1, 1, SESSION, 0, 0, 0, V16, 0, 0, 2**32 - 1),
        ),
        # DraftBlock with MAX_PREFIX_TOKENS, in a 40-byte buffer
        (
            "draft_prefix_max",
            draft_hdr.pack(1, 1, SESSION, 0, 0, 0, V16, 0, 0, MAX_PREFIX_TOKENS),
        ),
        # DraftBlock with dense_q of 64 x 2**24 f16 (2 GiB)
        (
            "draft_dense_2gib",
            draft_hdr.pack(1, 1, SESSION, 0, 0, 0, MAX_VOCAB, 1, 64, 0),
        ),
        ("draft_255_tokens", draft_hdr.pack(1, 1, SESSION, 0, 0, 0, V16, 0, 255, 0)),
        ("draft_vocab_zero", draft_hdr.pack(1, 1, SESSION, 0, 0, 0, 0, 0, 0, 0)),
        ("draft_vocab_huge", draft_hdr.pack(1, 1, SESSION, 0, 0, 0, 2**32 - 1, 0, 0, 0)),
    ]


@pytest.mark.parametrize("name,buf", _hostile_headers(), ids=[n for n, _ in _hostile_headers()])
def test_huge_declared_lengths_fail_fast_without_allocating(name: str, buf: bytes) -> None:
    assert len(buf) <= 60
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(CodecError):
            decode(buf)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"{name}: decode allocated {peak} bytes"
    assert elapsed < 0.5, f"{name}: took {elapsed:.3f}s"


def test_max_vocab_argument() -> None:
    buf = encode(verdict(k=8))
    assert decode(buf, max_vocab=V16) == decode(buf)
    with pytest.raises(CodecError, match="vocab_size"):
        decode(buf, max_vocab=V16 - 1)
    with pytest.raises(CodecError, match="vocab_size"):
        decode(encode(request(vocab=300, k=4)), max_vocab=299)
    with pytest.raises(CodecError, match="vocab_size"):
        decode(encode(block(2, vocab=V32)), max_vocab=V16)
    with pytest.raises(CodecError, match="vocab_size"):
        decode_as(encode(block(2, vocab=V32)), DraftBlock, max_vocab=V16)


# Offsets into the documented layout, used to corrupt individual fields.
SPARSE_AT = 37  # sparse block inside a Verdict
REQ_SPARSE_AT = 10  # sparse block inside a SampleRequest


def sparse_values_at(msg_sparse: SparseDist, block_at: int) -> int:
    return block_at + 13 + len(msg_sparse.ids) * id_w(msg_sparse.vocab_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, -0.0, 1.5])
def test_bad_f32_sparse_probability_on_wire(bad: float) -> None:
    msg = verdict(k=8)
    assert msg.sparse is not None
    buf = patch(encode(msg), sparse_values_at(msg.sparse, SPARSE_AT) + 4, "<f", bad)
    assert_codec_error(buf)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.25, 2.0])
def test_bad_f16_sparse_probability_on_wire(bad: float) -> None:
    msg = verdict(k=8, value_codec=ValueCodec.F16)
    assert msg.sparse is not None
    out = bytearray(encode(msg))
    at = sparse_values_at(msg.sparse, SPARSE_AT)
    out[at : at + 2] = np.array([bad], dtype="<f2").tobytes()
    assert_codec_error(bytes(out))


def test_bad_sample_request_q_on_wire() -> None:
    msg = request(vocab=100, k=4)
    buf = encode(msg)
    q_at = len(buf) - 4 * 100
    for bad in (float("nan"), float("inf"), -1e-3):
        assert_codec_error(patch(buf, q_at, "<f", bad))
    # q that no longer sums to 1
    assert_codec_error(patch(buf, q_at, "<f", float(msg.q[0]) + 0.01), "sum")
    # a small change within the 1e-3 tolerance is still valid
    assert decode_checked(patch(buf, q_at, "<f", float(msg.q[0]) + 1e-4)) is not None


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_bad_draft_q_on_wire(bad: float) -> None:
    msg = block(4)
    q_at = 40 + 4 * 2
    assert_codec_error(patch(encode(msg), q_at + 4, "<f", bad), "q")


def test_bad_dense_q_on_wire() -> None:
    msg = block(2, vocab=30, dense=True)
    buf = bytearray(encode(msg))
    dense_at = 40 + 2 * 2 + 2 * 4
    for bad in (np.nan, np.inf, -0.5, 1.5, -0.0):
        mutated = bytearray(buf)
        mutated[dense_at + 6 : dense_at + 8] = np.array([bad], dtype="<f2").tobytes()
        assert_codec_error(bytes(mutated))


def test_out_of_vocab_ids_on_wire() -> None:
    buf = encode(block(4, prefix=(1,), vocab=1000))
    assert_codec_error(patch(buf, 40, "<H", 1000), "prefix")  # prefix id
    assert_codec_error(patch(buf, 42 + 6, "<H", 65535), "tokens")  # last draft token
    assert decode_checked(patch(buf, 42 + 6, "<H", 999)) is not None  # vocab-1 is fine
    vbuf = encode(verdict(vocab=1000, token=3))
    assert_codec_error(patch(vbuf, 32, "<i", 1000), "token")
    assert_codec_error(patch(vbuf, 32, "<i", -2))
    msg = verdict(vocab=V32, k=4)
    assert msg.sparse is not None
    assert_codec_error(patch(encode(msg), SPARSE_AT + 13 + 4, "<I", V32), "ids")
    assert_codec_error(patch(encode(SampleReply(token=1)), 2, "<I", MAX_VOCAB))


def test_duplicate_sparse_ids_on_wire() -> None:
    msg = verdict(k=4)
    assert msg.sparse is not None
    first = int(msg.sparse.ids[0])
    assert_codec_error(patch(encode(msg), SPARSE_AT + 13 + 2 * 3, "<H", first), "unique")


def test_sparse_k_larger_than_vocab_on_wire() -> None:
    sp = SparseDist(vocab_size=4, ids=[0, 1, 2, 3], probs=[0.25] * 4, tail_mass=0.0)
    req = SampleRequest(sparse=sp, q=np.full(4, 0.25, np.float32), seed=1)
    buf = encode(req)
    # declare vocab 3 in the sparse header (q then also shrinks by one entry)
    assert_codec_error(patch(buf, REQ_SPARSE_AT, "<I", 3)[:-4], "K=4 exceeds")


def test_sparse_mass_above_one_on_wire() -> None:
    msg = verdict(k=8)
    assert msg.sparse is not None
    assert_codec_error(patch(encode(msg), SPARSE_AT + 9, "<f", 1.0), "exceeds 1")
    assert_codec_error(patch(encode(msg), SPARSE_AT + 9, "<f", float("nan")), "tail_mass")


def test_other_header_field_violations_on_wire() -> None:
    vbuf = encode(verdict(k=4))
    assert_codec_error(patch(vbuf, 26, "<B", 4))  # unknown status
    assert_codec_error(patch(vbuf, 27, "<B", MAX_DRAFT_TOKENS + 1), "accepted")
    assert_codec_error(patch(vbuf, 36, "<B", 4), "flag")
    assert_codec_error(patch(vbuf, SPARSE_AT + 8, "<B", 3), "value codec")
    assert_codec_error(patch(vbuf, SPARSE_AT, "<I", V16 - 1), "sparse.vocab_size")
    dbuf = encode(block(2))
    assert_codec_error(patch(dbuf, 34, "<B", 4), "flag")
    # n_tokens > 64, even with a buffer of exactly the size it declares
    n = MAX_DRAFT_TOKENS + 1
    big = struct.pack("<BB16sIIIIBBI", 1, 1, SESSION, 0, 0, 0, V16, 0, n, 0) + bytes(6 * n)
    assert_codec_error(big, "n_tokens")


def test_codec_error_chains_the_cause() -> None:
    msg = verdict(k=4)
    buf = patch(encode(msg), SPARSE_AT + 9, "<f", 1.0)
    with pytest.raises(CodecError) as info:
        decode(buf)
    assert isinstance(info.value.__cause__, ValidationError)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------
# Construction-time validation (the same validators run on decode)
# ------------------------------------------------------------------------------------------------


def test_draft_block_validation() -> None:
    good = {
        "session": SESSION,
        "epoch": 0,
        "seq": 0,
        "pos": 0,
        "prefix": (),
        "tokens": (1, 2),
        "q": (0.5, 0.5),
        "vocab_size": 10,
    }
    assert DraftBlock(**good).tokens == (1, 2)
    bad_updates: list[dict[str, object]] = [
        {"session": b"x" * 15},
        {"session": b"x" * 17},
        {"epoch": -1},
        {"seq": 2**32},
        {"pos": 2**32},
        {"q": (0.5,)},  # length mismatch
        {"q": (0.0, 0.5)},  # q(x) = 0
        {"q": (1e-50, 0.5)},  # underflows float32
        {"q": (float("nan"), 0.5)},
        {"q": (1.5, 0.5)},
        {"q": (-0.5, 0.5)},
        {"tokens": (1, 10)},  # id == vocab
        {"tokens": (1, -1)},
        {"prefix": (10,)},
        {"tokens": tuple(range(65)), "q": (0.5,) * 65, "vocab_size": 100},
        {"vocab_size": 0},
        {"vocab_size": MAX_VOCAB + 1},
        {"dense_q": np.full((2, 9), 0.1, np.float32)},  # wrong shape
        {"dense_q": np.full((2, 10), np.nan, np.float32)},
        {"dense_q": np.full((2, 10), -0.1, np.float32)},
        {"dense_q": np.full(20, 0.1, np.float32)},  # 1-D
        {
            "dense_q": np.full((64, V32), 0.0, np.float32),
            "tokens": (1,) * 64,
            "q": (1.0,) * 64,
            "vocab_size": V32,
        },  # 12.8 MB > MAX_MESSAGE_BYTES
    ]
    for update in bad_updates:
        with pytest.raises(ValidationError):
            DraftBlock(**(good | update))


def test_sparse_dist_validation() -> None:
    good = {"vocab_size": 10, "ids": [1, 2], "probs": [0.5, 0.25], "tail_mass": 0.25}
    sp = SparseDist(**good)
    assert sp.ids.dtype == np.int64 and sp.probs.dtype == np.float32
    bad_updates: list[dict[str, object]] = [
        {"ids": [1, 1]},
        {"ids": [1, 10]},
        {"ids": [-1, 2]},
        {"ids": [1.5, 2.0]},
        {"ids": [1]},  # length mismatch
        {"probs": [np.nan, 0.25]},
        {"probs": [-0.1, 0.25]},
        {"probs": [1.1, 0.0]},
        {"probs": [np.inf, 0.0]},
        {"tail_mass": -0.1},
        {"tail_mass": 1.1},
        {"tail_mass": float("nan")},
        {"tail_mass": 0.3},  # 0.5 + 0.25 + 0.3 > 1 + 1e-3
        {"vocab_size": 1, "ids": [0, 1]},  # K > vocab (and id out of range)
        {"value_codec": "f64"},
        {"ids": [[1, 2]], "probs": [[0.5, 0.25]]},  # 2-D
    ]
    for update in bad_updates:
        with pytest.raises(ValidationError):
            SparseDist(**(good | update))
    # per-codec tolerance on sum(probs) + tail_mass
    over = {"vocab_size": 10, "ids": [1, 2], "probs": [0.5, 0.5], "tail_mass": 0.005}
    with pytest.raises(ValidationError):
        SparseDist(**over)
    assert SparseDist(**over, value_codec=ValueCodec.F16).tail_mass == pytest.approx(0.005)
    over_u8 = over | {"tail_mass": 0.02}
    with pytest.raises(ValidationError):
        SparseDist(**over_u8, value_codec=ValueCodec.F16)
    assert SparseDist(**over_u8, value_codec="u8").value_codec is ValueCodec.U8


def test_verdict_sample_request_reply_validation() -> None:
    sp = sparse_from_probs(dist(10), 3)
    with pytest.raises(ValidationError):
        Verdict(session=SESSION, epoch=0, seq=0, accepted=65, vocab_size=10)
    with pytest.raises(ValidationError):
        Verdict(session=SESSION, epoch=0, seq=0, accepted=0, token=10, vocab_size=10)
    with pytest.raises(ValidationError):
        Verdict(session=SESSION, epoch=0, seq=0, accepted=0, sparse=sp, vocab_size=11)
    with pytest.raises(ValidationError):
        Verdict(session=SESSION[:8], epoch=0, seq=0, accepted=0, vocab_size=10)
    with pytest.raises(ValidationError):
        Verdict(session=SESSION, epoch=0, seq=0, status=9, accepted=0, vocab_size=10)
    q = np.full(10, 0.1, np.float32)
    assert SampleRequest(sparse=sp, q=q, seed=0).vocab_size == 10
    for bad_q in (np.full(9, 1 / 9), np.full(10, 0.2), np.r_[np.full(9, 1 / 9), np.nan]):
        with pytest.raises(ValidationError):
            SampleRequest(sparse=sp, q=bad_q, seed=0)
    with pytest.raises(ValidationError):
        SampleRequest(sparse=sp, q=np.r_[-0.1, 0.3, np.full(8, 0.1)], seed=0)  # sums to 1
    with pytest.raises(ValidationError):
        SampleRequest(sparse=sp, q=q, seed=2**64)
    with pytest.raises(ValidationError):
        SampleRequest(sparse=sp, q=q, seed=-1)
    with pytest.raises(ValidationError):
        SampleReply(token=-1)
    with pytest.raises(ValidationError):
        SampleReply(token=MAX_VOCAB)
    v_big = MAX_MESSAGE_BYTES // 4  # q alone fills MAX_MESSAGE_BYTES
    sp_big = SparseDist(vocab_size=v_big, ids=[0], probs=[1.0], tail_mass=0.0)
    with pytest.raises(ValidationError, match="MAX_MESSAGE_BYTES"):
        SampleRequest(sparse=sp_big, q=np.r_[1.0, np.zeros(v_big - 1)], seed=0)


def test_models_are_frozen_and_own_their_arrays() -> None:
    probs = np.array([0.5, 0.25], np.float32)
    sp = SparseDist(vocab_size=10, ids=[1, 2], probs=probs, tail_mass=0.25)
    probs[0] = 0.0  # mutating the source does not change the model
    assert sp.probs[0] == 0.5
    with pytest.raises(ValueError):
        sp.probs[0] = 0.1  # read-only
    with pytest.raises(ValidationError):
        sp.vocab_size = 11  # type: ignore[misc]
    msg = verdict(k=4)
    with pytest.raises(ValidationError):
        msg.accepted = 3  # type: ignore[misc]


def test_equality_and_hash() -> None:
    a, b = verdict(k=8, seed=1), verdict(k=8, seed=1)
    assert a == b and hash(a) == hash(b)
    c = verdict(k=8, seed=2)
    assert a != c
    assert a != verdict(k=8, seed=1, value_codec=ValueCodec.F16)
    assert a != "verdict"
    # -0.0 is normalised to +0.0 so equal arrays hash equally
    s1 = SparseDist(vocab_size=3, ids=[0, 1], probs=[0.0, 0.5], tail_mass=0.5)
    s2 = SparseDist(vocab_size=3, ids=[0, 1], probs=[-0.0, 0.5], tail_mass=0.5)
    assert s1 == s2 and hash(s1) == hash(s2)
    assert len({encode(m) for m in CORPUS_MSGS}) == len(CORPUS_MSGS)
    assert len(set(CORPUS_MSGS)) == len(CORPUS_MSGS)


def test_torch_and_numpy_inputs_accepted() -> None:
    p = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), dim=0)
    sp = sparse_from_probs(p, 5)
    q = torch.full((50,), 1 / 50)
    req = SampleRequest(sparse=sp, q=q, seed=np.uint64(7))
    assert req.q.dtype == np.float32 and req.seed == 7
    blk = DraftBlock(
        session=bytearray(SESSION),
        epoch=np.int64(1),
        seq=1,
        pos=1,
        prefix=np.array([3, 4]),
        tokens=torch.tensor([1, 2]),
        q=np.array([0.5, 0.25], np.float32),
        vocab_size=50,
    )
    assert blk.prefix == (3, 4) and blk.tokens == (1, 2) and blk.q == (0.5, 0.25)
    assert decode(encode(blk)) == blk


def test_bfloat16_tensor_input() -> None:
    p = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(2)), 0)
    p16 = p.to(torch.bfloat16)
    sp = sparse_from_probs(p16, 4)
    np.testing.assert_array_equal(sp.probs, p16.float().numpy()[sp.ids])
    assert set(sp.ids.tolist()) == set(torch.topk(p16.float(), 4).indices.tolist())


def test_importing_the_codec_does_not_import_torch() -> None:
    code = "import sys, picospec.protocol.codec; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# sparse_from_probs / to_dense
# ------------------------------------------------------------------------------------------------


def test_sparse_from_probs_keeps_top_k() -> None:
    p = dist(V16, seed=7)
    sp = sparse_from_probs(p, 32)
    order = np.argsort(-p, kind="stable")
    assert set(sp.ids.tolist()) == set(order[:32].tolist())
    np.testing.assert_array_equal(sp.probs, p[sp.ids].astype(np.float32))
    assert (np.diff(sp.probs) <= 0).all()  # ordered by decreasing probability
    expected_tail = 1.0 - float(np.sort(p)[-32:].sum())
    assert sp.tail_mass == pytest.approx(expected_tail, rel=1e-6)
    assert 0 < sp.tail_mass < 1
    assert sp.vocab_size == V16 and sp.value_codec is ValueCodec.F32


def test_sparse_from_probs_fewer_nonzeros_than_k() -> None:
    p = np.zeros(100)
    p[[3, 50, 97]] = [0.5, 0.25, 0.25]
    sp = sparse_from_probs(p, 10)
    assert sp.ids.tolist() == [3, 50, 97]
    assert sp.probs.tolist() == [0.5, 0.25, 0.25]
    assert sp.tail_mass == 0.0
    sp_exact = sparse_from_probs(p, 3)
    assert sp_exact == sp
    sp2 = sparse_from_probs(p, 2)
    assert sp2.ids.tolist() == [3, 50] and sp2.tail_mass == 0.25  # tie at 0.25: smaller id


def test_sparse_from_probs_ties_are_deterministic() -> None:
    p = np.full(8, 0.125)
    a, b = sparse_from_probs(p, 3), sparse_from_probs(p.copy(), 3)
    assert a == b
    assert a.ids.tolist() == [0, 1, 2] and a.tail_mass == 0.625


def test_sparse_from_probs_edge_cases() -> None:
    p = dist(20)
    empty = sparse_from_probs(p, 0)
    assert empty.k == 0 and empty.tail_mass == 1.0
    assert sparse_from_probs(np.zeros(5), 3).k == 0
    assert sparse_from_probs(p, 10, "u8").value_codec is ValueCodec.U8
    with pytest.raises(ValueError):
        sparse_from_probs(p, -1)
    with pytest.raises(ValueError):
        sparse_from_probs(p.reshape(4, 5), 3)
    with pytest.raises(ValueError):
        sparse_from_probs(np.r_[p[:-1], np.nan], 3)
    with pytest.raises(ValueError):
        sparse_from_probs(np.r_[p[:-1], -0.5], 3)


def test_sparse_from_probs_torch_matches_numpy() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 4
    p = torch.softmax(logits, dim=0)
    a = sparse_from_probs(p, 16, ValueCodec.F16)
    b = sparse_from_probs(p.numpy(), 16, ValueCodec.F16)
    assert a == b
    assert set(a.ids.tolist()) == set(torch.topk(p, 16).indices.tolist())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0, 0.5, 7.0]), min_size=1, max_size=60),
    st.integers(0, 70),
)
def test_sparse_from_probs_property(weights: list[float], k: int) -> None:
    w = np.array(weights)
    if w.sum() == 0:
        p = w
    else:
        p = w / w.sum()
    sp = sparse_from_probs(p, k)
    nnz = int((p > 0).sum())
    assert sp.k == min(k, nnz)
    kept = np.zeros(len(p), dtype=bool)
    kept[sp.ids] = True
    assert (p[kept] > 0).all()
    if kept.any() and (~kept & (p > 0)).any():
        assert p[kept].min() >= p[~kept].max()  # a genuine top-k set
    assert sp.tail_mass == pytest.approx(max(0.0, 1.0 - float(p[kept].sum())), abs=1e-7)
    dense = sp.to_dense()
    assert dense.dtype == np.float32 and dense.shape == (len(p),)
    np.testing.assert_array_equal(dense[~kept], 0)
    np.testing.assert_array_equal(dense[kept], p[kept].astype(np.float32))
    assert sparse_from_probs(p, k) == sp  # deterministic


def test_to_dense_does_not_spread_tail() -> None:
    sp = sparse_from_probs(dist(1000, 3), 10)
    dense = sp.to_dense()
    assert np.count_nonzero(dense) == 10
    assert float(dense.sum(dtype=np.float64)) == pytest.approx(1 - sp.tail_mass, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Speed (no Python loops over vocab-sized arrays)
# ------------------------------------------------------------------------------------------------


def test_large_messages_encode_and_decode_fast() -> None:
    blk = block(MAX_DRAFT_TOKENS, vocab=V16, dense=True)  # 6.3 MB on the wire
    req = request(vocab=V32, k=256)
    t0 = time.perf_counter()
    for _ in range(3):
        assert decode(encode(blk)) is not None
        assert decode(encode(req)) is not None
    elapsed = (time.perf_counter() - t0) / 3
    assert elapsed < 0.5, f"{elapsed:.3f}s per round trip"
    assert len(encode(blk)) == 40 + 64 * 2 + 64 * 4 + 2 * 64 * V16 <= MAX_MESSAGE_BYTES


def test_verdict_load_round_trips_beside_sparse_and_costs_four_bytes() -> None:
    """The verifier's load (busy fraction in 1/255 steps, sessions per forward, sessions held)
    travels in four bytes behind the header; a verdict without it is unchanged on the wire."""
    plain = verdict(k=4)
    loaded = plain.model_copy(update={"busy": 0.5, "batch": 7, "sessions": 300})
    loaded = Verdict.model_validate(loaded.model_dump())  # through the validators
    assert loaded.busy == round(0.5 * 255) / 255  # quantised on construction
    out = decode_as(encode(loaded), Verdict)
    assert out == loaded and out.sparse == plain.sparse
    assert len(encode(loaded)) == len(encode(plain)) + 4 == loaded.wire_size()
    # flags bit 1 without the two bytes is a truncated message
    assert_codec_error(patch(encode(plain), 36, "<B", 3))
    with pytest.raises(ValidationError, match="go together"):
        Verdict.model_validate({**plain.model_dump(), "busy": 0.5, "batch": 1})
    with pytest.raises(ValidationError):
        Verdict.model_validate({**plain.model_dump(), "busy": 1.5, "batch": 1, "sessions": 1})


def test_a_lead_block_round_trips_and_carries_no_draft_tokens() -> None:
    """The block that hands a session over to the verifier: flag bit 1, a prefix, no tokens."""
    lead = DraftBlock(session=SESSION, epoch=3, seq=9, pos=40, prefix=(5, 6), tokens=(), q=(),
                      vocab_size=V16, lead=True)  # fmt: skip
    assert decode_as(encode(lead), DraftBlock) == lead
    assert encode(lead)[34] == 0x02 and len(encode(lead)) == lead.wire_size()
    with pytest.raises(ValidationError, match="no draft tokens"):
        DraftBlock(session=SESSION, epoch=0, seq=0, pos=0, prefix=(), tokens=(1,), q=(0.5,),
                   vocab_size=V16, lead=True)  # fmt: skip
