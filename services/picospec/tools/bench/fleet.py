"""``picospec bench --fleet 1,4,16,64 --acceptance 0.6,0.9``: the edge users one verifier holds.

The figure the field judges edge-cloud speculative decoding by is the cloud's capacity: how
many edge users one verifier replica serves, with speculation and without (SpecEdge and SLED
report about 2.2x). One machine cannot host N real edge devices, so N **emulated edges** stand
in for them (EMULATED EDGES in every report):

* Each edge drafts with a set per-token acceptance ``α`` against the target: it replays the
  target's own greedy answer to its prompt, recorded from the ``ar`` run of the same prompt,
  with each position replaced by a wrong token with probability ``1 - α``
  (:class:`picospec.speculation.proposers.EmulatedEdge`).
* Each edge takes ``pace × t_v1`` of device time per draft token and computes nothing, where
  ``t_v1`` is the verifier's one-token step as one user sees it (the median inter-token latency
  of ``ar`` with one user, measured in the same run) and ``pace`` the paper's proportion of a
  Jetson AGX Orin drafting Llama 1B for Llama 70B on A100s (``--edge-pace``; the default is the
  ``paper-llama-1b-70b`` device profile's draft step over its verify step, 0.22).
* Its blocks go through the real drafter pipeline, protocol, NATS and verifier: the verifier
  does, on real compute, exactly the work N real edges would cause. The users are at the edge:
  the client runs on the edge's CPUs, the verifier alone on the cloud's.

Per level ``N`` it runs ``ar`` (cloud-only decoding, the baseline users would get) and then
``picospec`` at each ``α`` with ``N`` streams in flight, every request exactly
``--max-tokens`` long (``ignore_eos``), greedy. Per backend, ``α``, ``N`` and mode it reports
total tokens/s; the verifier's busy seconds per generated token (the CPU time of the verifier
and its engine's processes: on this CPU-only machine, all of its work); for the embedded
runtime also its model thread's forward seconds per token; ITL p50/p99 (per token: a chunk of
``k`` tokens after a gap ``g`` counts ``k`` gaps of ``g/k``) and TTFT p50; whether every text
equals ``ar``'s for its prompt. Then, per ``α``, the users one replica holds at an ITL target
(``--itl-target``, by default twice the one-user ``ar`` ITL; ITL p50, interpolated between the
levels) with and without speculation, and beside their ratio the bound ``1 + γ·t_d/t_v``
("Speculation at a Distance": a saturated server holds up to that many times more clients),
with ``γ`` the mean draft length the sessions chose, ``t_d`` the edge's step, ``t_v`` ``t_v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any

from picospec.tools.bench.run import _pinned, _scrape, scraped, stack_config

PACE_PROFILE = "paper-llama-1b-70b"
# the embedded runtime's model thread: forward seconds, forwards, sessions per forward
COUNTERS = (
    "picospec_verify_forward_seconds_sum",
    "picospec_verify_forward_seconds_count",
    "picospec_verify_batch_size_sum",
    "picospec_verify_batch_size_count",
)
FLEET_PROMPTS = 16  # distinct prompts (each recorded once from ar)
EMULATED_EDGES = "EMULATED EDGES"


def default_pace() -> float:
    """The paper's draft step over its verify step (a Jetson AGX Orin's Llama 1B over A100s'
    Llama 70B: 31.7 ms / 145.6 ms)."""
    from picospec.runtime.devices import load_profile

    profile = load_profile(PACE_PROFILE)
    return profile.draft.step_s / profile.verify.step_s


def parse_acceptances(text: str) -> list[str]:
    """``0.6,0.9`` to ``["0.6", "0.9"]`` (kept as given: they are the report's keys)."""
    out = [v.strip() for v in text.split(",") if v.strip()]
    try:
        ok = out and all(0.0 <= float(v) <= 1.0 for v in out) and len(set(out)) == len(out)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected distinct acceptances in [0, 1], got {text!r}")
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return total


def _percentile(values: list[float], q: float) -> float | None:
    from picospec.tools.loadgen import percentile

    return percentile(values, q)


@dataclasses.dataclass
class Level:
    """One mode's run at one level: its requests, and the verifier's work during it."""

    results: list[Any]
    duration_s: float
    cpu_s: float
    counters: dict[str, float] | None  # deltas of COUNTERS (embedded runtime only)
    policy: dict[str, float]  # adaptive rounds by the draft-length policy they followed

    def row(self, reference: dict[str, str] | None) -> dict[str, Any]:
        ok = [r for r in self.results if r.error is None]
        tokens = sum(r.tokens for r in ok)
        c = self.counters or {}
        forward_s, forwards = c.get(COUNTERS[0]), c.get(COUNTERS[1])
        batches = c.get(COUNTERS[3])
        itl = [g for r in ok for g in r.itl_s]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        chosen: dict[str, int] = {}
        accepted = rejected = 0
        for r in ok:
            for g, n in (r.stats.get("draft_len_rounds") or {}).items():
                chosen[g] = chosen.get(g, 0) + n
            accepted += r.stats.get("accepted_tokens") or 0
            rejected += r.stats.get("rollbacks") or 0
        return {
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "tokens": tokens,
            "duration_s": self.duration_s,
            "tokens_per_s": tokens / self.duration_s if self.duration_s > 0 else None,
            "verifier_s_per_token": self.cpu_s / tokens if tokens else None,
            "forward_s_per_token": forward_s / tokens if tokens and forward_s is not None else None,
            "verifier_forwards": forwards,
            "sessions_per_forward": c[COUNTERS[2]] / batches if batches else None,
            "speculation_off_share": sum(r.stats.get("draft_policy") == "off" for r in ok) / len(ok)
            if ok
            else None,
            "capacity_policy_share": self.policy["capacity"] / rounds
            if (rounds := sum(self.policy.values()))
            else None,
            "itl_p50_s": _percentile(itl, 50),
            "itl_p99_s": _percentile(itl, 99),
            "itl_max_s": max(itl) if itl else None,
            "ttft_p50_s": _percentile(ttft, 50),
            # sessions moved to another replica (or re-opened on the same one): with one
            # healthy replica any is a stall, a lost message waited out (verify_timeout_s)
            "migrations": sum(r.stats.get("migrations") or 0 for r in ok),
            "identical_to_ar": None
            if reference is None
            else all(reference.get(r.prompt) == r.text for r in ok) and len(ok) > 0,
            "token_acceptance": accepted / (accepted + rejected) if accepted + rejected else None,
            "draft_len_mean": sum(int(g) * n for g, n in chosen.items()) / sum(chosen.values())
            if chosen
            else None,
        }


def users_at_target(rows: dict[int, dict[str, Any]], target_s: float) -> tuple[float, bool]:
    """The users one replica holds with ITL p50 at most ``target_s``: interpolated between the
    measured levels; ``(users, True)`` where even the largest level stays under the target
    (then the replica holds at least that many)."""
    levels = sorted(rows)
    itl = {n: rows[n]["itl_p50_s"] for n in levels}
    if itl[levels[0]] is None or itl[levels[0]] > target_s:
        return 0.0, False
    for lo, hi in zip(levels, levels[1:], strict=False):
        if itl[hi] is None or itl[hi] > target_s:
            if itl[hi] is None:
                return float(lo), False
            span = itl[hi] - itl[lo]
            frac = (target_s - itl[lo]) / span if span > 0 else 0.0
            return lo + frac * (hi - lo), False
    return float(levels[-1]), True


async def _load(url: str, n: int, prompts: list[str], extra: dict[str, Any], args: Any) -> Any:
    from picospec.tools.loadgen import run_load

    results: list[Any] = []
    report = await run_load(
        url,
        concurrency=n,
        duration_s=float("inf"),
        max_tokens=args.max_tokens,
        prompts=prompts,
        temperature=0.0,
        timeout_s=900.0,
        extra=extra,
        max_requests=max(FLEET_PROMPTS, 2 * n) * args.repeat,
        on_result=results.append,
    )
    return results, report["duration_s"]


def _summary(
    rows: dict[str, dict[str, Any]], target: float, t_d: float, t_v1: float
) -> dict[str, Any]:
    """Beside one acceptance's levels: the users one replica holds at the ITL ``target`` with
    and without speculation, their ratio, and the bound ``1 + γ·t_d/t_v`` at the mean γ."""
    held, bounded = {}, {}
    for mode in ("ar", "picospec"):
        held[mode], bounded[mode] = users_at_target(
            {int(n): r[mode] for n, r in rows.items()}, target
        )
    gammas = [r["picospec"]["draft_len_mean"] for r in rows.values()]
    gammas = [g for g in gammas if g is not None]
    gamma = statistics.mean(gammas) if gammas else None
    return {
        "users_at_target": held,
        "users_at_target_is_lower_bound": bounded,
        "capacity_gain": held["picospec"] / held["ar"] if held["ar"] else None,
        "bound": 1 + gamma * t_d / t_v1 if gamma is not None else None,
        "draft_len_mean": gamma,
    }


def run_fleet(args: argparse.Namespace, prompts: list[str], progress: Any) -> dict[str, Any]:
    """One backend's fleet report (module docstring): ``{"pace", "t_v1_s", "t_d_s",
    "itl_target_s", alpha: {N: {"ar": row, "picospec": row}, "users_at_target": ...}}``."""
    from picospec.tools.stack.up import Stack

    levels: list[int] = args.fleet
    alphas: list[str] = args.acceptance
    prompts = prompts[:FLEET_PROMPTS]
    pace = args.edge_pace if args.edge_pace is not None else default_pace()
    top = max(levels)
    cfg = stack_config(args.profiles or "loopback", args, args.verifier, "none", "float32")
    cfg = dataclasses.replace(
        cfg,
        env={
            **cfg.env,
            "PICOSPEC_EMULATED_EDGES": "true",
            "PICOSPEC_MAX_CONCURRENT_REQUESTS": str(top + 8),
            "PICOSPEC_MAX_SESSIONS": str(2 * top + 16),
            "PICOSPEC_NATS_TIMEOUT_S": "60",
            "PICOSPEC_REQUEST_TIMEOUT_S": "300",
        },
    )
    base = {"seed": args.seed, "ignore_eos": True, "min_tokens": args.max_tokens}
    out: dict[str, Any] = {a: {} for a in alphas}
    with contextlib.ExitStack() as ctx:
        stack = ctx.enter_context(Stack(cfg))
        ctx.enter_context(_pinned(stack.cpus["edge"] if stack.cpus else None))
        verifier = stack.services["verifier-1"].url
        pid = stack.pids["verifier-1"]
        drafter = stack.services["drafter"].url

        def policy() -> dict[str, float]:
            scrape = _scrape(drafter)
            return {
                p: scraped(scrape, "picospec_draft_policy_rounds_total", policy=p)
                for p in ("latency", "capacity")
            }

        embedded = args.verifier_backend != "vllm"

        def measure(n: int, extra: dict[str, Any], label: str) -> Level:
            tick = progress(label, max(FLEET_PROMPTS, 2 * n) * args.repeat)
            cpu0 = tree_cpu_seconds(pid)
            before = counters() if embedded else None
            policy0 = policy()
            results, duration = asyncio.run(_load(stack.api_url, n, prompts, extra, args))
            tick(len(results))
            cpu = tree_cpu_seconds(pid) - cpu0
            after = counters() if embedded else None
            deltas = None if before is None or after is None else {
                k: after[k] - before[k] for k in COUNTERS
            }  # fmt: skip
            policy1 = policy()
            return Level(
                results, duration, cpu, deltas, {k: policy1[k] - policy0[k] for k in policy1}
            )

        def counters() -> dict[str, float]:
            scrape = _scrape(verifier)
            return {k: scraped(scrape, k) for k in COUNTERS}

        # first-touch costs, then the reference: ar with one user records every prompt's
        # answer (what the emulated edges replay) and gives t_v1
        asyncio.run(_load(stack.api_url, 1, prompts[:1], {**base, "mode": "ar"}, args))
        ref = measure(1, {**base, "mode": "ar"}, "fleet: ar x1 (reference)")
        reference = {r.prompt: r.text for r in ref.results if r.error is None}
        t_v1 = ref.row(None)["itl_p50_s"]
        t_d = pace * t_v1
        for n in levels:
            ar = ref if n == 1 else measure(n, {**base, "mode": "ar"}, f"fleet: ar x{n}")
            ar_row = ar.row(reference)
            for alpha in alphas:
                edge = {"acceptance": float(alpha), "step_s": t_d, "seed": args.seed}
                extra = {
                    **base,
                    "mode": "picospec",
                    "draft_len": args.draft_len,
                    "emulated_edge": edge,
                }
                spec = measure(n, extra, f"fleet: picospec α={alpha} x{n}").row(reference)
                out[alpha][str(n)] = {"ar": ar_row, "picospec": spec}
    target = args.itl_target if args.itl_target is not None else 2 * t_v1
    for alpha in alphas:
        out[alpha].update(_summary(out[alpha], target, t_d, t_v1))
    return {
        "label": EMULATED_EDGES,
        "pace": pace,
        "t_v1_s": t_v1,
        "t_d_s": t_d,
        "itl_target_s": target,
        "network": args.profiles or "loopback",
        **out,
    }


_TABLE_COLUMNS = (
    "α",
    "users",
    "ar tok/s",
    "picospec tok/s",
    "ratio",
    "verifier s/token (picospec/ar)",
    "ITL p50 ar / picospec",
    "greedy = ar",
    "migrated",
)


def fleet_table(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for backend, by_alpha in report["fleet"].items():
        t = Table(
            title=f"{EMULATED_EDGES}: one verifier replica ({backend}), edges paced at "
            f"{by_alpha['pace']:.2f} x t_v1 = {by_alpha['t_d_s'] * 1e3:.1f} ms per draft token; "
            f"ITL target {by_alpha['itl_target_s'] * 1e3:.0f} ms"
        )
        for col in _TABLE_COLUMNS:
            t.add_column(col)
        for alpha, rows in by_alpha.items():
            if not isinstance(rows, dict) or "users_at_target" not in rows:
                continue
            for n, r in sorted(
                ((k, v) for k, v in rows.items() if k.isdigit()), key=lambda x: int(x[0])
            ):
                a, p = r["ar"], r["picospec"]
                t.add_row(
                    alpha,
                    n,
                    f"{a['tokens_per_s']:.1f}",
                    f"{p['tokens_per_s']:.1f}",
                    f"{p['tokens_per_s'] / a['tokens_per_s']:.2f}x",
                    f"{p['verifier_s_per_token'] / a['verifier_s_per_token']:.2f}x",
                    f"{a['itl_p50_s'] * 1e3:.0f} / {p['itl_p50_s'] * 1e3:.0f} ms",
                    str(p["identical_to_ar"] and a["identical_to_ar"]),
                    str(a["migrations"] + p["migrations"]),  # one healthy replica: a stall
                )
            held = rows["users_at_target"]
            t.add_row(
                alpha,
                "at target",
                f"{held['ar']:.1f} users",
                f"{held['picospec']:.1f} users",
                f"{rows['capacity_gain']:.2f}x" if rows["capacity_gain"] else "-",
                f"bound {rows['bound']:.2f}x" if rows["bound"] else "-",
                "",
                "",
                "",
            )
        console.print(t)


def fleet_plot(report: dict[str, Any], out_dir: Path) -> Path:
    """Tokens/s and the verifier's seconds per token against emulated edge users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for backend, by_alpha in report["fleet"].items():
        drawn_ar = False
        for alpha, rows in by_alpha.items():
            if not isinstance(rows, dict) or "users_at_target" not in rows:
                continue
            levels = sorted(int(n) for n in rows if n.isdigit())
            for mode in ("ar", "picospec"):
                if mode == "ar" and drawn_ar:
                    continue
                label = f"{mode} ({backend})" if mode == "ar" else f"picospec α={alpha} ({backend})"
                xs = [rows[str(n)][mode] for n in levels]
                style = "--" if mode == "ar" else "-"
                left.plot(levels, [r["tokens_per_s"] for r in xs], style, marker="o", label=label)
                right.plot(
                    levels,
                    [r["verifier_s_per_token"] * 1e3 for r in xs],
                    style,
                    marker="o",
                    label=label,
                )
            drawn_ar = True
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("edge users (EMULATED EDGES)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("total generated tokens/s")
    right.set_ylabel("verifier CPU ms per generated token")
    fig.suptitle("One verifier replica, real compute, EMULATED EDGES")
    path = out_dir / "fleet_emulated_edges.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_folder(folder: Path) -> Path:
    """The fleet plot of every backend measured in ``folder`` (its ``bench-fleet-*.json``, as
    ``make bench-fleet`` writes them), beside them."""
    merged: dict[str, Any] = {}
    for path in sorted(folder.glob("bench-fleet-*.json")):
        merged.update(json.loads(path.read_text())["fleet"])
    if not merged:
        raise SystemExit(f"no bench-fleet-*.json in {folder}")
    return fleet_plot({"fleet": merged}, folder)
