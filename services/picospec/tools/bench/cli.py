"""``picospec bench``: its flags and the run it makes of them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picospec import (
    DRAFT_DTYPE_HELP,
    DRAFT_DTYPES,
    DRAFTER_HELP,
    SUFFIX,
    default_draft_dtype,
    default_drafter,
)
from picospec.tools.bench.concurrency import CONCURRENCY_MODES, parse_levels, run_concurrency
from picospec.tools.bench.fleet import parse_acceptances
from picospec.tools.bench.report import (
    BenchReport,
    _progress_factory,
    concurrency_plot,
    concurrency_table,
    emit,
    plots,
    sweep_plot,
    table,
)
from picospec.tools.bench.run import (
    MODES,
    PROFILES,
    QUICK_PROMPTS,
    WORKLOADS,
    load_prompts,
    run_profile,
)
from picospec.tools.bench.speedup_map import (
    MAP_MODES,
    PAPER_TABLE1,
    map_plot,
    map_table,
    model_curves,
    paper_implied_acceptance,
    speedup_map,
)

DEFAULT_PROFILES = "lan,wifi,5g,4g,poor"


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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _sweep_arg(value: str) -> str:
    for v in value.split(","):
        _draft_len_arg(v.strip())
    return ",".join(v.strip() for v in value.split(","))


def _modes_arg(value: str) -> list[str]:
    """``--modes``: the comma-separated modes, as a list (the run says which it does not know)."""
    return [m.strip() for m in value.split(",")]


_Mode = Callable[[argparse.Namespace, Any], BenchReport | None]


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    report = _mode(args)(args, Console(stderr=True))
    return 2 if report is None else emit(report, args)


def _mode(args: argparse.Namespace) -> _Mode:
    """The mode the flags ask for: the first of these that is given, else the comparison of
    modes over each link profile. Each returns its report, or None where the request is bad
    (said on the console it is given)."""
    if args.overhead:
        return _overhead
    if args.prefill is not None:
        return _prefill
    if args.fleet:
        return _fleet
    if args.colocation is not None:
        return _colocation
    if args.map:
        return _speedup_map
    if args.concurrency:
        return _concurrency
    return _profiles


def _overhead(args: argparse.Namespace, console: Any) -> BenchReport:
    """``--overhead``: the software cost of one verification round, without the model's compute
    (picospec.tools.bench.overhead)."""
    from picospec.tools.bench.overhead import measure

    return BenchReport({"overhead": measure(args)})


def _prefill(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """``--prefill``: a long prompt's prefill on the cloud's CPUs (picospec.tools.bench.prefill)."""
    from picospec.tools.bench.prefill import measure

    cpus = _cpu_sets(args, console)
    if cpus is None:
        return None
    return BenchReport({"prefill": measure(args, cpus["cloud"])})


def _colocation(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """``--colocation``: the cloud's prefill with the edge idle and busy on the same machine
    (picospec.tools.bench.colocation)."""
    from picospec.tools.bench.colocation import measure

    prompts = load_prompts(args.prompts, args.quick, args.workload)
    cpus = _cpu_sets(args, console)
    if cpus is None:
        return None
    return BenchReport(
        {"colocation": measure(args, prompts[:QUICK_PROMPTS], cpus, args.colocation)}
    )


def _cpu_sets(args: argparse.Namespace, console: Any) -> dict[str, frozenset[int]] | None:
    """The benchmark's own placement: --edge-cpus/--cloud-cpus, else the CPUs halved (None,
    with the reason printed, where that cannot be)."""
    from picospec.tools.stack.up import StackConfig

    try:
        cpus = StackConfig(
            topology="edge-cloud",
            pin_cpus=True,
            edge_cpus=args.edge_cpus,
            cloud_cpus=args.cloud_cpus,
        ).cpu_sets()
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return None
    assert cpus is not None  # pinning was asked for: cpu_sets raises rather than give None
    return cpus


def _profiles(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """The default: every mode over each link profile, on a fresh stack per profile."""
    report = _measured(args, console, _run_modes)
    return None if report is None else BenchReport(report, table, _profile_plots)


def _concurrency(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """``--concurrency``: throughput as users are added (picospec.tools.bench.concurrency)."""
    report = _measured(args, console, _run_concurrency)
    return None if report is None else BenchReport(report, concurrency_table, _concurrency_plots)


def _speedup_map(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """``--map``: every draft over every profile against ar, next to the paper's Table 1
    (picospec.tools.bench.speedup_map)."""
    report = _measured(args, console, _run_map)
    if report is None:
        return None
    report["model_curves"] = model_curves(report, args)
    report["paper_table1"] = PAPER_TABLE1
    report["paper_implied_acceptance"] = paper_implied_acceptance(
        list(report["config"]["profiles"])
    )
    return BenchReport(report, map_table, _map_plots)


_Fill = Callable[[argparse.Namespace, list[str], dict[str, Any], Any], None]


def _measured(args: argparse.Namespace, console: Any, fill: _Fill) -> dict[str, Any] | None:
    """The report of a run over the link profiles: ``fill`` fills it in (its progress on
    ``console``), then the run's config and notes are added. None (said on ``console``) where
    the flags ask for an unknown mode or profile, or for ones that do not go together."""
    prompts = load_prompts(args.prompts, args.quick, args.workload)
    checked = _modes_profiles_device(args, console)
    if checked is None:
        return None
    args, profiles, device = checked
    progress = _progress_factory(console)
    report: dict[str, Any] = {
        "profiles": {},
        "notes": [],
        "placement": {},
        "profiles_requested": profiles,
    }
    try:
        fill(args, prompts, report, progress)
    finally:
        progress.stop()
    del report["profiles_requested"]
    report["config"] = _config(args, len(prompts), profiles, device)
    report["notes"].extend(_notes(args, device))
    return report


def _modes_profiles_device(
    args: argparse.Namespace, console: Any
) -> tuple[argparse.Namespace, list[str], Any] | None:
    """The run's flags with its modes (``--modes``, else the default of its kind: a copy,
    ``args`` stays as parsed), the link profiles and the device profile the run asks for;
    None (said on ``console``) where one is unknown or they do not go together."""
    from picospec.runtime.devices import DeviceProfileError, load_profile

    if args.modes is None:
        default = CONCURRENCY_MODES if args.concurrency else MAP_MODES if args.map else MODES
        args = argparse.Namespace(**{**vars(args), "modes": list(default)})
    bad = [m for m in args.modes if m not in MODES]
    if args.drafter == SUFFIX and set(args.modes) - {"ar", "picospec"}:
        console.print("[red]--drafter suffix (no draft model) runs --modes ar,picospec only[/red]")
        return None
    if args.profiles is not None:
        names = args.profiles
    else:
        names = "loopback" if args.concurrency else DEFAULT_PROFILES
    profiles = [p.strip() for p in names.split(",")]
    bad += [p for p in profiles if p not in PROFILES]
    if bad:
        console.print(f"[red]unknown mode/profile: {', '.join(bad)}[/red]")
        return None
    if not args.device_profile:
        return args, profiles, None
    try:
        return args, profiles, load_profile(args.device_profile)
    except DeviceProfileError as e:
        console.print(f"[red]{e}[/red]")
        return None


def _run_modes(
    args: argparse.Namespace, prompts: list[str], report: dict[str, Any], progress: Any
) -> None:
    """Every mode over each link profile, into ``report``: a row per mode, and picospec's rows
    with each draft and at each swept draft length."""
    for name in report["profiles_requested"]:
        run = run_profile(name, args, prompts, progress, placement=report["placement"])
        report["profiles"][name] = run.rows
        if run.drafts:
            report.setdefault("drafts", {})[name] = run.drafts
        if run.draft_len_sweep:
            report.setdefault("draft_len_sweep", {})[name] = {
                g: r["tokens_per_s"] for g, r in run.draft_len_sweep.items()
            }
            report.setdefault("draft_len_sweep_detail", {})[name] = run.draft_len_sweep


def _run_concurrency(
    args: argparse.Namespace, prompts: list[str], report: dict[str, Any], progress: Any
) -> None:
    """Every mode at each concurrency level, over each link profile, into ``report``."""
    report["concurrency"] = {
        name: run_concurrency(name, args, prompts, progress, report["placement"])
        for name in report["profiles_requested"]
    }


def _run_map(
    args: argparse.Namespace, prompts: list[str], report: dict[str, Any], progress: Any
) -> None:
    """The speedup map, into ``report``."""
    report["map"] = speedup_map(report, args, prompts, progress)


def _config(
    args: argparse.Namespace, prompts: int, profiles: list[str], device: Any
) -> dict[str, Any]:
    """What the run measured, as its report states it."""
    return {
        "drafter": args.drafter,
        "verifier": args.verifier,
        "quantize_draft": args.quantize_draft,
        "draft_dtype": args.draft_dtype,
        "verifier_backend": args.verifier_backend,
        "draft_len": args.draft_len,
        "drafts": args.drafts,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "prompts": prompts,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "vllm_baseline": args.vllm_baseline or None,
        "prompt_source": args.prompts or args.workload,
        "threads_per_service": args.threads or "one per CPU of its side",
        "leaf_compression": args.leaf_compression or "s2_auto",
        "device_profile": args.device_profile,
        "device": device.summary() if device else None,
        "emulated": device is not None,
        "profiles": {
            p: {"rtt_ms": PROFILES[p][0], "bandwidth_mbit": PROFILES[p][1]} for p in profiles
        },
    }


def _notes(args: argparse.Namespace, device: Any) -> list[str]:
    """How to read the run's figures: what is emulated, and what the setup bounds."""
    notes = []
    if device is not None:
        notes.append(
            f"EMULATED: every draft step and verifier forward is padded to the device profile "
            f"{device.name} (real tokens, real acceptance, real emulated network); see "
            "'emulation' in each mode for forwards whose real compute overran the profile"
        )
    if args.concurrency:
        notes.append(
            "every request has ignore_eos and min_tokens = max_tokens, so all are max_tokens "
            "long; cloud model-s/token is the verifier model thread's forward time over the "
            "tokens generated (prefills included)"
        )
    elif device is None and not args.map and "ar" in args.modes:
        notes.append(
            "TTFT is the cloud's prefill (cloud_prefill_s) plus the rest: the link's round "
            "trip and both sides' software (ttft_beyond_prefill_s). Both sides share this "
            "machine: while a speculative mode's draft model prefills on the edge's CPUs, the "
            "verifier's prefill on the cloud's runs slower than in ar (cloud_prefill_vs_ar "
            "shows by how much; docs/benchmark.md measures the effect), a cost separate edge "
            "and cloud machines do not pay"
        )
    self_draft = args.drafter == args.verifier and args.quantize_draft == "none"
    if not args.map and self_draft and args.draft_dtype in ("auto", "float32"):
        notes.append(
            "draft and verifier are the same checkpoint: every greedy draft is accepted, so the "
            "speedup over ar is bounded by the draft-bound pipeline and is not representative "
            "of a real small->large pair"
        )
    return notes


