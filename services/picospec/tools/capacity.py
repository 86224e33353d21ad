"""``picospec capacity``: how many edge sessions one verifier replica holds, and at what cost.

It drives ONE verifier replica (the real
:class:`~picospec.services.verifier.service.VerifierService`, in this process, on a real
``nats-server``) directly over NATS with ``N`` synthetic sessions at a context length ``L``, for
every point of a grid (``N`` = 1, 4, 16, 64; ``L`` = 256, 1k, 4k; points whose caches would not fit
the memory budget are skipped and say so). Per point:

* each session is opened at ``L`` tokens: the first through ``picospec.v1.sessions.open``
  (its prefill is timed), the others seeded in this process from a copy of its cache (one
  prefill per point instead of ``N``: the prefill is not what this measures);
* then rounds in lock-step: every session sends one draft block (``--draft-len`` random
  tokens, plus the correction of its previous round as prefix, as a drafter does), all in one
  burst, and waits for its verdict; the replica verifies what is queued together, as it does
  in service. Warm-up rounds first, then ``--rounds`` measured ones.

Reported per point: verify rounds/s and forwards/s, draft tokens verified/s (every drafted
position checked, whatever the acceptance), p50/p99 of the round latency (block sent ->
verdict back, each session), the KV cache memory (reserved and used), the cache bytes copied
per round (:class:`picospec.runtime.kvslots.CacheCounters`), and the bytes of keys/values attention
reads per round with the time they take at this machine's measured memory bandwidth.

``--layouts slots,copy`` and ``--batching on,off`` repeat the grid with the copying KV layout
and with one forward per session, so ratios come from one run on one machine. The knee: per
context, the most sessions whose p50 round stays within twice the 1-session round (slots,
batched): the number of sessions a replica holds before its rounds slow down, which the
chart's autoscaling target comes from (docs/capacity.md).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GRID_SESSIONS = (1, 4, 16, 64)
GRID_CONTEXTS = (256, 1024, 4096)
QUICK_SESSIONS = (1, 4, 16)
QUICK_CONTEXTS = (256, 1024)
KNEE_SLOWDOWN = 2.0
"""A replica's rounds have "slowed down" once the p50 round takes this many times the round of
one session alone at the same context."""
SITE = "capacity"


@dataclass
class Point:
    layout: str
    batching: bool
    sessions: int
    context: int
    skipped: str | None = None
    prefill_s: float | None = None
    rounds: int = 0
    elapsed_s: float = 0.0
    forwards: int = 0
    latencies_s: list[float] = field(default_factory=list)
    draft_tokens: int = 0
    fed_tokens: int = 0
    copied_bytes: int = 0
    grows: int = 0
    cache_reserved_bytes: int = 0
    cache_used_bytes: int = 0
    attention_read_bytes: int = 0
    stall_s: float = 0.0
    retries: int = 0

    def report(self, bandwidth: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layout": self.layout,
            "batching": self.batching,
            "sessions": self.sessions,
            "context": self.context,
        }
        if self.skipped:
            return out | {"skipped": self.skipped}
        lat = sorted(self.latencies_s)
        per_round = self.attention_read_bytes / max(1, self.rounds)
        return out | {
            "prefill_s": self.prefill_s,
            "rounds": self.rounds,
            "elapsed_s": self.elapsed_s,
            "rounds_per_s": self.rounds / self.elapsed_s,
            "forwards_per_s": self.forwards / self.elapsed_s,
            "sessions_per_forward": self.rounds * self.sessions / max(1, self.forwards),
            "verified_tokens_per_s": self.draft_tokens / self.elapsed_s,
            "fed_tokens_per_s": self.fed_tokens / self.elapsed_s,
            "round_s": self.elapsed_s / self.rounds,
            "latency_p50_s": _quantile(lat, 0.50),
            "latency_p99_s": _quantile(lat, 0.99),
            "cache_reserved_bytes": self.cache_reserved_bytes,
            "cache_used_bytes": self.cache_used_bytes,
            "copied_bytes_per_round": self.copied_bytes / max(1, self.rounds),
            "slot_grows": self.grows,
            "attention_read_bytes_per_round": per_round,
            "attention_read_s_per_round": per_round / bandwidth if bandwidth else None,
            "longest_stall_s": self.stall_s,
            "remeasured": self.retries,
        }


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def _ints(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        out.append(int(part.rstrip("k")) * mult)
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(out)


def _layouts(text: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in text.split(",") if x.strip())
    if not out or any(x not in ("slots", "copy") for x in out):
        raise argparse.ArgumentTypeError(f"layouts are slots and/or copy, got {text!r}")
    return out


def _batching(text: str) -> tuple[bool, ...]:
    try:
        return tuple({"on": True, "off": False}[x.strip()] for x in text.split(",") if x.strip())
    except KeyError:
        raise argparse.ArgumentTypeError(f"batching is on and/or off, got {text!r}") from None


def memory_bandwidth(device: Any, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s: the best of ``repeats`` copies of a
    ``nbytes`` tensor (a copy reads and writes it: 2 x nbytes)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _available_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class Driver:
    """The synthetic drafters of one run: opens, seeds and drives sessions over NATS."""

    def __init__(self, nc: Any, service: Any, draft_len: int, seed: int) -> None:
        self.nc = nc
        self.service = service
        self.model = service.model
        self.draft_len = draft_len
        self.rng = random.Random(seed)
        self.reply_to = f"picospec.v1.verdict.{SITE}.driver"
        self.waiting: dict[bytes, tuple[asyncio.Future[Any], float]] = {}

    async def start(self) -> None:
        from picospec.protocol.codec import Verdict, decode_as

        async def on_verdict(msg: Any) -> None:
            verdict = decode_as(msg.data, Verdict)
            entry = self.waiting.pop(verdict.session, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result((verdict, time.perf_counter() - entry[1]))

        await self.nc.subscribe(self.reply_to, cb=on_verdict)

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.model.vocab_size) for _ in range(n)]

    async def open(self, sessions: int, context: int, extra: int) -> tuple[list[Any], float]:
        """Open ``sessions`` sessions of ``context`` tokens: one over NATS (timed), the rest
        copies of it. Returns the per-session states and the prefill's seconds."""
        from picospec.protocol import subjects
        from picospec.services.control import OpenReply, OpenSession
        from picospec.services.verifier.service import Held
        from picospec.speculation.sampling import Rng, SamplingParams
        from picospec.speculation.spec import Mode, SpecConfig
        from picospec.speculation.verifier import VerifierStats

        params = SamplingParams(temperature=0.0)
        spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=self.draft_len)
        prompt = self._tokens(context)
        first = os.urandom(16)
        req = OpenSession(
            session=first.hex(), prompt=prompt, params=params, spec=spec,
            vocab_size=self.model.vocab_size, reply_to=self.reply_to, max_new_tokens=extra,
            first_token=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        msg = await self.nc.request(
            subjects.SESSIONS_OPEN, req.model_dump_json().encode(), timeout=3600
        )
        prefill_s = time.perf_counter() - t0
        OpenReply.model_validate_json(msg.data)
        template = self.service.sessions[first]
        states = [_State(first, context)]
        for _ in range(sessions - 1):
            sid = os.urandom(16)
            vs = copy.copy(template.session)
            vs.session, vs.cache = sid, template.session.cache.clone()
            vs.stats, vs._waiting, vs._rng = VerifierStats(forwards=1), {}, Rng(0)
            held_req = req.model_copy(update={"session": sid.hex()})
            self.service.sessions[sid] = Held(vs, self.reply_to, held_req)
            states.append(_State(sid, context))
        return states, prefill_s

    async def round(self, states: list[_State]) -> list[float]:
        """One lock-step round: every session's block in one burst, then every verdict."""
        from picospec.protocol import subjects
        from picospec.protocol.codec import DraftBlock, encode
        from picospec.services.shell import headers

        loop = asyncio.get_running_loop()
        futures = []
        subject = subjects.verify(self.service.id)
        for st in states:
            tokens = self._tokens(self.draft_len)
            block = DraftBlock(
                session=st.sid, epoch=st.epoch, seq=st.seq, pos=st.pos, prefix=st.prefix,
                tokens=tuple(tokens), q=(0.5,) * len(tokens), vocab_size=self.model.vocab_size,
            )  # fmt: skip
            fut: asyncio.Future[Any] = loop.create_future()
            self.waiting[st.sid] = (fut, time.perf_counter())
            futures.append(fut)
            await self.nc.publish(subject, encode(block), reply=self.reply_to, headers=headers())
        await self.nc.flush()
        got = await asyncio.wait_for(asyncio.gather(*futures), timeout=3600)
        latencies = []
        for st, (verdict, seconds) in zip(states, got, strict=True):
            st.apply(verdict, self.draft_len)
            latencies.append(seconds)
        return latencies

    def close(self, states: list[_State]) -> None:
        for st in states:
            self.service._free(st.sid, "closed")


@dataclass
class _State:
    """A synthetic drafter's view of its session: where the next block starts."""

    sid: bytes
    pos: int
    epoch: int = 0
    seq: int = 0
    prefix: tuple[int, ...] = ()

    def apply(self, verdict: Any, draft_len: int) -> None:
        from picospec.protocol.codec import VerdictStatus

        if verdict.status is not VerdictStatus.OK:
            raise RuntimeError(f"verifier answered {verdict.status.name}")
        self.pos += len(self.prefix) + verdict.accepted
        self.seq += 1
        if verdict.accepted < draft_len:  # a rejection: the correction opens the next epoch
            self.epoch += 1
            self.prefix = (int(verdict.token),)
        else:
            self.prefix = ()


async def run_grid(args: argparse.Namespace, model: Any, log: Any = print) -> dict[str, Any]:
    """Start a nats-server and one verifier replica on ``model``; measure every point."""
    from picospec.config import Settings
    from picospec.services.shell import connect_nats
    from picospec.services.verifier.service import VerifierService
    from picospec.tools.stack.natsserver import NatsServer, free_port

    sessions, contexts = args.sessions, args.contexts
    layouts, batchings = args.layouts, args.batching
    extra = (args.warmup + args.rounds) * (args.draft_len + 1) + 8
    token_bytes = {}
    for layout in layouts:
        model.kv_layout = layout
        token_bytes[layout] = model.kv_token_bytes
    budget = int(args.memory_fraction * _available_memory(model.device))
    bandwidth = memory_bandwidth(model.device)
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; cache budget {budget / 2**30:.1f} GiB")
    server = NatsServer(0, name="capacity")
    server.start()
    points: list[Point] = []
    try:
        settings = Settings(
            nats_url=server.url, replica_id="capacity", port=free_port(), site=SITE,
            max_sessions=max(sessions) + 1, idle_timeout_s=24 * 3600,
        )  # fmt: skip
        service = VerifierService(settings, model=model)
        stop = asyncio.Event()
        serving = asyncio.create_task(service.main(stop))
        while not service.ready:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.05)
        nc = await connect_nats(settings, "capacity-driver")
        driver = Driver(nc, service, args.draft_len, args.seed)
        await driver.start()
        for layout in layouts:
            for batching in batchings:
                for context in contexts:
                    for n in sessions:
                        point = Point(layout, batching, n, context)
                        points.append(point)
                        need = n * (context + extra + 64) * token_bytes[layout]
                        if layout == "copy" and n > 1:
                            need *= 3  # the temporary batched cache and the concatenations
                        if context + extra >= model.max_context:
                            point.skipped = f"context {context} + rounds > {model.max_context}"
                        elif need > budget:
                            point.skipped = (
                                f"caches need {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f}"
                            )
                        if point.skipped:
                            log(f"skip {layout} batching={batching} N={n} L={context}: "
                                f"{point.skipped}")  # fmt: skip
                            continue
                        model.kv_layout, model.batching = layout, batching
                        await _measure(driver, model, point, args, extra)
                        r = point.report(bandwidth)
                        log(
                            f"{layout:5} batching={'on ' if batching else 'off'} N={n:3} "
                            f"L={context:5}: {r['rounds_per_s']:.2f} rounds/s, "
                            f"{r['verified_tokens_per_s']:.0f} tok/s, p50 "
                            f"{r['latency_p50_s'] * 1e3:.0f} ms, p99 "
                            f"{r['latency_p99_s'] * 1e3:.0f} ms, copied "
                            f"{r['copied_bytes_per_round'] / 2**20:.1f} MiB/round, cache "
                            f"{r['cache_reserved_bytes'] / 2**20:.0f} MiB, longest stall "
                            f"{r['longest_stall_s']:.2f} s"
                        )
        await nc.drain()
        stop.set()
        await asyncio.wait_for(serving, timeout=60)
    finally:
        model.kv_layout, model.batching = "slots", True
        server.stop()
    return report(args, model, points, bandwidth)


