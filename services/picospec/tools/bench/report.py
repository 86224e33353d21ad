"""What a benchmark run prints and draws: the report of a mode (:class:`BenchReport`, put out by
:func:`emit`), the tables and the PNG plots."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picospec.tools.bench.run import MODES, PROFILES

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class BenchReport:
    """What one mode of ``picospec bench`` measured, and how it is shown.

    ``data`` is the JSON document ``--json`` prints. ``table`` prints it for a person; None: the
    document is one named result, ``{name: result}``, and the result alone is printed as pretty
    JSON. ``plot`` writes the mode's plots into a folder and returns their paths (None: the mode
    draws none)."""

    data: dict[str, Any]
    table: Callable[[dict[str, Any], Console], None] | None = None
    plot: Callable[[dict[str, Any], Path], list[str]] | None = None


def emit(report: BenchReport, args: argparse.Namespace, console: Console | None = None) -> int:
    """Put a mode's report out: its plots into ``--plot-dir`` when given (their paths go into
    the document as ``plots``), then the document as JSON on stdout (``--json``) or its table
    on ``console`` (default: stdout). The command's exit status: 0."""
    if report.plot is not None and args.plot_dir:
        report.data["plots"] = report.plot(report.data, Path(args.plot_dir))
    if args.json:
        print(json.dumps(report.data, indent=1))
        return 0
    if console is None:
        from rich.console import Console

        console = Console()
    if report.table is not None:
        report.table(report.data, console)
    else:
        (result,) = report.data.values()
        console.print_json(json.dumps(result))
    return 0


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


def _bandwidth(mbit: float | None) -> str:
    return "no bandwidth limit" if mbit is None else f"{mbit:g} Mbit/s"


def table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    for profile, modes in report["profiles"].items():
        rtt, mbit = PROFILES[profile]
        emulated = report["config"]["device_profile"]
        tag = f" - EMULATED devices: {emulated}" if emulated else " - real compute"
        t = Table(title=f"{profile}: RTT {rtt:g} ms, {_bandwidth(mbit)}{tag}")
        for col in (
            "mode",
            "tok/s (p10-p90)",
            "decode tok/s",
            "vs ar",
            "vs vanilla",
            "accept",
            "α/token",
            "mean len",
            "TTFT s (cloud prefill)",
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
                f(r.get("token_acceptance")),
                f(r["mean_accepted_len"]),
                f"{f(r['ttft_s'])} ({f(r.get('cloud_prefill_s'))})",
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


def concurrency_table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from picospec.tools.bench.concurrency import knee

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    emulated = report["config"]["device_profile"]
    tag = f"EMULATED devices: {emulated}" if emulated else "real compute"
    for profile, modes in report["concurrency"].items():
        rtt, mbit = PROFILES[profile]
        t = Table(title=f"{profile}: RTT {rtt:g} ms, {_bandwidth(mbit)} - {tag}")
        for col in (
            "mode",
            "users",
            "total tok/s",
            "x users=first",
            "vs ar",
            "per-user tok/s",
            "TTFT p50 / p90 s",
            "cloud model-s/token",
            "same text",
            "errors",
            "overruns e/c",
        ):
            t.add_column(col, justify="right")
        for mode, by_level in modes.items():
            for c, r in by_level.items():
                t.add_row(
                    mode,
                    c,
                    f(r["tokens_per_s"], "{:.1f}"),
                    f(r.get("scaling"), "{:.2f}x"),
                    f(r.get("vs_ar"), "{:.2f}x"),
                    f(r["per_user_tokens_per_s"], "{:.1f}"),
                    f"{f(r['ttft_p50_s'])} / {f(r['ttft_p90_s'])}",
                    f(r["cloud_model_s_per_token"], "{:.4f}"),
                    {True: "yes", False: "NO", None: "-"}[r.get("identical_to_ref")],
                    str(sum(r["errors"].values())),
                    _overruns(r.get("emulation")),
                )
            t.add_row(mode, "knee", str(knee(by_level)), *[""] * 8)
        console.print(t)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def concurrency_plot(report: dict[str, Any], out_dir: Path) -> Path:
    """Total tokens/s against concurrent users, per mode and network profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for profile, modes in report["concurrency"].items():
        for mode, by_level in modes.items():
            rows = sorted(by_level.values(), key=lambda r: r["concurrency"])
            ax.plot(
                [r["concurrency"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                marker="o",
                label=f"{mode} ({profile})",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("total generated tokens/s")
    emulated = report["config"]["device_profile"]
    tag = f"EMULATED {emulated}" if emulated else "real compute"
    ax.set_title(f"PicoSpec: throughput against concurrent users ({tag})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out_dir / f"concurrency_{'emulated' if emulated else 'real'}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
