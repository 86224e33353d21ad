"""The verifier's target on vLLM (``PICOSPEC_VERIFIER_BACKEND=vllm``): vLLM's engine in the
verifier process, through its public engine API with token-id prompts.

**Why prompt log-probabilities.** A verification round needs the target's distribution at each
position of a block. vLLM's own speculative decoding verifies *its* proposer's tokens with *its*
rejection sampler, which would replace PicoSpec's separate rejection sampling (the ``q(x)``
scalars, the sparse ``p_j``, the position-keyed randomness); a custom logits processor sees only
the positions being sampled, not a block's; reaching into the model runner breaks with tensor
and pipeline parallelism across processes. What keeps every guarantee is the public API:

* A round is one request whose prompt is the session's verified tokens plus the block's
  (``TokensPrompt``), with ``prompt_logprobs=k`` for the block's positions and one generated
  token whose ``logprobs=k`` give the position after the block. ``max_tokens=1``; nothing is
  detokenised; the log-probabilities come back flat (``flat_logprobs``: a few lists, not an
  object per entry). ``k`` is what the session's sampling needs (:meth:`VllmTarget.rows_top`):
  1 when greedy (the argmax; the draft token's own log-prob comes anyway), ``top_k`` when the
  support is bounded, else ``vllm_max_logprobs``.
* **Prefix caching** keeps the cost of a round to its new tokens: the session's earlier tokens
  are in vLLM's content-addressed KV cache (in whole blocks: on a CPU 32 tokens, the least its
  attention kernels take), and ``skip_reading_prefix_cache=False`` lets a request with prompt
  log-probabilities read it (vLLM skips the cache for such requests by default, because cached
  positions get no log-probs). Each session's requests carry a ``cache_salt`` of its own, so
  they hit only its own earlier blocks: the rows a round reads then always lie past what was
  cached (its own earlier rounds differ from this one from the block on). Without the salt a
  session would hit the blocks of another session with the same content (greedy answers to
  the same prompt) and every such round would have to be re-run without the cache; that re-run
  stays as a guard, counted in :attr:`VllmTarget.reruns`.
* **A rollback is free**: the session is its list of verified tokens (:class:`TokenCache`); a
  rejection truncates it, and the next round's prompt shares the cached prefix up to there.
  Failover by re-prefill, drain and the session rules are the verifier's, unchanged.
* **The rows.** vLLM returns, per position, the top ``k`` log-probabilities plus the prompt
  token's own. :func:`dense_row` turns them into a full-vocabulary row of log-probabilities (the
  verifier's maths takes logits; log-probabilities differ from them by a constant per row) with
  the remaining mass spread evenly over the other ids, each below the ``k``-th largest (as every
  id outside the top ``k`` truly is), so the top ``k`` stay the top ``k``. So: greedy
  verification is exact (the argmax is the top 1, or among the top ``1 + len(ban_ids)`` when ids
  are banned); a draft token's ``p(x)`` is exact (a prompt row holds its token's own log-prob;
  the row after the block holds the top ``k`` and vLLM's throwaway greedy token only); a request
  whose sampling support fits in ``k`` (``top_k <= vllm_max_logprobs``) is exact at any
  temperature; otherwise the mass outside the top ``vllm_max_logprobs`` is approximated evenly,
  and it travels as the compressed ``p_j``'s tail mass, summed per response (``tail_mass``) as
  compression's is. The rows are read from the end of vLLM's prompt log-probabilities (vLLM
  0.32 returns a row per prompt token, the cached ones unset), each checked to hold its token.
* **``ar`` is vLLM's own decoding**: one streaming request with the request's sampling and
  seed, stopped at the session's EOS ids, so the benchmark's cloud-only row is the engine users
  run.

Concurrent sessions' requests are batched by vLLM's scheduler (continuous batching); the
verifier submits them as they come (:class:`VllmRunner`), each session's in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Hashable
from typing import Any

import torch

from picospec.runtime.scheduler import Emit, Forward, ForwardStats, Job, Program

log = logging.getLogger(__name__)
_ids = itertools.count()

CPU_BLOCK_SIZE = 32
"""KV-cache block on a CPU when ``vllm_block_size`` is unset: the least vLLM's CPU attention
takes (multiples of 32; its own default is 128), as a round recomputes the last, partly filled
block (prefix-cache hits land on whole blocks)."""


class TokenCache:
    """A session's verified tokens: all the vLLM backend keeps of a session (vLLM's prefix
    cache holds the keys and values, addressed by content and by the session's ``salt``)."""

    layout = "vllm"

    def __init__(self, model: VllmTarget) -> None:
        self._model = model
        self.tokens: list[int] = []
        self.salt = f"picospec-{secrets.token_hex(8)}"  # vLLM's cache_salt: this session only
        self.top = model.rows_k  # each row's top entries vLLM returns (use_sampling narrows it)

    def use_sampling(self, params: Any) -> None:
        """Ask vLLM for no more of each row than ``params`` need (:meth:`VllmTarget.rows_top`);
        the verifier session calls it with its sampling."""
        self.top = self._model.rows_top(params)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return len(self.tokens)

    def crop(self, length: int) -> None:
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot crop a cache of {len(self.tokens)} tokens to {length}")
        del self.tokens[length:]

    def nbytes(self) -> int:
        return 0  # vLLM accounts for its own KV cache (vllm:kv_cache_usage_perc)

    used_bytes = nbytes


