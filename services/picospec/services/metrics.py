"""Every Prometheus metric PicoSpec exports, defined once.

Conventions (the summary is in docs/architecture.md, "Metric conventions"):

- Names are ``picospec_<what>_<unit>`` in base units (``_seconds``, ``_bytes``); counters are
  exported with ``_total`` (prometheus-client appends it); ``_info`` for metadata.
- Where vLLM has the same idea, the name after the prefix and the meaning are vLLM's:
  ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
  ``e2e_request_latency_seconds``, ``prompt_tokens_total``, ``generation_tokens_total`` and the
  ``spec_decode_num_*`` counters. So, as in vLLM::

      acceptance rate      = rate(picospec_spec_decode_num_accepted_tokens_total)
                             / rate(picospec_spec_decode_num_draft_tokens_total)
      mean accepted length = 1 + rate(picospec_spec_decode_num_accepted_tokens_total)
                                 / rate(picospec_spec_decode_num_drafts_total)

- Labels are low-cardinality and closed sets: ``mode`` (ar, vanilla, dssd, picospec),
  ``position`` (0..γ-1), ``direction`` (uplink, downlink), ``reason``, ``status`` (HTTP code),
  ``role``. Never session ids. Which replica, edge site and namespace a series comes from is
  a *target* label added by the scraper (the local stack's scrape config, or ServiceMonitor
  relabelling in Kubernetes); the process's own view of it is in ``picospec_build_info``.
- Latency histograms have buckets that fit LLM serving: milliseconds to minutes overall, and
  fine steps (<= 25 % apart) from 5 ms to 200 ms, where edge-cloud per-token latencies sit.
- Series that only move on rare events (migrations, rejected messages, a mode not used yet)
  are created at zero when a service starts (:func:`init_series`, called from
  :func:`set_build_info`), so dashboards and ``rate()`` see them from the first scrape.
- Every process also exports prometheus-client's default collectors: ``process_*`` (CPU,
  memory, open fds, start time) and ``python_*`` (GC, interpreter info).

Who updates what: the drafter (edge) owns the user-facing latencies, the speculation counters
and the link counters (it sees both directions of the edge-cloud link); the verifier owns
verification compute, its queue and its capacity gauges; the sampler its compute time.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

from picospec import __version__
from picospec.speculation.spec import Mode

# ``*_created`` series double the counter series and no dashboard uses them.
disable_created_metrics()

# Time to first token: vLLM's buckets (1 ms .. 2560 s), a little finer below 1 s.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# Per-token latencies (inter-token latency, verify round trip): steps of at most 25 % from
# 5 ms to 200 ms, then coarser up to vLLM's 80 s.
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.006, 0.0075, 0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025,
    0.03, 0.035, 0.04, 0.045, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15, 0.175, 0.2,
    0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# Whole requests: 10 ms (a short completion on a fast path) to vLLM's 7680 s.
REQUEST_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Compute steps and local hops (verify forward, queue wait, sampler): 0.1 ms .. 10 s.
STEP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025,
    0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

MODES = tuple(m.value for m in Mode)
# modes that draft and verify (not ``ar``: the verifier alone; not ``edge``: the draft alone)
SPECULATIVE_MODES = tuple(m.value for m in Mode if m.value not in ("ar", "edge"))

# --- metadata -----------------------------------------------------------------------------
BUILD_INFO = Info(
    "picospec_build",
    "Always 1. Labels: PicoSpec version, this process's role (drafter, verifier, sampler), its "
    "model, and the replica id and edge site it reports for itself",
)

# --- latency: what users see (drafter) ------------------------------------------------------
TTFT = Histogram(
    "picospec_time_to_first_token_seconds",
    "Time from the arrival of an HTTP request to its first generated (verified) token being "
    "ready to send to the client; one observation per request that produced a token",
    ["mode"],
    buckets=TTFT_BUCKETS,
)
ITL = Histogram(
    "picospec_inter_token_latency_seconds",
    "Time between consecutive generated tokens of a request, one observation per token after "
    "the first; tokens committed together share the interval equally",
    ["mode"],
    buckets=TOKEN_BUCKETS,
)
E2E = Histogram(
    "picospec_e2e_request_latency_seconds",
    "Time from the arrival of an HTTP request to its last generated token; one observation "
    "per request that completed generation",
    ["mode"],
    buckets=REQUEST_BUCKETS,
)
VERIFY_RTT = Histogram(
    "picospec_verify_round_trip_seconds",
    "Drafter-observed time from publishing a draft block to receiving its verdict: uplink, "
    "verifier queue, verify forward and downlink (speculative modes only)",
    ["mode"],
    buckets=TOKEN_BUCKETS,
)
SAMPLER_LATENCY = Histogram(
    "picospec_sample_round_trip_seconds",
    "Drafter-observed time of one correction request to a sampler (request to reply); one "
    "per sampled rejection",
    buckets=STEP_BUCKETS,
)

# --- latency: verifier and sampler ------------------------------------------------------------
VERIFY_FORWARD = Histogram(
    "picospec_verify_forward_seconds",
    "Verifier compute time of one batch of draft blocks (target-model forward and acceptance "
    "test), as spent by its single model worker; rate(..._sum) is the worker's busy fraction",
    buckets=STEP_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "picospec_verify_queue_time_seconds",
    "Time a draft block waited in the verifier's queue between arrival and the start of the "
    "batch that verified it",
    buckets=STEP_BUCKETS,
)
SAMPLE_SECONDS = Histogram(
    "picospec_sample_compute_seconds",
    "Sampler compute time of one correction draw from the residual max(0, p_j - q_j)",
    buckets=STEP_BUCKETS,
)
DRAFT_STEP = Histogram(
    "picospec_draft_step_seconds",
    "Edge compute time of one draft-model step (one token's forward and draw, on the model "
    "thread); a request's first step, which carries the prompt's prefill, is not observed",
    ["mode"],
    buckets=STEP_BUCKETS,
)

# --- speculation (drafter) ---------------------------------------------------------------
DRAFT_BATCH_SIZE = Histogram(
    "picospec_draft_batch_size",
    "Sessions whose draft steps (or prefill chunks) share one forward of the drafter's model "
    "thread",
    buckets=BATCH_BUCKETS,
)
DRAFTS = Counter(
    "picospec_spec_decode_num_drafts",
    "Verification rounds: draft blocks whose verdict the drafter applied (as vLLM's "
    "spec_decode_num_drafts)",
    ["mode"],
)
DRAFT_TOKENS = Counter(
    "picospec_spec_decode_num_draft_tokens",
    "Draft tokens in the blocks whose verdict the drafter applied: the denominator of the "
    "acceptance rate (blocks made stale by a rollback are not counted)",
    ["mode"],
)
ACCEPTED_TOKENS = Counter(
    "picospec_spec_decode_num_accepted_tokens",
    "Draft tokens the verifier accepted: the numerator of the acceptance rate (corrections "
    "and bonus tokens are not counted)",
    ["mode"],
)
ACCEPTED_PER_POS = Counter(
    "picospec_spec_decode_num_accepted_tokens_per_pos",
    "Accepted draft tokens by their 0-based position in the block; divided by the rate of "
    "drafts it is the acceptance probability of each position",
    ["mode", "position"],
)
ROLLBACKS = Counter(
    "picospec_rollbacks",
    "Rejections: the drafter discarded its speculation after the first rejected token, "
    "rolled its draft cache back and started a new epoch",
    ["mode"],
)
WASTED = Counter(
    "picospec_wasted_draft_tokens",
    "Draft tokens computed but thrown away: rejected ones and those drafted past a rejection",
    ["mode"],
)
DRAFT_LEN = Gauge(
    "picospec_draft_length_tokens",
    "Draft block length γ (draft tokens per block) in use by the latest request of this mode",
    ["mode"],
)
DRAFT_POLICY_ROUNDS = Counter(
    "picospec_draft_policy_rounds",
    "Verification rounds of adaptive sessions (draft_len auto) by the policy their draft "
    "length followed: latency (the session's own speed) or capacity (a saturated verifier's "
    "throughput)",
    ["policy"],
)
SPECULATION_OFF = Counter(
    "picospec_speculation_off_sessions",
    "Adaptive picospec sessions that stopped speculating (at their open, or handed over to the "
    "verifier in the middle of their answer), so the verifier decoded alone: it was saturated "
    "and no draft length would have cost it less per token than cloud-only decoding, or "
    "cloud-only decoding would have served the session faster than its best draft length",
)
DRAFT_POLICY_LOAD = Gauge(
    "picospec_draft_policy_load_ratio",
    "The verifier busy fraction (0-1) that the latest draft-length choice of this drafter "
    "reacted to, as the verdict reported it",
)
ACCEPTED_BY_SOURCE = Counter(
    "picospec_accepted_tokens_by_source",
    "Accepted draft tokens by what drafted them: model (the draft model), suffix (a match in "
    "the prompt or output), emulated (an emulated edge device of a benchmark)",
    ["source"],
)
GENERATED = Counter(
    "picospec_generation_tokens",
    "Generated tokens delivered to clients (committed, i.e. verified unless degraded)",
    ["mode"],
)
PROMPT_TOKENS = Counter(
    "picospec_prompt_tokens",
    "Prompt tokens of accepted requests, after the chat template",
    ["mode"],
)

# --- communication (drafter: the edge end of the edge-cloud link) -----------------------------
LINK_BYTES = Counter(
    "picospec_link_bytes",
    "Payload bytes crossing the edge-cloud link, counted at the drafter: direction=uplink "
    "for edge->cloud (session opens, draft blocks), downlink for cloud->edge (verdicts)",
    ["direction"],
)
LINK_MESSAGES = Counter(
    "picospec_link_messages",
    "NATS messages crossing the edge-cloud link, counted at the drafter, by direction "
    "(uplink: edge->cloud, downlink: cloud->edge)",
    ["direction"],
)
TAIL_MASS = Counter(
    "picospec_compression_tail_mass",
    "Sum, over sampled rejections, of the probability mass of p_j left out by top-K "
    "compression (an upper bound on the TVD it adds); divide by the rate of "
    "picospec_sample_round_trip_seconds_count for the mean per rejection",
)

# --- capacity (verifier) ---------------------------------------------------------------
ACTIVE_SESSIONS = Gauge(
    "picospec_active_sessions", "Sessions (per-session KV caches) this verifier replica holds"
)
REQUESTS_RUNNING = Gauge(
    "picospec_num_requests_running",
    "Drafter: API requests generating now (at most max_concurrent_requests)",
)
REQUESTS_WAITING = Gauge(
    "picospec_num_requests_waiting",
    "Drafter: API requests waiting for a generation slot (429 after queue_timeout_s)",
)
QUEUE_DEPTH = Gauge(
    "picospec_verify_queue_depth",
    "Draft blocks waiting in this verifier's queue for the model worker",
)
VERIFY_BUSY = Gauge(
    "picospec_verify_busy_ratio",
    "The fraction of the last second this verifier's engine spent running forwards (0-1), as "
    "its latest verdict told its drafter: the load the draft-length policy reacts to",
)
BATCH_SIZE = Histogram(
    "picospec_verify_batch_size",
    "Sessions whose draft blocks share one batched target-model forward of the verifier",
    buckets=BATCH_BUCKETS,
)
KV_BYTES = Gauge("picospec_kv_cache_bytes", "Bytes of KV cache held by this verifier's sessions")
EVICTIONS = Counter(
    "picospec_session_evictions",
    "Sessions a verifier freed without a close (reason: idle timeout, memory_cap); their "
    "drafters re-prefill elsewhere if they come back",
    ["reason"],
)
MIGRATIONS = Counter(
    "picospec_session_migrations",
    "Sessions the drafter re-opened on another verifier by re-prefill (reason: lost = no "
    "verdict in time, draining, unknown_session)",
    ["reason"],
)

# --- errors -------------------------------------------------------------------------------
REJECTED = Counter(
    "picospec_rejected_messages",
    "NATS messages refused and dropped, by the refusing role and reason (malformed, "
    "unknown_session, protocol, bad_open, a block refusal...)",
    ["role", "reason"],
)
REQUESTS = Counter(
    "picospec_requests",
    "Finished HTTP API requests by mode and final HTTP status (a stream that failed after it "
    "started counts with the error's status; 499: the client went away)",
    ["mode", "status"],
)
NATS_RECONNECTS = Counter(
    "picospec_nats_reconnects", "Successful reconnections of this process to its NATS server"
)
NATS_DISCONNECTS = Counter(
    "picospec_nats_disconnects",
    "Losses of this process's NATS connection (disconnects minus reconnects > 0: disconnected)",
)
DEGRADED = Counter(
    "picospec_degraded_responses",
    "Responses served unverified, by the draft model alone, because the cloud was "
    "unreachable and the request opted in (fallback: edge)",
)

# Device emulation (``PICOSPEC_DEVICE_PROFILE``): every model forward is padded to the profile's
# time; an overrun is a forward whose real compute took longer than the profile allows.
EMULATED_FORWARDS = Counter(
    "picospec_device_emulated_forwards",
    "Model forwards paced by the device profile (kind: step = one token, forward = several)",
    ["kind"],
)
EMULATED_SECONDS = Counter(
    "picospec_device_emulated_seconds",
    "Time the paced forwards took, real compute plus the padding wait",
    ["kind"],
)
REAL_COMPUTE_SECONDS = Counter(
    "picospec_device_real_compute_seconds",
    "Real compute time of the paced forwards, before padding",
    ["kind"],
)
DEVICE_OVERRUNS = Counter(
    "picospec_device_overruns",
    "Paced forwards whose real compute ran slower than the device profile allows",
    ["kind"],
)
DEVICE_OVERRUN_SECONDS = Counter(
    "picospec_device_overrun_seconds",
    "Time by which real compute exceeded the device profile, summed over the overruns",
    ["kind"],
)


def observe_pace(kind: str, real_s: float, target_s: float) -> None:
    """The device pacer's report of one forward (see ``picospec.runtime.devices``)."""
    EMULATED_FORWARDS.labels(kind).inc()
    EMULATED_SECONDS.labels(kind).inc(max(real_s, target_s))
    REAL_COMPUTE_SECONDS.labels(kind).inc(real_s)
    if real_s > target_s:
        DEVICE_OVERRUNS.labels(kind).inc()
        DEVICE_OVERRUN_SECONDS.labels(kind).inc(real_s - target_s)


