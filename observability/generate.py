"""Generate PicoSpec's Grafana dashboards (and the local scrape config) as code.

The dashboards are built with ``grafana-foundation-sdk``, Grafana's own builder library, and
written as JSON to ``observability/dashboards/``; the Prometheus scrape config for the default
local stack goes to ``observability/prometheus/prometheus.yml``. The output is checked in;
``make dashboards`` regenerates it and the tests fail when it is stale.

    python observability/generate.py            # write the files
    python observability/generate.py --check    # exit 1 if a checked-in file differs

Every panel query filters on the target labels the scrape config (or ServiceMonitor
relabelling) attaches: ``namespace``, ``site`` (edge roles), ``replica`` and ``role``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import table as gtable
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from picospec.stack.prometheus import local_targets, render_config, scrape_config

HERE = Path(__file__).resolve().parent
DASHBOARDS_DIR = HERE / "dashboards"
SCRAPE_CONFIG = HERE / "prometheus" / "prometheus.yml"
LOCAL_VERIFIERS = 4  # the checked-in scrape config lists verifier ports 8101..8104

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


# -- PromQL helpers ------------------------------------------------------------------------------


def sel(*matchers: str) -> str:
    return "{" + ", ".join(m for m in matchers if m) + "}"


def rate(metric: str, s: str, fn: str = "rate") -> str:
    return f"{fn}({metric}{s}[{RATE}])"


def srate(metric: str, s: str, by: str = "", fn: str = "rate") -> str:
    """``sum [by (...)] (rate(metric{...}[$__rate_interval]))``."""
    return f"sum{f' by ({by})' if by else ''} ({rate(metric, s, fn)})"


def quantile(q: float, histogram: str, s: str, by: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', s)}))"


def acceptance(s: str, by: str = "") -> str:
    return (
        f"{srate('picospec_spec_decode_num_accepted_tokens_total', s, by)}\n"
        f"/ {srate('picospec_spec_decode_num_draft_tokens_total', s, by)}"
    )


def accepted_length(s: str, by: str = "") -> str:
    return (
        f"1 + {srate('picospec_spec_decode_num_accepted_tokens_total', s, by)}\n"
        f"/ {srate('picospec_spec_decode_num_drafts_total', s, by)}"
    )


# -- panel helpers -------------------------------------------------------------------------------


@dataclass
class Q:
    expr: str
    legend: str = "__auto"


class Board:
    """Collects panels for one dashboard and numbers them."""

    def __init__(self, title: str, uid: str, description: str, tags: list[str]) -> None:
        self.builder = (
            gd.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["picospec", *tags])
            .refresh("30s")
            .time("now-1h", "now")
            .timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .editable()
            .with_variable(
                gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
            )
        )
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def variable(self, name: str, label: str, query: str) -> Board:
        self.builder.with_variable(
            gd.QueryVariable(name)
            .label(label)
            .datasource(DS)
            .query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
        return self

    def row(self, title: str) -> Board:
        self.builder.with_row(gd.Row(title).id(self._id()))
        return self

    @staticmethod
    def _targets(panel: object, queries: Iterable[Q], instant: bool = False) -> None:
        for i, q in enumerate(queries):
            target = gp.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).datasource(DS)
            target.legend_format(q.legend)
            if instant:
                target.instant().format(PromQueryFormat.TABLE)
            panel.with_target(target)  # type: ignore[attr-defined]

    def timeseries(
        self,
        title: str,
        description: str,
        unit: str,
        *queries: Q,
        span: int = 8,
        threshold: float | None = None,
    ) -> Board:
        panel = (
            gts.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DS)
            .unit(unit)
            .span(span)
            .height(8)
            .fill_opacity(10)
            .line_width(1)
            .legend(
                VizLegendOptions()
                .show_legend(True)
                .display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM)
            )
        )
        if threshold is not None:
            panel.thresholds(_thresholds(threshold)).thresholds_style(
                GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
            )
        self._targets(panel, queries)
        self.builder.with_panel(panel)
        return self

    def stat(
        self,
        title: str,
        description: str,
        unit: str,
        expr: str,
        threshold: float | None = None,
        decimals: int = 2,
    ) -> Board:
        panel = (
            gstat.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DS)
            .unit(unit)
            .decimals(decimals)
            .span(4)
            .height(4)
            .graph_mode(cm.BigValueGraphMode.AREA)
            .color_mode(cm.BigValueColorMode.VALUE)
        )
        if threshold is not None:
            panel.thresholds(_thresholds(threshold))
        self._targets(panel, [Q(expr, title)])
        self.builder.with_panel(panel)
        return self

    def table(self, title: str, description: str, expr: str) -> Board:
        panel = (
            gtable.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DS)
            .span(24)
            .height(6)
            .with_transformation(
                dm.DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True, "Value": True, "__name__": True},
                        "renameByName": {},
                    },
                )
            )
        )
        self._targets(panel, [Q(expr, "")], instant=True)
        self.builder.with_panel(panel)
        return self

    def json(self) -> dict:
        return json.loads(JSONEncoder(sort_keys=True).encode(self.builder.build()))


def _thresholds(red_at: float) -> gd.ThresholdsConfig:
    return (
        gd.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=None, color="green"), dm.Threshold(value=red_at, color="red")])
    )


def percentiles(histogram: str, s: str, by: str = "") -> list[Q]:
    suffix = f" {{{{{by}}}}}" if by else ""
    return [Q(quantile(q, histogram, s, by), name + suffix) for name, q in QUANTILES]


NS = 'namespace=~"$namespace"'
SITE = 'site=~"$site"'
REPLICA = 'replica=~"$replica"'
ROLE_VERIFIER = 'role="verifier"'
STATUS_5XX = 'status=~"5.."'
NON_2XX = 'status!~"2.."'
NAMESPACE_VAR = ("namespace", "Namespace", "label_values(picospec_build_info, namespace)")
SITE_VAR = (
    "site",
    "Edge site",
    'label_values(picospec_build_info{namespace=~"$namespace", role="drafter"}, site)',
)
REPLICA_VAR = (
    "replica",
    "Verifier replica",
    'label_values(picospec_build_info{namespace=~"$namespace", role="verifier"}, replica)',
)


# -- the dashboards ------------------------------------------------------------------------------


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


# -- files -----------------------------------------------------------------------------------------

SCRAPE_HEADER = """\
# Prometheus scrape config for `picospec up` with its default ports: drafter 8000, sampler
# 8201, verifiers 8101..8104 (those beyond --verifiers show as down, which no rule minds).
# `picospec up --observability` writes and runs an exact config of its own. Generated by
# observability/generate.py (`make dashboards`); do not edit by hand.
#
#   prometheus --config.file=observability/prometheus/prometheus.yml
#
# The target labels (namespace, role, replica, site) are what the dashboards and rules filter
# on; in Kubernetes, ServiceMonitor relabelling provides the same (observability/README.md).
"""


def metrics_reference() -> str:
    """``METRICS.md``: every metric of ``picospec.metrics`` with its type, labels and help."""
    from prometheus_client import Counter, Gauge, Histogram, Info

    from picospec import metrics

    suffix = {Counter: "_total", Info: "_info"}
    rows = []
    for obj in vars(metrics).values():
        if not isinstance(obj, Counter | Gauge | Histogram | Info):
            continue
        kind = type(obj).__name__.lower()
        name = obj._name + suffix.get(type(obj), "")
        labels = ", ".join(f"`{lb}`" for lb in obj._labelnames) or "–"
        text = obj._documentation
        if isinstance(obj, Histogram):
            bounds = [b for b in obj._upper_bounds if b != float("inf")]
            text += f" (buckets {bounds[0]:g} .. {bounds[-1]:g}, {len(bounds)} bounds)"
        rows.append(f"| `{name}` | {kind} | {labels} | {text} |")
    return (
        "# PicoSpec metrics\n\n"
        "Generated from `services/picospec/metrics.py` by `observability/generate.py`; do not "
        "edit by hand.\nEvery series also carries the target labels `namespace`, `role`, "
        "`replica` and, at the edge, `site`\n(see README.md). Each process also exports "
        "prometheus-client's `process_*` and `python_*` metrics.\n\n"
        "| metric | type | labels | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def outputs() -> dict[Path, str]:
    files = {
        DASHBOARDS_DIR / f"{name}.json": json.dumps(doc, indent=2, sort_keys=True) + "\n"
        for name, doc in (
            ("picospec-overview", overview()),
            ("picospec-edge-site", edge_site()),
            ("picospec-verifier", verifier()),
        )
    }
    doc = scrape_config(
        local_targets(LOCAL_VERIFIERS),
        scrape_interval=5.0,
        evaluation_interval=15.0,
        rule_files=["recording.rules.yml", "alerts.rules.yml"],
    )
    files[SCRAPE_CONFIG] = render_config(doc, SCRAPE_HEADER)
    files[HERE / "METRICS.md"] = metrics_reference()
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if a checked-in file is stale")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        verb = "stale" if args.check else "wrote"
        print(
            f"{verb}: {path.relative_to(HERE.parent)}",
            file=sys.stderr if args.check else sys.stdout,
        )
    if args.check and stale:
        print("run `make dashboards` to regenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
