"""The Edge site dashboard: what one or more edge sites' users see (tokens/s, latency), how well
their drafts are accepted (draft step time), what the WAN costs, and the health of the site's
drafter and sampler processes."""

from __future__ import annotations

from boards.panels import (
    NAMESPACE_VAR,
    NON_2XX,
    NS,
    RATE,
    SITE,
    SITE_VAR,
    Board,
    Q,
    acceptance,
    accepted_length,
    percentiles,
    quantile,
    sel,
    srate,
)


def edge_site() -> dict:
    s = sel(NS, SITE)
    sd = sel(NS, SITE, 'role="drafter"')
    ss = sel(NS, SITE, 'role="sampler"')
    b = Board(
        "PicoSpec / Edge site",
        "picospec-edge-site",
        "One or more edge sites: what their users see, how well their drafts are accepted, "
        "what the WAN costs and how the site's drafter and sampler processes are doing.",
        ["edge"],
    )
    b.variable(*NAMESPACE_VAR).variable(*SITE_VAR)
    b.row("Users")
    b.timeseries(
        "Generated tokens/s",
        "Tokens delivered to clients per second.",
        "short",
        Q(srate("picospec_generation_tokens_total", s, "site, mode"), "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Requests/s by status",
        "Finished API requests per second by HTTP status.",
        "reqps",
        Q(srate("picospec_requests_total", s, "site, status"), "{{site}} {{status}}"),
    )
    b.timeseries(
        "Prompt tokens/s",
        "Prompt tokens of accepted requests per second.",
        "short",
        Q(srate("picospec_prompt_tokens_total", s, "site"), "{{site}}"),
    )
    b.timeseries(
        "Time to first token",
        "p50/p95/p99 per site.",
        "s",
        *percentiles("picospec_time_to_first_token_seconds", s, "site"),
    )
    b.timeseries(
        "Inter-token latency",
        "p50/p95/p99 per site.",
        "s",
        *percentiles("picospec_inter_token_latency_seconds", s, "site"),
    )
    b.timeseries(
        "End-to-end request latency",
        "p50/p95/p99 per site.",
        "s",
        *percentiles("picospec_e2e_request_latency_seconds", s, "site"),
    )
    b.timeseries(
        "Requests running and waiting",
        "Generations running on the drafter, and requests waiting for a slot (backpressure: "
        "they get 429 after queue_timeout_s).",
        "short",
        Q(f"sum by (site) (picospec_num_requests_running{sd})", "running {{site}}"),
        Q(f"sum by (site) (picospec_num_requests_waiting{sd})", "waiting {{site}}"),
    )
    b.row("Speculation")
    b.timeseries(
        "Draft step time",
        "Edge compute of one draft-model token, p50/p95/p99 per site: the draft-bound "
        "pipeline's speed limit is 1 / this.",
        "s",
        *percentiles("picospec_draft_step_seconds", s, "site"),
    )
    b.timeseries(
        "Acceptance rate",
        "rate(accepted) / rate(drafted) per site and mode.",
        "percentunit",
        Q(acceptance(s, "site, mode"), "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Mean accepted length",
        "1 + accepted / drafts per site and mode.",
        "short",
        Q(accepted_length(s, "site, mode"), "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Acceptance by draft position",
        "Share of rounds whose draft token at this position was accepted.",
        "percentunit",
        Q(
            srate("picospec_spec_decode_num_accepted_tokens_per_pos_total", s, "site, position")
            + "\n/ on(site) group_left "
            + srate("picospec_spec_decode_num_drafts_total", s, "site"),
            "{{site}} position {{position}}",
        ),
    )
    b.timeseries(
        "Rollbacks/s",
        "Rejections that rolled the drafter back, per site and mode.",
        "short",
        Q(srate("picospec_rollbacks_total", s, "site, mode"), "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Wasted draft tokens/s",
        "Draft tokens thrown away (rejected or drafted past a rejection).",
        "short",
        Q(srate("picospec_wasted_draft_tokens_total", s, "site, mode"), "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Draft length in use",
        "Draft tokens per block (γ) of the latest request.",
        "short",
        Q(f"max by (site, mode) (picospec_draft_length_tokens{s})", "{{site}} {{mode}}"),
    )
    b.timeseries(
        "Draft-length policy and the cloud's load",
        "Share of adaptive rounds drafted for a saturated verifier's throughput (capacity) "
        "rather than the session's own speed (latency), and the verifier busy fraction the "
        "latest choice reacted to.",
        "percentunit",
        Q(
            srate("picospec_draft_policy_rounds_total", s, "site, policy")
            + "\n/ on(site) group_left "
            + srate("picospec_draft_policy_rounds_total", s, "site"),
            "{{site}} {{policy}} rounds",
        ),
        Q(f"max by (site) (picospec_draft_policy_load_ratio{s})", "{{site}} verifier busy"),
    )
    b.timeseries(
        "Accepted tokens by draft source",
        "Accepted draft tokens per second by what drafted them: the draft model, a suffix "
        "match, or an emulated edge (benchmarks).",
        "short",
        Q(
            srate("picospec_accepted_tokens_by_source_total", s, "site, source"),
            "{{site}} {{source}}",
        ),
    )
    b.row("WAN and cloud round trips")
    b.timeseries(
        "WAN bytes per generated token",
        "Edge-cloud payload bytes per delivered token, by direction.",
        "bytes",
        Q(
            f"{srate('picospec_link_bytes_total', s, 'site, direction')}\n/ on(site) group_left "
            f"{srate('picospec_generation_tokens_total', s, 'site')}",
            "{{site}} {{direction}}",
        ),
    )
    b.timeseries(
        "WAN throughput",
        "Edge-cloud payload bytes per second.",
        "Bps",
        Q(srate("picospec_link_bytes_total", s, "site, direction"), "{{site}} {{direction}}"),
    )
    b.timeseries(
        "WAN messages/s",
        "Edge-cloud messages per second.",
        "short",
        Q(srate("picospec_link_messages_total", s, "site, direction"), "{{site}} {{direction}}"),
    )
    b.timeseries(
        "Verify round trip",
        "Drafter-observed: block sent to verdict applied.",
        "s",
        *percentiles("picospec_verify_round_trip_seconds", s, "site"),
    )
    b.timeseries(
        "Sampler latency",
        "Correction requests: drafter-observed round trip and sampler compute, p95.",
        "s",
        Q(quantile(0.95, "picospec_sample_round_trip_seconds", sd, "site"), "round trip {{site}}"),
        Q(quantile(0.95, "picospec_sample_compute_seconds", ss, "site"), "compute {{site}}"),
    )
    b.timeseries(
        "Compression tail mass per sampled rejection",
        "Mean probability mass of p_j left out by top-K (bounds the TVD it adds).",
        "short",
        Q(
            f"{srate('picospec_compression_tail_mass_total', sd, 'site')}\n/ "
            f"{srate('picospec_sample_round_trip_seconds_count', sd, 'site')}",
            "{{site}}",
        ),
    )
    b.row("Health")
    b.timeseries(
        "Errors by status",
        "Non-2xx API responses per second (0 when there are none).",
        "reqps",
        Q(
            f"sum by (site, status) (rate(picospec_requests_total"
            f"{sel(NS, SITE, NON_2XX)}[{RATE}]))\nor on() vector(0)",
            "{{site}} {{status}}",
        ),
    )
    b.timeseries(
        "Degraded (unverified) responses",
        "Responses served by the draft model alone, per second.",
        "reqps",
        Q(srate("picospec_degraded_responses_total", sd, "site"), "{{site}}"),
    )
    b.timeseries(
        "Session migrations",
        "Sessions moved to another verifier per second, by reason.",
        "short",
        Q(srate("picospec_session_migrations_total", s, "site, reason"), "{{site}} {{reason}}"),
    )
    b.timeseries(
        "Rejected messages",
        "NATS messages refused at the edge per second, by role and reason.",
        "short",
        Q(srate("picospec_rejected_messages_total", s, "role, reason"), "{{role}} {{reason}}"),
    )
    b.timeseries(
        "NATS connection",
        "Disconnects and reconnects of the site's processes in the interval.",
        "short",
        Q(srate("picospec_nats_disconnects_total", s, "role", "increase"), "disconnects {{role}}"),
        Q(srate("picospec_nats_reconnects_total", s, "role", "increase"), "reconnects {{role}}"),
    )
    b.timeseries(
        "Drafter CPU and memory",
        "CPU cores used and resident memory of the site's processes.",
        "short",
        Q(srate("process_cpu_seconds_total", s, "role, replica"), "CPU {{role}} {{replica}}"),
        Q(
            f"sum by (role, replica) (process_resident_memory_bytes{s}) / 2^30",
            "RSS GiB {{role}} {{replica}}",
        ),
    )
    b.table(
        "Drafters of the site",
        "Version and draft model of each drafter.",
        f"picospec_build_info{sd}",
    )
    return b.json()