def dense_row(known: dict[int, float], vocab: int, top: int = 1) -> torch.Tensor:
    """A full-vocabulary row of log-probabilities from the ones vLLM returned (``known``: the
    row's ``top`` most likely ids, and the prompt token's own): the rest of the mass spread
    evenly over the other ids (``-inf`` when nothing is left).

    Every other id lies outside the top ``top``, so its probability is at most the ``top``-th
    largest; so is their mean, the spread value. It is kept strictly below that entry (float
    rounding or an exact tie could otherwise lift it to it), so the top ``top`` ids stay the
    most likely, in order: the argmax, and with ``top = 1 + len(ban_ids)`` the argmax after a
    ban, are exact."""
    ids = torch.tensor(list(known), dtype=torch.long)
    lps = torch.tensor(list(known.values()), dtype=torch.float64)
    rest = max(0.0, 1.0 - float(lps.exp().sum()))
    others = vocab - len(known)
    row = torch.full((vocab,), float("-inf"), dtype=torch.float32)
    if rest > 1e-12 and others > 0:
        fill = torch.tensor(math.log(rest / others), dtype=torch.float32)
        kth = torch.topk(lps.float(), min(max(top, 1), len(known))).values[-1]
        row.fill_(float(torch.minimum(fill, torch.nextafter(kth, torch.tensor(-math.inf)))))
    row[ids] = lps.float()
    return row


def _known(seq: Any, i: int) -> dict[int, float]:
    """``{token id: log-prob}`` of entry ``i`` of vLLM's log-probabilities: the flat form
    (``flat_logprobs``, read from its lists) or a list of ``{id: Logprob}``."""
    if hasattr(seq, "start_indices"):  # vllm.logprobs.FlatLogprobs
        a, b = seq.start_indices[i], seq.end_indices[i]
        return dict(zip(seq.token_ids[a:b], seq.logprobs[a:b], strict=True))
    return {int(t): float(lp.logprob) for t, lp in (seq[i] or {}).items()}


def prompt_rows(logprobs: Any, prompt: list[int], n: int) -> list[dict[int, float]]:
    """The last ``n`` rows of a request's prompt log-probabilities, read from the end: row
    ``i`` of ``prompt`` is the distribution of ``prompt[i]``, whether vLLM returned a row per
    prompt token (0.32: the first ``None``, the cached ones unset) or only the computed ones.
    Each row must hold its own token (vLLM always returns it): otherwise they are misaligned."""
    if n <= 0:
        return []
    have = 0 if logprobs is None else len(logprobs)
    if not n <= have <= len(prompt):
        raise RuntimeError(
            f"vLLM returned {have} prompt log-probability rows for a {len(prompt)}-token "
            f"prompt; the round reads its last {n}"
        )
    rows = []
    for i in range(have - n, have):
        known = _known(logprobs, i)
        token = prompt[len(prompt) - have + i]
        if token not in known:
            raise RuntimeError(
                f"vLLM's prompt log-probabilities are misaligned: the row of position "
                f"{len(prompt) - have + i} lacks its token {token}"
            )
        rows.append(known)
    return rows


