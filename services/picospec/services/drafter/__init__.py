"""The drafter (edge): the OpenAI-compatible API, the draft model and the pipeline.

- :mod:`picospec.speculation.drafter`: the drafter's state machine (committed tokens, blocks in
  flight, epochs, rollback, the first token from the prefill), transport-free.
- :mod:`picospec.services.drafter.service`: its NATS shell: one ``Generation`` per
  request, migration, sampler calls, the edge fallback, adaptive speculation
  (``picospec.speculation.tuning``).
- :mod:`picospec.services.drafter.link`: a session's link to the cloud (opens, blocks,
  verdict waits and pings, sampler calls).
- :mod:`picospec.services.drafter.stats`: what a response reports of its generation.
- :mod:`picospec.services.drafter.api`: the HTTP API (aiohttp), backpressure, API keys; its
  request bodies are :mod:`picospec.services.drafter.requests`.
"""
