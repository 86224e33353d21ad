"""Compact binary wire codec for every PicoSpec message.

Every message that crosses the network (edge drafter <-> cloud verifier, drafter <-> edge
sampler) is a :class:`DraftBlock`, :class:`Verdict`, :class:`SampleRequest` or
:class:`SampleReply`, encoded with :func:`encode` and decoded with :func:`decode`. The models are
frozen pydantic v2 models whose validators enforce every invariant on construction; :func:`decode`
builds them through the same validators, so a decoded message is exactly as valid as a
constructed one. Every problem a decoder finds is reported as :class:`CodecError` (a
``ValueError``), with the underlying exception chained as ``__cause__``.

Conventions
===========

* Everything is little-endian, with no padding and no alignment.
* ``u8``/``u16``/``u32``/``u64`` are unsigned integers, ``i32`` a signed one, ``f16``/``f32`` IEEE
  754 binary16/binary32.
* ``ID`` is one token id: ``u16`` when the governing ``vocab_size <= 65536``, else ``u32``
  (``w`` = 2 or 4 bytes below). There is no width flag: the decoder derives the width from the
  ``vocab_size`` field that governs the array (the DraftBlock / Verdict header, or the SparseDist
  block's own ``vocab_size``), exactly as the encoder does.
* Every message starts with the same 2-byte preamble: ``version u8`` (= ``PROTOCOL_VERSION`` = 1)
  and ``type u8``: 1 draft_block, 2 verdict, 3 sample_request, 4 sample_reply.
* A buffer must contain exactly one message: its length must equal the length the headers
  declare (trailing bytes are an error) and may not exceed ``MAX_MESSAGE_BYTES`` (8 MiB).
* Reserved flag bits must be zero.

DraftBlock (type 1, drafter -> verifier), 40-byte header
--------------------------------------------------------

======  ======  =========================================================================
offset  bytes   field
======  ======  =========================================================================
0       1       version u8
1       1       type u8 = 1
2       16      session (16 raw bytes)
18      4       epoch u32
22      4       seq u32
26      4       pos u32 (absolute position of the first token of prefix+tokens)
30      4       vocab_size u32 (V, 1..MAX_VOCAB; decides w)
34      1       flags u8: bit 0 = dense_q present; bits 1-7 must be 0
35      1       n_tokens u8 (T, 0..MAX_DRAFT_TOKENS = 64)
36      4       n_prefix u32 (P, 0..MAX_PREFIX_TOKENS = 2**20)
40      P*w     prefix: ID[P]
..      T*w     tokens: ID[T]
..      4*T     q: f32[T]
..      2*T*V   dense_q: f16[T][V], row-major (only when flags bit 0 is set)
======  ======  =========================================================================

Total: ``40 + (P + T) * w + 4 * T [+ 2 * T * V]``.

Verdict (type 2, verifier -> drafter), 37-byte header
-----------------------------------------------------

======  ======  =========================================================================
offset  bytes   field
======  ======  =========================================================================
0       1       version u8
1       1       type u8 = 2
2       16      session
18      4       epoch u32
22      4       seq u32
26      1       status u8 (VerdictStatus: 0 OK, 1 UNKNOWN_SESSION, 2 BAD_BLOCK, 3 DRAINING)
27      1       accepted u8 (0..64)
28      4       vocab_size u32 (V, 1..MAX_VOCAB)
32      4       token i32: a token id in [0, V), or -1 for None (always i32, whatever V)
36      1       flags u8: bit 0 = sparse present; bits 1-7 must be 0
37      ..      SparseDist block (only when flags bit 0 is set); its vocab_size must equal V
======  ======  =========================================================================

Total: ``37 [+ 13 + K * (w + b)]``.

SparseDist block (embedded in Verdict and SampleRequest), 13-byte header
-----------------------------------------------------------------------

======  ======  =========================================================================
offset  bytes   field
======  ======  =========================================================================
0       4       vocab_size u32 (V, 1..MAX_VOCAB; decides w for the ids below)
4       4       K u32 (number of entries, 0..V)
8       1       value_codec u8: 0 = f32 (b = 4), 1 = f16 (b = 2), 2 = u8 log code (b = 1)
9       4       tail_mass f32
13      K*w     ids: ID[K] (unique, each < V)
13+K*w  K*b     values[K] in the value codec
======  ======  =========================================================================

Total: ``13 + K * (w + b)``.

SampleRequest (type 3, drafter -> edge sampler)
-----------------------------------------------

======  ======  =========================================================================
offset  bytes   field
======  ======  =========================================================================
0       1       version u8
1       1       type u8 = 3
2       8       seed u64
10      ..      SparseDist block (13 + K * (w + b) bytes; its vocab_size is V)
..      4*V     q: f32[V], the draft distribution at the rejected position
======  ======  =========================================================================

Total: ``23 + K * (w + b) + 4 * V``.

SampleReply (type 4, sampler -> drafter)
----------------------------------------

======  ======  =========================================================================
offset  bytes   field
======  ======  =========================================================================
0       1       version u8
1       1       type u8 = 4
2       4       token u32 (< MAX_VOCAB)
======  ======  =========================================================================

Total: 6 bytes.

Value codecs (SparseDist probabilities) and their errors
========================================================

* ``f32``: exact.
* ``f16``: IEEE binary16. Relative error <= 2**-11 (~4.9e-4) for p >= 2**-14 (~6.1e-5);
  absolute error <= 2**-25 (~3.0e-8) below that (subnormals).
* ``u8``: logarithmic code. Code ``c`` in 1..255 means ``p = 2 ** (-(255 - c) / 16)`` (255 ->
  1.0, 1 -> 2**-15.875 ~ 1.66e-5; consecutive codes differ by a factor 2**(1/16) ~ 1.044);
  code 0 means exactly 0. The encoder rounds to the nearest code in log space, halves up:
  ``c = clip(floor(255 + 16 * log2(p) + 0.5), 0, 255)``. Hence for p >= 2**-15.90625
  (~1.63e-5) the relative error is <= 2**(1/32) - 1 (~2.19 %); smaller p (including 0) encode
  to code 0, an absolute error below 1.63e-5. Decoding is a 256-entry float32 table lookup.

``tail_mass`` is always sent as f32 and is whatever the sender computed *before* quantising the
values, so after a lossy codec ``sum(probs) + tail_mass`` may exceed 1 slightly. The SparseDist
validator therefore checks ``sum(probs) + tail_mass <= 1 + tol`` with a tolerance chosen by the
value codec: f32 1e-3, f16 1e-2, u8 3e-2 (the u8 bound follows from the 2.19 % maximum relative
error plus the f32 sender slack). The same tolerance applies to a model constructed by the sender.

Other wire value notes
======================

* ``DraftBlock.q`` travels as f32, so the model rounds each q(x) to the nearest float32 on
  construction (a q that rounds to 0, i.e. below ~1.4e-45, is rejected); ``SparseDist.tail_mass``
  is rounded to float32 likewise. Together with f32 arrays this makes every round trip exact for
  f32 data, and the encoding canonical: if ``decode(buf)`` succeeds, ``encode(decode(buf)) == buf``.
* ``DraftBlock.dense_q`` is held as float32 but travels as f16 (the "vanilla" baseline), so it
  round-trips with the f16 error above.

Validation (on construction and therefore on decode)
====================================================

* session exactly 16 bytes; epoch, seq, pos u32; seed u64; accepted and len(tokens) <= 64;
  len(prefix) <= MAX_PREFIX_TOKENS; 1 <= vocab_size <= MAX_VOCAB; every token id in
  [0, vocab_size) (SampleReply: [0, MAX_VOCAB)).
* DraftBlock: len(q) == len(tokens); each q(x) finite and in (0, 1]; dense_q, when present,
  float32 [len(tokens), vocab_size], finite and in [0, 1].
* SparseDist: ids int64 [K] unique and in range; probs float32 [K] finite and in [0, 1];
  K <= vocab_size; tail_mass finite and in [0, 1]; sum(probs) + tail_mass <= 1 + tol (above).
* Verdict: sparse.vocab_size == vocab_size.
* SampleRequest: q float32 [sparse.vocab_size], finite, >= 0, |sum(q) - 1| <= 1e-3.
* The encoded size of any message is at most MAX_MESSAGE_BYTES.

The decoder additionally checks, before allocating anything, that the buffer is non-empty, no
larger than MAX_MESSAGE_BYTES, of the right version and a known type, that every declared count
respects its MAX_* limit and ``max_vocab``, that K <= vocab_size, and that the declared total length
equals the buffer length. Array fields are parsed with ``np.frombuffer`` (zero-copy views) and
then copied once into the model's read-only arrays.

Sizes of representative messages (see :func:`message_size_table`)
=================================================================

================================================================  =======
message                                                           bytes
================================================================  =======
draft_block: 4 draft tokens, no prefix, vocab 49152 (u16 ids)     64
draft_block: 4 draft tokens + 1 prefix token, vocab 49152         66
draft_block: 8 draft tokens, no prefix, vocab 49152               88
draft_block: 4 draft tokens, no prefix, vocab 100000 (u32 ids)    72
draft_block: 4 draft tokens + dense_q (f16), vocab 49152          393280
verdict: no token, no sparse                                      37
verdict: token only (greedy correction)                           37
verdict: sparse K=32 f32, vocab 49152                             242
verdict: sparse K=32 f16, vocab 49152                             178
verdict: sparse K=32 u8, vocab 49152                              146
verdict: sparse K=32 f32, vocab 100000 (u32 ids)                  306
sample_request: sparse K=32 f32 + q f32, vocab 49152              196823
sample_request: sparse K=32 f16 + q f32, vocab 49152              196759
sample_reply                                                      6
================================================================  =======
"""