_PREINIT_REJECT_REASONS = {
    "drafter": ("malformed", "unknown_session", "protocol"),
    "verifier": ("malformed", "unknown_session", "bad_open"),
    "sampler": ("malformed",),
}


def init_series(role: str) -> None:
    """Create the labelled series a role updates at zero, so they exist from the first scrape.

    Without this a series appears only at its first event: a rare one (a migration) leaves
    dashboards empty, and ``rate()`` misses the increments before the first scrape that saw it.
    """
    for reason in _PREINIT_REJECT_REASONS.get(role, ()):
        REJECTED.labels(role, reason)
    if role in ("drafter", "verifier"):
        for kind in ("step", "forward"):
            for metric in (
                EMULATED_FORWARDS,
                EMULATED_SECONDS,
                REAL_COMPUTE_SECONDS,
                DEVICE_OVERRUNS,
                DEVICE_OVERRUN_SECONDS,
            ):
                metric.labels(kind)
    if role == "drafter":
        for mode in MODES:
            for metric in (TTFT, ITL, E2E, GENERATED, PROMPT_TOKENS):
                metric.labels(mode)
            REQUESTS.labels(mode, "200")
        for mode in SPECULATIVE_MODES:
            for metric in (VERIFY_RTT, DRAFTS, DRAFT_TOKENS, ACCEPTED_TOKENS, ROLLBACKS, WASTED):
                metric.labels(mode)
        for direction in ("uplink", "downlink"):
            LINK_BYTES.labels(direction)
            LINK_MESSAGES.labels(direction)
        for reason in ("lost", "draining", "unknown_session"):
            MIGRATIONS.labels(reason)
        for policy in ("latency", "capacity"):
            DRAFT_POLICY_ROUNDS.labels(policy)
        for source in ("model", "suffix"):
            ACCEPTED_BY_SOURCE.labels(source)
    elif role == "verifier":
        for reason in ("idle", "memory_cap"):
            EVICTIONS.labels(reason)


def set_build_info(role: str, model: str, replica: str, site: str) -> None:
    """Publish ``picospec_build_info`` for this process and create its role's series."""
    BUILD_INFO.info(
        {"version": __version__, "role": role, "model": model, "replica": replica, "site": site}
    )
    init_series(role)
