"""vLLM's own OpenAI server as a local process: the baseline ``picospec bench
--vllm-baseline`` measures PicoSpec against (the engine users would run instead), serving the
same weights (:func:`picospec.runtime.vllm_env.model_dir`) from vLLM's environment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from picospec.runtime.vllm_env import VllmUnavailable, model_dir, preload_env, vllm_python
from picospec.tools.stack.procs import NotReady, http_ready, spawn, terminate_all, wait_until


@contextlib.contextmanager
def serve(
    model: str,
    port: int,
    cpus: frozenset[int] | None = None,
    log_path: Path | None = None,
    served_name: str = "picospec",
    max_model_len: int = 2048,
    ready_timeout: float = 300.0,
) -> Iterator[str]:
    """vLLM's own OpenAI server for ``model`` (a PicoSpec model name), float32, eager, on
    ``cpus``, with tcmalloc and Intel OpenMP preloaded as vLLM's CPU guide asks (as the
    verifier's in-process engine has them: :func:`~picospec.runtime.vllm_env.preload_env`);
    yields its ``/v1`` URL and stops it afterwards."""
    python = vllm_python()
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir(model),
        "--served-model-name", served_name, "--dtype", "float32", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    env = preload_env(os.environ, python)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on a CPU
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(cpus))
    proc = spawn(argv, log_path or Path(os.devnull), env, Path.cwd(), cpus)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        try:
            wait_until(
                lambda: http_ready(f"{url}/models", timeout=2), ready_timeout, "vllm serve",
                proc=proc, log_path=log_path, interval=1.0,
            )  # fmt: skip
        except NotReady as e:
            raise VllmUnavailable(str(e)) from None
        yield url
    finally:
        terminate_all([proc], timeout=30)