def _profile_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Tokens/s against RTT and bytes per token (and the draft-length sweep), written to ``out``."""
    paths = [str(p) for p in plots(report, out)]
    if "draft_len_sweep" in report:
        paths.append(str(sweep_plot(report, out)))
    return paths


def _concurrency_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Throughput against concurrent users, written to ``out``."""
    return [str(concurrency_plot(report, out))]


def _map_plots(report: dict[str, Any], out: Path) -> list[str]:
    """The speedup map (and each draft's draft-length sweep), written to ``out``."""
    paths = [str(map_plot(report, out))]
    for label, d in report["map"].items():
        if "draft_len_sweep" in d:
            paths.append(str(sweep_plot(report, out, label)))
    return paths


def _fleet(args: argparse.Namespace, console: Any) -> BenchReport | None:
    """``--fleet``: one verifier replica against emulated edges (picospec.tools.bench.fleet)."""
    from picospec.tools.bench.fleet import EMULATED_EDGES, fleet_plot, fleet_table, run_fleet

    prompts = load_prompts(args.prompts, args.quick, args.workload)
    if args.profiles is not None and (args.profiles not in PROFILES or "," in args.profiles):
        console.print(f"[red]--fleet takes one network profile of {', '.join(PROFILES)}[/red]")
        return None
    progress = _progress_factory(console)
    try:
        result = run_fleet(args, prompts, progress)
    finally:
        progress.stop()
    report: dict[str, Any] = {
        "fleet": {args.verifier_backend: result},
        "notes": [
            f"{EMULATED_EDGES}: each edge user replays the target's own greedy answer (recorded "
            "from the ar run of its prompt) with each token wrong with probability 1 - α, and "
            "takes pace x t_v1 of device time per draft token without computing; the verifier, "
            "NATS and the drafter pipeline are real. verifier_s_per_token is the CPU time of "
            "the verifier's processes per generated token (its busy time on this CPU); "
            "forward_s_per_token its model thread's forwards alone (embedded runtime)",
        ],
        "config": {
            "verifier": args.verifier,
            "verifier_backend": args.verifier_backend,
            "levels": args.fleet,
            "acceptance": args.acceptance,
            "max_tokens": args.max_tokens,
            "repeat": args.repeat,
            "seed": args.seed,
            "prompt_source": args.prompts or args.workload,
        },
    }
    return BenchReport(report, fleet_table, lambda data, out: [str(fleet_plot(data, out))])


