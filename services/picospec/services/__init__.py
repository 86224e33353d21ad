"""The microservices: drafter (edge, with the OpenAI API), verifier (cloud), sampler (edge).

Layer 3 of 5 (protocol, runtime, speculation, **services**, tools). It may import the layers
below and :mod:`picospec.config`; nothing here imports :mod:`picospec.tools`.

- :mod:`~picospec.services.drafter`, :mod:`~picospec.services.verifier`,
  :mod:`~picospec.services.sampler`: each role's NATS (and HTTP) shell around its core in
  :mod:`picospec.speculation`.
- :mod:`~picospec.services.shell`: what every service shares: NATS connection, health and
  metrics endpoints, structured events, signals.
- :mod:`~picospec.services.control`: the JSON control messages (open/close session, errors);
  the hot-path wire format is :mod:`picospec.protocol`.
- :mod:`~picospec.services.metrics`: every Prometheus metric, defined once. **A new metric
  goes here** (then ``make dashboards`` regenerates observability/METRICS.md).
"""
