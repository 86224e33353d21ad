"""The message schemas: frozen pydantic models whose validators enforce every invariant.

:class:`DraftBlock`, :class:`Verdict`, :class:`SampleRequest` and :class:`SampleReply` (with the
embedded :class:`SparseDist`) are what crosses the network; :func:`sparse_from_probs` compresses a
full distribution to a :class:`SparseDist`. A model is valid on construction, and the binary
decoder (:mod:`picospec.protocol.binary`) builds models through the same validators, so a decoded
message is exactly as valid as a constructed one. Each model knows its encoded size
(``wire_size()``) from the layout (:mod:`picospec.protocol.layout`); the validation rules are
listed in the :mod:`picospec.protocol.codec` docstring.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from picospec.protocol.layout import (
    _DRAFT_HEADER,
    _SAMPLE_REPLY,
    _SAMPLE_REQUEST_HEADER,
    _SPARSE_HEADER,
    _U32_MAX,
    _U64_MAX,
    _VALUE_DTYPE,
    _VERDICT_HEADER,
    _VERDICT_LOAD,
    LOAD_STEPS,
    MAX_DRAFT_TOKENS,
    MAX_MESSAGE_BYTES,
    MAX_PREFIX_TOKENS,
    MAX_VOCAB,
    SAMPLE_Q_SUM_TOLERANCE,
    SESSION_BYTES,
    SPARSE_SUM_TOLERANCE,
    ValueCodec,
    VerdictStatus,
    id_width,
)

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
    # the drafter hands the session over: the verifier feeds the prefix and from then on
    # decodes on its own (a cloud-led session); such a block carries no draft tokens
    lead: bool = False

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
        if self.lead and (n or self.dense_q is not None):
            raise ValueError("DraftBlock: a lead block carries no draft tokens")
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
    # the verifier's load when it decided: the busy fraction of its engine over the last
    # second (in steps of 1/255, as on the wire), the sessions per forward (capped at 255) and
    # the sessions it holds (capped at 65535)
    busy: float | None = Field(None, ge=0.0, le=1.0)
    batch: int | None = Field(None, ge=0, le=255)
    sessions: int | None = Field(None, ge=0, le=65535)

    @field_validator("session", mode="before")
    @classmethod
    def _v_session(cls, v: Any) -> Any:
        return bytes(v) if isinstance(v, bytearray | memoryview) else v

    @field_validator("busy")
    @classmethod
    def _v_busy(cls, v: float | None) -> float | None:
        return None if v is None else round(v * LOAD_STEPS) / LOAD_STEPS

    @model_validator(mode="after")
    def _v_consistency(self) -> Verdict:
        if self.token is not None and self.token >= self.vocab_size:
            raise ValueError(f"Verdict.token {self.token} >= vocab_size {self.vocab_size}")
        if self.sparse is not None and self.sparse.vocab_size != self.vocab_size:
            raise ValueError(
                f"Verdict: sparse.vocab_size {self.sparse.vocab_size} != "
                f"vocab_size {self.vocab_size}"
            )
        if len({self.busy is None, self.batch is None, self.sessions is None}) > 1:
            raise ValueError("Verdict: busy, batch and sessions go together")
        _check_size(self.wire_size(), "Verdict")
        return self

    def wire_size(self) -> int:
        size = _VERDICT_HEADER.size
        if self.busy is not None:
            size += _VERDICT_LOAD.size
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


def _check_size(size: int, what: str) -> None:
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{what}: encoded size {size} exceeds MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES}"
        )


# --------------------------------------------------------------------------------------------
# Building a SparseDist
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
