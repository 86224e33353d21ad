"""The verifier's engines: one face over PicoSpec's own runtime and over vLLM.

:class:`EmbeddedBackend` runs the target on PicoSpec's runtime (one device; its model thread
schedules every session's prefills, ``ar`` steps and blocks); :class:`VllmBackend` runs it in
vLLM's engine (:mod:`picospec.runtime.vllm_engine`). :func:`make_backend` picks the one
``verifier_backend`` names; the service (:mod:`picospec.services.verifier.service`) sees only
the face: ``load``, ``warm_up``, ``submit``, ``start_ar``, ``start_led``, ``cancel``,
``waiting``, ``stop``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from picospec.config import Settings
from picospec.protocol.codec import DraftBlock
from picospec.runtime.loading import model_from_settings
from picospec.runtime.model import LanguageModel
from picospec.runtime.scheduler import ForwardStats, Job, ModelThread, Program
from picospec.runtime.vllm_engine import VllmRunner, VllmTarget
from picospec.services import metrics
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig
from picospec.speculation.verifier import VerifierSession, warm_up


class EmbeddedBackend:
    """PicoSpec's own runtime: the target on one device, its model thread the scheduler of
    every session's prefills, ``ar`` steps and blocks (the default ``transformers`` backend).
    The vLLM backend (:class:`VllmBackend`) has the same face."""

    def __init__(self, settings: Settings, on_forward: Callable[[ForwardStats], None]) -> None:
        self.settings = settings
        self.model: LanguageModel | None = None
        self.thread = ModelThread(
            "verify",
            settings.max_batch_tokens,
            on_forward=on_forward,
            on_batch=metrics.BATCH_SIZE.observe,
        )

    async def load(self, model: LanguageModel | None = None) -> LanguageModel:
        self.model = model or await self.thread.call(model_from_settings, self.settings, "verify")
        return self.model

    async def warm_up(self) -> list[tuple[int, float]]:
        """First-touch costs before ready, so the first request is as fast as the hundredth."""
        return await self.thread.call(warm_up, self.model)

    def submit(self, program: Program[Any], key: Hashable) -> Job[Any]:
        return self.thread.submit(program, key=key)

    def start_ar(
        self, vs: VerifierSession, n: int, eos: set[int], key: Hashable, on_emit: Any
    ) -> Job[int]:
        return self.thread.submit(vs.ar_stream(n, eos), key=key, on_emit=on_emit)

    def start_led(
        self, vs: VerifierSession, n: int, eos: set[int], key: Hashable, on_emit: Any
    ) -> Job[int]:
        """A cloud-led session's stream (:meth:`VerifierSession.led_stream`)."""
        return self.thread.submit(vs.led_stream(n, eos), key=key, on_emit=on_emit)

    def cancel(self, key: Hashable) -> None:
        self.thread.cancel(key)

    @property
    def waiting(self) -> int:
        return self.thread.waiting

    def stop(self) -> None:
        self.thread.stop()


def make_backend(settings: Settings, on_forward: Callable[[ForwardStats], None]) -> Any:
    """The engine ``settings.verifier_backend`` names."""
    if settings.verifier_backend == "vllm":
        return VllmBackend(settings, on_forward)
    return EmbeddedBackend(settings, on_forward)


class VllmBackend:
    """The verifier's ``vllm`` backend: the same face as the embedded runtime's
    (:class:`EmbeddedBackend`), on :class:`~picospec.runtime.vllm_engine.VllmTarget`."""

    def __init__(self, settings: Any, on_forward: Callable[[ForwardStats], None]) -> None:
        self.settings = settings
        self.on_forward = on_forward
        self.model: VllmTarget | None = None
        self.runner: VllmRunner | None = None

    async def load(self, model: Any = None) -> VllmTarget:
        if model is not None:
            raise ValueError("the vllm backend loads its model itself")
        self.model = await VllmTarget.start(self.settings)
        self.runner = VllmRunner(self.model, self.on_forward)
        return self.model

    async def warm_up(self) -> list[tuple[int, float]]:
        """What the first requests would do, before ready: a prefill, a block verified with
        prompt log-probabilities, a few tokens of vLLM's own decoding (vLLM's first requests
        pay for its kernels' first use)."""
        assert self.model is not None and self.runner is not None
        prompt = self.model.warm_up_prompt()
        greedy = SamplingParams(temperature=0.0)
        vs = VerifierSession(self.model, b"\0" * 16, prompt, greedy, SpecConfig(), prefill=False)
        timed = []
        t0 = time.perf_counter()
        await self.runner.submit(vs.prefill(), key="warm-up")
        timed.append((len(prompt), time.perf_counter() - t0))
        block = DraftBlock(
            session=vs.session,
            epoch=0,
            seq=0,
            pos=len(prompt),
            prefix=(),
            tokens=tuple(prompt[:4]),
            q=(1.0,) * len(prompt[:4]),
            vocab_size=self.model.vocab_size,
        )
        t0 = time.perf_counter()
        await self.runner.submit(vs.verify(block), key="warm-up")
        timed.append((len(block.tokens), time.perf_counter() - t0))
        ar = VerifierSession(
            self.model, b"\1" * 16, prompt, greedy, SpecConfig(mode=Mode.AR), prefill=False
        )
        await self.runner.submit(ar.prefill(), key="warm-up")
        await self.start_ar(ar, 4, set(), "warm-up", lambda _t: None)
        return timed

    def submit(self, program: Program[Any], key: Hashable) -> Job[Any]:
        assert self.runner is not None
        return self.runner.submit(program, key=key)

    def start_ar(
        self, vs: Any, n: int, eos: set[int], key: Hashable, on_emit: Callable[[int], None]
    ) -> Job[int]:
        assert self.runner is not None
        tokens, salt = list(vs.cache.tokens), vs.cache.salt  # the prefill's blocks, read back
        return self.runner.stream_ar(tokens, vs.params, n, eos, key, on_emit, salt)

    def start_led(
        self, vs: Any, n: int, eos: set[int], key: Hashable, on_emit: Callable[[Any], None]
    ) -> Job[int]:
        """A cloud-led session's stream: its steps are rounds, as blocks are (vLLM's own
        decoding cannot take the edge's hints)."""
        assert self.runner is not None
        return self.runner.submit(vs.led_stream(n, eos), key=key, on_emit=on_emit)

    def cancel(self, key: Hashable) -> None:
        if self.runner is not None:
            self.runner.cancel(key)

    @property
    def waiting(self) -> int:
        return 0 if self.runner is None else self.runner.waiting

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
