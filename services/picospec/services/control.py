"""Control messages (JSON, low rate): opening and closing sessions, error replies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from picospec.protocol.codec import MAX_PREFIX_TOKENS
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import SpecConfig

MAX_CONTROL_BYTES = 8 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OpenSession(_Strict):
    """Drafter -> any verifier: prefill ``prompt`` (the committed tokens) and hold the session."""

    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    prompt: list[int] = Field(min_length=1, max_length=MAX_PREFIX_TOKENS)
    params: SamplingParams
    spec: SpecConfig
    vocab_size: int = Field(ge=1)
    reply_to: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^picospec\.v1\.verdict\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
        description="the drafter's verdict subject (subjects.verdicts)",
    )
    max_new_tokens: int = Field(ge=1, description="ar mode: tokens to stream")
    eos_ids: list[int] = Field(default_factory=list, max_length=64)
    epoch: int = Field(0, ge=0, lt=2**32, description="first epoch (re-opened sessions)")
    first_token: bool = Field(
        False,
        description="speculative modes: commit the session's first token from the prefill "
        "(the target's own choice at the first position) and return it in the reply",
    )


class OpenReply(BaseModel):
    """Verifier -> drafter. Fields a newer verifier adds are ignored, so that a drafter on an
    edge device keeps working while the cloud is upgraded first."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    verifier: str
    session: str
    first_token: int | None = Field(
        None, ge=0, description="the target's token at the first position, when asked for"
    )
    prefill_s: float | None = Field(None, ge=0, description="how long this prefill took")
    verify_step_s: float | None = Field(
        None, ge=0, description="the replica's recent forward cost: one token (adaptive γ)"
    )
    verify_per_token_s: float | None = Field(
        None, ge=0, description="... and each further token of a forward"
    )
    verify_per_session_s: float | None = Field(
        None, ge=0, description="... and each further session of a batched forward"
    )
    verify_per_round_s: float | None = Field(
        None, ge=0, description="... and each block's own request (vLLM; 0: blocks are forwards)"
    )
    # the replica's load as it opened the session, as every verdict tells it (Verdict.busy,
    # .batch, .sessions): a drafter whose first session this is decides at the open whether
    # speculating pays on this replica, instead of after its first rounds
    busy: float | None = Field(None, ge=0.0, le=1.0, description="engine busy fraction, last 1 s")
    batch: int | None = Field(None, ge=0, le=255, description="sessions per forward, last 1 s")
    sessions: int | None = Field(None, ge=0, le=65535, description="sessions the replica holds")

    @model_validator(mode="after")
    def _v_load(self) -> OpenReply:
        if len({self.busy is None, self.batch is None, self.sessions is None}) > 1:
            raise ValueError("OpenReply: busy, batch and sessions go together")
        return self


class CloseSession(_Strict):
    session: str = Field(pattern=r"^[0-9a-f]{32}$")


class ErrorReply(_Strict):
    error: str
    reason: str
