"""The Verifier dashboard: one or more cloud replicas' load (busy fraction, the scale-up
signal), verification compute, queueing, batching, sessions, KV memory and process health."""

from __future__ import annotations

from boards.panels import (
    NAMESPACE_VAR,
    NS,
    REPLICA,
    REPLICA_VAR,
    ROLE_VERIFIER,
    Board,
    Q,
    percentiles,
    quantile,
    sel,
    srate,
)


def verifier() -> dict:
    s = sel(NS, REPLICA, ROLE_VERIFIER)
    b = Board(
        "PicoSpec / Verifier",
        "picospec-verifier",
        "One or more verifier replicas: verification compute, queueing, batching, sessions, KV "
        "memory and process health. Busy fraction near 1 means the replica is saturated.",
        ["verifier"],
    )
    b.variable(*NAMESPACE_VAR).variable(*REPLICA_VAR)
    b.row("Load")
    b.stat(
        "Busy fraction",
        "Mean share of wall time the selected replicas' model workers spend verifying.",
        "percentunit",
        f"avg({srate('picospec_verify_forward_seconds_sum', s, 'replica')})",
        threshold=0.8,
    )
    b.stat(
        "Active sessions",
        "Sessions held by the selected replicas.",
        "none",
        f"sum(picospec_active_sessions{s})",
        decimals=0,
    )
    b.stat(
        "Queued blocks",
        "Draft blocks waiting for the model worker.",
        "none",
        f"sum(picospec_verify_queue_depth{s})",
        decimals=0,
    )
    b.timeseries(
        "Busy fraction",
        "Share of wall time spent in verify forwards (sustained > 0.8: add replicas).",
        "percentunit",
        Q(srate("picospec_verify_forward_seconds_sum", s, "replica"), "{{replica}}"),
        threshold=0.8,
    )
    b.timeseries(
        "Active sessions",
        "Sessions (KV caches) per replica.",
        "short",
        Q(f"sum by (replica) (picospec_active_sessions{s})", "{{replica}}"),
    )
    b.timeseries(
        "KV cache memory",
        "Bytes of KV cache per replica.",
        "bytes",
        Q(f"sum by (replica) (picospec_kv_cache_bytes{s})", "{{replica}}"),
    )
    b.row("Verification")
    b.timeseries(
        "Busy fraction",
        "Share of the last second each replica's engine spent running forwards: the load its "
        "verdicts report, which drafters' draft-length policy follows (capacity above 0.9).",
        "percentunit",
        Q(f"max by (replica) (picospec_verify_busy_ratio{s})", "{{replica}}"),
    )
    b.timeseries(
        "Verify forward time",
        "Compute time of one batch: target forward and acceptance test.",
        "s",
        *percentiles("picospec_verify_forward_seconds", s, "replica"),
    )
    b.timeseries(
        "Queue wait",
        "Time a block waited before its batch started.",
        "s",
        *percentiles("picospec_verify_queue_time_seconds", s, "replica"),
    )
    b.timeseries(
        "Batch size",
        "Blocks per verify batch: mean and p95.",
        "short",
        Q(
            f"{srate('picospec_verify_batch_size_sum', s, 'replica')}\n/ "
            f"{srate('picospec_verify_batch_size_count', s, 'replica')}",
            "mean {{replica}}",
        ),
        Q(quantile(0.95, "picospec_verify_batch_size", s, "replica"), "p95 {{replica}}"),
    )
    b.timeseries(
        "Batches/s",
        "Verify batches per second per replica.",
        "short",
        Q(srate("picospec_verify_forward_seconds_count", s, "replica"), "{{replica}}"),
    )
    b.timeseries(
        "Queue depth",
        "Blocks waiting per replica.",
        "short",
        Q(f"sum by (replica) (picospec_verify_queue_depth{s})", "{{replica}}"),
    )
    b.timeseries(
        "Session evictions",
        "Sessions freed without a close, per second, by reason.",
        "short",
        Q(
            srate("picospec_session_evictions_total", s, "replica, reason"),
            "{{replica}} {{reason}}",
        ),
    )
    b.row("Health")
    b.timeseries(
        "Rejected messages",
        "Messages refused per second, by reason.",
        "short",
        Q(
            srate("picospec_rejected_messages_total", s, "replica, reason"),
            "{{replica}} {{reason}}",
        ),
    )
    b.timeseries(
        "NATS connection",
        "Disconnects and reconnects in the interval.",
        "short",
        Q(srate("picospec_nats_disconnects_total", s, "replica", "increase"), "down {{replica}}"),
        Q(srate("picospec_nats_reconnects_total", s, "replica", "increase"), "up {{replica}}"),
    )
    b.timeseries(
        "CPU",
        "CPU cores used per replica process.",
        "short",
        Q(srate("process_cpu_seconds_total", s, "replica"), "{{replica}}"),
    )
    b.timeseries(
        "Resident memory",
        "Resident set size per replica process.",
        "bytes",
        Q(f"sum by (replica) (process_resident_memory_bytes{s})", "{{replica}}"),
    )
    b.timeseries(
        "Python GC collections",
        "Garbage collections per second, by generation.",
        "short",
        Q(
            srate("python_gc_collections_total", s, "replica, generation"),
            "{{replica}} gen {{generation}}",
        ),
    )
    b.table(
        "Replicas",
        "Version, model and id of each selected replica.",
        f"picospec_build_info{s}",
    )
    return b.json()
