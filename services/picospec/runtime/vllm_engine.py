"""The verifier's target on vLLM (``PICOSPEC_VERIFIER_BACKEND=vllm``): vLLM's engine in the
verifier process, through its public engine API with token-id prompts.

**Why prompt log-probabilities.** A verification round needs the target's distribution at each
position of a block. vLLM's own speculative decoding verifies *its* proposer's tokens with *its*
rejection sampler, which would replace PicoSpec's separate rejection sampling (the ``q(x)``
scalars, the sparse ``p_j``, the position-keyed randomness); a custom logits processor sees only
the positions being sampled, not a block's; reaching into the model runner breaks with tensor
and pipeline parallelism across processes. What keeps every guarantee is the public API:

* A round is one request whose prompt is the session's verified tokens plus the block's
  (``TokensPrompt``), with ``prompt_logprobs=K`` for the block's positions and one generated
  token whose ``logprobs=K`` give the position after the block. ``max_tokens=1``; nothing is
  detokenised.
* **Prefix caching** keeps the cost of a round to its new tokens: the session's earlier tokens
  are in vLLM's content-addressed KV cache (in whole blocks), and
  ``skip_reading_prefix_cache=False`` lets a request with prompt log-probabilities read it (vLLM
  skips the cache for such requests by default, because cached positions get no log-probs).
  The rows a round reads always lie past what was cached (the block's tokens are new); where
  vLLM reports more cached tokens than that, the round is re-run without the cache.
* **A rollback is free**: the session is its list of verified tokens (:class:`TokenCache`); a
  rejection truncates it, and the next round's prompt shares the cached prefix up to there.
  Failover by re-prefill, drain and the session rules are the verifier's, unchanged.
* **The rows.** vLLM returns, per position, the top ``K`` log-probabilities plus the prompt
  token's own. :func:`dense_row` turns them into a full-vocabulary row of log-probabilities (the
  verifier's maths takes logits; log-probabilities differ from them by a constant per row) with
  the remaining mass spread evenly over the other ids. So: greedy verification is exact (the
  argmax is among the top ``K``); the draft token's ``p(x)`` is exact (its own log-prob is
  returned); a request whose sampling support fits in ``K`` (``top_k <= K``) is exact at any
  temperature; otherwise the mass outside ``K`` is approximated evenly, and it travels as the
  compressed ``p_j``'s tail mass, summed per response (``tail_mass``) as compression's is.
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
import time
from collections.abc import AsyncIterator, Callable, Collection, Hashable
from typing import Any

import torch

from picospec.runtime.scheduler import Emit, Forward, ForwardStats, Job, Program

log = logging.getLogger(__name__)
_ids = itertools.count()


class TokenCache:
    """A session's verified tokens: all the vLLM backend keeps of a session (vLLM's prefix
    cache holds the keys and values, addressed by content)."""

    layout = "vllm"

    def __init__(self, model: VllmTarget) -> None:
        self._model = model
        self.tokens: list[int] = []

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


def dense_row(known: dict[int, float], vocab: int) -> torch.Tensor:
    """A full-vocabulary row of log-probabilities from the ones vLLM returned (``known``): the
    rest of the mass spread evenly over the other ids (``-inf`` when nothing is left)."""
    ids = torch.tensor(list(known), dtype=torch.long)
    lps = torch.tensor(list(known.values()), dtype=torch.float64)
    rest = max(0.0, 1.0 - float(lps.exp().sum()))
    others = vocab - len(known)
    fill = math.log(rest / others) if rest > 1e-12 and others > 0 else float("-inf")
    row = torch.full((vocab,), fill, dtype=torch.float32)
    row[ids] = lps.float()
    return row


def _known(position: Any) -> dict[int, float]:
    """``{token id: log-prob}`` of one position of a vLLM output."""
    return {int(t): float(lp.logprob) for t, lp in position.items()}


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

    @classmethod
    async def start(cls, settings: Any) -> VllmTarget:
        """Start vLLM's engine on ``settings.model`` (its engine core in a process of its own;
        the event loop stays free meanwhile)."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from picospec.runtime.vllm_env import model_dir

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
        if settings.vllm_block_size:
            kwargs["block_size"] = settings.vllm_block_size
        args = AsyncEngineArgs(**kwargs)
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        log.info("vLLM serves %s (%s)", settings.model, path)
        return cls(settings, engine, tokenizer, settings.model)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()

    # --- what a verifier session asks of its model ------------------------------------------
    def new_cache(self, capacity: int | None = None) -> TokenCache:
        return TokenCache(self)

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
        out = await self._rows_request(prompt, req.keep, read_cache=True)
        if out.num_cached_tokens and out.num_cached_tokens > first:
            out = await self._rows_request(prompt, req.keep, read_cache=False)
        rows = []
        for pos in range(first, len(prompt) - 1):  # prompt_logprobs[i]: token i's distribution
            rows.append(dense_row(_known(out.prompt_logprobs[pos + 1]), self.vocab_size))
        rows.append(dense_row(_known(out.outputs[0].logprobs[0]), self.vocab_size))
        cache.tokens.extend(req.tokens)
        return torch.stack(rows)

    async def _rows_request(self, prompt: list[int], keep: int, read_cache: bool) -> Any:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=self.rows_k,
            prompt_logprobs=self.rows_k if keep > 1 else None,
            skip_reading_prefix_cache=not read_cache,
            detokenize=False,
        )
        out = None
        async for item in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"rows-{next(_ids)}"
        ):
            out = item
        assert out is not None
        return out

    async def stream(
        self, prompt: list[int], sampling: Any, max_tokens: int, eos: Collection[int]
    ) -> AsyncIterator[int]:
        """vLLM's own decoding of ``prompt`` with the request's sampling (``ar``): its tokens,
        as they come, up to ``max_tokens`` or one of ``eos`` (included)."""
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
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt), params, rid
            ):
                for token in out.outputs[0].token_ids:
                    yield int(token)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.engine.abort(rid))


class VllmRunner:
    """Runs the verifier sessions' programs against vLLM, as the embedded runtime's model
    thread does (same ``submit``/``cancel``/``call``): each session's programs in order, the
    sessions concurrently, so vLLM's scheduler batches their requests."""

    def __init__(
        self, target: VllmTarget, on_forward: Callable[[ForwardStats], None] | None = None
    ) -> None:
        self.target = target
        self.on_forward = on_forward
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._tasks: dict[Hashable, set[asyncio.Task[Any]]] = {}
        self.queued = 0

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
    ) -> Job[int]:
        """vLLM's own decoding as a job: each token to ``on_emit``; the count as its result."""

        async def ar() -> Any:
            n = 0
            async for token in self.target.stream(prompt, sampling, max_tokens, eos):
                on_emit(token)
                n += 1
                if token in eos:
                    break
            return n

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
                    rows = await self.target.forward(req)
                    seconds = time.perf_counter() - t0
                    job.compute_s += seconds
                    if self.on_forward is not None:
                        waits = (t0 - job.submitted,) if job.compute_s == seconds else ()
                        self.on_forward(
                            ForwardStats(self.target, 1, len(req.tokens), seconds, waits)
                        )
                    req = program.send(rows)
            except StopIteration as done:
                return done.value
            finally:
                program.close()

        await self._guarded(job, body)
