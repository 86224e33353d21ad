"""Every Prometheus metric PicoSpec exports, defined once.

Names follow Prometheus conventions (``picospec_<what>_<unit>``, ``_total`` counters, base units)
and mirror vLLM's where the meaning is the same (``time_to_first_token_seconds``,
``spec_decode_num_accepted_tokens``…), so acceptance rate is
``rate(picospec_spec_decode_num_accepted_tokens_total) /
rate(picospec_spec_decode_num_draft_tokens_total)``. Labels are low-cardinality: ``mode``,
``position``, ``direction``, ``reason``, ``status`` — never session ids. Replica and site come
from the scrape target's labels and from ``picospec_build_info``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from picospec import __version__

# Edge-cloud latencies sit at 5-200 ms per token; requests take seconds to minutes.
_FINE = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    80.0,
)
_REQUEST = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
)

BUILD_INFO = Info("picospec_build", "PicoSpec version, role and model of this process")


def set_build_info(role: str, model: str, replica: str, site: str) -> None:
    BUILD_INFO.info(
        {"version": __version__, "role": role, "model": model, "replica": replica, "site": site}
    )


# --- latency (drafter: what users see) --------------------------------------------------
TTFT = Histogram(
    "picospec_time_to_first_token_seconds",
    "Time from request arrival to the first generated token sent to the client",
    ["mode"],
    buckets=_REQUEST,
)
ITL = Histogram(
    "picospec_inter_token_latency_seconds",
    "Time between consecutive generated tokens sent to the client (per token)",
    ["mode"],
    buckets=_FINE,
)
E2E = Histogram(
    "picospec_e2e_request_latency_seconds",
    "Time from request arrival to the last token of the response",
    ["mode"],
    buckets=_REQUEST,
)
VERIFY_RTT = Histogram(
    "picospec_verify_round_trip_seconds",
    "Drafter-observed time from sending a draft block to applying its verdict",
    ["mode"],
    buckets=_FINE,
)
SAMPLER_LATENCY = Histogram(
    "picospec_sampler_request_seconds",
    "Drafter-observed round trip of a correction request to a sampler",
    buckets=_FINE,
)
# --- latency (verifier) ------------------------------------------------------------------
VERIFY_FORWARD = Histogram(
    "picospec_verify_forward_seconds",
    "Verifier compute time of one verification batch (forward + test)",
    buckets=_FINE,
)
QUEUE_WAIT = Histogram(
    "picospec_request_queue_time_seconds",
    "Time a draft block waited in the verifier's queue before verification",
    buckets=_FINE,
)
SAMPLE_SECONDS = Histogram(
    "picospec_sample_seconds", "Sampler compute time of one correction draw", buckets=_FINE
)

# --- speculation (drafter) ---------------------------------------------------------------
DRAFTS = Counter(
    "picospec_spec_decode_num_drafts",
    "Draft blocks whose verdict was applied (verification rounds)",
    ["mode"],
)
DRAFT_TOKENS = Counter(
    "picospec_spec_decode_num_draft_tokens",
    "Draft tokens in blocks whose verdict was applied",
    ["mode"],
)
ACCEPTED_TOKENS = Counter(
    "picospec_spec_decode_num_accepted_tokens", "Draft tokens accepted by the verifier", ["mode"]
)
ACCEPTED_PER_POS = Counter(
    "picospec_spec_decode_num_accepted_tokens_per_pos",
    "Draft tokens accepted, by position in their block",
    ["mode", "position"],
)
ROLLBACKS = Counter(
    "picospec_rollbacks", "Rejections that rolled the drafter back (new epoch)", ["mode"]
)
WASTED = Counter(
    "picospec_wasted_draft_tokens",
    "Drafted tokens thrown away: rejected, or drafted past a rejection",
    ["mode"],
)
DRAFT_LEN = Gauge(
    "picospec_draft_length_tokens", "Draft block length (γ) of the last request", ["mode"]
)
GENERATED = Counter("picospec_generation_tokens", "Tokens generated for clients", ["mode"])
PROMPT_TOKENS = Counter("picospec_prompt_tokens", "Prompt tokens of requests", ["mode"])

# --- communication ----------------------------------------------------------------------
LINK_BYTES = Counter(
    "picospec_link_bytes",
    "Payload bytes over the edge-cloud link (uplink: edge->cloud)",
    ["direction"],
)
LINK_MESSAGES = Counter(
    "picospec_link_messages", "Messages over the edge-cloud link", ["direction"]
)
TAIL_MASS = Counter(
    "picospec_compression_tail_mass",
    "Sum over sampled rejections of the probability mass of p_j left out by top-K",
)

# --- capacity (verifier) ---------------------------------------------------------------
ACTIVE_SESSIONS = Gauge("picospec_active_sessions", "Sessions (KV caches) this verifier holds")
QUEUE_DEPTH = Gauge("picospec_verify_queue_depth", "Draft blocks waiting for verification")
BATCH_SIZE = Histogram(
    "picospec_verify_batch_size",
    "Blocks verified together in one batch",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
KV_BYTES = Gauge("picospec_kv_cache_bytes", "Bytes of KV cache this verifier holds")
EVICTIONS = Counter("picospec_sessions_evicted", "Sessions freed without a close", ["reason"])
MIGRATIONS = Counter(
    "picospec_session_migrations",
    "Sessions the drafter re-opened on another verifier (re-prefill)",
    ["reason"],
)

# --- errors -------------------------------------------------------------------------------
REJECTED = Counter(
    "picospec_rejected_messages",
    "Messages refused (malformed, wrong version, unknown session...)",
    ["role", "reason"],
)
REQUESTS = Counter("picospec_requests", "HTTP API requests by final status", ["mode", "status"])
NATS_RECONNECTS = Counter("picospec_nats_reconnects", "Reconnections to the NATS server")
NATS_DISCONNECTS = Counter("picospec_nats_disconnects", "Disconnections from the NATS server")
DEGRADED = Counter(
    "picospec_degraded_responses",
    "Responses served unverified by the draft model alone (fallback: edge)",
)