from __future__ import annotations

import struct
from enum import IntEnum, StrEnum
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MAX_DRAFT_TOKENS",
    "MAX_MESSAGE_BYTES",
    "MAX_PREFIX_TOKENS",
    "MAX_VOCAB",
    "PROTOCOL_VERSION",
    "CodecError",
    "DraftBlock",
    "Message",
    "SampleReply",
    "SampleRequest",
    "SparseDist",
    "ValueCodec",
    "Verdict",
    "VerdictStatus",
    "decode",
    "decode_as",
    "encode",
    "encoded_size",
    "message_size_table",
    "message_type_name",
    "sparse_from_probs",
]

PROTOCOL_VERSION = 1
MAX_DRAFT_TOKENS = 64  # per block
MAX_PREFIX_TOKENS = 1 << 20  # committed tokens a block may carry (re-prefill on migration)
MAX_VOCAB = 1 << 24
MAX_MESSAGE_BYTES = 8 << 20

SESSION_BYTES = 16
U16_ID_MAX_VOCAB = 1 << 16  # vocab sizes up to this use u16 ids on the wire

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1

# Sum tolerances for sum(probs) + tail_mass <= 1 + tol, by value codec (see module docstring).
SPARSE_SUM_TOLERANCE: dict[str, float] = {"f32": 1e-3, "f16": 1e-2, "u8": 3e-2}
SAMPLE_Q_SUM_TOLERANCE = 1e-3


