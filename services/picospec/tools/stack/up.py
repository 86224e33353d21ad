"""``picospec up``: a whole PicoSpec stack on this machine, and the :class:`Stack` behind it.

Topologies:

- ``single``: one nats-server; N verifiers, the sampler and the drafter all connect to it.
- ``edge-cloud``: a cloud hub nats-server (verifiers connect here) and an edge leaf node
  (drafter and sampler connect here). The leaf dials the hub's leafnode port, through the WAN
  link emulator (``picospec.tools.stack.netem``, its own process) when ``rtt_ms`` or
  ``bandwidth_mbit`` is set. The leaf connection authenticates with a random user/password.

``secure`` gives every service its own NATS user with the least permissions of its role and
site (``subjects.permissions``), random passwords, and, in ``edge-cloud``, a per-site leaf user
on the hub whose permissions bound what crosses the link; ``tls`` adds a throwaway CA and TLS on
every NATS listener; ``api_key`` guards the drafter's API.

Every child is its own process with its own entrypoint, configured by ``PICOSPEC_*`` variables,
logging to ``<run_dir>/<name>.log``. :class:`Stack` waits for each service's ``/ready`` and stops
everything in order: drafter and sampler, verifiers (which drain), the link, the NATS servers.

Use from tests and benchmarks::

    cfg = StackConfig(topology="edge-cloud", verifiers=2, rtt_ms=60).with_free_ports()
    with Stack(cfg) as stack:
        api = stack.api_url                  # http://127.0.0.1:<port>/v1
        stack.kill("verifier-1")             # SIGKILL one replica
        stack.link.cut(); stack.link.restore()
        stack.restart_nats("nats-hub")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picospec import (
    DRAFT_DTYPE_HELP,
    DRAFT_DTYPES,
    DRAFTER_HELP,
    default_draft_dtype,
    default_drafter,
)
from picospec.tools.sse import EventStream, StreamError
from picospec.tools.stack.config import TOPOLOGIES, StackConfig, StackError
from picospec.tools.stack.natsserver import (
    NatsServerError,
)
from picospec.tools.stack.procs import (
    http_status,
    log_tail,
    parse_cpus,
)
from picospec.tools.stack.prometheus import (
    Prometheus,
    PrometheusError,
    default_rule_files,
    stack_targets,
)
from picospec.tools.stack.supervisor import LinkControl, Stack

__all__ = [
    "LinkControl",
    "Stack",
    "StackConfig",
    "StackError",
    "add_arguments",
    "add_placement_arguments",
    "build_parser",
    "cmd_up",
    "compare_with_ar",
    "config_from_args",
    "http_status",
    "main",
    "run_demo",
    "stream_chat",
]


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _model_id(api_url: str, api_key: str | None = None) -> str:
    req = urllib.request.Request(f"{api_url}/models", headers=_auth_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            data = json.loads(resp.read())
        return str(data["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "picospec"


def stream_chat(
    api_url: str,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    timeout: float = 300.0,
    api_key: str | None = None,
    **extra: Any,
) -> Iterator[dict[str, Any]]:
    """POST a streaming chat completion and yield each server-sent event's JSON object
    (``extra``: more request fields, e.g. ``mode`` or ``seed``)."""
    body = {
        "model": _model_id(api_url, api_key),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        **extra,
    }
    req = urllib.request.Request(
        f"{api_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **_auth_headers(api_key),
        },
        method="POST",
    )
    stream = EventStream()
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback
        yield from stream.events(resp)
    stream.check()


DEMO_SEED = 0  # the demo's requests are seeded: the same answer every run


def _final_stats(chunks: Iterator[dict[str, Any]], out: Any = None) -> dict[str, Any]:
    """Consume a stream (printing its text to ``out`` when given); its ``picospec`` stats."""
    stats: dict[str, Any] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text and out is not None:
                print(text, end="", file=out, flush=True)
        if isinstance(chunk.get("picospec"), dict):
            stats = chunk["picospec"]
    return stats


def run_demo(
    api_url: str,
    prompt: str,
    max_tokens: int = 64,
    out: Any = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Stream one chat answer to ``out`` as it arrives; print and return the final stats."""
    out = out or sys.stdout
    print(f"demo> {prompt}", file=out, flush=True)
    stats = _final_stats(
        stream_chat(api_url, prompt, max_tokens=max_tokens, api_key=api_key, seed=DEMO_SEED),
        out,
    )
    print(file=out)
    print(json.dumps({"picospec": stats}, indent=2), file=out, flush=True)
    return stats