class Heartbeat:
    """A thread that wakes every 10 ms and keeps the longest gap between its wake-ups: a gap
    of seconds means the whole process was paused (SIGSTOP, a suspended VM), and the
    point's timings with it."""

    def __init__(self) -> None:
        import threading

        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


STALL_S = 1.0
"""A measured point during which the process stood still this long is measured again."""


async def _measure(driver: Driver, model: Any, point: Point, args: Any, extra: int) -> None:
    for attempt in range(3):
        point.latencies_s = []
        await _measure_once(driver, model, point, args, extra)
        point.retries = attempt
        if point.stall_s < STALL_S:
            return


async def _measure_once(driver: Driver, model: Any, point: Point, args: Any, extra: int) -> None:
    states, point.prefill_s = await driver.open(point.sessions, point.context, extra)
    try:
        for _ in range(args.warmup):
            await driver.round(states)
        before = model.kv_counters.snapshot()
        lengths_before = sum(driver.service.sessions[s.sid].session.cache.length for s in states)
        with Heartbeat() as beat:
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                point.latencies_s += await driver.round(states)
            point.elapsed_s = time.perf_counter() - t0
        point.stall_s = beat.longest
        after = model.kv_counters
        helds = [driver.service.sessions[s.sid].session for s in states]
        lengths_after = sum(vs.cache.length for vs in helds)
        point.rounds = args.rounds
        point.forwards = after.forwards - before.forwards
        point.copied_bytes = after.copied_bytes - before.copied_bytes
        point.grows = after.grows - before.grows
        point.draft_tokens = args.rounds * point.sessions * args.draft_len
        point.fed_tokens = args.rounds * point.sessions * (args.draft_len + 1)
        point.cache_reserved_bytes = sum(vs.cache.nbytes() for vs in helds)
        point.cache_used_bytes = sum(vs.cache.used_bytes() for vs in helds)
        # each round's attention reads every session's keys/values once per layer
        mean_tokens = (lengths_before + lengths_after) / 2 + point.sessions * args.draft_len
        point.attention_read_bytes = int(args.rounds * mean_tokens * model.kv_token_bytes)
    finally:
        driver.close(states)


