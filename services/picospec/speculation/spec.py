"""What a session speculates with: the decoding modes and one session's speculation settings.

Both cross the network inside a session's opening message, and every layer above reads them;
the services' :class:`picospec.config.Settings` builds them from the operator's settings.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from picospec.protocol.codec import MAX_DRAFT_TOKENS, ValueCodec

DEFAULT_DRAFT_LEN = 4  # γ of a fixed-length session by default, and where 'auto' starts


class Mode(StrEnum):
    """How a request is decoded. All modes produce target-equivalent output."""

    AR = "ar"  # the verifier alone decodes: the cloud-only baseline
    EDGE = "edge"  # the draft model alone on the edge: unverified, a speed/quality reference
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
        return self not in (Mode.AR, Mode.EDGE)


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
    cloud_led: bool = Field(
        False,
        description="picospec with a draft that needs no model (suffix matches): the verifier "
        "decodes on its own as in ar and verifies the edge's proposed tokens (hints) where "
        "they reach it in time, so the session never waits for a draft",
    )
    adaptive: bool = Field(
        False,
        description="draft_len 'auto': the drafter picks γ and the look-ahead per session "
        "from its measurements (speculation/tuning.py); draft_len and lookahead are where it "
        "starts",
    )

    @property
    def max_inflight(self) -> int:
        """Blocks in flight at once: the pipeline depth, or 1 for the synchronous modes."""
        return self.lookahead if self.mode.pipelined else 1

    @property
    def bonus(self) -> bool:
        """Synchronous modes take a bonus token from the verifier when a whole block passes;
        the pipeline does not (the next block already drafts that position)."""
        return not self.mode.pipelined
