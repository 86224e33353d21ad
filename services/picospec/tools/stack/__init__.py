"""Run PicoSpec locally: real nats-server processes, the WAN link emulator and ``picospec up``.

- :mod:`picospec.tools.stack.natsserver`: :class:`NatsServer` (single server, cloud hub, edge leaf).
- :mod:`picospec.tools.stack.netem`: :class:`LinkEmulator`, a TCP proxy adding delay and a bandwidth
  cap, with cut/restore; ``picospec netem``.
- :mod:`picospec.tools.stack.config`: :class:`StackConfig` (topology, models, ports, CPU sets).
- :mod:`picospec.tools.stack.supervisor`: :class:`Stack`, the running processes.
- :mod:`picospec.tools.stack.up`: ``picospec up`` (its flags and the demo request).
- :mod:`picospec.tools.stack.procs`: the one way to run a child process: spawning (pinned to
  CPUs), waiting until it is ready (:func:`~picospec.tools.stack.procs.wait_until` and its
  probes), log tails, stopping in order.

Submodules are imported lazily, so ``python -m picospec.tools.stack.up`` and ``-m
picospec.tools.stack.netem`` run cleanly and importing the CLI stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

_EXPORTS = {
    "NatsServer": "natsserver",
    "NatsServerError": "natsserver",
    "LeafRemote": "natsserver",
    "find_nats_server": "natsserver",
    "free_port": "natsserver",
    "free_ports": "natsserver",
    "LinkEmulator": "netem",
    "Stack": "supervisor",
    "StackConfig": "config",
    "StackError": "config",
    "LinkControl": "supervisor",
}

__all__ = [*_EXPORTS, "register"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``up`` and ``netem`` to the ``picospec`` command line (each sets ``func``)."""
    from picospec.tools.stack import netem, up

    u = subparsers.add_parser(
        "up",
        help="run a whole local stack: NATS, verifiers, sampler, drafter",
        description="Run a whole PicoSpec stack locally; Ctrl-C or SIGTERM stops it cleanly.",
    )
    up.add_arguments(u)
    u.set_defaults(func=up.cmd_up)

    n = subparsers.add_parser(
        "netem",
        help="emulate a WAN link: a TCP proxy with delay, bandwidth cap and partition",
        description="TCP proxy adding delay and a bandwidth cap; cut and restored over HTTP.",
    )
    netem.add_arguments(n)
    n.set_defaults(func=netem.cmd_netem)
