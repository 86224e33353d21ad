"""The PicoSpec protocol: what crosses the network between drafter, verifier and sampler.

- :mod:`picospec.protocol.codec`: the binary wire format's reference (its docstring is the byte
  layout) and every public name of the hot-path messages: ``DraftBlock``, ``Verdict``,
  ``SampleRequest``, ``SampleReply``, ``encode``, ``decode``, ``CodecError``, …
- :mod:`picospec.protocol.layout`, :mod:`~picospec.protocol.schemas`,
  :mod:`~picospec.protocol.binary`, :mod:`~picospec.protocol.sizes`: the code behind it, one job
  each (wire constants, pydantic models, encoder/decoder, the size table).
- :mod:`picospec.protocol.subjects`: every NATS subject, queue group and header, and the least
  NATS permissions of each role.

Import from ``picospec.protocol.codec`` (or the module that defines a name); this package
imports nothing itself, so ``import picospec.protocol.subjects`` stays cheap.

Layer 0 of 5 (**protocol**, runtime, speculation, services, tools): it imports nothing else
of PicoSpec. The services' JSON control messages, which carry a session's speculation
settings, are :mod:`picospec.services.control`.
"""
