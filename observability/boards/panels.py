"""The panel builders every PicoSpec dashboard is made of (``grafana-foundation-sdk``).

- PromQL helpers: :func:`sel`, :func:`rate`, :func:`srate`, :func:`quantile`,
  :func:`percentiles`, :func:`acceptance` (vLLM's accepted / draft tokens) and
  :func:`accepted_length`;
- :class:`Board`, which collects one dashboard's rows and panels (time series, stat, table),
  numbers them and renders the JSON;
- the label matchers and template variables the dashboards filter on (``namespace``, ``site``,
  ``replica``, ``role``).

A change here changes every dashboard; a change to one dashboard belongs in its own module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

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