def knees(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per context: the most sessions whose p50 round stays within KNEE_SLOWDOWN x the
    1-session round (slot layout, batched)."""
    out: dict[str, Any] = {}
    ok = [p for p in points if not p.get("skipped") and p["layout"] == "slots" and p["batching"]]
    for context in sorted({p["context"] for p in ok}):
        row = sorted((p for p in ok if p["context"] == context), key=lambda p: p["sessions"])
        alone = next((p for p in row if p["sessions"] == 1), None)
        if alone is None:
            continue
        within = [p for p in row if p["latency_p50_s"] <= KNEE_SLOWDOWN * alone["latency_p50_s"]]
        best = max(within, key=lambda p: p["sessions"])
        out[str(context)] = {
            "sessions": best["sessions"],
            "verified_tokens_per_s": best["verified_tokens_per_s"],
            "latency_p50_s": best["latency_p50_s"],
            "single_session_p50_s": alone["latency_p50_s"],
            "largest_measured": row[-1]["sessions"],
        }
    return out


def comparisons(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Side-by-side ratios at every point measured more than one way."""
    done = {(p["layout"], p["batching"], p["sessions"], p["context"]): p for p in points}
    out = []
    for (layout, batching, n, ctx), p in done.items():
        if p.get("skipped") or layout != "slots" or not batching:
            continue
        copy_p = done.get(("copy", True, n, ctx))
        if copy_p and not copy_p.get("skipped"):
            out.append({
                "sessions": n, "context": ctx, "what": "slots vs copy (batched)",
                "round_speedup": copy_p["round_s"] / p["round_s"],
                "slots_round_s": p["round_s"], "copy_round_s": copy_p["round_s"],
            })  # fmt: skip
        seq = done.get(("slots", False, n, ctx))
        if seq and not seq.get("skipped") and n > 1:
            out.append({
                "sessions": n, "context": ctx, "what": "batched vs sequential (slots)",
                "tokens_per_s_ratio": p["verified_tokens_per_s"] / seq["verified_tokens_per_s"],
                "batched_tokens_per_s": p["verified_tokens_per_s"],
                "sequential_tokens_per_s": seq["verified_tokens_per_s"],
            })  # fmt: skip
        seq_copy = done.get(("copy", False, n, ctx))
        if seq_copy and not seq_copy.get("skipped") and n > 1:
            out.append({
                "sessions": n, "context": ctx, "what": "batched slots vs sequential copy",
                "tokens_per_s_ratio": p["verified_tokens_per_s"]
                / seq_copy["verified_tokens_per_s"],
            })  # fmt: skip
    return out


def report(
    args: argparse.Namespace, model: Any, points: list[Point], bandwidth: float
) -> dict[str, Any]:
    import torch

    rows = [p.report(bandwidth) for p in points]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None),
        "config": {
            "model": model.name,
            "device": str(model.device),
            "dtype": str(model.kv_geometry.dtype if model.slots_unsupported is None else ""),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "draft_len": args.draft_len,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "kv_token_bytes": model.kv_token_bytes,
            "memory_bandwidth_bytes_per_s": bandwidth,
            "knee_slowdown": KNEE_SLOWDOWN,
        },
        "points": rows,
        "knee": knees(rows),
        "comparisons": comparisons(rows),
    }


