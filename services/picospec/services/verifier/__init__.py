"""The verifier (cloud): the target model's KV caches and the verification of draft blocks.

- :mod:`picospec.speculation.verifier`: the verifier's state machine (strict order, stale epochs,
  crop on rejection, the first token, batched ``verify_many``), transport-free.
- :mod:`picospec.services.verifier.service`: its NATS shell: the queue group, the batching worker,
  eviction, drain, ping, the cost line it tells drafters.
- :mod:`picospec.services.verifier.backends`: the engine behind it, PicoSpec's runtime or
  vLLM's, with one face.
"""