def register(sub: Any) -> None:
    from picospec.tools.stack.up import add_placement_arguments

    b = sub.add_parser("bench", help="edge-cloud benchmark of every mode over emulated WANs")
    b.add_argument("--quick", action="store_true", help=f"first {QUICK_PROMPTS} prompts only")
    b.add_argument(
        "--profiles",
        default=None,
        help=f"comma-separated: {', '.join(PROFILES)} (default: {DEFAULT_PROFILES}, "
        "or loopback with --concurrency)",
    )
    b.add_argument(
        "--modes",
        type=_modes_arg,
        default=None,
        help=f"default: {','.join(MODES)} ({','.join(MAP_MODES)} with --map)",
    )
    b.add_argument(
        "--prompts",
        default=None,
        help="text file, one prompt per line (default: the --workload's prompts)",
    )
    b.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="mt-bench",
        help="the prompts: MT-Bench's 80 questions, or edit (16 passages to correct, whose "
        "answers repeat the prompt: where a suffix draft pays off)",
    )
    b.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        metavar="N",
        help="run the prompt list N times (every mode, still taking turns request by "
        "request): N times the samples per figure, for figures within a run's noise",
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
    b.add_argument(
        "--drafter",
        default=default_drafter(),
        help=DRAFTER_HELP,
    )
    b.add_argument(
        "--drafts",
        default=None,
        metavar="LIST",
        help="after the modes, run picospec once per draft of this list in the same stack, "
        "each request naming its draft (model, suffix, model+suffix; reported as drafts), "
        "e.g. model,suffix,model+suffix to compare them side by side",
    )
    b.add_argument("--verifier", default="smollm2")
    b.add_argument("--quantize-draft", choices=["none", "int8"], default="none")
    b.add_argument(
        "--draft-dtype", choices=DRAFT_DTYPES, default=default_draft_dtype(), help=DRAFT_DTYPE_HELP
    )
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
        "quantisation), bf16 (its weights in bfloat16: a near-target draft that disagrees "
        "about one token in ten), or draft model names/paths",
    )
    b.add_argument(
        "--overhead",
        action="store_true",
        help="measure the software cost of one verification round on loopback, without the "
        "model's compute (picospec.tools.bench.overhead)",
    )
    b.add_argument(
        "--colocation",
        type=_positive,
        default=None,
        metavar="N",
        help="measure how much the edge's draft prefill slows the verifier's prefill when "
        "both sides share this machine: N prefills with the edge idle and N with it busy, "
        "alternating (picospec.tools.bench.colocation)",
    )
    b.add_argument(
        "--concurrency",
        type=parse_levels,
        default=None,
        metavar="LIST",
        help="throughput as users are added: at each of these levels (e.g. 1,4,16) that many "
        "clients stream requests at once, per mode (default modes: "
        f"{','.join(CONCURRENCY_MODES)}); picospec.tools.bench.concurrency",
    )
    b.add_argument(
        "--fleet",
        type=parse_levels,
        default=None,
        metavar="LIST",
        help="the cloud's capacity: one verifier replica against this many EMULATED edge users "
        "at each level (e.g. 1,4,16,64), ar against picospec at each --acceptance; "
        "picospec.tools.bench.fleet",
    )
    b.add_argument(
        "--acceptance",
        type=parse_acceptances,
        default=["0.6", "0.9"],
        metavar="LIST",
        help="with --fleet: the emulated edges' per-token acceptance(s) (default 0.6,0.9)",
    )
    b.add_argument(
        "--edge-pace",
        type=float,
        default=None,
        metavar="RATIO",
        help="with --fleet: an emulated edge's draft step over the verifier's one-user ar "
        "step (default: the paper's, from the paper-llama-1b-70b profile, 0.22)",
    )
    b.add_argument(
        "--itl-target",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --fleet: the inter-token latency (p50) a replica must keep; the users it "
        "holds at it are reported (default: twice the one-user ar ITL)",
    )
    b.add_argument(
        "--vllm-baseline",
        action="store_true",
        help="with --concurrency: also vLLM's own OpenAI server on the verifier's weights, on "
        "the cloud's CPUs, driven the same way (needs `make vllm-setup`)",
    )
    b.add_argument(
        "--prefill",
        type=_positive,
        default=None,
        metavar="N",
        help="time an N-token prompt's prefill (transformers, the slot layout, the "
        "scheduler's chunks) and how much later running streams' tokens come while it is "
        "prefilled, in one process on the cloud's CPUs (picospec.tools.bench.prefill)",
    )
    b.add_argument(
        "--prefill-streams",
        type=_positive,
        default=2,
        metavar="N",
        help="with --prefill: cloud-only streams decoding when the long prompt arrives",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot-dir", default=None, help="write PNG plots here")
    b.set_defaults(func=main)
