"""The speculation core: the maths and the state machines of speculative decoding, transport-free.

Layer 2 of 5 (protocol, runtime, **speculation**, services, tools). It may import
:mod:`picospec.protocol` and :mod:`picospec.runtime`, nothing above: no NATS, no HTTP, no
settings. The services wrap these functional cores in thin shells.

- :mod:`~picospec.speculation.spec`: the decoding modes and one session's speculation settings.
- :mod:`~picospec.speculation.sampling`: sampling, standard and separate rejection sampling,
  sparse ``p_j``, the output distribution (the losslessness proofs' maths).
- :mod:`~picospec.speculation.drafter`, :mod:`~picospec.speculation.verifier`,
  :mod:`~picospec.speculation.sampler`: the drafter's, verifier's and sampler's functional cores
  (sessions as programs for the model thread).
- :mod:`~picospec.speculation.tuning`: the rate model and adaptive γ / look-ahead.
- :mod:`~picospec.speculation.engine`: the three cores in one process (``picospec generate``,
  the reference the services are tested against). **A new decoding mode goes here** (a
  :class:`~picospec.speculation.spec.Mode`, its drafter and verifier steps).
- :mod:`~picospec.speculation.analysis`: what compression costs in distribution distance
  (``picospec tvd``).
"""
