"""Compact binary wire codec for every PicoSpec message.

Every message that crosses the network (edge drafter <-> cloud verifier, drafter <-> edge
sampler) is a :class:`DraftBlock`, :class:`Verdict`, :class:`SampleRequest` or
:class:`SampleReply`, encoded with :func:`encode` and decoded with :func:`decode`. The models are
frozen pydantic v2 models whose validators enforce every invariant on construction; :func:`decode`
builds them through the same validators, so a decoded message is exactly as valid as a
constructed one. Every problem a decoder finds is reported as :class:`CodecError` (a
``ValueError``), with the underlying exception chained as ``__cause__``.

This module is the protocol's reference and its public face: the docstring below is the byte
layout, and every public name of the protocol is importable from here. The code lives in four
modules, one job each:

* :mod:`picospec.protocol.layout`: limits, enums, header structs, id widths, the u8 value code;
* :mod:`picospec.protocol.schemas`: the pydantic message models and :func:`sparse_from_probs`;
* :mod:`picospec.protocol.binary`: :func:`encode`, :func:`decode` and :class:`CodecError`;
* :mod:`picospec.protocol.sizes`: :func:`message_size_table`.

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
34      1       flags u8: bit 0 = dense_q present; bit 1 = lead (the verifier leads from
                here: it feeds the prefix and decodes on its own; T must be 0); bits 2-7
                must be 0
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
36      1       flags u8: bit 0 = sparse present; bit 1 = load present; bits 2-7 must be 0
37      1       busy u8: the verifier's busy fraction x 255 (0..255; only with flags bit 1)
38      1       batch u8: its sessions per forward, capped at 255 (only with flags bit 1)
39      2       sessions u16: the sessions it holds, capped at 65535 (only with flags bit 1)
..      ..      SparseDist block (only when flags bit 0 is set); its vocab_size must equal V
======  ======  =========================================================================

Total: ``37 [+ 4] [+ 13 + K * (w + b)]``. The load (bit 1) was added within version 1: a
verdict without it decodes as before; a decoder older than it refuses the unknown bit.

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

# Every name this module defined before the split stays importable from here; those outside
# __all__ are marked as re-exported.
from picospec.protocol.binary import (
    CodecError,
    decode,
    decode_as,
    encode,
    encoded_size,
    message_type_name,
)
from picospec.protocol.layout import (
    MAX_DRAFT_TOKENS,
    MAX_MESSAGE_BYTES,
    MAX_PREFIX_TOKENS,
    MAX_VOCAB,
    PROTOCOL_VERSION,
    SAMPLE_Q_SUM_TOLERANCE,  # noqa: F401 (re-exported)
    SESSION_BYTES,  # noqa: F401 (re-exported)
    SPARSE_SUM_TOLERANCE,  # noqa: F401 (re-exported)
    U8_MAX_RELATIVE_ERROR,  # noqa: F401 (re-exported)
    U8_ZERO_THRESHOLD,  # noqa: F401 (re-exported)
    U16_ID_MAX_VOCAB,  # noqa: F401 (re-exported)
    ValueCodec,
    VerdictStatus,
    dequantize_u8,  # noqa: F401 (re-exported)
    id_width,  # noqa: F401 (re-exported)
    quantize_u8,  # noqa: F401 (re-exported)
)
from picospec.protocol.schemas import (
    U32,  # noqa: F401 (re-exported)
    U64,  # noqa: F401 (re-exported)
    DraftBlock,
    Message,
    SampleReply,
    SampleRequest,
    Session,  # noqa: F401 (re-exported)
    SparseDist,
    T,  # noqa: F401 (re-exported)
    TokenId,  # noqa: F401 (re-exported)
    Verdict,
    VocabSize,  # noqa: F401 (re-exported)
    sparse_from_probs,
)
from picospec.protocol.sizes import message_size_table

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
