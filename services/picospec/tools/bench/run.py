"""Running the benchmark: one edge-cloud stack per network profile, every mode through the
OpenAI API, the figures each run reports (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picospec.tools.prompts import edit_prompts, mtbench_questions
from picospec.tools.promtext import Scrape
from picospec.tools.sse import EventStream, StreamError

PROFILES: dict[str, tuple[float, float | None]] = {  # name: (round-trip ms, Mbit/s)
    "loopback": (0.0, None),  # no link emulator: the edge's leaf node dials the hub directly
    "lan": (1.0, 1000.0),
    "wifi": (10.0, 100.0),
    "5g": (30.0, 50.0),
    "4g": (60.0, 20.0),
    "poor": (120.0, 5.0),
}


MODES = ["ar", "edge", "vanilla", "dssd", "picospec"]


QUICK_PROMPTS = 4


WORKLOADS = ("mt-bench", "edit")


def load_prompts(source: str | None, quick: bool, workload: str = "mt-bench") -> list[str]:
    """``--prompts`` (a file, one prompt per line), else the workload's prompts: MT-Bench's 80
    questions, or the edit workload's 16 passages to correct (:func:`edit_prompts`)."""
    if source:
        prompts = [p.strip() for p in Path(source).read_text().splitlines() if p.strip()]
    else:
        prompts = edit_prompts() if workload == "edit" else mtbench_questions()
    return prompts[:QUICK_PROMPTS] if quick else prompts


