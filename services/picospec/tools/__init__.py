"""The operator's and developer's tools around the services.

Layer 4 of 5 (protocol, runtime, speculation, services, **tools**): may import every layer
below; nothing below imports it.

- :mod:`~picospec.tools.stack`: ``picospec up``: a whole stack on this machine (nats-server,
  the WAN emulator, the services, Prometheus).
- :mod:`~picospec.tools.bench`: ``picospec bench``: mode against mode, and against vLLM.
  **A new benchmark mode goes here** (a module, and its flag in ``bench/cli.py``).
- :mod:`~picospec.tools.prompts`: the prompt sets benchmarks report against (MT-Bench).
- :mod:`~picospec.tools.distill`: ``picospec distill``: training a draft.
- :mod:`~picospec.tools.capacity`, :mod:`~picospec.tools.loadgen`,
  :mod:`~picospec.tools.cluster`: capacity figures, load and soak, the cluster checks.
"""