class CodecError(ValueError):
    """The one error every decoder raises for malformed, truncated, wrong-version, oversized or
    invalid buffers."""


class ValueCodec(StrEnum):  # a (str, Enum): ValueCodec.U8 == "u8"
    """How the probabilities of a :class:`SparseDist` are stored on the wire."""

    F32 = "f32"
    F16 = "f16"
    U8 = "u8"


class VerdictStatus(IntEnum):
    OK = 0
    UNKNOWN_SESSION = 1
    BAD_BLOCK = 2
    DRAINING = 3


class _MsgType(IntEnum):
    DRAFT_BLOCK = 1
    VERDICT = 2
    SAMPLE_REQUEST = 3
    SAMPLE_REPLY = 4


_TYPE_NAMES: dict[int, str] = {
    _MsgType.DRAFT_BLOCK: "draft_block",
    _MsgType.VERDICT: "verdict",
    _MsgType.SAMPLE_REQUEST: "sample_request",
    _MsgType.SAMPLE_REPLY: "sample_reply",
}

_CODEC_TO_WIRE: dict[ValueCodec, int] = {ValueCodec.F32: 0, ValueCodec.F16: 1, ValueCodec.U8: 2}
_WIRE_TO_CODEC: dict[int, ValueCodec] = {v: k for k, v in _CODEC_TO_WIRE.items()}
_VALUE_DTYPE: dict[ValueCodec, np.dtype[Any]] = {
    ValueCodec.F32: np.dtype("<f4"),
    ValueCodec.F16: np.dtype("<f2"),
    ValueCodec.U8: np.dtype("u1"),
}

_ID_U16 = np.dtype("<u2")
_ID_U32 = np.dtype("<u4")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")