def plot(rep: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = [p for p in rep["points"] if not p.get("skipped")]
    series = sorted({(p["layout"], p["batching"], p["context"]) for p in ok})
    for layout, batching, ctx in series:
        row = sorted(
            (
                p
                for p in ok
                if (p["layout"], p["batching"], p["context"]) == (layout, batching, ctx)
            ),
            key=lambda p: p["sessions"],
        )
        tag = f"{layout}{'' if batching else ' sequential'} L={ctx}"
        style = "-" if layout == "slots" and batching else "--"
        xs = [p["sessions"] for p in row]
        ax1.plot(xs, [p["verified_tokens_per_s"] for p in row], style, marker="o", label=tag)
        ax2.plot(xs, [p["latency_p50_s"] * 1e3 for p in row], style, marker="o", label=tag)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions on one replica")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("draft tokens verified / s")
    ax2.set_ylabel("round latency p50 (ms)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    cfg = rep["config"]
    fig.suptitle(f"Verifier capacity: {cfg['model']} on {cfg['device']} ({rep['date'][:10]})")
    fig.tight_layout()
    path = out_dir / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    import sys

    from picospec.runtime.loading import load_model

    if args.quick:
        args.sessions = args.sessions or QUICK_SESSIONS
        args.contexts = args.contexts or QUICK_CONTEXTS
    args.sessions = tuple(sorted(set(args.sessions or GRID_SESSIONS)))
    args.contexts = tuple(sorted(set(args.contexts or GRID_CONTEXTS)))
    args.command_line = "picospec " + " ".join(sys.argv[1:]) if sys.argv else None
    model = load_model(args.model, device=args.device, dtype=args.dtype, threads=args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rep = asyncio.run(run_grid(args, model, log))
    text = json.dumps(rep, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.plot_dir:
        log(f"plot: {plot(rep, Path(args.plot_dir))}")
    print(text)
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser(
        "capacity",
        help="sessions per verifier replica: rounds/s, tokens/s, latency, memory, bytes copied",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    c.add_argument("--quick", action="store_true", help="N = 1,4,16 at L = 256,1k")
    c.add_argument(
        "--sessions", type=_ints, default=None, help="concurrent sessions, e.g. 1,4,16,64"
    )
    c.add_argument("--contexts", type=_ints, default=None, help="context lengths, e.g. 256,1k,4k")
    c.add_argument(
        "--layouts",
        type=_layouts,
        default=("slots",),
        help="KV layouts to measure: slots (default), copy, or slots,copy side by side",
    )
    c.add_argument(
        "--batching",
        type=_batching,
        default=(True,),
        help="on (one forward per round), off (one per session), or on,off side by side",
    )
    c.add_argument("--rounds", type=int, default=10, help="measured rounds per point")
    c.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    c.add_argument("--draft-len", type=int, default=4, help="draft tokens per block (γ)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="skip points whose KV caches need more than this share of free memory",
    )
    c.add_argument("--model", default="smollm2", help="the verifier's model")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="auto")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", default=None, help="write the JSON report here too")
    c.add_argument("--plot-dir", default=None, help="write capacity.png here")
    c.set_defaults(func=main)
