"""The binary codec: :func:`encode` and :func:`decode` of every PicoSpec message.

Encoding packs a validated model (:mod:`picospec.protocol.schemas`) into the little-endian layout
documented in :mod:`picospec.protocol.codec`; decoding checks sizes, version, type, counts and
the declared length before allocating anything, parses arrays zero-copy, and builds the model
through its validators. Every problem a decoder finds is a :class:`CodecError` (a ``ValueError``)
with the underlying exception chained as ``__cause__``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from picospec.protocol.layout import (
    _CODEC_TO_WIRE,
    _DRAFT_FLAG_DENSE_Q,
    _DRAFT_FLAG_LEAD,
    _DRAFT_HEADER,
    _F16,
    _F32,
    _NO_TOKEN,
    _PREAMBLE,
    _SAMPLE_REPLY,
    _SAMPLE_REQUEST_HEADER,
    _SPARSE_HEADER,
    _TYPE_NAMES,
    _VALUE_DTYPE,
    _VERDICT_FLAG_LOAD,
    _VERDICT_FLAG_SPARSE,
    _VERDICT_HEADER,
    _VERDICT_LOAD,
    _WIRE_TO_CODEC,
    LOAD_STEPS,
    MAX_DRAFT_TOKENS,
    MAX_MESSAGE_BYTES,
    MAX_PREFIX_TOKENS,
    MAX_VOCAB,
    PROTOCOL_VERSION,
    ValueCodec,
    _id_dtype,
    _MsgType,
    dequantize_u8,
    id_width,
    quantize_u8,
)
from picospec.protocol.schemas import (
    DraftBlock,
    Message,
    SampleReply,
    SampleRequest,
    SparseDist,
    T,
    Verdict,
    _Model,
)


class CodecError(ValueError):
    """The one error every decoder raises for malformed, truncated, wrong-version, oversized or
    invalid buffers."""


_CLS_TO_TYPE: dict[type[_Model], int] = {
    DraftBlock: _MsgType.DRAFT_BLOCK,
    Verdict: _MsgType.VERDICT,
    SampleRequest: _MsgType.SAMPLE_REQUEST,
    SampleReply: _MsgType.SAMPLE_REPLY,
}


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _encode_values(probs: np.ndarray, codec: ValueCodec) -> bytes:
    if codec is ValueCodec.U8:
        return quantize_u8(probs).tobytes()
    return probs.astype(_VALUE_DTYPE[codec]).tobytes()


def _encode_sparse(sp: SparseDist) -> list[bytes]:
    return [
        _SPARSE_HEADER.pack(sp.vocab_size, sp.k, _CODEC_TO_WIRE[sp.value_codec], sp.tail_mass),
        sp.ids.astype(_id_dtype(sp.vocab_size)).tobytes(),
        _encode_values(sp.probs, sp.value_codec),
    ]


def _encode_parts(msg: Message) -> list[bytes]:
    if isinstance(msg, DraftBlock):
        ids = _id_dtype(msg.vocab_size)
        flags = (_DRAFT_FLAG_DENSE_Q if msg.dense_q is not None else 0) | (
            _DRAFT_FLAG_LEAD if msg.lead else 0
        )
        parts = [
            _DRAFT_HEADER.pack(
                PROTOCOL_VERSION,
                _MsgType.DRAFT_BLOCK,
                msg.session,
                msg.epoch,
                msg.seq,
                msg.pos,
                msg.vocab_size,
                flags,
                len(msg.tokens),
                len(msg.prefix),
            ),
            np.asarray(msg.prefix, dtype=np.int64).astype(ids).tobytes(),
            np.asarray(msg.tokens, dtype=np.int64).astype(ids).tobytes(),
            np.asarray(msg.q, dtype=_F32).tobytes(),
        ]
        if msg.dense_q is not None:
            parts.append(msg.dense_q.astype(_F16).tobytes())
        return parts
    if isinstance(msg, Verdict):
        parts = [
            _VERDICT_HEADER.pack(
                PROTOCOL_VERSION,
                _MsgType.VERDICT,
                msg.session,
                msg.epoch,
                msg.seq,
                int(msg.status),
                msg.accepted,
                msg.vocab_size,
                _NO_TOKEN if msg.token is None else msg.token,
                (_VERDICT_FLAG_SPARSE if msg.sparse is not None else 0)
                | (_VERDICT_FLAG_LOAD if msg.busy is not None else 0),
            )
        ]
        if msg.busy is not None:
            parts.append(_VERDICT_LOAD.pack(round(msg.busy * LOAD_STEPS), msg.batch, msg.sessions))
        if msg.sparse is not None:
            parts.extend(_encode_sparse(msg.sparse))
        return parts
    if isinstance(msg, SampleRequest):
        return [
            _SAMPLE_REQUEST_HEADER.pack(PROTOCOL_VERSION, _MsgType.SAMPLE_REQUEST, msg.seed),
            *_encode_sparse(msg.sparse),
            msg.q.astype(_F32).tobytes(),
        ]
    if isinstance(msg, SampleReply):
        return [_SAMPLE_REPLY.pack(PROTOCOL_VERSION, _MsgType.SAMPLE_REPLY, msg.token)]
    raise TypeError(f"cannot encode {type(msg).__name__}: not a PicoSpec message")


def encode(msg: Message) -> bytes:
    """Encode a message to its wire bytes (layout in the module docstring)."""
    out = b"".join(_encode_parts(msg))
    if len(out) != msg.wire_size():  # pragma: no cover - internal consistency guard
        raise AssertionError(f"encoded {len(out)} bytes, layout says {msg.wire_size()}")
    return out


def encoded_size(msg: Message) -> int:
    """Size of ``encode(msg)`` in bytes."""
    return len(encode(msg))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class _Reader:
    """Sequential zero-copy reader over a byte memoryview."""

    __slots__ = ("mv", "off", "what")

    def __init__(self, mv: memoryview, what: str) -> None:
        self.mv = mv
        self.off = 0
        self.what = what

    def need(self, n: int) -> None:
        if self.off + n > self.mv.nbytes:
            raise CodecError(
                f"{self.what}: truncated: need {self.off + n} bytes, buffer has {self.mv.nbytes}"
            )

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        self.need(st.size)
        out = st.unpack_from(self.mv, self.off)
        self.off += st.size
        return out

    def array(self, dtype: np.dtype[Any], count: int) -> np.ndarray:
        self.need(count * dtype.itemsize)
        out = np.frombuffer(self.mv, dtype=dtype, count=count, offset=self.off)
        self.off += count * dtype.itemsize
        return out

    def expect_total(self, total: int) -> None:
        """Check the declared total length against the buffer, before reading any array."""
        if total != self.mv.nbytes:
            raise CodecError(
                f"{self.what}: length mismatch: header declares {total} bytes, "
                f"buffer has {self.mv.nbytes}"
                + (" (trailing bytes)" if total < self.mv.nbytes else " (truncated)")
            )


def _reject_sign_bit(arr: np.ndarray, what: str) -> None:
    """Wire floats that must be >= 0 may not carry a sign bit (this also rejects -0.0, which
    keeps the encoding canonical: models normalise -0.0 to +0.0)."""
    if arr.size and np.signbit(arr).any():
        raise CodecError(f"{what}: negative value (or -0.0) on the wire")


def _check_vocab(vocab_size: int, max_vocab: int, what: str) -> None:
    limit = min(max_vocab, MAX_VOCAB)
    if not 1 <= vocab_size <= limit:
        raise CodecError(f"{what}: vocab_size {vocab_size} not in [1, {limit}]")


def _read_sparse_header(r: _Reader, max_vocab: int) -> tuple[int, int, ValueCodec, float, int]:
    """Read and bound-check a SparseDist header; returns (V, K, codec, tail, body_bytes)."""
    vocab_size, k, codec_byte, tail_mass = r.unpack(_SPARSE_HEADER)
    _check_vocab(vocab_size, max_vocab, f"{r.what}.sparse")
    if k > vocab_size:
        raise CodecError(f"{r.what}.sparse: K={k} exceeds vocab_size={vocab_size}")
    codec = _WIRE_TO_CODEC.get(codec_byte)
    if codec is None:
        raise CodecError(f"{r.what}.sparse: unknown value codec {codec_byte}")
    body = k * (id_width(vocab_size) + _VALUE_DTYPE[codec].itemsize)
    return vocab_size, k, codec, tail_mass, body


def _read_sparse_body(
    r: _Reader, vocab_size: int, k: int, codec: ValueCodec, tail_mass: float
) -> SparseDist:
    ids = r.array(_id_dtype(vocab_size), k)
    values = r.array(_VALUE_DTYPE[codec], k)
    if codec is ValueCodec.U8:
        probs = dequantize_u8(values)
    else:
        _reject_sign_bit(values, f"{r.what}.sparse.probs")
        probs = values
    return SparseDist(
        vocab_size=vocab_size, ids=ids, probs=probs, tail_mass=tail_mass, value_codec=codec
    )


def _decode_draft_block(mv: memoryview, max_vocab: int) -> DraftBlock:
    r = _Reader(mv, "draft_block")
    (_, _, session, epoch, seq, pos, vocab_size, flags, n_tokens, n_prefix) = r.unpack(
        _DRAFT_HEADER
    )
    _check_vocab(vocab_size, max_vocab, r.what)
    if flags & ~(_DRAFT_FLAG_DENSE_Q | _DRAFT_FLAG_LEAD):
        raise CodecError(f"draft_block: unknown flag bits 0x{flags:02x}")
    if n_tokens > MAX_DRAFT_TOKENS:
        raise CodecError(f"draft_block: n_tokens {n_tokens} > MAX_DRAFT_TOKENS")
    if n_prefix > MAX_PREFIX_TOKENS:
        raise CodecError(f"draft_block: n_prefix {n_prefix} > MAX_PREFIX_TOKENS")
    has_dense = bool(flags & _DRAFT_FLAG_DENSE_Q)
    ids = _id_dtype(vocab_size)
    total = _DRAFT_HEADER.size + (n_prefix + n_tokens) * ids.itemsize + 4 * n_tokens
    if has_dense:
        total += 2 * n_tokens * vocab_size
    r.expect_total(total)
    prefix = r.array(ids, n_prefix)
    tokens = r.array(ids, n_tokens)
    q = r.array(_F32, n_tokens)
    dense_q = None
    if has_dense:
        dense_q = r.array(_F16, n_tokens * vocab_size).reshape(n_tokens, vocab_size)
        _reject_sign_bit(dense_q, "draft_block.dense_q")
    return DraftBlock(
        session=session,
        epoch=epoch,
        seq=seq,
        pos=pos,
        prefix=tuple(prefix.tolist()),
        tokens=tuple(tokens.tolist()),
        q=tuple(q.tolist()),
        dense_q=dense_q,
        vocab_size=vocab_size,
        lead=bool(flags & _DRAFT_FLAG_LEAD),
    )


def _decode_verdict(mv: memoryview, max_vocab: int) -> Verdict:
    r = _Reader(mv, "verdict")
    (_, _, session, epoch, seq, status, accepted, vocab_size, token, flags) = r.unpack(
        _VERDICT_HEADER
    )
    _check_vocab(vocab_size, max_vocab, r.what)
    if flags & ~(_VERDICT_FLAG_SPARSE | _VERDICT_FLAG_LOAD):
        raise CodecError(f"verdict: unknown flag bits 0x{flags:02x}")
    if accepted > MAX_DRAFT_TOKENS:
        raise CodecError(f"verdict: accepted {accepted} > MAX_DRAFT_TOKENS")
    busy = batch = sessions = None
    if flags & _VERDICT_FLAG_LOAD:
        code, batch, sessions = r.unpack(_VERDICT_LOAD)
        busy = code / LOAD_STEPS
    sparse = None
    if flags & _VERDICT_FLAG_SPARSE:
        sp_vocab, k, codec, tail_mass, body = _read_sparse_header(r, max_vocab)
        if sp_vocab != vocab_size:
            raise CodecError(f"verdict: sparse.vocab_size {sp_vocab} != vocab_size {vocab_size}")
        r.expect_total(r.off + body)
        sparse = _read_sparse_body(r, sp_vocab, k, codec, tail_mass)
    else:
        r.expect_total(r.off)
    return Verdict(
        session=session,
        epoch=epoch,
        seq=seq,
        status=status,
        accepted=accepted,
        token=None if token == _NO_TOKEN else token,
        sparse=sparse,
        vocab_size=vocab_size,
        busy=busy,
        batch=batch,
        sessions=sessions,
    )


def _decode_sample_request(mv: memoryview, max_vocab: int) -> SampleRequest:
    r = _Reader(mv, "sample_request")
    (_, _, seed) = r.unpack(_SAMPLE_REQUEST_HEADER)
    vocab_size, k, codec, tail_mass, body = _read_sparse_header(r, max_vocab)
    r.expect_total(r.off + body + 4 * vocab_size)
    sparse = _read_sparse_body(r, vocab_size, k, codec, tail_mass)
    q = r.array(_F32, vocab_size)
    _reject_sign_bit(q, "sample_request.q")
    return SampleRequest(sparse=sparse, q=q, seed=seed)


def _decode_sample_reply(mv: memoryview, max_vocab: int) -> SampleReply:
    r = _Reader(mv, "sample_reply")
    r.expect_total(_SAMPLE_REPLY.size)
    (_, _, token) = r.unpack(_SAMPLE_REPLY)
    return SampleReply(token=token)


_DECODERS = {
    _MsgType.DRAFT_BLOCK: _decode_draft_block,
    _MsgType.VERDICT: _decode_verdict,
    _MsgType.SAMPLE_REQUEST: _decode_sample_request,
    _MsgType.SAMPLE_REPLY: _decode_sample_reply,
}


def _as_view(buf: Any) -> memoryview:
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, bytearray or memoryview, got {type(buf).__name__}")
    try:
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unsupported buffer: {exc}") from exc
    return mv


def _peek_type(mv: memoryview) -> int:
    """Check size, version and type; return the message type byte."""
    n = mv.nbytes
    if n == 0:
        raise CodecError("empty buffer")
    if n > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {n} bytes exceeds MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES}")
    if n < _PREAMBLE.size:
        raise CodecError(f"truncated: {n} byte(s), the preamble alone is {_PREAMBLE.size}")
    version, msg_type = _PREAMBLE.unpack_from(mv, 0)
    if version != PROTOCOL_VERSION:
        raise CodecError(
            f"unsupported protocol version: expected {PROTOCOL_VERSION}, got {version}"
        )
    if msg_type not in _DECODERS:
        raise CodecError(f"unknown message type {msg_type}")
    return msg_type


def decode(buf: bytes | bytearray | memoryview, *, max_vocab: int = MAX_VOCAB) -> Message:
    """Decode one message; raises :class:`CodecError` for anything malformed or invalid.

    ``max_vocab`` lowers the accepted vocab_size (never raises it above MAX_VOCAB); it is checked
    before anything is allocated.
    """
    try:
        mv = _as_view(buf)
        return _DECODERS[_peek_type(mv)](mv, max_vocab)  # type: ignore[index]
    except CodecError:
        raise
    except Exception as exc:  # ValidationError, struct.error, ValueError, OverflowError, ...
        raise CodecError(f"invalid message: {exc}") from exc


def decode_as(
    buf: bytes | bytearray | memoryview, cls: type[T], *, max_vocab: int = MAX_VOCAB
) -> T:
    """Decode a message that must be of type ``cls``; :class:`CodecError` otherwise.

    The type byte is checked before the body is parsed.
    """
    expected = _CLS_TO_TYPE.get(cls)
    if expected is None:
        raise TypeError(f"{cls!r} is not a PicoSpec message class")
    try:
        got = _peek_type(_as_view(buf))
    except CodecError:
        raise
    except Exception as exc:  # pragma: no cover - _peek_type only raises CodecError
        raise CodecError(f"invalid message: {exc}") from exc
    if got != expected:
        raise CodecError(f"expected a {_TYPE_NAMES[expected]}, got a {_TYPE_NAMES[got]}")
    msg = decode(buf, max_vocab=max_vocab)
    if not isinstance(msg, cls):  # pragma: no cover - the type byte was checked above
        raise CodecError(f"expected a {cls.__name__}, got a {type(msg).__name__}")
    return msg


def message_type_name(buf: Any) -> str:
    """``"draft_block"``, ``"verdict"``, ``"sample_request"``, ``"sample_reply"`` from the
    preamble (for metrics labels), or ``"unknown"`` (empty, wrong version, unknown type, not a
    buffer). Only the first two bytes are inspected; never raises."""
    try:
        mv = memoryview(buf)
        if mv.nbytes < _PREAMBLE.size:
            return "unknown"
        head = mv.cast("B")[:2] if (mv.format != "B" or mv.ndim != 1) else mv[:2]
        version, msg_type = head[0], head[1]
        if version != PROTOCOL_VERSION:
            return "unknown"
        return _TYPE_NAMES.get(msg_type, "unknown")
    except (TypeError, ValueError):  # not a buffer, or one memoryview cannot cast
        return "unknown"
