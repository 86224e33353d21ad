"""The wire layout's building blocks: limits, enums, header structs, id widths, value codes.

Everything here is a fact of the byte layout documented in :mod:`picospec.protocol.codec` (which
re-exports the public names): the protocol version and size limits, the value codecs and verdict
statuses, the ``struct`` formats of each header, the token-id width rule (u16 up to 65,536 ids,
else u32) and the logarithmic ``u8`` probability code. The schemas
(:mod:`picospec.protocol.schemas`) and the binary codec (:mod:`picospec.protocol.binary`) both
build on it; it imports neither.
"""

from __future__ import annotations

import struct
from enum import IntEnum, StrEnum
from typing import Any

import numpy as np

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
_DRAFT_FLAG_LEAD = 0x02
_VERDICT_FLAG_SPARSE = 0x01
_VERDICT_FLAG_LOAD = 0x02
_VERDICT_LOAD = struct.Struct("<BBH")  # busy u8 (/255), batch u8, sessions u16
LOAD_STEPS = 255  # the verifier's busy fraction travels in steps of 1/255
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
