"""The services' settings: every ``PICOSPEC_*`` variable and flag, defined once (:class:`Settings`).

The operator's reference: the chart's values schema and docs/configuration.md are generated
from it. A session's own speculation settings are :class:`picospec.speculation.spec.SpecConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from picospec.protocol import subjects
from picospec.protocol.codec import MAX_DRAFT_TOKENS, ValueCodec
from picospec.speculation.spec import DEFAULT_DRAFT_LEN, Mode, SpecConfig

NATS_DOCS = "docs/security.md#nats-authentication-and-tls"
Draft = Literal["model", "suffix", "model+suffix"]


def meta(*roles: str, backend: str | None = None, docs: str | None = None) -> dict[str, Any]:
    """A setting's metadata, for the generated table in docs/configuration.md: the roles that
    read it (``all``, or some of ``drafter``, ``verifier``, ``sampler``), the verifier engine it
    belongs to, if only one, and the page that explains it."""
    out: dict[str, Any] = {"roles": list(roles)}
    if backend:
        out["backend"] = backend
    if docs:
        out["docs"] = docs
    return out


class Settings(BaseSettings):
    """Service configuration: ``PICOSPEC_*`` environment variables or command-line flags.

    The same names appear in the Helm values. One class for all roles; each uses its part.
    """

    model_config = SettingsConfigDict(
        env_prefix="PICOSPEC_", env_nested_delimiter="__", extra="forbid"
    )

    # NATS
    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="the NATS server (the edge leaf node at the edge)",
        json_schema_extra=meta("all"),
    )
    nats_user: str | None = Field(
        None,
        description="NATS authentication: the user name",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_password: SecretStr | None = Field(
        None,
        description="NATS authentication: the password (needs `NATS_USER`)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_creds: str | None = Field(
        None,
        description="NATS authentication: a credentials file (JWT + NKey)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_nkey_seed: str | None = Field(
        None,
        description="NATS authentication: an NKey seed file (a user seed, `SU…`); needs "
        "`nats-py[nkeys]`",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_tls_ca: str | None = Field(
        None,
        description="NATS TLS: the CA bundle (PEM) that verifies the NATS server's certificate",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_tls_cert: str | None = Field(
        None,
        description="NATS mutual TLS: the client certificate (PEM), for NATS servers that verify "
        "clients (with `NATS_TLS_KEY`)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_tls_key: str | None = Field(
        None,
        description="NATS mutual TLS: the client certificate's key (PEM)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_tls_hostname: str | None = Field(
        None,
        description="NATS TLS: the name the NATS server's certificate must carry (default: the "
        "URL's)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_inbox_prefix: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="the request/reply inbox prefix (default: `_INBOX.<site>`), so NATS "
        "permissions can keep each site to its own replies",
        json_schema_extra=meta("all"),
    )
    nats_timeout_s: float = Field(
        10.0,
        gt=0,
        description="timeout of every NATS request",
        json_schema_extra=meta("all"),
    )
    nats_user_file: str | None = Field(
        None,
        description="NATS authentication: a file holding the user name (e.g. mounted from a "
        "Secret)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    nats_password_file: str | None = Field(
        None,
        description="NATS authentication: a file holding the password (e.g. mounted from a Secret)",
        json_schema_extra=meta("all", docs=NATS_DOCS),
    )
    # models
    model: str = Field(
        "smollm2",
        description="this role's model: a Hub id (local cache), a directory, a `.gguf` file or "
        "`smollm2`",
        json_schema_extra=meta("drafter", "verifier"),
    )
    quantize: str = Field(
        "none",
        pattern="^(none|int8)$",
        description="`int8`: dynamic int8 quantisation of the linear layers (CPU)",
        json_schema_extra=meta("drafter", "verifier"),
    )
    device: str = Field(
        "auto",
        description="the torch device: `auto` is CUDA when a GPU is present, else CPU",
        json_schema_extra=meta("drafter", "verifier"),
    )
    dtype: str = Field(
        "auto",
        description="the weights' precision (`float32`, `bfloat16`, `float16`): `auto` is "
        "bfloat16 on CUDA, float32 on CPU",
        json_schema_extra=meta("drafter", "verifier"),
    )
    prefill_dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="the precision of forwards of 3 tokens or more (a prompt's prefill, a "
        "block, the draft steps of several sessions) when it should differ from `DTYPE`: on a "
        "CPU without half-precision matrix units, `DTYPE=float16` decodes fast (half the "
        "weights to read) but prefills slowly, and `PREFILL_DTYPE=float32` keeps a float32 "
        "copy of the weights for prefills (keys/values stay float16); `auto`: the device "
        "profile's, else `DTYPE`",
        json_schema_extra=meta("drafter", "verifier"),
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch's CPU threads (default: torch's own choice)",
        json_schema_extra=meta("drafter", "verifier"),
    )
    draft_thread_idle: bool = Field(
        True,
        description="run the draft model at Linux's idle CPU priority (`SCHED_IDLE`), so the "
        "service's event loop (the first token, verdicts, the stream) never waits behind a "
        "draft forward on a shared CPU; it yields to every other busy process on those CPUs "
        "too, so turn it off (`false`) where the drafter shares CPUs with other work outside a "
        "container (in Kubernetes it yields only within its own container)",
        json_schema_extra=meta("drafter"),
    )
    device_profile: str | None = Field(
        None,
        description="emulate hardware: every draft step (drafter) or verifier forward "
        "(verifier) lasts as long as the profile says, padded with a wait, never shortened "
        "(overruns are counted); a built-in name (`paper-llama-1b-70b`, "
        "`paper-qwen-0.6b-32b`) or a `.yaml`/`.json` file",
        json_schema_extra=meta(
            "drafter", "verifier", docs="docs/benchmark.md#emulated-hardware-device-profiles"
        ),
    )
    # the verifier's engine
    verifier_backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="the engine that runs the target: `transformers` (PicoSpec's embedded "
        "runtime, one device) or `vllm` (vLLM's engine in the verifier process: tensor and "
        "pipeline parallelism, paged KV caches with prefix caching, quantised weights), which "
        "the `VLLM_*` settings configure",
        json_schema_extra=meta("verifier", docs="docs/architecture.md#the-cloud-on-vllm"),
    )
    vllm_tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs per pipeline stage",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="pipeline stages",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="the weights' precision (`auto`: the model's own)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_quantization: str | None = Field(
        None,
        description="vLLM's quantisation method (`fp8`, `awq`, `gptq`…)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_max_model_len: int | None = Field(
        None,
        ge=16,
        description="the context length (default: the model's)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="the fraction of each GPU's memory vLLM may use",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_enable_prefix_caching: bool = Field(
        True,
        description="reuse the cached keys/values of a session's earlier tokens, so a "
        "verification round computes only its new tokens (and the rest of the last KV block)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_max_logprobs: int = Field(
        256,
        ge=1,
        description="the entries of each position's distribution vLLM returns (top-K, plus the "
        "token's own); sampling whose support fits in them (`top_k` ≤ it) is verified exactly, "
        "beyond that the rest is tail mass, reported",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_block_size: int | None = Field(
        None,
        ge=1,
        description="tokens per KV-cache block (default: vLLM's)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="no CUDA graphs or compilation (faster start, slower steps)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    vllm_cpu_kv_cache_gib: int | None = Field(
        None,
        gt=0,
        description="on a CPU: the KV cache's GiB (`VLLM_CPU_KVCACHE_SPACE`)",
        json_schema_extra=meta("verifier", backend="vllm"),
    )
    # speculation defaults (requests may override draft_len, mode and draft)
    draft: Draft = Field(
        "model",
        description="what drafts: the draft model (`model`); suffix matches in the prompt, "
        "the answer so far and the site's recent answers, with no draft model at all "
        "(`suffix`: the verifier decodes on its own and verifies the proposed tokens where they "
        "reach it; picospec mode only); or both (`model+suffix`: a match of at least "
        "`SUFFIX_MIN_MATCH` tokens drafts, the model elsewhere)",
        json_schema_extra=meta("drafter", docs="docs/benchmark.md#when-each-draft-pays-off"),
    )
    suffix_min_match: int = Field(
        3,
        ge=1,
        le=32,
        description="the shortest match of the text's last tokens that the suffix draft "
        "proposes from",
        json_schema_extra=meta("drafter"),
    )
    suffix_cache_answers: int = Field(
        64,
        ge=0,
        description="recent answers per tenant (API key) the suffix draft also matches "
        "against, at this drafter only and never across API keys (0: off; the open API is one "
        "tenant)",
        json_schema_extra=meta("drafter", docs="docs/security.md"),
    )
    mode: Mode = Field(
        Mode.PICOSPEC,
        description="the default decoding mode (a request may choose another)",
        json_schema_extra=meta("drafter"),
    )
    draft_len: Annotated[int, Field(ge=1, le=MAX_DRAFT_TOKENS)] | Literal["auto"] = Field(
        "auto",
        description=f"γ, draft tokens per block (1–{MAX_DRAFT_TOKENS}), or `auto`: chosen per "
        "session from the measured acceptance, draft step time, verifier cost and round trip",
        json_schema_extra=meta("drafter"),
    )
    lookahead: int = Field(
        3,
        ge=1,
        le=64,
        description="blocks in flight in the pipelined mode (with `auto`, where the choice starts)",
        json_schema_extra=meta("drafter"),
    )
    compress_k: int = Field(
        256,
        ge=1,
        description="top-K entries of `p_j` sent at a sampled rejection",
        json_schema_extra=meta("drafter"),
    )
    value_codec: ValueCodec = Field(
        ValueCodec.F32,
        description="the value codec of those top-K entries (`f32`, `f16`, `u8`)",
        json_schema_extra=meta("drafter"),
    )
    # serving
    host: str = Field(
        "127.0.0.1",
        description="HTTP: the listen address (the API on the drafter; health and metrics "
        "everywhere)",
        json_schema_extra=meta("all"),
    )
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP: the port (the API on the drafter; health and metrics everywhere)",
        json_schema_extra=meta("all"),
    )
    replica_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="the replica's name in subjects and metrics (a verifier's default: the "
        "hostname, with a random suffix; a sampler's build-info metric shows it, or -)",
        json_schema_extra=meta("verifier", "sampler"),
    )
    max_sessions: int = Field(
        64,
        ge=1,
        description="sessions held at once; quiet ones are evicted beyond it",
        json_schema_extra=meta("verifier"),
    )
    max_batch_tokens: int = Field(
        128,
        ge=1,
        description="the most tokens one forward of the model thread feeds. Every iteration the "
        "thread runs one forward over the ready work of all sessions (continuous batching): "
        "draft steps, `ar` steps and verification blocks first, then a long prompt's prefill in "
        "chunks of what is left, so a long prompt never freezes the answers already streaming. "
        "Larger: long prefills finish a little sooner, running streams wait longer per chunk",
        json_schema_extra=meta(
            "drafter",
            "verifier",
            docs="docs/benchmark.md#long-prompts-while-others-stream---prefill",
        ),
    )
    idle_timeout_s: float = Field(
        120.0,
        gt=0,
        description="sessions idle this long are freed (their drafter has gone)",
        json_schema_extra=meta("verifier"),
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="cloud unreachable past this: 503 (or the edge fallback)",
        json_schema_extra=meta("drafter"),
    )
    verify_timeout_s: float = Field(
        5.0,
        gt=0,
        description="no verdict this long: ping the replica, move the session elsewhere if it "
        "is gone",
        json_schema_extra=meta("drafter"),
    )
    served_model_name: str = Field(
        "picospec",
        description="the model id the API serves",
        json_schema_extra=meta("drafter"),
    )
    api_key: SecretStr | None = Field(
        None,
        min_length=1,
        description="an API key: every `/v1` request then needs `Authorization: Bearer <key>` "
        "(401 else)",
        json_schema_extra=meta("drafter", docs="docs/security.md"),
    )
    api_keys_file: str | None = Field(
        None,
        description="a file of accepted API keys, one per line (`#` comments), in addition to "
        "`API_KEY`",
        json_schema_extra=meta("drafter", docs="docs/security.md"),
    )
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        description="generations running at once (the rest queue)",
        json_schema_extra=meta("drafter"),
    )
    queue_timeout_s: float = Field(
        10.0,
        ge=0,
        description="the longest wait for a slot before 429 (with Retry-After)",
        json_schema_extra=meta("drafter"),
    )
    max_tokens_limit: int = Field(
        4096,
        ge=1,
        description="the largest `max_tokens` accepted",
        json_schema_extra=meta("drafter"),
    )
    drain_grace_s: float = Field(
        20.0,
        ge=0,
        description="the SIGTERM drain deadline",
        json_schema_extra=meta("verifier"),
    )
    site: str = Field(
        "local",
        description="the edge site label, in metrics, verdict subjects and inboxes "
        "(`picospec.v1.verdict.<site>.*`, `_INBOX.<site>.*`)",
        json_schema_extra=meta("all"),
    )
    emulated_edges: bool = Field(
        False,
        description="benchmarks only: accept requests that stand for an emulated edge device "
        "(the API's `emulated_edge` field: the target's greedy answer, recorded from an `ar` "
        "request for the same prompt, replayed with a set per-token acceptance and device "
        "time, no draft model compute), as `picospec bench --fleet 1,4` sends; their figures are "
        "EMULATED",
        json_schema_extra=meta("drafter", docs="docs/capacity.md#edge-users-per-replica---fleet"),
    )
    fallback: str = Field(
        "none",
        pattern="^(none|edge)$",
        description="`edge`: answer from the draft model alone, marked unverified, when the "
        "cloud is unreachable, instead of failing with 503",
        json_schema_extra=meta("drafter"),
    )

    @model_validator(mode="after")
    def _v_device_profile(self) -> Settings:
        if self.device_profile:
            from picospec.runtime.devices import DeviceProfileError, load_profile

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

    def spec(
        self,
        mode: Mode | None = None,
        draft_len: int | str | None = None,
        draft: Draft | None = None,
    ) -> SpecConfig:
        """A session's speculation settings; ``draft_len`` and ``draft`` (a request's) override
        the settings; ``"auto"`` makes them adaptive, starting from γ = 4; the suffix draft
        alone makes a picospec session cloud-led."""
        chosen = draft_len or self.draft_len
        auto = chosen == "auto"
        mode = mode or self.mode
        return SpecConfig(
            mode=mode,
            cloud_led=(draft or self.draft) == "suffix" and mode is Mode.PICOSPEC,
            draft_len=DEFAULT_DRAFT_LEN if auto else int(chosen),
            lookahead=self.lookahead,
            top_k=self.compress_k,
            value_codec=self.value_codec,
            adaptive=auto,
        )
