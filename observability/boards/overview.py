"""The Overview dashboard: throughput, user latency, acceptance, WAN cost, verifier capacity and
errors across all sites and replicas of the chosen namespaces."""

from __future__ import annotations

from boards.panels import (
    NAMESPACE_VAR,
    NON_2XX,
    NS,
    RATE,
    ROLE_VERIFIER,
    STATUS_5XX,
    Board,
    Q,
    acceptance,
    accepted_length,
    percentiles,
    quantile,
    sel,
    srate,
)


def overview() -> dict:
    s = sel(NS)
    sv = sel(NS, ROLE_VERIFIER)
    sd = sel(NS, 'role="drafter"')
    b = Board(
        "PicoSpec / Overview",
        "picospec-overview",
        "Edge-cloud speculative decoding: throughput, user latency, acceptance, WAN cost, "
        "verifier capacity and errors across all sites and replicas of the chosen namespaces.",
        ["overview"],
    )
    b.variable(*NAMESPACE_VAR)
    b.row("Service level")
    b.stat(
        "Generated tokens/s",
        "Tokens delivered to clients per second, all sites and modes.",
        "short",
        srate("picospec_generation_tokens_total", s),
    )
    b.stat(
        "Acceptance rate",
        "rate(accepted draft tokens) / rate(draft tokens), as vLLM defines it.",
        "percentunit",
        acceptance(s),
    )
    b.stat(
        "Mean accepted length",
        "1 + accepted / drafts: tokens committed per verification round (vLLM's definition).",
        "short",
        accepted_length(s),
    )
    b.stat(
        "TTFT p99",
        "99th percentile time to first token.",
        "s",
        quantile(0.99, "picospec_time_to_first_token_seconds", s),
        threshold=2.0,
    )
    b.stat(
        "Verifier replicas up",
        "Verifier targets Prometheus scraped successfully.",
        "none",
        f"sum(up{sv})",
        decimals=0,
    )
    b.stat(
        "Server error ratio",
        "Share of API requests that ended in a 5xx status.",
        "percentunit",
        f"(sum(rate(picospec_requests_total{sel(NS, STATUS_5XX)}[{RATE}])) or vector(0))"
        f"\n/ {srate('picospec_requests_total', s)}",
        threshold=0.05,
    )
    b.row("Throughput")
    b.timeseries(
        "Generated tokens/s by site",
        "Tokens delivered to clients per second.",
        "short",
        Q(srate("picospec_generation_tokens_total", s, "site"), "{{site}}"),
        span=12,
    )
    b.timeseries(
        "Requests/s by mode",
        "Finished API requests per second, by decoding mode.",
        "reqps",
        Q(srate("picospec_requests_total", s, "mode"), "{{mode}}"),
        span=12,
    )
    b.row("Latency")
    b.timeseries(
        "Time to first token",
        "From request arrival to the first verified token.",
        "s",
        *percentiles("picospec_time_to_first_token_seconds", s),
    )
    b.timeseries(
        "Inter-token latency",
        "Between consecutive tokens of a response.",
        "s",
        *percentiles("picospec_inter_token_latency_seconds", s),
    )
    b.timeseries(
        "End-to-end request latency",
        "From request arrival to the last token.",
        "s",
        *percentiles("picospec_e2e_request_latency_seconds", s),
    )
    b.row("Speculation")
    b.timeseries(
        "Acceptance rate by mode",
        "rate(accepted) / rate(drafted), per speculative mode.",
        "percentunit",
        Q(acceptance(s, "mode"), "{{mode}}"),
    )
    b.timeseries(
        "Mean accepted length by mode",
        "1 + accepted / drafts: tokens committed per verification round.",
        "short",
        Q(accepted_length(s, "mode"), "{{mode}}"),
    )
    b.timeseries(
        "Acceptance by draft position",
        "Share of verification rounds whose draft token at this position was accepted.",
        "percentunit",
        Q(
            f"{srate('picospec_spec_decode_num_accepted_tokens_per_pos_total', s, 'position')}"
            f"\n/ on() group_left {srate('picospec_spec_decode_num_drafts_total', s)}",
            "position {{position}}",
        ),
    )
    b.timeseries(
        "Rollbacks and wasted draft tokens",
        "Rejections that rolled the drafter back, and draft tokens thrown away, per second.",
        "short",
        Q(srate("picospec_rollbacks_total", s), "rollbacks/s"),
        Q(srate("picospec_wasted_draft_tokens_total", s), "wasted tokens/s"),
        Q(srate("picospec_spec_decode_num_drafts_total", s), "verification rounds/s"),
    )
    b.timeseries(
        "Draft length in use",
        "Draft tokens per block (γ) of the latest request, per site and mode.",
        "short",
        Q(f"max by (site, mode) (picospec_draft_length_tokens{s})", "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Verify round trip (drafter-observed)",
        "Block sent to verdict received: WAN both ways, verifier queue and forward.",
        "s",
        *percentiles("picospec_verify_round_trip_seconds", s),
    )
    b.row("Communication")
    b.timeseries(
        "WAN bytes per generated token",
        "Edge-cloud payload bytes per delivered token, by direction.",
        "bytes",
        Q(
            f"{srate('picospec_link_bytes_total', s, 'direction')}"
            f"\n/ on() group_left {srate('picospec_generation_tokens_total', s)}",
            "{{direction}}",
        ),
    )
    b.timeseries(
        "WAN throughput",
        "Edge-cloud payload bytes per second, by direction.",
        "Bps",
        Q(srate("picospec_link_bytes_total", s, "direction"), "{{direction}}"),
    )
    b.timeseries(
        "WAN messages/s",
        "Edge-cloud messages per second, by direction.",
        "short",
        Q(srate("picospec_link_messages_total", s, "direction"), "{{direction}}"),
    )
    b.row("Capacity")
    b.timeseries(
        "Active sessions per verifier",
        "KV caches each verifier replica holds.",
        "short",
        Q(f"sum by (replica) (picospec_active_sessions{sv})", "{{replica}}"),
    )
    b.timeseries(
        "Verifier replicas",
        "Verifier replicas up (scraped) and known (reporting build info).",
        "none",
        Q(f"sum(up{sv})", "up"),
        Q(f"count(picospec_build_info{sv})", "reporting"),
    )
    b.timeseries(
        "Verifier busy fraction (scale-up signal)",
        "Share of wall time each verifier's model worker spends verifying; sustained > 0.8 "
        "means add replicas.",
        "percentunit",
        Q(srate("picospec_verify_forward_seconds_sum", sv, "replica"), "{{replica}}"),
        threshold=0.8,
    )
    b.timeseries(
        "Verify queue",
        "Blocks waiting per replica, and the p95 time blocks waited.",
        "short",
        Q(f"sum by (replica) (picospec_verify_queue_depth{sv})", "depth {{replica}}"),
        Q(
            quantile(0.95, "picospec_verify_queue_time_seconds", sv, "replica"),
            "wait p95 (s) {{replica}}",
        ),
    )
    b.timeseries(
        "KV cache memory",
        "Bytes of KV cache held per verifier replica.",
        "bytes",
        Q(f"sum by (replica) (picospec_kv_cache_bytes{sv})", "{{replica}}"),
    )
    b.timeseries(
        "Session migrations",
        "Sessions re-opened on another verifier per second, by reason.",
        "short",
        Q(srate("picospec_session_migrations_total", s, "reason"), "{{reason}}"),
    )
    b.row("Errors")
    b.timeseries(
        "Non-2xx responses by status",
        "API requests per second that did not succeed (0 when there are none).",
        "reqps",
        Q(
            f"sum by (status) (rate(picospec_requests_total{sel(NS, NON_2XX)}"
            f"[{RATE}]))\nor on() vector(0)",
            "{{status}}",
        ),
    )
    b.timeseries(
        "Rejected messages by reason",
        "NATS messages refused and dropped per second, by role and reason.",
        "short",
        Q(srate("picospec_rejected_messages_total", s, "role, reason"), "{{role}} {{reason}}"),
    )
    b.timeseries(
        "NATS connection",
        "Disconnects and reconnects in the interval, and connections currently down.",
        "short",
        Q(srate("picospec_nats_disconnects_total", s, fn="increase"), "disconnects"),
        Q(srate("picospec_nats_reconnects_total", s, fn="increase"), "reconnects"),
        Q(
            f"sum(picospec_nats_disconnects_total{s} - picospec_nats_reconnects_total{s})",
            "down now",
        ),
    )
    b.timeseries(
        "Degraded (unverified) responses",
        "Responses served by the draft model alone while the cloud was unreachable, per site.",
        "reqps",
        Q(srate("picospec_degraded_responses_total", sd, "site"), "{{site}}"),
    )
    b.table(
        "Versions and models",
        "One row per process: version, role, model, replica and site.",
        f"picospec_build_info{s}",
    )
    return b.json()
