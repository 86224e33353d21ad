"""The API's request bodies: OpenAI's chat and completion fields, vLLM's extensions and
PicoSpec's own (``mode``, ``draft_len``, ``emulated_edge``). Unknown fields are refused (400)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from picospec.protocol.codec import MAX_DRAFT_TOKENS
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class EmulatedEdgeParams(BaseModel):
    """``emulated_edge``: this request stands for an edge device of an emulated fleet (the
    drafter's ``emulated_edges`` setting; :class:`~picospec.speculation.proposers.EmulatedEdge`)."""

    model_config = ConfigDict(extra="forbid")

    acceptance: float = Field(ge=0.0, le=1.0, description="per-token acceptance of its drafts")
    step_s: float = Field(ge=0.0, le=10.0, description="its device's time per draft token")
    seed: int = Field(0, ge=0, lt=2**63, description="which tokens it gets wrong")


class Request(BaseModel):
    """Fields common to both endpoints. Unknown fields are refused (400), not ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    # PicoSpec extensions
    mode: Mode | None = None
    draft_len: int | Literal["auto"] | None = Field(
        None, description="γ of this request, or 'auto' (the default setting)"
    )
    fallback: Literal["none", "edge"] | None = None
    draft: Literal["model", "suffix", "model+suffix"] | None = Field(
        None, description="what drafts this request (the drafter's `draft` setting by default)"
    )
    emulated_edge: EmulatedEdgeParams | None = None
    # vLLM's and SGLang's extensions, which benchmark clients send to fix output lengths
    ignore_eos: bool = Field(False, description="do not stop at end-of-sequence tokens")
    min_tokens: int = Field(
        0, ge=0, description="end-of-sequence tokens cannot be chosen before this many tokens"
    )

    @field_validator("draft_len", mode="before")
    @classmethod
    def _draft_len(cls, v: object) -> object:
        """JSON true is not a length: checked before pydantic would read it as 1."""
        ok = v is None or v == "auto" or (type(v) is int and 1 <= v <= MAX_DRAFT_TOKENS)
        if not ok:
            raise ValueError(f"draft_len must be 'auto' or an integer in 1..{MAX_DRAFT_TOKENS}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(len(s) > 256 for s in stops)):
            raise ValueError("at most 4 stop strings of at most 256 characters")
        return stops

    def sampling(self) -> SamplingParams:
        seed = self.seed if self.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7])
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=seed,
        )


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Request):
    prompt: str
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
