"""PicoSpec's Grafana dashboards as code, one module per dashboard.

- :mod:`boards.panels`: the shared panel builders, PromQL helpers and template variables;
- :mod:`boards.overview`, :mod:`boards.edge_site`, :mod:`boards.verifier`: one dashboard each;
  each module's function returns the dashboard's JSON model.

``observability/generate.py`` (``make dashboards``) writes them to ``observability/dashboards/``;
it puts this folder on ``sys.path``, so the package is imported as ``boards``.
"""
