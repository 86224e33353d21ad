"""The OpenAI-compatible HTTP API the drafter serves (aiohttp).

``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``; streaming with
server-sent events ending in ``data: [DONE]``; errors in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Extensions: ``top_k``, ``min_p``,
``ignore_eos``, ``min_tokens`` and ``stream_options.continuous_usage_stats`` (vLLM's),
``mode``, ``draft_len`` in requests (and ``emulated_edge``, benchmarks only); a ``picospec``
object (acceptance, rounds, bytes…) in responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from picospec.config import Settings
from picospec.runtime.loading import model_from_settings
from picospec.runtime.model import LanguageModel, ModelError
from picospec.runtime.text import TextStream
from picospec.services import metrics
from picospec.services.drafter.requests import ChatRequest, CompletionRequest, Request
from picospec.services.drafter.service import BadRequest, DrafterService, Generation, Unavailable
from picospec.services.shell import event
from picospec.speculation.drafter import warm_up
from picospec.speculation.proposers import EmulatedEdge, Proposer, SuffixDraft
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode

MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


# paths that never need the API key: probes and Prometheus scrapes
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
TENANT = web.RequestKey("tenant", str)  # whose recent answers a suffix draft may match


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def api_key_middleware(keys: list[str], mode: str) -> Any:
    """Refuse every request but :data:`OPEN_PATHS` without ``Authorization: Bearer <key>``.

    Keys are compared as SHA-256 digests with :func:`hmac.compare_digest` against every
    configured key, so the time taken tells neither the key's length nor which key came
    close. Refusals are 401 in OpenAI's error shape and count in ``picospec_requests_total``.
    """
    digests = [_digest(k) for k in keys]

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = _digest(token.strip())
        ok = False
        for d in digests:
            ok |= hmac.compare_digest(given, d)
        if ok and scheme.lower() == "bearer":
            request[TENANT] = given.hex()[:32]
            return await handler(request)
        metrics.REQUESTS.labels(mode, "401").inc()
        event("request_unauthorized", logging.WARNING, path=request.path, remote=request.remote)
        message = (
            "Incorrect API key provided."
            if token
            else "Missing API key: send it as 'Authorization: Bearer <key>'."
        )
        return ApiError(
            401,
            message,
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="picospec"'},
        ).response()

    return check


class Api:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api_keys = settings.api_keys()  # read once: a bad keys file fails at start
        self.svc: DrafterService | None = None
        self.model: LanguageModel | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)

    def attach(self, svc: DrafterService, model: LanguageModel) -> None:
        self.svc, self.model = svc, model

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        """Backpressure: at most ``max_concurrent_requests`` generations run; the next ones
        wait up to ``queue_timeout_s`` for a slot, then get 429 with ``Retry-After``."""
        metrics.REQUESTS_WAITING.inc()
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.settings.queue_timeout_s)
        except TimeoutError:
            raise ApiError(
                429,
                f"all {self.settings.max_concurrent_requests} generation slots are busy; retry",
                "rate_limit_error",
                code="overloaded",
                headers={"Retry-After": str(max(1, round(self.settings.queue_timeout_s)))},
            ) from None
        finally:
            metrics.REQUESTS_WAITING.dec()
        metrics.REQUESTS_RUNNING.inc()
        try:
            yield
        finally:
            metrics.REQUESTS_RUNNING.dec()
            self._slots.release()

    @property
    def ready(self) -> bool:
        return self.svc is not None and self.model is not None

    def _require_ready(self) -> tuple[DrafterService, LanguageModel]:
        if self.svc is None or self.model is None:
            raise ApiError(
                503,
                "the server is starting or stopping; retry shortly",
                "service_unavailable",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        return self.svc, self.model

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
        ]

    async def models(self, _: web.Request) -> web.Response:
        try:
            _, model = self._require_ready()
        except ApiError as e:
            return e.response()
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.settings.served_model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "picospec",
                        "max_model_len": model.max_context,
                    }
                ],
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, ChatRequest, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, CompletionRequest, chat=False)

    # --- request handling ---------------------------------------------------------------
    async def _parse(self, request: web.Request, cls: type[Request]) -> Request:
        if request.content_length and request.content_length > MAX_BODY_BYTES:
            raise ApiError(
                413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error"
            )
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(
                413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error"
            )
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _invalid(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise _invalid("the body is nested too deeply") from None
        if not isinstance(body, dict):
            raise _invalid("the body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise _invalid(f"{param}: {first['msg']}", param) from None
        if req.model != self.settings.served_model_name:
            raise ApiError(
                404,
                f"the model '{req.model}' does not exist; this server serves "
                f"'{self.settings.served_model_name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return req

    @staticmethod
    def _prompt(model: LanguageModel, req: Request) -> list[int]:
        try:
            if isinstance(req, ChatRequest):
                msgs = [{"role": m.role, "content": m.content} for m in req.messages]
                ids = model.encode_chat(msgs)
            else:
                assert isinstance(req, CompletionRequest)
                ids = model.encode(req.prompt)
        except ModelError as e:
            raise _invalid(str(e)) from None
        except (TypeError, ValueError) as e:  # e.g. lone surrogates the tokenizer cannot encode
            raise _invalid(f"the text cannot be tokenized: {e}") from None
        if not ids:
            raise _invalid("the prompt is empty", "prompt")
        return ids

    async def _handle(
        self, request: web.Request, cls: type[Request], chat: bool
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        mode = self.settings.mode
        try:
            svc, model = self._require_ready()
            req = await self._parse(request, cls)
            mode = req.mode or self.settings.mode
            prompt = self._prompt(model, req)
            limit = model.max_context
            max_tokens = (
                getattr(req, "max_completion_tokens", None)
                or req.max_tokens
                or min(self.settings.max_tokens_limit, limit - len(prompt))
            )
            if max_tokens > self.settings.max_tokens_limit:
                raise _invalid(
                    f"max_tokens {max_tokens} is over this server's limit "
                    f"{self.settings.max_tokens_limit}",
                    "max_tokens",
                )
            if len(prompt) + max_tokens > limit:
                raise _invalid(
                    f"the prompt ({len(prompt)} tokens) plus max_tokens "
                    f"({max_tokens}) exceeds the context of {limit} tokens",
                    "messages" if chat else "prompt",
                )
            if req.min_tokens > max_tokens:
                raise _invalid(
                    f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                    "min_tokens",
                )
            params = req.sampling()
            if req.min_tokens and not req.ignore_eos:
                # the same ban in the draft's and the target's distributions: still exact
                params = params.model_copy(
                    update={
                        "ban_ids": tuple(sorted(model.eos_ids)),
                        "ban_before": len(prompt) + req.min_tokens,
                    }
                )
            fallback = (req.fallback or self.settings.fallback) == "edge"
            spec = self.settings.spec(mode, req.draft_len, req.draft)
            tenant = request.get(TENANT, "open")
            proposer: Proposer | None = None
            if req.emulated_edge is not None:
                proposer = self._emulated_edge(svc, req, prompt, params, spec.mode, model)
            else:
                proposer = self._suffix(svc, req.draft or self.settings.draft, mode, tenant)
            gen = svc.generation(
                prompt, params, spec, max_tokens, fallback, req.ignore_eos, proposer, tenant
            )
            metrics.PROMPT_TOKENS.labels(mode.value).inc(len(prompt))
            async with self._admission():
                if req.stream:
                    return await self._stream(request, req, gen, chat, t0, model)
                return await self._complete(req, gen, chat, t0, model)
        except ApiError as e:
            metrics.REQUESTS.labels(mode.value, str(e.status)).inc()
            return e.response()

    def _suffix(
        self, svc: DrafterService, draft: str, mode: Mode, tenant: str
    ) -> SuffixDraft | None:
        """The suffix draft of a request that uses one (``draft``: ``suffix`` alone, which
        only picospec mode can run, or ``model+suffix``), matching also against the tenant's
        recent answers at this site."""
        if draft == "model" or not mode.speculative:
            return None
        if draft == "suffix" and mode is not Mode.PICOSPEC:
            raise _invalid(
                f"the suffix draft alone (no draft model) runs in mode picospec, not "
                f"{mode.value}: use draft 'model+suffix'",
                "draft",
            )
        history = svc.suffix_cache.answers(tenant)
        return SuffixDraft(min_match=self.settings.suffix_min_match, history=history)

    @staticmethod
    def _emulated_edge(
        svc: DrafterService,
        req: Request,
        prompt: list[int],
        params: SamplingParams,
        mode: Mode,
        model: LanguageModel,
    ) -> EmulatedEdge:
        """The draft of a request that stands for an emulated edge device (400 where this
        drafter does not take them, or cannot)."""
        e = req.emulated_edge
        assert e is not None
        if svc.recorder is None:
            raise _invalid(
                "emulated_edge needs a drafter started with PICOSPEC_EMULATED_EDGES=true",
                "emulated_edge",
            )
        if not mode.speculative:
            raise _invalid(f"emulated_edge drafts, and mode {mode.value} does not", "mode")
        if not params.greedy:
            raise _invalid("emulated_edge replays the greedy answer: temperature must be 0")
        continuation = svc.recorder.get(prompt)
        if continuation is None:
            raise _invalid(
                "emulated_edge: no recorded answer for this prompt; send it once with "
                "mode 'ar', temperature 0 first",
                "emulated_edge",
            )
        return EmulatedEdge(continuation, e.acceptance, e.step_s, model.vocab_size, e.seed)

    async def _run(
        self, gen: Generation, req: Request, t0: float, model: LanguageModel
    ) -> AsyncIterator[str]:
        """Yield text deltas; maps cloud failures to API errors."""
        text = TextStream(model.decode, req.stop or [])  # type: ignore[arg-type]
        last = None
        mode = gen.spec.mode.value
        try:
            async with contextlib.aclosing(gen.tokens()) as tokens:
                async for ids in tokens:
                    now = time.perf_counter()
                    if last is None:
                        metrics.TTFT.labels(mode).observe(now - t0)
                    else:
                        for _ in ids:
                            metrics.ITL.labels(mode).observe((now - last) / len(ids))
                    last = now
                    metrics.GENERATED.labels(mode).inc(len(ids))
                    delta = text.push(ids)
                    if text.stopped:
                        gen.stop()
                    if delta:
                        yield delta
                    if text.stopped:
                        break
        except Unavailable as e:
            raise ApiError(
                503,
                f"the cloud verifier is unreachable: {e}",
                "service_unavailable",
                code="cloud_unreachable",
                headers={"Retry-After": "5"},
            ) from None
        except BadRequest as e:
            raise _invalid(str(e)) from None
        tail = text.finish()
        if tail:
            yield tail
        if text.stopped:
            gen.finish_reason = "stop"
        metrics.E2E.labels(mode).observe(time.perf_counter() - t0)

    @staticmethod
    def _headers(gen: Generation) -> dict[str, str]:
        """``X-Picospec-Verified: false`` marks answers (partly) from the draft model alone. A
        stream that degrades after its first token says so in its final chunk's ``picospec``."""
        verified = gen.stats.verified and gen.spec.mode is not Mode.EDGE
        return {
            "X-Picospec-Mode": gen.spec.mode.value,
            "X-Picospec-Verified": "true" if verified else "false",
        }

    def _usage(self, gen: Generation) -> dict[str, int]:
        n = len(gen.generated)
        return {
            "prompt_tokens": len(gen.prompt),
            "completion_tokens": n,
            "total_tokens": len(gen.prompt) + n,
        }

    async def _complete(
        self, req: Request, gen: Generation, chat: bool, t0: float, model: LanguageModel
    ) -> web.Response:
        parts = [d async for d in self._run(gen, req, t0, model)]
        text = "".join(parts)
        metrics.REQUESTS.labels(gen.spec.mode.value, "200").inc()
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": gen.finish_reason or "stop",
            "logprobs": None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{gen.request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "usage": self._usage(gen),
            "picospec": gen.stats.as_dict(),
        }
        event(
            "request_done",
            mode=gen.spec.mode.value,
            tokens=len(gen.generated),
            elapsed_s=round(gen.stats.elapsed_s, 3),
        )
        return web.json_response(body, headers=self._headers(gen))

    async def _stream(
        self,
        request: web.Request,
        req: Request,
        gen: Generation,
        chat: bool,
        t0: float,
        model: LanguageModel,
    ) -> web.StreamResponse:
        # wait for the first text before answering, so a cloud that cannot be reached at all
        # still gets a plain 503 (or 400) instead of an event stream holding an error
        async with contextlib.aclosing(self._run(gen, req, t0, model)) as deltas:
            return await self._stream_events(request, req, gen, chat, deltas)

    async def _stream_events(
        self,
        request: web.Request,
        req: Request,
        gen: Generation,
        chat: bool,
        deltas: AsyncIterator[str],
    ) -> web.StreamResponse:
        first_delta = await anext(deltas, "")
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **self._headers(gen),
            }
        )
        await resp.prepare(request)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{gen.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        chunk = functools.partial(_stream_chunk, head, chat)

        # vLLM's stream_options.continuous_usage_stats: the usage so far in every chunk (a
        # client can then tell how many tokens each chunk carried)
        every = bool((req.stream_options or {}).get("continuous_usage_stats"))

        async def send(obj: dict[str, Any] | str) -> None:
            if every and isinstance(obj, dict) and "usage" not in obj and "error" not in obj:
                obj["usage"] = self._usage(gen)
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await resp.write(f"data: {data}\n\n".encode())

        status = "200"
        try:
            if chat:
                await send(chunk("", None, first=True))
            if first_delta:
                await send(chunk(first_delta, None))
            async for delta in deltas:
                await send(chunk(delta, None))
            final = chunk(None if chat else "", gen.finish_reason or "stop")
            final["usage"] = self._usage(gen)
            final["picospec"] = gen.stats.as_dict()
            await send(final)
            await send("[DONE]")
        except ApiError as e:
            status = str(e.status)
            await send(
                {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
            )
            await send("[DONE]")
        except ConnectionResetError:
            # the client went away: closing the generators (aclosing) closes the session now
            gen.stop()
            metrics.REQUESTS.labels(gen.spec.mode.value, "499").inc()
            event("client_gone", mode=gen.spec.mode.value, tokens=len(gen.generated))
            return resp
        except asyncio.CancelledError:
            gen.stop()
            metrics.REQUESTS.labels(gen.spec.mode.value, "499").inc()
            raise
        metrics.REQUESTS.labels(gen.spec.mode.value, status).inc()
        await resp.write_eof()
        event(
            "request_done",
            level=logging.INFO,
            mode=gen.spec.mode.value,
            tokens=len(gen.generated),
            status=status,
        )
        return resp


def _stream_chunk(
    head: dict[str, Any], chat: bool, delta: str | None, finish: str | None, first: bool = False
) -> dict[str, Any]:
    """One chunk of a streamed answer, in OpenAI's shape: ``head`` (id, object, created,
    model) and its one choice (a chat's first chunk names the assistant's role)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        d: dict[str, str] = {"role": "assistant"} if first else {}
        if delta is not None:
            d["content"] = delta
        choice["delta"] = d
    else:
        choice["text"] = delta or ""
    return {**head, "choices": [choice]}


def application(api: Api, extra_routes: Sequence[web.RouteDef] = ()) -> web.Application:
    """The drafter's aiohttp application: the API's routes (behind the API key when one is
    configured) and ``extra_routes`` (health, readiness, metrics)."""
    middlewares = []
    if api.api_keys:
        middlewares.append(api_key_middleware(api.api_keys, api.settings.mode.value))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app.add_routes(extra_routes)
    app.add_routes(api.routes())
    return app


async def main(settings: Settings, stop: asyncio.Event) -> None:
    from picospec.services.shell import connect_nats, health_routes, serve_http

    api = Api(settings)
    app = application(api, health_routes(lambda: api.ready))
    runner = await serve_http(app, settings.host, settings.port)  # /health while loading
    model = await asyncio.get_running_loop().run_in_executor(
        None, model_from_settings, settings, "draft"
    )
    nc = await connect_nats(settings, "drafter")
    svc = DrafterService(settings, nc, model)
    # first-touch costs before ready (on the model thread), so the first request is as fast
    # as the hundredth
    await svc.thread.call(warm_up, model)
    if model.pacer is not None:
        model.pacer.on_pace = metrics.observe_pace
    await svc.start()
    metrics.set_build_info("drafter", model.name, svc.id, settings.site)
    api.attach(svc, model)
    event(
        "ready",
        drafter=svc.id,
        model=model.name,
        url=f"http://{settings.host}:{settings.port}/v1",
        api_keys=len(api.api_keys),
    )
    await stop.wait()
    api.svc = None  # not ready: new requests get 503 while in-flight ones finish
    await runner.shutdown()
    await runner.cleanup()
    await nc.drain()
