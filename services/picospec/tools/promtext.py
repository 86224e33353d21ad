"""Reading what a ``/metrics`` endpoint says, on ``prometheus_client``'s own parser of the text
exposition format: the one reader of the bench, the load generator, the cluster view and the
tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape's text, parsed once (a caller that reads several series from it parses it
    once). Raises ``ValueError`` on text that is not the exposition format."""

    def __init__(self, text: str) -> None:
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def sum(self, name: str, **labels: str) -> float | None:
        """The sum of the samples named ``name`` (as exposed: a counter's ``_total``, a
        histogram's ``_sum`` or ``_count``) whose labels include ``labels``, over every other
        label's values; None where no such sample is exposed."""
        values = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sum(values) if values else None


def series_sum(text: str, name: str, **labels: str) -> float | None:
    """:meth:`Scrape.sum` of one series from ``text``."""
    return Scrape(text).sum(name, **labels)