def p10_p90(values: list[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles (the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=10)
    return q[0], q[-1]


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

    def summary(self, draft_len: int | str, prompts: int) -> dict[str, Any]:
        tps = sorted(r.tokens / r.elapsed_s for r in self.runs if r.elapsed_s > 0)
        tokens = sum(r.tokens for r in self.runs)
        st = [r.stats for r in self.runs]
        drafted = sum(s.get("drafted_tokens", 0) for s in st)
        accepted = sum(s.get("accepted_tokens", 0) for s in st)
        rounds = sum(s.get("rounds", 0) for s in st)
        rejections = sum(s.get("rollbacks", 0) for s in st)  # each rejection starts an epoch
        up = sum(s.get("bytes_up", 0) for s in st)
        down = sum(s.get("bytes_down", 0) for s in st)
        forwards = sum(_verifier_forwards(s, r.tokens) for s, r in zip(st, self.runs, strict=True))
        p10, p90 = p10_p90(tps)
        decode = [d for s in st if (d := s.get("decode_tokens_per_s")) is not None]
        server = [t for s in st if (t := s.get("ttft_s")) is not None]
        prefill = [t for s in st if (t := s.get("cloud_prefill_s")) is not None]
        beyond = [  # the first token's time outside the verifier's prefill, request by request
            r.ttft_s - t for r in self.runs if (t := r.stats.get("cloud_prefill_s")) is not None
        ]
        chosen: dict[str, int] = {}  # adaptive: rounds drafted at each γ, over all prompts
        for s in st:
            for g, n in (s.get("draft_len_rounds") or {}).items():
                chosen[g] = chosen.get(g, 0) + n
        return {
            "prompts": prompts,  # distinct
            "requests": len(self.runs),  # prompts x --repeat
            "tokens": tokens,
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_p10": p10,
            "tokens_per_s_p90": p90,
            "decode_tokens_per_s": statistics.median(decode) if decode else None,
            "ttft_s": statistics.median(r.ttft_s for r in self.runs),
            # the drafter's own view: from the request reaching it to the first token it emits
            "server_ttft_s": statistics.median(server) if server else None,
            # the part of TTFT the verifier's prefill took (the open's), from its own clock
            "cloud_prefill_s": statistics.median(prefill) if prefill else None,
            "ttft_beyond_prefill_s": statistics.median(beyond) if beyond else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "token_acceptance": accepted / (accepted + rejections) if drafted else None,
            "mean_accepted_len": 1 + accepted / rounds if rounds else None,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "rounds": rounds,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_per_token": (up + down) / tokens if tokens else None,
            "verifier_forwards": forwards,
            "verifier_forwards_per_token": forwards / tokens if tokens else None,
            "rollbacks": rejections,
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


@dataclass
class _Deltas:
    """One mode's runs, and the counters of :func:`_snapshot` summed over exactly those runs
    (other modes' runs interleave with them)."""

    runs: list[Run] = field(default_factory=list)
    sums: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> series -> delta

    def add(self, run: Run, before: Snapshot, after: Snapshot) -> None:
        self.runs.append(run)
        for side, series in after.items():
            mine = self.sums.setdefault(side, dict.fromkeys(series, 0.0))
            for name, value in series.items():
                mine[name] += value - before[side][name]

    def result(self, emulated: bool) -> ModeResult:
        drafter = self.sums.get("drafter", {})

        def mean(h: str) -> float | None:
            n = drafter.get(f"{h}_count", 0.0)
            return drafter[f"{h}_sum"] / n if n > 0 else None

        return ModeResult(
            runs=self.runs,
            rtt_s=mean(HISTOGRAMS[0]),
            draft_step_s=mean(HISTOGRAMS[1]),
            emulation=_emulation_summary(self.sums) if emulated else None,
        )


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
    api: str,
    prompt: str,
    mode: str,
    args: argparse.Namespace,
    draft_len: int | str | None = None,
    draft: str | None = None,
) -> Run:
    body: dict[str, Any] = {
        "model": "picospec",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stream": True,
        "mode": mode,
        "draft_len": args.draft_len if draft_len is None else draft_len,
        **({"draft": draft} if draft else {}),
    }
    req = urllib.request.Request(
        f"{api}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft, stats, usage, text = None, {}, {}, []
    stream = EventStream()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for obj in stream.events(resp):
            choice = obj["choices"][0]
            content = choice.get("delta", {}).get("content")
            if content:
                text.append(content)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if choice.get("finish_reason"):
                stats, usage = obj.get("picospec", {}), obj.get("usage", {})
    try:
        stream.check()
    except StreamError as e:
        raise RuntimeError(f"{mode}: {e}") from e
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


def _scrape(metrics_url: str) -> Scrape:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
        return Scrape(r.read().decode())


def scraped(scrape: Scrape, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples (with ``labels``) in one scrape; 0 where none."""
    return scrape.sum(name, **labels) or 0.0


def _histogram_means(metrics_url: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram, over all its label values, from one scrape."""
    scrape = _scrape(metrics_url)
    return {n: (scraped(scrape, f"{n}_sum"), scraped(scrape, f"{n}_count")) for n in names}


Snapshot = dict[str, dict[str, float]]  # side -> series -> value, from one scrape per side


def _snapshot(urls: dict[str, str], emulated: bool) -> Snapshot:
    """The drafter's :data:`HISTOGRAMS` (sums and counts) and, under a device profile, both
    sides' pacer counters: one scrape of each side needed."""
    out: Snapshot = {}
    for side, url in urls.items():
        names = [*EMULATION_COUNTERS] if emulated else []
        if side == "drafter":
            names += [f"{h}_{part}" for h in HISTOGRAMS for part in ("sum", "count")]
        if names:
            scrape = _scrape(url)
            out[side] = {n: scraped(scrape, n) for n in names}
    return out


def _emulation_summary(deltas: Snapshot) -> dict[str, Any]:
    """Per side: paced forwards, how many overran the profile, by how much, and the mean real
    and emulated time of a forward, from the pacers' counters over one mode's runs."""
    out: dict[str, Any] = {}
    for side, d in deltas.items():
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


def stack_config(
    name: str,
    args: argparse.Namespace,
    drafter: str,
    quantize: str,
    draft_dtype: str | None = None,
) -> Any:
    """The edge-cloud stack of one network profile (free ports, pinned sides, emulation)."""
    from picospec.tools.stack.up import StackConfig

    rtt_ms, mbit = PROFILES[name]
    emulate = rtt_ms > 0 or mbit is not None  # loopback: the leaf dials the hub directly
    env = {
        "PICOSPEC_REQUEST_TIMEOUT_S": "120",
        "PICOSPEC_VERIFY_TIMEOUT_S": "30",
        "PICOSPEC_MAX_TOKENS_LIMIT": "4096",
        # the suffix draft matches the prompt and the answer so far only: the bench sends every
        # prompt once per mode and repeat, and the site's cache of recent answers would replay
        # the same prompt's earlier answer, which measures the cache, not the draft
        "PICOSPEC_SUFFIX_CACHE_ANSWERS": "0",
    }
    cfg = StackConfig(
        topology="edge-cloud",
        verifiers=1,
        drafter_model=drafter,
        verifier_model=args.verifier,
        quantize_draft=quantize,
        draft_dtype=draft_dtype or args.draft_dtype,
        threads=args.threads,
        rtt_ms=rtt_ms if emulate else None,
        bandwidth_mbit=mbit,
        emulate_link=emulate,
        env=env,
        ready_timeout=600.0,
        log_level="WARNING",
        leaf_compression=args.leaf_compression,
        pin_cpus=args.pin_cpus,
        edge_cpus=args.edge_cpus,
        cloud_cpus=args.cloud_cpus,
        device_profile=args.device_profile,
        verifier_backend=args.verifier_backend,
    ).with_free_ports()
    if args.threads is None and cfg.cpu_sets() is None:  # unpinned: one thread per service
        cfg = dataclasses.replace(cfg, threads=1)
    return cfg


@dataclass
class ProfileRun:
    """What :func:`run_profile` measured over one network profile: a row per mode of
    ``args.modes``, and picospec's rows at each ``--draft-len-sweep`` length and with each
    ``--drafts`` draft (empty where not asked for)."""

    rows: dict[str, dict[str, Any]]
    draft_len_sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_profile(
    name: str,
    args: argparse.Namespace,
    prompts: list[str],
    progress: Any,
    drafter: str | None = None,
    quantize: str | None = None,
    placement: dict[str, Any] | None = None,
    draft_dtype: str | None = None,
) -> ProfileRun:
    """Every mode of ``args.modes`` over one network profile, on one fresh stack. Fills
    ``placement`` (when given) with the CPUs each side had."""
    from picospec.tools.stack.up import Stack

    quantize = quantize if quantize is not None else args.quantize_draft
    cfg = stack_config(name, args, drafter or args.drafter, quantize, draft_dtype)
    greedy = args.temperature == 0
    with Stack(cfg) as stack, _pinned(stack.cpus["cloud"] if stack.cpus else None):
        if placement is not None:
            placement.update(_placement(stack))
        sides = {
            "drafter": stack.services["drafter"].url,
            "verifier": stack.services["verifier-1"].url,
        }
        task = progress(f"{name}: warm-up", 1)
        _stream(stack.api_url, prompts[0], "picospec", args)  # first-touch costs out of the way
        task(1)
        emulated = cfg.device_profile is not None

        # every mode (and every swept γ) runs each prompt in turn, prompt by prompt, so a
        # drift of the machine's speed during the run falls on all of them alike
        # (mode, γ, draft): the modes, then picospec at each swept γ and with each draft
        runs: list[tuple[str, int | str | None, str | None]] = [(m, None, None) for m in args.modes]
        runs += [("picospec", g, None) for g in _sweep_values(args)]
        runs += [("picospec", None, d) for d in _drafts(args)]
        acc = {key: _Deltas() for key in runs}
        total = args.repeat * len(prompts)
        tasks = {key: progress(f"{name}: {_label(key)}", total) for key in runs}
        snap = _snapshot(sides, emulated)  # nothing runs between two requests: one per boundary
        order = [p for _ in range(args.repeat) for p in prompts]  # --repeat: the list again
        for i, prompt in enumerate(order):
            for key in runs:
                run = _stream(stack.api_url, prompt, key[0], args, key[1], key[2])
                after = _snapshot(sides, emulated)
                acc[key].add(run, snap, after)
                snap = after
                tasks[key](i + 1)
        results = {mode: acc[(mode, None, None)].result(emulated) for mode in args.modes}
        sweep = {str(g): acc[("picospec", g, None)].result(emulated) for g in _sweep_values(args)}
        drafts = {d: acc[("picospec", None, d)].result(emulated) for d in _drafts(args)}
    if greedy and "ar" in results:
        ref = [r.text for r in results["ar"].runs]
        picospecs = [*sweep.values(), *drafts.values()]
        for mode, res in [*results.items(), *(("picospec", r) for r in picospecs)]:
            if mode != "edge":  # the draft alone is not the target
                res.identical_to_ar = [r.text for r in res.runs] == ref
    out: dict[str, Any] = {
        mode: r.summary(args.draft_len, len(prompts)) for mode, r in results.items()
    }
    for row in out.values():
        for base in ("ar", "vanilla"):
            if base in out and out[base]["tokens_per_s"]:
                row[f"speedup_vs_{base}"] = row["tokens_per_s"] / out[base]["tokens_per_s"]
        if "ar" in out:
            row["ttft_vs_ar"] = row["ttft_s"] / out["ar"]["ttft_s"]
            ar_prefill = out["ar"]["cloud_prefill_s"]
            if row["cloud_prefill_s"] is not None and ar_prefill:
                row["cloud_prefill_vs_ar"] = row["cloud_prefill_s"] / ar_prefill
    p = out.get("picospec")
    if p and p["token_acceptance"] is not None and p["verify_round_trip_s"] and p["draft_step_s"]:
        gamma = p["draft_len_mean"] or (4 if args.draft_len == "auto" else args.draft_len)
        b = bound(p["draft_step_s"], p["token_acceptance"], gamma, p["verify_round_trip_s"])
        p["bound_tokens_per_s"] = b
        p["bound_ratio"] = p["decode_tokens_per_s"] / b if p["decode_tokens_per_s"] else None
    swept = {g: r.summary(g, len(prompts)) for g, r in sweep.items()}
    rows = {d: r.summary(args.draft_len, len(prompts)) for d, r in drafts.items()}
    ar = out.get("ar", {}).get("tokens_per_s")
    for row in rows.values():
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar if ar else None
    return ProfileRun(out, draft_len_sweep=swept, drafts=rows)


def _drafts(args: argparse.Namespace) -> list[str]:
    """``--drafts`` (e.g. ``model,suffix,model+suffix``): picospec once per draft, per request."""
    return [d for d in (args.drafts or "").split(",") if d]


def _label(key: tuple[str, int | str | None, str | None]) -> str:
    mode, gamma, draft = key
    return f"{mode} γ={gamma}" if gamma is not None else f"{mode} draft={draft}" if draft else mode


def _sweep_values(args: argparse.Namespace) -> list[int | str]:
    """``--draft-len-sweep`` (e.g. ``2,4,6,8,auto``) as request values."""
    if not args.draft_len_sweep:
        return []
    return [v if v == "auto" else int(v) for v in args.draft_len_sweep.split(",") if v]


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
        "link_emulator": "cloud" if stack.config.link_enabled else None,
        "benchmark_client": "cloud",
    }
