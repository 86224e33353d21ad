"""Reading what a ``/metrics`` endpoint says, on ``prometheus_client``'s own parser of the text
exposition format: the one reader of the bench, the load generator, the cluster view and the
tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def series_sum(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` (as exposed: a counter's ``_total``, a
    histogram's ``_sum`` or ``_count``) whose labels include ``labels``, over every other
    label's values; None where no such sample is exposed. Raises ``ValueError`` on text that
    is not the exposition format."""
    found, total = False, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found, total = True, total + sample.value
    return total if found else None