def compare_with_ar(
    api_url: str,
    prompt: str,
    stats: dict[str, Any],
    max_tokens: int = 64,
    out: Any = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Send the demo's request again in ``ar`` mode (the cloud alone: what PicoSpec saves) and
    print the two speeds side by side; return ``{"demo_vs_ar": ...}``."""
    out = out or sys.stdout
    ar = _final_stats(
        stream_chat(
            api_url, prompt, max_tokens=max_tokens, api_key=api_key, seed=DEMO_SEED, mode="ar"
        )
    )
    mine, theirs = stats.get("tokens_per_s"), ar.get("tokens_per_s")
    ratio = mine / theirs if mine and theirs else None
    mode = stats.get("mode", "picospec")

    def rate(s: dict[str, Any]) -> str:
        tps, ttft = s.get("tokens_per_s"), s.get("ttft_s")
        if not tps or ttft is None:
            return "-"
        return f"{tps:.1f} tokens/s (TTFT {ttft:.2f} s)"

    print(
        f"demo: {mode} {rate(stats)}; ar, the cloud alone, {rate(ar)}"
        + (f": {ratio:.2f}x" if ratio else ""),
        file=out,
        flush=True,
    )
    return {"demo_vs_ar": {"mode": mode, "tokens_per_s": mine, "ar_tokens_per_s": theirs,
                           "ratio": ratio}}  # fmt: skip


def cold_and_warm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first request's time to first token and speed against the mean of the later ones
    (``--demo-repeat``): what warming up before ready is for."""
    warm = runs[1:]

    def mean(key: str, rs: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rs if isinstance(r.get(key), int | float)]
        return sum(vals) / len(vals) if vals else None

    cold_ttft, warm_ttft = runs[0].get("ttft_s"), mean("ttft_s", warm)
    return {
        "demo_cold_vs_warm": {
            "cold_ttft_s": cold_ttft,
            "warm_ttft_s": warm_ttft,
            "ttft_cold_over_warm": (cold_ttft / warm_ttft) if cold_ttft and warm_ttft else None,
            "cold_tokens_per_s": runs[0].get("tokens_per_s"),
            "warm_tokens_per_s": mean("tokens_per_s", warm),
            "warm_requests": len(warm),
        }
    }


def _env_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", choices=TOPOLOGIES, default="single")
    p.add_argument("--verifiers", type=int, default=1, help="verifier replicas")
    p.add_argument(
        "--drafter",
        default=default_drafter(),
        help=DRAFTER_HELP,
    )
    p.add_argument("--verifier", default="smollm2", help="target model (cloud)")
    p.add_argument("--quantize-draft", choices=["none", "int8"], default="none")
    p.add_argument(
        "--draft-dtype", choices=DRAFT_DTYPES, default=default_draft_dtype(), help=DRAFT_DTYPE_HELP
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads per service")
    p.add_argument("--rtt-ms", type=float, default=None, help="edge-cloud: added round trip")
    p.add_argument(
        "--bandwidth-mbit", type=float, default=None, help="edge-cloud: link capacity per way"
    )
    p.add_argument("--port", type=int, default=8000, help="the drafter's API port")
    p.add_argument("--nats-port", type=int, default=4222, help="NATS client port (hub)")
    p.add_argument("--edge-nats-port", type=int, default=None, help="leaf client port")
    p.add_argument("--leaf-port", type=int, default=7422, help="the hub's leafnode port")
    p.add_argument("--link-port", type=int, default=7423, help="the link emulator's port")
    p.add_argument(
        "--link-control-port", type=int, default=7424, help="the link emulator's control endpoint"
    )
    p.add_argument("--monitor-port", type=int, default=8222, help="NATS monitoring (the leaf: +1)")
    p.add_argument("--verifier-port", type=int, default=8101, help="verifier i: this + i - 1")
    p.add_argument("--sampler-port", type=int, default=8201, help="the sampler's HTTP port")
    p.add_argument("--site", default="edge-1", help="edge site label")
    add_placement_arguments(p)
    p.add_argument(
        "--secure",
        action="store_true",
        help="per-role NATS users with least permissions and random passwords (edge-cloud: a "
        "per-site leaf user bounds the link), and an API key for the drafter: "
        "$PICOSPEC_API_KEY, else a random one written to <run-dir>/api-key",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every NATS listener, from a throwaway CA in <run-dir>/pki",
    )
    p.add_argument("--run-dir", type=Path, default=None, help="configs and logs (default: temp)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--demo", action="store_true", help="send one streaming chat request")
    p.add_argument("--demo-prompt", default="What is the capital of France?")
    p.add_argument(
        "--demo-repeat",
        type=int,
        default=1,
        metavar="N",
        help="send the demo request N times and compare the first (cold) request's time to "
        "first token with the later (warm) ones",
    )
    p.add_argument(
        "--observability",
        action="store_true",
        help="also run Prometheus scraping the stack, with PicoSpec's recording and alert rules",
    )
    p.add_argument(
        "--prometheus-port", type=int, default=9090, help="Prometheus's port (--observability)"
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every service (repeatable), e.g. PICOSPEC_DRAFT_LEN=8",
    )


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """Where the edge and the cloud compute, and at what emulated speed (``up`` and ``bench``)."""
    p.add_argument(
        "--pin-cpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin the edge (drafter, sampler, leaf node) and the cloud (verifiers, the hub or "
        "the single server) to disjoint CPUs, in every topology (default: whenever 2+ CPUs "
        "are usable; on 2 cores edge=0, "
        "cloud=1)",
    )
    p.add_argument("--edge-cpus", type=parse_cpus, default=None, help="e.g. 0 or 0-1")
    p.add_argument("--cloud-cpus", type=parse_cpus, default=None, help="e.g. 1 or 2-3")
    p.add_argument(
        "--verifier-backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="the verifiers' engine: PicoSpec's embedded runtime, or vLLM in the verifier "
        "process (run `make vllm-setup` first; docs/architecture.md)",
    )
    p.add_argument(
        "--device-profile",
        default=None,
        metavar="NAME|FILE",
        help="emulate hardware: pad every draft step and verifier forward to the profile's "
        "time (built-in: paper-llama-1b-70b, paper-qwen-0.6b-32b; or a .yaml/.json file)",
    )


def config_from_args(args: argparse.Namespace) -> StackConfig:
    return StackConfig(
        topology=args.topology,
        verifiers=args.verifiers,
        drafter_model=args.drafter,
        verifier_model=args.verifier,
        quantize_draft=args.quantize_draft,
        draft_dtype=args.draft_dtype,
        threads=args.threads,
        rtt_ms=args.rtt_ms,
        bandwidth_mbit=args.bandwidth_mbit,
        site=args.site,
        nats_port=args.nats_port,
        edge_nats_port=args.edge_nats_port or args.nats_port + 1,
        leaf_port=args.leaf_port,
        link_port=args.link_port,
        link_control_port=args.link_control_port,
        monitor_port=args.monitor_port,
        edge_monitor_port=args.monitor_port + 1,
        verifier_port=args.verifier_port,
        sampler_port=args.sampler_port,
        api_port=args.port,
        run_dir=args.run_dir,
        ready_timeout=args.ready_timeout,
        log_level="INFO",
        env=dict(args.env),
        secure=args.secure,
        tls=args.tls,
        pin_cpus=args.pin_cpus,
        edge_cpus=args.edge_cpus,
        cloud_cpus=args.cloud_cpus,
        device_profile=args.device_profile,
        verifier_backend=args.verifier_backend,
        api_key=(os.environ.get("PICOSPEC_API_KEY") or secrets.token_urlsafe(24))
        if args.secure
        else None,
    )


class _Terminate(BaseException):
    """SIGTERM (or SIGINT) arrived: stop the stack."""


_terminating: list[int] = []


def _raise_terminate(signum: int, frame: object) -> None:
    """Raise once: a second signal (Ctrl-C twice, or a supervisor that forwards it) arriving
    while the stack shuts down must not cut the shutdown short."""
    if _terminating:
        return
    _terminating.append(signum)
    raise _Terminate(signum)


def cmd_up(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"picospec up: error: {e}", file=sys.stderr)
        return 2
    try:
        stack = Stack(cfg)
    except NatsServerError as e:  # e.g. the nats-server binary is missing
        print(f"picospec up: error: {e}", file=sys.stderr)
        return 2
    _terminating.clear()
    old = {s: signal.signal(s, _raise_terminate) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    prometheus: Prometheus | None = None
    try:
        print(f"picospec up: {cfg.topology}, logs in {stack.run_dir}", flush=True)
        if stack.cpus is not None:
            print(
                f"CPUs: edge {sorted(stack.cpus['edge'])}, cloud {sorted(stack.cpus['cloud'])}",
                flush=True,
            )
        if cfg.device_profile:
            print(f"emulated devices: profile {cfg.device_profile}", flush=True)
        if cfg.secure:
            print(
                "secure: one NATS user per service with least permissions"
                + (", TLS from the CA in " + str(stack.run_dir / "pki") if cfg.tls else ""),
                flush=True,
            )
        if cfg.api_key is not None:
            key_file = stack.run_dir / "api-key"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cfg.api_key + "\n")
            print(f"API key in {key_file} (Authorization: Bearer <key>)", flush=True)
        stack.start()
        for line in stack.summary():
            print(line, flush=True)
        print(f"API: {stack.api_url}" if cfg.drafter else "no drafter", flush=True)
        if args.observability:
            prometheus = Prometheus(
                stack_targets(stack),
                rule_files=default_rule_files(),
                port=args.prometheus_port,
                run_dir=stack.run_dir / "prometheus",
            ).start()
            print(f"Prometheus: {prometheus.url}", flush=True)
        if args.demo and cfg.drafter:
            try:
                runs = [
                    run_demo(stack.api_url, args.demo_prompt, api_key=cfg.api_key)
                    for _ in range(max(1, args.demo_repeat))
                ]
                if len(runs) > 1:
                    print(json.dumps(cold_and_warm(runs)), flush=True)
                if runs[-1].get("mode") != "ar":
                    compare_with_ar(stack.api_url, args.demo_prompt, runs[-1],
                                    api_key=cfg.api_key)  # fmt: skip
            except (OSError, ValueError, StreamError) as e:
                print(f"picospec up: demo request failed: {e}", file=sys.stderr, flush=True)
        print("serving; Ctrl-C to stop", flush=True)
        reported: set[str] = set()
        while True:
            for name, rc in stack.exited().items():
                if name not in reported:
                    reported.add(name)
                    print(
                        f"picospec up: warning: {name} exited with code {rc}:\n"
                        f"{log_tail(stack.log_path(name), lines=20)}",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(0.5)
    except _Terminate:
        pass
    except (StackError, PrometheusError) as e:
        print(f"picospec up: error: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for s in old:  # a second Ctrl-C must not cut the orderly shutdown short
            signal.signal(s, signal.SIG_IGN)
        print("stopping...", flush=True)
        with contextlib.suppress(_Terminate):
            if prometheus is not None:
                prometheus.stop()
            stack.stop()
        for s, h in old.items():
            signal.signal(s, h)
        print("stopped", flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="picospec up", description="run a whole PicoSpec stack locally (Ctrl-C stops it)"
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return cmd_up(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