_PREAMBLE = struct.Struct("<BB")  # version, type
_DRAFT_HEADER = struct.Struct("<BB16sIIIIBBI")  # 40 bytes
_VERDICT_HEADER = struct.Struct("<BB16sIIBBIiB")  # 37 bytes
_SPARSE_HEADER = struct.Struct("<IIBf")  # 13 bytes
_SAMPLE_REQUEST_HEADER = struct.Struct("<BBQ")  # 10 bytes
_SAMPLE_REPLY = struct.Struct("<BBI")  # 6 bytes

_DRAFT_FLAG_DENSE_Q = 0x01
_VERDICT_FLAG_SPARSE = 0x01
_NO_TOKEN = -1

# u8 log code: code c in 1..255 -> 2 ** (-(255 - c) / 16); code 0 -> 0.
_U8_STEPS_PER_OCTAVE = 16
_U8_TABLE = np.concatenate(
    [[0.0], 2.0 ** (-(255 - np.arange(1, 256, dtype=np.float64)) / _U8_STEPS_PER_OCTAVE)]
).astype(np.float32)
_U8_TABLE.setflags(write=False)
U8_MAX_RELATIVE_ERROR = 2.0 ** (1 / (2 * _U8_STEPS_PER_OCTAVE)) - 1  # ~0.0219
U8_ZERO_THRESHOLD = 2.0 ** (-254.5 / _U8_STEPS_PER_OCTAVE)  # ~1.63e-5: smaller p encode as 0


def id_width(vocab_size: int) -> int:
    """Bytes per token id on the wire for a vocabulary of ``vocab_size`` tokens (2 or 4)."""
    return 2 if vocab_size <= U16_ID_MAX_VOCAB else 4


def _id_dtype(vocab_size: int) -> np.dtype[Any]:
    return _ID_U16 if vocab_size <= U16_ID_MAX_VOCAB else _ID_U32


def quantize_u8(probs: np.ndarray) -> np.ndarray:
    """Encode probabilities in [0, 1] to the u8 log code (nearest code in log space)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        codes = np.floor(255.5 + _U8_STEPS_PER_OCTAVE * np.log2(p))  # round half up
    return np.clip(codes, 0, 255).astype(np.uint8)


def dequantize_u8(codes: np.ndarray) -> np.ndarray:
    """Decode u8 log codes to float32 probabilities."""
    return _U8_TABLE[np.asarray(codes, dtype=np.uint8)]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

U32 = Annotated[int, Field(ge=0, le=_U32_MAX)]
U64 = Annotated[int, Field(ge=0, le=_U64_MAX)]
VocabSize = Annotated[int, Field(ge=1, le=MAX_VOCAB)]
TokenId = Annotated[int, Field(ge=0, lt=MAX_VOCAB)]
Session = Annotated[bytes, Field(min_length=SESSION_BYTES, max_length=SESSION_BYTES)]


def _is_tensor(value: Any) -> bool:
    # Duck-typed so that importing the codec does not import torch.
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view/copy of an array-like; torch tensors (any device, bf16 included) welcome."""
    if _is_tensor(value):
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.double()  # numpy has no bfloat16; float64 holds every float32 exactly
        return t.numpy()
    return np.asarray(value)


