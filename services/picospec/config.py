"""Configuration: decoding modes and the speculation settings shared by every role."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from picospec.protocol import subjects
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
    adaptive: bool = Field(
        False,
        description="draft_len 'auto': the drafter picks γ and the look-ahead per session "
        "from its measurements (drafter/tuning.py); draft_len and lookahead are where it starts",
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


class Settings(BaseSettings):
    """Service configuration: ``PICOSPEC_*`` environment variables or command-line flags.

    The same names appear in the Helm values. One class for all roles; each uses its part.
    """

    model_config = SettingsConfigDict(
        env_prefix="PICOSPEC_", env_nested_delimiter="__", extra="forbid"
    )

    # NATS
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_creds: str | None = Field(None, description="NATS credentials file (JWT + NKey)")
    nats_nkey_seed: str | None = Field(
        None, description="NATS NKey seed file (a user seed, SU...); needs nats-py[nkeys]"
    )
    nats_tls_ca: str | None = Field(
        None, description="CA bundle (PEM) that verifies the NATS server's certificate"
    )
    nats_tls_cert: str | None = Field(
        None, description="client certificate (PEM) for NATS servers that verify clients"
    )
    nats_tls_key: str | None = Field(None, description="the client certificate's key (PEM)")
    nats_tls_hostname: str | None = Field(
        None, description="the name the NATS server's certificate must carry (default: the URL's)"
    )
    nats_inbox_prefix: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="prefix of request/reply inboxes (default _INBOX.<site>, so NATS "
        "permissions can keep each site to its own replies)",
    )
    nats_timeout_s: float = Field(10.0, gt=0, description="timeout of every NATS request")
    nats_user_file: str | None = Field(
        None, description="file holding the NATS user name (e.g. mounted from a Secret)"
    )
    nats_password_file: str | None = Field(
        None, description="file holding the NATS password (e.g. mounted from a Secret)"
    )
    # models
    model: str = Field("smollm2", description="this role's model: hub id, dir, .gguf, smollm2")
    quantize: str = Field("none", pattern="^(none|int8)$")
    device: str = "auto"
    dtype: str = "auto"
    prefill_dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="precision of forwards of many tokens (a prompt's prefill) when it should "
        "differ from dtype: a CPU without half-precision matrix units decodes fp16 fast (half "
        "the weights to read) but prefills it slowly; 'auto' = the device profile's, else dtype",
    )
    threads: int | None = Field(None, ge=1)
    draft_thread_idle: bool = Field(
        True,
        description="the drafter runs its model at Linux's idle CPU priority (SCHED_IDLE): "
        "the service's own I/O (the first token, verdicts, the stream) then never waits behind "
        "a draft forward on the same CPU. It yields to every other busy process too, so turn "
        "it off where the drafter shares its CPUs with other work outside a container",
    )
    device_profile: str | None = Field(
        None,
        description="emulate hardware: pad every model forward to the time this profile gives "
        "it (a built-in name such as paper-llama-1b-70b, or a .yaml/.json file); real compute "
        "is never shortened, and overruns are counted",
    )
    # the verifier's engine
    verifier_backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="verifier: the engine that runs the target: 'transformers', PicoSpec's "
        "embedded runtime on one device, or 'vllm', vLLM's engine in the verifier process "
        "(tensor and pipeline parallelism, paged KV caches with prefix caching, quantised "
        "weights); the vllm_* settings configure it",
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per pipeline stage")
    vllm_pipeline_parallel_size: int = Field(1, ge=1, description="vllm: pipeline stages")
    vllm_dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="vllm: the weights' precision ('auto': the model's own)",
    )
    vllm_quantization: str | None = Field(
        None, description="vllm: quantisation method (vLLM's names, e.g. fp8, awq, gptq)"
    )
    vllm_max_model_len: int | None = Field(
        None, ge=16, description="vllm: the context length (default: the model's)"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: the fraction of each GPU's memory vLLM may use"
    )
    vllm_enable_prefix_caching: bool = Field(
        True,
        description="vllm: reuse cached keys/values of a session's earlier tokens, so a "
        "verification round computes only its new tokens (and the rest of the last block)",
    )
    vllm_max_logprobs: int = Field(
        256,
        ge=1,
        description="vllm: the entries of each position's distribution the engine returns "
        "(top-K, plus the token's own); a request whose sampling support fits in them is "
        "verified exactly, beyond that the rest is tail mass, reported",
    )
    vllm_block_size: int | None = Field(
        None, ge=1, description="vllm: tokens per KV-cache block (default: vLLM's)"
    )
    vllm_enforce_eager: bool = Field(
        False, description="vllm: no CUDA graphs or compilation (faster start, slower steps)"
    )
    vllm_cpu_kv_cache_gib: int | None = Field(
        None, gt=0, description="vllm on a CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)"
    )
    # speculation defaults (requests may override draft_len and mode)
    mode: Mode = Mode.PICOSPEC
    draft_len: Annotated[int, Field(ge=1, le=MAX_DRAFT_TOKENS)] | Literal["auto"] = Field(
        "auto",
        description="γ, draft tokens per block, or 'auto': chosen per session from the measured "
        "acceptance, draft step time, verifier cost and round trip",
    )
    lookahead: int = Field(3, ge=1, le=64)
    compress_k: int = Field(256, ge=1)
    value_codec: ValueCodec = ValueCodec.F32
    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="HTTP: the API (drafter), or health")
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_sessions: int = Field(64, ge=1, description="verifier: sessions held at once")
    max_batch_tokens: int = Field(
        128,
        ge=1,
        description="tokens one forward of a model thread feeds at most (drafter and verifier): "
        "decode steps and draft blocks of every session go first, a long prompt's prefill is "
        "fed in chunks of what is left, so it never freezes the streams already running",
    )
    idle_timeout_s: float = Field(120.0, gt=0, description="verifier: free idle sessions")
    request_timeout_s: float = Field(
        30.0, gt=0, description="drafter: cloud unreachable past this -> 503"
    )
    verify_timeout_s: float = Field(
        5.0, gt=0, description="drafter: no verdict this long -> move the session elsewhere"
    )
    served_model_name: str = Field("picospec", description="the model id the API serves")
    api_key: SecretStr | None = Field(
        None,
        min_length=1,
        description="drafter: every /v1 request needs 'Authorization: Bearer <key>' (401 else)",
    )
    api_keys_file: str | None = Field(
        None,
        description="drafter: file of accepted API keys, one per line ('#' comments), "
        "in addition to api_key",
    )
    max_concurrent_requests: int = Field(
        32, ge=1, description="drafter: generations running at once (the rest queue)"
    )
    queue_timeout_s: float = Field(
        10.0, ge=0, description="drafter: longest wait for a slot before 429 + Retry-After"
    )
    max_tokens_limit: int = Field(4096, ge=1, description="drafter: largest max_tokens accepted")
    drain_grace_s: float = Field(20.0, ge=0, description="verifier: SIGTERM drain deadline")
    site: str = Field(
        "local",
        description="edge site label for metrics, verdict subjects and inboxes "
        "(picospec.v1.verdict.<site>.*, _INBOX.<site>.*)",
    )
    fallback: str = Field(
        "none",
        pattern="^(none|edge)$",
        description="drafter: 'edge' serves from the draft model alone (marked unverified) "
        "when the cloud is unreachable, instead of failing with 503",
    )

    @model_validator(mode="after")
    def _v_device_profile(self) -> Settings:
        if self.device_profile:
            from picospec.devices import DeviceProfileError, load_profile

            try:
                load_profile(self.device_profile)
            except DeviceProfileError as e:
                raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _v_pairs(self) -> Settings:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key go together")
        if self.nats_password is not None and self.nats_user is None:
            raise ValueError("nats_password needs nats_user")
        return self

    def api_keys(self) -> list[str]:
        """The API keys the drafter accepts (none: the API is open).

        Reads ``api_keys_file`` (one key per line; blank lines and ``#`` comments skipped). A
        file that is set but unreadable or holds no key is an error: the API must not silently
        open up.
        """
        keys = [self.api_key.get_secret_value()] if self.api_key is not None else []
        if self.api_keys_file is not None:
            try:
                lines = Path(self.api_keys_file).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"api_keys_file {self.api_keys_file}: {e.strerror}") from None
            found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not found:
                raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
            keys += found
        return keys

    def inbox_prefix(self) -> str:
        """This client's request/reply inbox prefix: the setting, or ``_INBOX.<site>``."""
        return self.nats_inbox_prefix or subjects.inbox_prefix(self.site)

    def spec(self, mode: Mode | None = None, draft_len: int | str | None = None) -> SpecConfig:
        """A session's speculation settings; ``draft_len`` (a request's) overrides the
        setting, and ``"auto"`` makes them adaptive, starting from γ = 4."""
        chosen = draft_len or self.draft_len
        auto = chosen == "auto"
        return SpecConfig(
            mode=mode or self.mode,
            draft_len=DEFAULT_DRAFT_LEN if auto else int(chosen),
            lookahead=self.lookahead,
            top_k=self.compress_k,
            value_codec=self.value_codec,
            adaptive=auto,
        )
