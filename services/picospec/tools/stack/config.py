"""The local stack's topology and settings: :class:`StackConfig` (what ``picospec up`` can set),
the edge and cloud CPU sets, and :class:`StackError`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from picospec.protocol import subjects
from picospec.tools.stack.natsserver import (
    free_ports,
)
from picospec.tools.stack.procs import (
    split_cpus,
)

TOPOLOGIES = ("single", "edge-cloud")


class StackError(RuntimeError):
    """A component failed to start, exited, or did not become ready."""


@dataclass
class StackConfig:
    """Everything ``picospec up`` can set. Ports are fixed by default; see :meth:`with_free_ports`.

    ``verifiers=0``, ``sampler=False`` and ``drafter=False`` leave those services out (e.g. to
    run only the NATS topology and the link). ``emulate_link=None`` starts the link emulator in
    ``edge-cloud`` exactly when ``rtt_ms`` or ``bandwidth_mbit`` is set; True forces it (so the
    link can be cut even with no delay), False never starts it.
    """

    topology: str = "single"
    verifiers: int = 1
    sampler: bool = True
    drafter: bool = True
    drafter_model: str = "smollm2"
    verifier_model: str = "smollm2"
    quantize_draft: str = "none"
    draft_dtype: str = "auto"  # the drafter's PICOSPEC_DTYPE (auto: its device's or profile's)
    threads: int | None = None
    rtt_ms: float | None = None
    bandwidth_mbit: float | None = None
    emulate_link: bool | None = None
    leaf_compression: str | None = None  # nats leafnode compression (None: nats' s2_auto)
    site: str = "edge-1"
    nats_port: int = 4222  # the single server, or the cloud hub's client port
    edge_nats_port: int = 4223  # edge-cloud: the leaf node's client port
    leaf_port: int = 7422  # edge-cloud: the hub's leafnode port
    link_port: int = 7423  # edge-cloud: the link emulator, in front of leaf_port
    link_control_port: int = 7424  # edge-cloud: the link emulator's HTTP control endpoint
    monitor_port: int = 8222  # nats monitoring of the single server / hub
    edge_monitor_port: int = 8223  # nats monitoring of the leaf node
    api_port: int = 8000  # the drafter's OpenAI-compatible API
    verifier_port: int = 8101  # verifier i listens on verifier_port + i - 1 ...
    verifier_ports: tuple[int, ...] = ()  # ... unless listed here explicitly
    sampler_port: int = 8201
    client_auth: bool = False  # require a random user/password from every NATS client
    secure: bool = False  # per-role NATS users with least permissions (replaces client_auth)
    tls: bool = False  # TLS on every NATS listener, from a throwaway CA (the tools extra)
    extra_sites: tuple[str, ...] = ()  # secure: also admit these edge sites (their own nodes)
    api_key: str | None = field(default=None, repr=False)  # the drafter's API key
    # pin the edge (drafter, sampler, leaf node) and the cloud (verifiers, hub or the single
    # server) to disjoint CPU sets, in every topology; None pins whenever 2+ CPUs are usable,
    # with split_cpus() as default sets
    pin_cpus: bool | None = None
    edge_cpus: frozenset[int] | None = None
    cloud_cpus: frozenset[int] | None = None
    device_profile: str | None = (
        None  # emulate hardware (picospec.runtime.devices): drafter + verifiers
    )
    verifier_backend: str = "transformers"  # or vllm: the verifiers run vLLM's engine
    run_dir: Path | None = None
    ready_timeout: float = 300.0
    log_level: str = "INFO"
    env: dict[str, str] = field(default_factory=dict)  # extra variables for every service

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}")
        if self.verifiers < 0:
            raise ValueError("verifiers must be >= 0")
        if self.verifier_backend not in ("transformers", "vllm"):
            raise ValueError("verifier_backend must be transformers or vllm")
        if self.draft_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("draft_dtype must be auto, float32, bfloat16 or float16")
        if self.quantize_draft not in ("none", "int8"):
            raise ValueError("quantize_draft must be none or int8")
        if self.rtt_ms is not None and self.rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise ValueError("bandwidth_mbit must be > 0")
        if self.verifier_ports and len(self.verifier_ports) < self.verifiers:
            raise ValueError("fewer verifier_ports than verifiers")
        for key in self.env:
            if not key or "=" in key:
                raise ValueError(f"bad environment variable name {key!r}")
        if self.secure and self.client_auth:
            raise ValueError("secure replaces client_auth: give one of them")
        if self.extra_sites and not self.secure:
            raise ValueError("extra_sites needs secure")
        sites = [self.site, *self.extra_sites]
        if len({subjects.site_token(x) for x in sites}) != len(sites):
            raise ValueError("edge sites must be distinct")
        if (self.edge_cpus is None) != (self.cloud_cpus is None):
            raise ValueError("edge_cpus and cloud_cpus go together")
        if self.edge_cpus is not None and self.cloud_cpus is not None:
            if self.edge_cpus & self.cloud_cpus:
                raise ValueError("edge_cpus and cloud_cpus must be disjoint")
            if self.pin_cpus is False:
                raise ValueError("edge_cpus/cloud_cpus need pinning")
        if self.device_profile:
            from picospec.runtime.devices import DeviceProfileError, load_profile

            try:
                load_profile(self.device_profile)
            except DeviceProfileError as e:
                raise ValueError(str(e)) from None

    def cpu_sets(self) -> dict[str, frozenset[int]] | None:
        """``{"edge": cpus, "cloud": cpus}`` when the two sides are pinned apart, else None."""
        if self.pin_cpus is False:
            return None
        if self.edge_cpus is not None and self.cloud_cpus is not None:
            return {"edge": self.edge_cpus, "cloud": self.cloud_cpus}
        try:
            edge, cloud = split_cpus()
        except ValueError:
            if self.pin_cpus:
                raise
            return None
        return {"edge": edge, "cloud": cloud}

    @property
    def link_enabled(self) -> bool:
        if self.topology != "edge-cloud":
            return False
        if self.emulate_link is not None:
            return self.emulate_link
        return self.rtt_ms is not None or self.bandwidth_mbit is not None

    def port_of_verifier(self, i: int) -> int:
        """The HTTP port of verifier ``i`` (1-based)."""
        if self.verifier_ports:
            return self.verifier_ports[i - 1]
        return self.verifier_port + i - 1

    def with_free_ports(self) -> StackConfig:
        """A copy where every port is one the OS reports free now (for tests and benchmarks)."""
        names = (
            "nats_port",
            "edge_nats_port",
            "leaf_port",
            "link_port",
            "link_control_port",
            "monitor_port",
            "edge_monitor_port",
            "api_port",
            "sampler_port",
        )
        picked = free_ports(len(names) + self.verifiers)
        ports = dict(zip(names, picked, strict=False))
        verifier_ports = tuple(picked[len(names) :])
        return dataclasses.replace(self, verifier_ports=verifier_ports, **ports)
