"""The model thread as a scheduler: continuous batching of every session's forwards.

Every piece of model work is a *program*: a generator that yields :class:`Forward` requests
("feed these tokens to this session's cache, give me the logits of the last ``keep`` rows"),
is sent back those logits, may yield :class:`Emit` values on the way (an ``ar`` stream's
tokens), and returns its result. A prefill, a draft step, an ``ar`` decode step and the
verification of a block are all programs, written as plain sequential code in the session
state machines (``speculation/drafter.py``, ``speculation/verifier.py``).

:class:`Batcher` is the synchronous core. Each :meth:`~Batcher.step` is one iteration of
continuous batching, as in Orca and vLLM: it takes the pending forward of every active program
and runs them as ONE :meth:`~picospec.runtime.model.LanguageModel.forward_batch` per model, then
resumes each program with its rows. Programs join and leave between iterations. Programs that
share a *key* (a session) run one after another in submission order, so a session's blocks
keep their order and never share a forward with each other. With a token budget
(``max_tokens``), short requests (decode steps, draft blocks) go first and a long one (a
prompt's prefill) is fed in chunks of what the budget leaves, one chunk per iteration: a long
prompt arriving never freezes the streams already running, it only slows their iterations by
one chunk's cost. Only a request's last chunk asks for logits.

:class:`ModelThread` is the asyncio shell: one thread runs the :class:`Batcher` for as long as
there is work, and the event loop submits programs (:meth:`~ModelThread.submit`, an awaitable
:class:`Job`) and gets results and emitted values back, batched per iteration. Submissions are
handed to the thread at the end of the event loop's current pass, so every session woken by
one iteration's results gets into the next iteration together instead of racing it one by one.

Batching never changes a session's output: sampling randomness is keyed by session seed and
position (:class:`picospec.speculation.sampling.Rng`), and a batched forward gives each session the
logits of its own forward to float tolerance.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from picospec.runtime.model import KVCache

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Forward:
    """One forward a program needs: feed ``tokens`` to ``cache``; the program is sent back the
    float32 logits of the last ``keep`` rows (on the model's device with ``on_device``)."""

    cache: KVCache
    tokens: list[int]
    keep: int = 1
    on_device: bool = False

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a forward needs at least one token")
        if not 1 <= self.keep <= len(self.tokens):
            raise ValueError(f"cannot keep {self.keep} rows of a {len(self.tokens)}-token forward")


@dataclass(frozen=True)
class Emit:
    """A value a program hands out before it ends (an ``ar`` stream's next token)."""

    value: Any


Program = Generator["Forward | Emit", "torch.Tensor | None", T]


def run(program: Program[T], on_emit: Callable[[Any], None] | None = None) -> T:
    """Drive one program alone, one plain forward at a time (no batching, no chunking)."""
    try:
        req = next(program)
        while True:
            if isinstance(req, Emit):
                if on_emit is not None:
                    on_emit(req.value)
                req = program.send(None)
            else:
                req = program.send(req.cache.extend(req.tokens, req.keep, req.on_device))
    except StopIteration as done:
        return done.value


def call(fn: Callable[..., T], *args: Any) -> Program[T]:
    """A plain function as a program that needs no forward (model loading, a warm-up): it
    runs on the model thread in its turn."""
    return fn(*args)
    yield  # pragma: no cover - makes this a generator


_seq = itertools.count()


@dataclass(eq=False)
class Job(Generic[T]):
    """One submitted program and what became of it."""

    program: Program[T]
    key: Hashable | None = None
    on_emit: Callable[[Any], None] | None = None
    seq: int = field(default_factory=lambda: next(_seq))
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its first forward began
    compute_s: float = 0.0  # time of the forwards it took part in
    pending: Forward | None = None  # the forward it waits for
    fed: int = 0  # tokens of ``pending`` already fed (earlier chunks)
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    done: bool = False
    emitted: list[Any] = field(default_factory=list)  # values not yet handed out
    future: asyncio.Future[T] | None = None  # ModelThread: what the event loop awaits

    def __await__(self) -> Generator[Any, None, T]:
        assert self.future is not None, "only jobs of a ModelThread can be awaited"
        return self.future.__await__()

    @property
    def remaining(self) -> int:
        return 0 if self.pending is None else len(self.pending.tokens) - self.fed


@dataclass(frozen=True)
class ForwardStats:
    """One forward :class:`Batcher` ran (for metrics and cost fitting)."""

    model: Any
    sessions: int
    tokens: int
    seconds: float
    queue_waits: tuple[float, ...]  # of the jobs whose first forward this was
    # a block the engine ran as a request of its own, beside its own decoding (vLLM); what it
    # costs beyond the forward of its tokens is the cost line's per-round term
    request: bool = False
    # one stream's view of an engine step it shared with the other requests in flight (a step
    # of vLLM's own decoding): the cost line and the load meter take it, the forward histogram
    # (which sums the engine's time) does not, as every stream in the step reports it
    shared: bool = False
    end: float | None = None  # when it ended (time.perf_counter()); None: when reported


class Batcher:
    """The synchronous core of continuous batching (module docstring).

    ``max_tokens``: the most tokens one iteration feeds (None: no limit, no chunking).
    ``on_forward``: called after every forward with its :class:`ForwardStats`.
    ``on_batch``: passed on to ``forward_batch`` (called with the sessions of each forward).
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        on_forward: Callable[[ForwardStats], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.max_tokens = max_tokens
        self.on_forward = on_forward
        self.on_batch = on_batch
        self._keys: dict[Hashable, deque[Job[Any]]] = {}  # per key: the head runs, the rest wait
        self._running: list[Job[Any]] = []  # heads with a pending forward
        self._finished: list[Job[Any]] = []

    @property
    def idle(self) -> bool:
        return not self._running

    @property
    def waiting(self) -> int:
        """Jobs submitted that have not started a forward yet."""
        return sum(1 for q in self._keys.values() for j in q if j.started is None)

    def add(self, job: Job[Any]) -> None:
        """Queue ``job`` behind the earlier jobs of its key (or start it)."""
        key = job.key if job.key is not None else ("job", job.seq)
        queue = self._keys.setdefault(key, deque())
        queue.append(job)
        if len(queue) == 1:
            self._start(key)

    def cancel(self, key: Hashable) -> list[Job[Any]]:
        """Drop every job of ``key`` (closing its program); returns them."""
        queue = self._keys.pop(key, None)
        if not queue:
            return []
        for job in queue:
            job.program.close()
            job.cancelled = job.done = True
            job.pending = None
        self._running = [j for j in self._running if not j.done]
        return list(queue)

    def _start(self, key: Hashable) -> None:
        """Prime the head job of ``key``; jobs that finish at once make way for the next."""
        queue = self._keys.get(key)
        while queue:
            job = queue[0]
            self._advance(job, None, first=True)
            if not job.done:
                self._running.append(job)
                return
            queue.popleft()
        self._keys.pop(key, None)

    def _advance(self, job: Job[Any], logits: torch.Tensor | None, first: bool = False) -> None:
        """Resume ``job``'s program until it needs a forward or ends."""
        send: torch.Tensor | None = logits
        try:
            while True:
                req = next(job.program) if first else job.program.send(send)
                first, send = False, None
                if isinstance(req, Emit):
                    job.emitted.append(req.value)
                    continue
                job.pending, job.fed = req, 0
                return
        except StopIteration as done:
            job.result = done.value
        except Exception as e:  # noqa: BLE001 - a program's failure is its job's result
            job.error = e
        job.pending, job.done = None, True
        self._finished.append(job)

    def _plan(self) -> list[tuple[Job[Any], int]]:
        """This iteration's work: ``(job, tokens to feed)``, short requests first, long ones
        chunked into what the budget leaves (a partial chunk leaves at least ``keep`` tokens
        for the last one, which returns the logits)."""
        budget = self.max_tokens if self.max_tokens is not None else float("inf")
        plan: list[tuple[Job[Any], int]] = []
        for job in sorted(self._running, key=lambda j: (j.remaining, j.seq)):
            assert job.pending is not None
            rem = job.remaining
            take = rem if rem <= budget else min(int(budget), rem - job.pending.keep)
            if take <= 0:
                if plan:
                    continue
                take = rem  # nothing else runs: a request longer than the budget goes whole
            plan.append((job, take))
            budget -= take
            if budget <= 0:
                break
        return plan

    def step(self) -> list[Job[Any]]:
        """One iteration: one forward per model over the planned work. Returns the jobs that
        finished since the last step (done, failed or cancelled ones excluded)."""
        groups: dict[tuple[int, bool], list[tuple[Job[Any], int]]] = {}
        for job, take in self._plan():
            assert job.pending is not None
            model = job.pending.cache._model
            groups.setdefault((id(model), job.pending.on_device), []).append((job, take))
        for (_, on_device), group in groups.items():
            self._forward(group, on_device)
        self._running = [j for j in self._running if not j.done]
        for job in list(self._finished):
            self._next_of(job)
        finished, self._finished = self._finished, []
        return finished

    def _next_of(self, job: Job[Any]) -> None:
        key = job.key if job.key is not None else ("job", job.seq)
        queue = self._keys.get(key)
        if queue and queue[0] is job:
            queue.popleft()
            if queue:
                self._start(key)
            else:
                self._keys.pop(key, None)

    def _forward(self, group: list[tuple[Job[Any], int]], on_device: bool) -> None:
        reqs = [job.pending for job, _ in group]
        assert all(r is not None for r in reqs)
        model = reqs[0].cache._model  # type: ignore[union-attr]
        tokens, keep = [], []
        for (job, take), req in zip(group, reqs, strict=True):
            assert req is not None
            tokens.append(req.tokens[job.fed : job.fed + take])
            keep.append(req.keep if job.fed + take == len(req.tokens) else 0)
        t0 = time.perf_counter()
        waits = tuple(t0 - job.submitted for job, _ in group if job.started is None)
        for job, _ in group:
            if job.started is None:
                job.started = t0
        try:
            outs = model.forward_batch(
                [r.cache for r in reqs],  # type: ignore[union-attr]
                tokens,
                self.on_batch,
                keep=keep,
                on_device=on_device,
            )
        except Exception as e:  # the forward's failure fails its jobs alone
            log.exception("a batched forward failed; its %d jobs fail", len(group))
            for job, _ in group:
                job.program.close()
                job.error, job.pending, job.done = e, None, True
                self._finished.append(job)
            return
        seconds = time.perf_counter() - t0
        if self.on_forward is not None:
            self.on_forward(
                ForwardStats(model, len(group), sum(len(t) for t in tokens), seconds, waits)
            )
        for (job, take), logits in zip(group, outs, strict=True):
            job.compute_s += seconds
            job.fed += take
            if job.pending is not None and job.fed == len(job.pending.tokens):
                self._advance(job, logits)

    def run_all(self) -> None:
        """Step until every job has ended (the synchronous use: :func:`run_batched`)."""
        while not self.idle:
            self.step()


def run_batched(
    programs: list[tuple[Hashable, Program[Any]]],
    on_batch: Callable[[int], None] | None = None,
) -> list[Job[Any]]:
    """Run ``(key, program)`` pairs to the end on the calling thread, sharing forwards among
    keys (a key's programs in order); returns their jobs, in the order given."""
    batcher = Batcher(on_batch=on_batch)
    jobs = [Job(program, key) for key, program in programs]
    for job in jobs:
        batcher.add(job)
    batcher.run_all()
    return jobs


class ModelThread:
    """One thread that owns a model and runs a :class:`Batcher` for the event loop.

    :meth:`submit` (on the loop) returns an awaitable :class:`Job`; values a program emits go
    to its ``on_emit`` on the loop, in order, before its result. ``initializer`` runs first on
    the thread (e.g. the drafter's idle CPU priority).
    """

    def __init__(
        self,
        name: str,
        max_tokens: int | None = None,
        initializer: Callable[[], None] | None = None,
        on_forward: Callable[[ForwardStats], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.batcher = Batcher(max_tokens, on_forward, on_batch)
        self._initializer = initializer
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._staged: list[tuple[str, Any]] = []
        self._flush_scheduled = False
        self._stopping = False
        self.queued = 0  # the batcher's waiting jobs after the last iteration
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the event loop's side -------------------------------------------------------------
    def submit(
        self,
        program: Program[T],
        key: Hashable | None = None,
        on_emit: Callable[[Any], None] | None = None,
    ) -> Job[T]:
        """Queue ``program`` (behind the earlier ones of ``key``); await the job for its
        result (its exception, if it raised)."""
        loop = self._ensure_started()
        job: Job[T] = Job(program, key, on_emit)
        job.future = loop.create_future()
        self._stage(("add", job))
        return job

    def cancel(self, key: Hashable) -> None:
        """Drop the jobs of ``key`` submitted so far (their programs are closed, their futures
        cancelled); later submissions of the key run as usual."""
        self._stage(("cancel", key))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the model thread in its turn (loading, warm-up)."""
        return await self.submit(call(fn, *args))

    @property
    def waiting(self) -> int:
        """Jobs submitted that have not started a forward yet (as of the last iteration, plus
        those handed over since)."""
        return self.queued + len(self._inbox) + len(self._staged)

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        assert self._loop is not None
        return self._loop

    def _stage(self, item: tuple[str, Any]) -> None:
        """Hold a submission until the loop's current pass ends (see the module docstring)."""
        loop = self._ensure_started()
        self._staged.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        with self._cond:
            self._inbox.extend(self._staged)
            self._cond.notify()
        self._staged = []

    def stop(self) -> None:
        """Stop the thread after its current iteration (outstanding jobs are abandoned)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _deliver(self, jobs: list[tuple[Job[Any], list[Any]]]) -> None:
        """On the loop: hand out emitted values, then results."""
        for job, values in jobs:
            if job.on_emit is not None and not job.cancelled:
                for v in values:
                    try:
                        job.on_emit(v)
                    except Exception:  # one callback must not stop the rest
                        log.exception("on_emit of a model-thread job failed")
            fut = job.future
            if fut is None or fut.done() or not job.done:
                continue
            if job.cancelled:
                fut.cancel()
            elif job.error is not None:
                fut.set_exception(job.error)
            else:
                fut.set_result(job.result)

    # --- the thread's side -------------------------------------------------------------------
    def _main(self) -> None:
        if self._initializer is not None:
            self._initializer()
        b = self.batcher
        while True:
            with self._cond:
                while not self._inbox and b.idle and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                events, self._inbox = self._inbox, []
            out: list[tuple[Job[Any], list[Any]]] = []
            for kind, item in events:
                if kind == "add":
                    b.add(item)
                else:
                    out.extend((j, []) for j in b.cancel(item))
            finished = b.step()
            touched = {id(j): j for j in finished}
            for job in b._running:
                if job.emitted:
                    touched[id(job)] = job
            for job in touched.values():
                values, job.emitted = job.emitted, []
                out.append((job, values))
            self.queued = b.waiting
            if out and self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._deliver, out)
                except RuntimeError:  # the loop closed meanwhile
                    return
