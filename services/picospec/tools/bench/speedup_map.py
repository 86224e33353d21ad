"""The speedup map: every draft over every network profile against cloud-only ``ar``, next to the
paper's Table 1, with the rate model's break-even acceptance and curves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from picospec.tools.bench.run import PROFILES, bound, run_profile

MAP_MODES = ["ar", "vanilla", "dssd", "picospec"]


# The paper's Table 1 (arXiv 2603.19133): tokens/s on a Jetson AGX Orin edge and A100 cloud,
# draft length 4 (as summarised from its v1; ratios are against cloud-only AR).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Llama 1B->70B, GSM8K": {"ar": 6.87, "vanilla": 9.27, "picospec": 17.22},
    "Llama 1B->70B, HumanEval": {"ar": 6.86, "vanilla": 9.95, "picospec": 19.88},
    "Qwen3 0.6B->32B, GSM8K": {"ar": 13.89, "vanilla": 8.04, "picospec": 20.19},
    "Qwen3 0.6B->32B, HumanEval": {"ar": 14.18, "vanilla": 6.24, "picospec": 16.04},
}


# Which built-in device profile stands for each of the paper's pairs, and its draft length.
PAPER_PAIR_PROFILES: dict[str, str] = {
    "Llama 1B->70B": "paper-llama-1b-70b",
    "Qwen3 0.6B->32B": "paper-qwen-0.6b-32b",
}
PAPER_DRAFT_LEN = 4


def implied_acceptance(rate: float, t_d: float, draft_len: int, rtt_s: float) -> float | None:
    """The per-token acceptance at which the rate model decodes at ``rate`` tokens/s: the
    inverse of :func:`~picospec.tools.bench.run.bound` in ``α``. None when ``rate`` is beyond the
    draft's own speed (``1/t_d``), which no acceptance explains."""
    if rate * t_d > 1.0:
        return None
    wait = (draft_len - 1) / 2 * t_d
    return 1.0 - (1.0 / rate - t_d) / (wait + rtt_s)


def paper_implied_acceptance(profiles: list[str]) -> dict[str, dict[str, float | None]]:
    """For each row of the paper's Table 1, the acceptance its PicoSpec figure implies by the
    rate model on each network profile: the draft step is the pair's device profile's, the
    round trip the profile's RTT plus the verifier's time for a block of the paper's draft
    length (for Llama 70B, 166 ms: the paper's own ablation figure)."""
    from picospec.runtime.devices import load_profile

    out: dict[str, dict[str, float | None]] = {}
    for row, v in PAPER_TABLE1.items():
        device = load_profile(PAPER_PAIR_PROFILES[row.split(",")[0]])
        verify_s = device.verify.seconds(PAPER_DRAFT_LEN + 1)
        out[row] = {
            p: implied_acceptance(
                v["picospec"], device.draft.step_s, PAPER_DRAFT_LEN, PROFILES[p][0] / 1e3 + verify_s
            )
            for p in profiles
        }
    return out


def break_even_acceptance(t_ar: float, t_d: float, draft_len: int, rtt_s: float) -> float | None:
    """The per-token acceptance above which the pipeline beats cloud-only decoding, by the rate
    model: ``1 / (t_d + (1-α)(W+R)) > 1 / t_ar``. None when even α = 1 cannot (t_d >= t_ar)."""
    if t_d >= t_ar:
        return None
    wait = (draft_len - 1) / 2 * t_d
    return max(0.0, 1.0 - (t_ar - t_d) / (wait + rtt_s))


def _drafts(spec: str, verifier: str) -> list[tuple[str, str, str, str | None]]:
    """``--map-drafts`` to (label, drafter model, quantisation, draft dtype): ``self`` is the
    verifier's own checkpoint, ``int8`` its int8 dynamic quantisation, ``bf16`` its weights in
    bfloat16 (a near-target draft that really disagrees), anything else a draft model name."""
    out: list[tuple[str, str, str, str | None]] = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "self":
            out.append(("self", verifier, "none", None))
        elif item == "int8":
            out.append(("int8", verifier, "int8", None))
        elif item == "bf16":
            out.append(("bf16", verifier, "none", "bfloat16"))
        else:
            out.append((item, item, "none", None))
    return out


def speedup_map(
    report: dict[str, Any], args: argparse.Namespace, prompts: list[str], progress: Any
) -> dict[str, Any]:
    """Every draft over every profile: picospec, dssd and vanilla against ``ar``, the measured
    acceptance, and the rate model's break-even acceptance at each profile."""
    from picospec.runtime.devices import load_profile

    out: dict[str, Any] = {}
    t_ar = load_profile(args.device_profile).verify.step_s if args.device_profile else None
    for label, drafter, quantize, dtype in _drafts(args.map_drafts, args.verifier):
        rows: dict[str, Any] = {}
        sweeps: dict[str, Any] = {}
        for name in report["profiles_requested"]:
            run = run_profile(
                name, args, prompts, progress, drafter, quantize, report["placement"], dtype
            )
            # the map has always listed --drafts' rows among the modes, as "_drafts"
            modes = {**run.rows, **({"_drafts": run.drafts} if run.drafts else {})}
            sweep = run.draft_len_sweep
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
                "token_acceptance": p.get("token_acceptance"),
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
    for col in ("draft", "profile", "α", "picospec", "dssd", "vanilla", "break-even α"):
        t.add_column(col, justify="right")
    for label, d in report["map"].items():
        for name, r in d["profiles"].items():

            def x(v: Any) -> str:
                return "-" if v is None else f"{v:.2f}x"

            t.add_row(
                label,
                name,
                "-" if r.get("token_acceptance") is None else f"{r['token_acceptance']:.2f}",
                x(r.get("picospec_vs_ar")),
                x(r.get("dssd_vs_ar")),
                x(r.get("vanilla_vs_ar")),
                "-" if r["break_even_acceptance"] is None else f"{r['break_even_acceptance']:.2f}",
            )
    console.print(t)
    paper = Table(title="the paper's Table 1 (Jetson AGX Orin + A100), against cloud-only AR")
    implied = report.get("paper_implied_acceptance", {})
    profiles = list(next(iter(implied.values()), {}))
    for col in ("pair, dataset", "AR tok/s", "vanilla", "picospec"):
        paper.add_column(col, justify="right")
    for p in profiles:
        paper.add_column(f"implied α ({p})", justify="right")
    for row, v in PAPER_TABLE1.items():
        paper.add_row(
            row,
            f"{v['ar']:.2f}",
            f"{v['vanilla'] / v['ar']:.2f}x",
            f"{v['picospec'] / v['ar']:.2f}x",
            *("-" if (a := implied[row][p]) is None else f"{a:.2f}" for p in profiles),
        )
    console.print(paper)


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
            a, y = rows[n].get("token_acceptance"), rows[n].get("picospec_vs_ar")
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
    ax2.set_xlabel("measured per-token acceptance α (picospec)")
    emulated = report["config"]["device_profile"]
    tag = f"EMULATED {emulated}" if emulated else "real compute"
    ax1.set_title(f"speedup vs RTT ({tag}); grey: paper, Llama")
    ax2.set_title("picospec speedup vs acceptance, with the rate model")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    path = out_dir / f"speedup_map_{'emulated' if emulated else 'real'}.png"
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
