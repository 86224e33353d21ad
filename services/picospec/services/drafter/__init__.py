"""The drafter (edge): the OpenAI-compatible API, the draft model and the pipeline.

- :mod:`picospec.speculation.drafter`: the drafter's state machine (committed tokens, blocks in
  flight, epochs, rollback, the first token from the prefill), transport-free.
- :mod:`picospec.services.drafter.service`: its NATS shell: one ``Generation`` per
  request, migration, sampler calls, the edge fallback, adaptive speculation
  (``picospec.speculation.tuning``).
- :mod:`picospec.services.drafter.api`: the HTTP API (aiohttp), backpressure, API keys.
"""