def _frozen_array(value: Any, dtype: np.dtype[Any], ndim: int, what: str) -> np.ndarray:
    """Copy ``value`` into a fresh, read-only, C-contiguous array of ``dtype``."""
    try:
        arr = _to_numpy(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{what}: not convertible to an array: {exc}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.size:
        kind = arr.dtype.kind
        allowed = "iub" if dtype.kind in "iu" else "iubf"
        if kind not in allowed:
            raise ValueError(f"{what}: dtype {arr.dtype} cannot be converted to {dtype}")
    out = np.array(arr, dtype=dtype, copy=True, order="C")
    if out.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # NaN/inf are rejected by the callers' checks
            np.add(out, 0.0, out=out)  # -0.0 -> +0.0, so equal arrays have equal bytes
    out.setflags(write=False)
    return out


def _tuple_input(value: Any) -> Any:
    if _is_tensor(value):
        return tuple(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _check_probabilities(arr: np.ndarray, what: str) -> None:
    """Every value finite and in [0, 1]."""
    if arr.size == 0:
        return
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: values must be finite")
    lo = float(arr.min())
    if lo < 0.0:
        raise ValueError(f"{what}: values must be >= 0, got {lo}")
    hi = float(arr.max())
    if hi > 1.0:
        raise ValueError(f"{what}: values must be <= 1, got {hi}")


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what}: ids must be in [0, {vocab_size}), got range [{lo}, {hi}]")


class _Model(BaseModel):
    """Frozen model base; equality compares numpy fields element-wise (and by dtype)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        for name in type(self).model_fields:
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (
                    isinstance(a, np.ndarray)
                    and isinstance(b, np.ndarray)
                    and a.dtype == b.dtype
                    and np.array_equal(a, b)
                ):
                    return False
            elif a != b:
                return False
        return True

    def __hash__(self) -> int:
        # Arrays hold no NaN and no -0.0 (validated / normalised), so equal arrays of equal
        # dtype have equal bytes and this hash is consistent with __eq__.
        return hash(
            tuple(
                (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v
                for v in (getattr(self, name) for name in type(self).model_fields)
            )
        )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class SparseDist(_Model):
    """Compressed p_j: the top-K (or all non-zero, if fewer) entries of a distribution."""

    vocab_size: VocabSize
    ids: np.ndarray  # int64 [K], unique, each in [0, vocab_size)
    probs: np.ndarray  # float32 [K], finite, in [0, 1]
    tail_mass: float  # 1 - sum(full distribution at ids), computed before quantisation
    value_codec: ValueCodec = ValueCodec.F32

    @field_validator("ids", mode="before")
    @classmethod
    def _v_ids(cls, v: Any) -> np.ndarray:
        return _frozen_array(v, np.dtype(np.int64), 1, "SparseDist.ids")

    @field_validator("probs", mode="before")
    @classmethod
    def _v_probs(cls, v: Any) -> np.ndarray:
        arr = _frozen_array(v, np.dtype(np.float32), 1, "SparseDist.probs")
        _check_probabilities(arr, "SparseDist.probs")
        return arr

    @field_validator("tail_mass", mode="after")
    @classmethod
    def _v_tail(cls, v: float) -> float:
        if not np.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"SparseDist.tail_mass must be finite and in [0, 1], got {v}")
        return float(np.float32(v))

    @model_validator(mode="after")
    def _v_consistency(self) -> SparseDist:
        k = self.ids.shape[0]
        if self.probs.shape[0] != k:
            raise ValueError(f"SparseDist: {k} ids but {self.probs.shape[0]} probs")
        if k > self.vocab_size:
            raise ValueError(f"SparseDist: K={k} exceeds vocab_size={self.vocab_size}")
        _check_ids(self.ids, self.vocab_size, "SparseDist.ids")
        if k > 1 and np.unique(self.ids).shape[0] != k:
            raise ValueError("SparseDist.ids must be unique")
        tol = SPARSE_SUM_TOLERANCE[self.value_codec.value]
        total = float(self.probs.sum(dtype=np.float64)) + self.tail_mass
        if total > 1.0 + tol:
            raise ValueError(
                f"SparseDist: sum(probs) + tail_mass = {total:.6f} exceeds 1 + {tol} "
                f"({self.value_codec.value})"
            )
        return self

    @property
    def k(self) -> int:
        return int(self.ids.shape[0])

    def to_dense(self) -> np.ndarray:
        """float32 [vocab_size] with probs at ids and zeros elsewhere (tail mass NOT spread)."""
        out = np.zeros(self.vocab_size, dtype=np.float32)
        out[self.ids] = self.probs
        return out

    def wire_size(self) -> int:
        width = id_width(self.vocab_size) + _VALUE_DTYPE[self.value_codec].itemsize
        return _SPARSE_HEADER.size + self.k * width


class DraftBlock(_Model):
    """Drafter -> verifier: a block of draft tokens to verify."""

    session: Session
    epoch: U32
    seq: U32
    pos: U32
    prefix: tuple[Annotated[int, Field(ge=0, lt=MAX_VOCAB)], ...] = Field(
        max_length=MAX_PREFIX_TOKENS
    )
    tokens: tuple[Annotated[int, Field(ge=0, lt=MAX_VOCAB)], ...] = Field(
        max_length=MAX_DRAFT_TOKENS
    )
    q: tuple[float, ...] = Field(max_length=MAX_DRAFT_TOKENS)
    dense_q: np.ndarray | None = None
    vocab_size: VocabSize

    @field_validator("session", mode="before")
    @classmethod
    def _v_session(cls, v: Any) -> Any:
        return bytes(v) if isinstance(v, bytearray | memoryview) else v

    @field_validator("prefix", "tokens", "q", mode="before")
    @classmethod
    def _v_sequences(cls, v: Any) -> Any:
        return _tuple_input(v)

    @field_validator("q", mode="after")
    @classmethod
    def _v_q(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            return v
        raw = np.asarray(v, dtype=np.float64)
        if not np.isfinite(raw).all() or raw.min() <= 0.0 or raw.max() > 1.0:
            raise ValueError(f"DraftBlock.q: each q(x) must be finite and in (0, 1], got {v}")
        rounded = raw.astype(np.float32)
        if rounded.min() <= 0.0:
            raise ValueError("DraftBlock.q: a q(x) underflows float32 (rounds to 0)")
        return tuple(rounded.tolist())

    @field_validator("dense_q", mode="before")
    @classmethod
    def _v_dense_q(cls, v: Any) -> np.ndarray | None:
        if v is None:
            return None
        arr = _frozen_array(v, np.dtype(np.float32), 2, "DraftBlock.dense_q")
        _check_probabilities(arr, "DraftBlock.dense_q")
        return arr

    @model_validator(mode="after")
    def _v_consistency(self) -> DraftBlock:
        n = len(self.tokens)
        if len(self.q) != n:
            raise ValueError(f"DraftBlock: {n} tokens but {len(self.q)} q values")
        _check_ids(np.asarray(self.tokens, dtype=np.int64), self.vocab_size, "DraftBlock.tokens")
        _check_ids(np.asarray(self.prefix, dtype=np.int64), self.vocab_size, "DraftBlock.prefix")
        if self.dense_q is not None and self.dense_q.shape != (n, self.vocab_size):
            raise ValueError(
                f"DraftBlock.dense_q: expected shape {(n, self.vocab_size)}, "
                f"got {self.dense_q.shape}"
            )
        _check_size(self.wire_size(), "DraftBlock")
        return self

    def wire_size(self) -> int:
        n = len(self.tokens)
        size = _DRAFT_HEADER.size + (len(self.prefix) + n) * id_width(self.vocab_size) + 4 * n
        if self.dense_q is not None:
            size += 2 * n * self.vocab_size
        return size


class Verdict(_Model):
    """Verifier -> drafter: how many draft tokens were accepted, and what comes next."""

    session: Session
    epoch: U32
    seq: U32
    status: VerdictStatus = VerdictStatus.OK
    accepted: Annotated[int, Field(ge=0, le=MAX_DRAFT_TOKENS)]
    token: TokenId | None = None
    sparse: SparseDist | None = None
    vocab_size: VocabSize

    @field_validator("session", mode="before")
    @classmethod
    def _v_session(cls, v: Any) -> Any:
        return bytes(v) if isinstance(v, bytearray | memoryview) else v

    @model_validator(mode="after")
    def _v_consistency(self) -> Verdict:
        if self.token is not None and self.token >= self.vocab_size:
            raise ValueError(f"Verdict.token {self.token} >= vocab_size {self.vocab_size}")
        if self.sparse is not None and self.sparse.vocab_size != self.vocab_size:
            raise ValueError(
                f"Verdict: sparse.vocab_size {self.sparse.vocab_size} != "
                f"vocab_size {self.vocab_size}"
            )
        _check_size(self.wire_size(), "Verdict")
        return self

    def wire_size(self) -> int:
        size = _VERDICT_HEADER.size
        if self.sparse is not None:
            size += self.sparse.wire_size()
        return size


class SampleRequest(_Model):
    """Drafter -> edge sampler: draw the correction token from the residual of p_j and q."""

    sparse: SparseDist
    q: np.ndarray  # float32 [vocab_size]
    seed: U64

    @field_validator("q", mode="before")
    @classmethod
    def _v_q(cls, v: Any) -> np.ndarray:
        arr = _frozen_array(v, np.dtype(np.float32), 1, "SampleRequest.q")
        if not np.isfinite(arr).all():
            raise ValueError("SampleRequest.q: values must be finite")
        if arr.size and float(arr.min()) < 0.0:
            raise ValueError("SampleRequest.q: values must be >= 0")
        total = float(arr.sum(dtype=np.float64))
        if abs(total - 1.0) > SAMPLE_Q_SUM_TOLERANCE:
            raise ValueError(
                f"SampleRequest.q: must sum to 1 within {SAMPLE_Q_SUM_TOLERANCE}, got {total}"
            )
        return arr

    @model_validator(mode="after")
    def _v_consistency(self) -> SampleRequest:
        if self.q.shape[0] != self.sparse.vocab_size:
            raise ValueError(
                f"SampleRequest: q has {self.q.shape[0]} entries, "
                f"sparse.vocab_size is {self.sparse.vocab_size}"
            )
        _check_size(self.wire_size(), "SampleRequest")
        return self

    @property
    def vocab_size(self) -> int:
        return self.sparse.vocab_size

    def wire_size(self) -> int:
        return _SAMPLE_REQUEST_HEADER.size + self.sparse.wire_size() + 4 * self.q.shape[0]


class SampleReply(_Model):
    """Sampler -> drafter: the sampled token."""

    token: TokenId

    def wire_size(self) -> int:
        return _SAMPLE_REPLY.size


Message = DraftBlock | Verdict | SampleRequest | SampleReply
T = TypeVar("T", DraftBlock, Verdict, SampleRequest, SampleReply)

_CLS_TO_TYPE: dict[type[_Model], int] = {
    DraftBlock: _MsgType.DRAFT_BLOCK,
    Verdict: _MsgType.VERDICT,
    SampleRequest: _MsgType.SAMPLE_REQUEST,
    SampleReply: _MsgType.SAMPLE_REPLY,
}


def _check_size(size: int, what: str) -> None:
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{what}: encoded size {size} exceeds MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES}"
        )


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
        flags = _DRAFT_FLAG_DENSE_Q if msg.dense_q is not None else 0
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
                _VERDICT_FLAG_SPARSE if msg.sparse is not None else 0,
            )
        ]
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
    if flags & ~_DRAFT_FLAG_DENSE_Q:
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
    )


def _decode_verdict(mv: memoryview, max_vocab: int) -> Verdict:
    r = _Reader(mv, "verdict")
    (_, _, session, epoch, seq, status, accepted, vocab_size, token, flags) = r.unpack(
        _VERDICT_HEADER
    )
    _check_vocab(vocab_size, max_vocab, r.what)
    if flags & ~_VERDICT_FLAG_SPARSE:
        raise CodecError(f"verdict: unknown flag bits 0x{flags:02x}")
    if accepted > MAX_DRAFT_TOKENS:
        raise CodecError(f"verdict: accepted {accepted} > MAX_DRAFT_TOKENS")
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
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sparse_from_probs(
    probs: Any, k: int, value_codec: ValueCodec | str = ValueCodec.F32
) -> SparseDist:
    """Compress a full 1-D probability vector to its ``min(k, nnz)`` largest non-zero entries.

    Ties at the cut-off keep the smaller token ids (deterministic). Entries are ordered by
    decreasing probability, then increasing id. ``tail_mass = max(0, 1 - sum(kept))`` is computed
    in float64 from the unquantised probabilities. ``probs`` is a torch tensor or array-like.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    p = np.asarray(_to_numpy(probs), dtype=np.float64)
    if p.ndim != 1 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty 1-D vector, got shape {p.shape}")
    if not np.isfinite(p).all() or float(p.min()) < 0.0:
        raise ValueError("probs must be finite and >= 0")
    nonzero = np.flatnonzero(p > 0.0)
    if k >= nonzero.shape[0]:
        keep = nonzero
    elif k == 0:
        keep = nonzero[:0]
    else:
        threshold = np.partition(p, p.shape[0] - k)[p.shape[0] - k]  # k-th largest value
        above = np.flatnonzero(p > threshold)
        ties = np.flatnonzero(p == threshold)[: k - above.shape[0]]
        keep = np.concatenate([above, ties])
    kept = p[keep]
    order = np.lexsort((keep, -kept))  # by decreasing prob, then increasing id
    keep, kept = keep[order], kept[order]
    tail = min(1.0, max(0.0, 1.0 - float(kept.sum())))
    return SparseDist(
        vocab_size=p.shape[0],
        ids=keep.astype(np.int64),
        probs=kept.astype(np.float32),
        tail_mass=tail,
        value_codec=ValueCodec(value_codec),
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
