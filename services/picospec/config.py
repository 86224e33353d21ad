"""Configuration: decoding modes and the speculation settings shared by every role."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from picospec.protocol.codec import MAX_DRAFT_TOKENS, ValueCodec


class Mode(StrEnum):
    """How a request is decoded. All modes produce target-equivalent output."""

    AR = "ar"  # the verifier alone decodes: the cloud-only baseline
    VANILLA = "vanilla"  # synchronous: draft, send full q, verify (standard RS), wait
    DSSD = "dssd"  # synchronous separate rejection sampling with sparse p_j (no pipeline)
    PICOSPEC = "picospec"  # pipelined drafting + separate rejection sampling + sparse p_j

    @property
    def pipelined(self) -> bool:
        return self is Mode.PICOSPEC

    @property
    def dense_q(self) -> bool:
        """Does the drafter send full draft distributions (the naive vanilla protocol)?"""
        return self is Mode.VANILLA

    @property
    def speculative(self) -> bool:
        return self is not Mode.AR


class SpecConfig(BaseModel):
    """Speculation settings of one session."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Mode.PICOSPEC
    draft_len: int = Field(4, ge=1, le=MAX_DRAFT_TOKENS, description="γ, tokens per draft block")
    lookahead: int = Field(
        3, ge=1, le=64, description="blocks the pipelined drafter may have in flight"
    )
    top_k: int = Field(256, ge=1, description="entries of p_j sent at a sampled rejection (K)")
    value_codec: ValueCodec = ValueCodec.F32

    @property
    def max_inflight(self) -> int:
        """Blocks in flight at once: the pipeline depth, or 1 for the synchronous modes."""
        return self.lookahead if self.mode.pipelined else 1

    @property
    def bonus(self) -> bool:
        """Synchronous modes take a bonus token from the verifier when a whole block passes;
        the pipeline does not (the next block already drafts that position)."""
        return not self.mode.pipelined