class VllmTarget:
    """The target model as vLLM serves it: what :class:`~picospec.speculation.verifier.
    VerifierSession` needs of a model (vocabulary, context, caches), and the engine calls."""

    def __init__(self, settings: Any, engine: Any, tokenizer: Any, name: str) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        cfg = engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_context = int(cfg.max_model_len)
        self.pacer = None
        self.rows_k = int(settings.vllm_max_logprobs)
        self.reruns = 0  # rounds re-run without the prefix cache (none expected: the salt)

    @classmethod
    async def start(cls, settings: Any) -> VllmTarget:
        """Start vLLM's engine on ``settings.model`` (its engine core in a process of its own;
        the event loop stays free meanwhile). On a CPU: 32-token KV blocks unless
        ``vllm_block_size`` says otherwise, and the engine's processes start with tcmalloc and
        Intel OpenMP preloaded, as vLLM's CPU guide asks (:func:`~picospec.runtime.vllm_env.
        cpu_preload`; a warning where one is missing)."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from picospec.runtime.vllm_env import model_dir, preloaded

        path = model_dir(settings.model)
        if settings.vllm_cpu_kv_cache_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.vllm_cpu_kv_cache_gib)
        kwargs: dict[str, Any] = {
            "model": path,
            "dtype": settings.vllm_dtype,
            "tensor_parallel_size": settings.vllm_tensor_parallel_size,
            "pipeline_parallel_size": settings.vllm_pipeline_parallel_size,
            "quantization": settings.vllm_quantization,
            "max_model_len": settings.vllm_max_model_len,
            "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
            "enable_prefix_caching": settings.vllm_enable_prefix_caching,
            "max_logprobs": settings.vllm_max_logprobs,
            "enforce_eager": settings.vllm_enforce_eager,
            "seed": 0,
        }
        cpu = current_platform.is_cpu()
        block = settings.vllm_block_size or (CPU_BLOCK_SIZE if cpu else None)
        if block:
            kwargs["block_size"] = block
        args = AsyncEngineArgs(**kwargs)

        def start_engine() -> Any:
            with preloaded(enabled=cpu):  # the engine core and workers it spawns inherit it
                return AsyncLLM.from_engine_args(args)

        engine = await asyncio.to_thread(start_engine)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        log.info("vLLM serves %s (%s)", settings.model, path)
        return cls(settings, engine, tokenizer, settings.model)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()

    # --- what a verifier session asks of its model ------------------------------------------
    def new_cache(self, capacity: int | None = None) -> TokenCache:
        return TokenCache(self)

    def rows_top(self, params: Any) -> int:
        """How many of each row's most likely ids a session sampling with ``params`` needs
        from vLLM (the draft token's own log-prob comes besides): the argmax when greedy (and
        as many more as ids may be banned, :func:`~picospec.speculation.sampling.
        probs_from_logits`), the ``top_k`` (plus banned) when that bounds the support, else
        all ``vllm_max_logprobs``."""
        banned = len(params.ban_ids)
        if params.greedy:
            return min(self.rows_k, 1 + banned)
        if params.top_k:
            return min(self.rows_k, params.top_k + banned)
        return self.rows_k

    @property
    def eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        gen = getattr(self.engine.model_config, "hf_config", None)
        cfg_eos = getattr(gen, "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif isinstance(cfg_eos, list | tuple):
            ids.update(int(e) for e in cfg_eos)
        return frozenset(ids)

    def warm_up_prompt(self) -> list[int]:
        msgs = [{"role": "user", "content": "Say hello, briefly."}]
        try:
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(i) for i in ids]
        except Exception:  # noqa: BLE001 - no chat template: plain ids will do
            return [i % self.vocab_size for i in range(1, 17)]

    # --- the engine calls ------------------------------------------------------------------
    async def forward(self, req: Forward) -> torch.Tensor:
        """What ``req.cache.extend(req.tokens, req.keep)`` gives with the embedded runtime:
        the last ``keep`` rows (log-probabilities, :func:`dense_row`) of feeding ``tokens``
        after the session's verified ones; the cache then holds them too."""
        cache = req.cache
        assert isinstance(cache, TokenCache)
        prompt = cache.tokens + list(req.tokens)
        first = len(prompt) - req.keep  # the first position whose next distribution is read
        out = await self._rows_request(prompt, req.keep, cache.top, cache.salt, read_cache=True)
        if (out.num_cached_tokens or 0) > first:
            # the salt keeps other sessions' blocks out, so only a session that re-sends what
            # it sent before gets here: re-run without the cache, and never read a cached row
            self.reruns += 1
            log.warning(
                "vLLM had %d of a round's %d tokens cached, past its first row (%d): re-run "
                "without the prefix cache",
                out.num_cached_tokens,
                len(prompt),
                first,
            )
            out = await self._rows_request(
                prompt, req.keep, cache.top, cache.salt, read_cache=False
            )
            if (out.num_cached_tokens or 0) > first:
                raise RuntimeError(
                    f"vLLM reports {out.num_cached_tokens} cached tokens for a request that "
                    f"skips its prefix cache; the round needs the rows from position {first}"
                )
        read = prompt_rows(out.prompt_logprobs, prompt, req.keep - 1)
        read.append(_known(out.outputs[0].logprobs, 0))  # the position after the tokens
        cache.tokens.extend(req.tokens)
        return torch.stack([dense_row(known, self.vocab_size, cache.top) for known in read])

    async def _rows_request(
        self, prompt: list[int], keep: int, top: int, salt: str, read_cache: bool
    ) -> Any:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=top,
            prompt_logprobs=top if keep > 1 else None,
            skip_reading_prefix_cache=not read_cache,
            detokenize=False,
            flat_logprobs=True,
        )
        out = None
        async for item in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt, cache_salt=salt), params, f"rows-{next(_ids)}"
        ):
            out = item
        assert out is not None
        return out

    async def stream(
        self,
        prompt: list[int],
        sampling: Any,
        max_tokens: int,
        eos: Collection[int],
        salt: str | None = None,
    ) -> AsyncIterator[list[int]]:
        """vLLM's own decoding of ``prompt`` with the request's sampling (``ar``): its tokens,
        as each output brings them (one per engine step it took part in), up to
        ``max_tokens`` or one of ``eos`` (included). ``salt``: the session's cache salt, so
        the prompt its prefill cached is read back."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        min_tokens = max(0, sampling.ban_before - len(prompt)) if sampling.ban_ids else 0
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            min_p=sampling.min_p,
            seed=sampling.seed,
            ignore_eos=True,  # the session's EOS ids decide, as in every mode
            stop_token_ids=sorted(eos),
            min_tokens=min(min_tokens, max_tokens),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        rid = f"ar-{next(_ids)}"
        tokens = TokensPrompt(prompt_token_ids=prompt)
        if salt is not None:
            tokens["cache_salt"] = salt
        try:
            async for out in self.engine.generate(tokens, params, rid):
                yield [int(t) for t in out.outputs[0].token_ids]
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.engine.abort(rid))


class VllmRunner:
    """Runs the verifier sessions' programs against vLLM, as the embedded runtime's model
    thread does (same ``submit``/``cancel``/``call``): each session's programs in order, the
    sessions concurrently, so vLLM's scheduler batches their requests.

    ``on_forward`` sees the engine's work as the embedded runtime's forwards would show it
    (the verifier's cost line and load meter): each round as a request (``request=True``) of
    its tokens, and each step of vLLM's own decoding (``ar`` streams) as a one-token forward;
    ``sessions`` is how many requests the engine had in flight, which share its steps."""

    def __init__(
        self, target: VllmTarget, on_forward: Callable[[ForwardStats], None] | None = None
    ) -> None:
        self.target = target
        self.on_forward = on_forward
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._tasks: dict[Hashable, set[asyncio.Task[Any]]] = {}
        self.queued = 0
        self.in_flight = 0  # engine requests: rounds and ar streams

    def _report(self, tokens: int, seconds: float, sessions: int, **kw: Any) -> None:
        """``kw``: :class:`ForwardStats`'s ``queue_waits``, ``request``, ``shared``, ``end``."""
        if self.on_forward is not None:
            kw.setdefault("queue_waits", ())
            self.on_forward(ForwardStats(self.target, max(1, sessions), tokens, seconds, **kw))

    @property
    def waiting(self) -> int:
        return self.queued

    def submit(
        self,
        program: Program[Any],
        key: Hashable | None = None,
        on_emit: Callable[[Any], None] | None = None,
    ) -> Job[Any]:
        job: Job[Any] = Job(program, key, on_emit)
        job.future = asyncio.get_running_loop().create_future()
        self._spawn(job, self._drive(job))
        return job

    def stream_ar(
        self,
        prompt: list[int],
        sampling: Any,
        max_tokens: int,
        eos: Collection[int],
        key: Hashable,
        on_emit: Callable[[int], None],
        salt: str | None = None,
    ) -> Job[int]:
        """vLLM's own decoding as a job: each token to ``on_emit``; the count as its result."""

        async def ar() -> Any:
            n, last = 0, None
            self.in_flight += 1
            try:
                async for chunk in self.target.stream(prompt, sampling, max_tokens, eos, salt):
                    now = time.perf_counter()
                    if last is not None and chunk:  # the first output holds the prefill
                        # one step per token, one after the other (an output that brings
                        # several tokens covers all their steps)
                        step = (now - last) / len(chunk)
                        for i in range(len(chunk)):
                            end = last + (i + 1) * step
                            self._report(1, step, self.in_flight, shared=True, end=end)
                    last = now
                    for token in chunk:
                        on_emit(token)
                        n += 1
                        if token in eos:
                            return n
                return n
            finally:
                self.in_flight -= 1

        job: Job[int] = Job(None, key)  # type: ignore[arg-type]  # no program: vLLM decodes
        job.future = asyncio.get_running_loop().create_future()
        self._spawn(job, self._guarded(job, ar))
        return job

    def cancel(self, key: Hashable) -> None:
        for task in list(self._tasks.get(key, ())):
            task.cancel()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def stop(self) -> None:
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
        self.target.shutdown()

    # --- internals --------------------------------------------------------------------------
    def _spawn(self, job: Job[Any], coro: Any) -> None:
        key = job.key if job.key is not None else ("job", job.seq)
        task = asyncio.ensure_future(coro)
        self._tasks.setdefault(key, set()).add(task)

        def done(t: asyncio.Task[Any]) -> None:
            tasks = self._tasks.get(key)
            if tasks is not None:
                tasks.discard(t)
                if not tasks:
                    self._tasks.pop(key, None)
                    self._locks.pop(key, None)
            fut = job.future
            if fut is not None and not fut.done():
                fut.cancel()  # cancelled before it finished

        task.add_done_callback(done)

    async def _guarded(self, job: Job[Any], body: Callable[[], Any]) -> None:
        """Run ``body`` after the key's earlier jobs; set the job's outcome."""
        key = job.key if job.key is not None else ("job", job.seq)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self.queued += 1
        try:
            async with lock:
                self.queued -= 1
                job.started = time.perf_counter()
                try:
                    result = await body()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - a program's failure is its job's result
                    job.error, job.done = e, True
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(e)
                    return
                job.result, job.done = result, True
                if job.future is not None and not job.future.done():
                    job.future.set_result(result)
        finally:
            if job.started is None:
                self.queued -= 1

    async def _drive(self, job: Job[Any]) -> None:
        async def body() -> Any:
            program = job.program
            try:
                req = next(program)
                while True:
                    if isinstance(req, Emit):
                        if job.on_emit is not None:
                            job.on_emit(req.value)
                        req = program.send(None)
                        continue
                    t0 = time.perf_counter()
                    self.in_flight += 1
                    alongside = self.in_flight
                    try:
                        rows = await self.target.forward(req)
                    finally:
                        alongside = round((alongside + self.in_flight) / 2)
                        self.in_flight -= 1
                    seconds = time.perf_counter() - t0
                    job.compute_s += seconds
                    waits = (t0 - job.submitted,) if job.compute_s == seconds else ()
                    self._report(
                        len(req.tokens), seconds, alongside, queue_waits=waits, request=True
                    )
                    req = program.send(rows)
            except StopIteration as done:
                return done.value
            finally:
                program.close()

        await self._guarded(job, body)
