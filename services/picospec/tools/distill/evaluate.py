"""How good a draft is for its target: acceptance on held-out prompts, and its step cost.

- **Per-token acceptance** α, teacher-forced along the target's own greedy continuations of
  held-out prompts: greedy α is the fraction of positions where the draft's argmax equals the
  target's; at temperature T, α is ``Σ_x min(p(x), q(x))`` (= 1 − TVD), the exact probability
  that speculative sampling accepts a drafted token, with ``p`` and ``q`` processed by
  :func:`picospec.speculation.sampling.probs_from_logits` exactly as the verifier and drafter do.
- **Engine acceptance**: the acceptance rate ``picospec generate --mode picospec`` reports
  (accepted / drafted tokens) on a few held-out prompts, and whether greedy output is
  token-identical to the target alone.
- **Step-time ratio**: the median one-token decode step of the draft over the target's, both
  through ``LanguageModel.forward`` with a KV cache, at the same thread count.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from picospec.speculation.sampling import SamplingParams, probs_from_logits
from picospec.tools.distill.data import Example


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()


@torch.inference_mode()
def acceptance(
    target: Any,
    draft_model: torch.nn.Module,
    examples: list[Example],
    temperatures: tuple[float, ...] = (0.0, 0.7),
    target_logits: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean per-token acceptance of ``draft_model`` for ``target`` over the trained positions
    of ``examples``, at each temperature: ``{"greedy": …, "t0.7": …, "positions": n}``."""
    sums = {t: 0.0 for t in temperatures}
    n = 0
    for i, ex in enumerate(examples):
        rows = slice(ex.start, len(ex.ids) - 1)
        p_logits = (
            target_logits[i]
            if target_logits is not None
            else _logits(target.model, ex.ids, target.device)[rows]
        )
        q_logits = _logits(draft_model, ex.ids, target.device)[rows].cpu()
        p_logits = p_logits.cpu()
        for t in temperatures:
            params = SamplingParams(temperature=t)
            if params.greedy:
                sums[t] += float((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
            else:
                p = probs_from_logits(p_logits, params)
                q = probs_from_logits(q_logits, params)
                sums[t] += float(torch.minimum(p, q).sum())
        n += p_logits.shape[0]
    out: dict[str, float] = {_key(t): (sums[t] / n if n else 0.0) for t in temperatures}
    out["positions"] = n
    return out


def _key(t: float) -> str:
    return "greedy" if SamplingParams(temperature=t).greedy else f"t{t:g}"


@torch.inference_mode()
def cache_target_logits(target: Any, examples: list[Example]) -> list[torch.Tensor]:
    """The target's logits at each example's trained positions (kept for repeated evaluation)."""
    return [
        _logits(target.model, ex.ids, target.device)[ex.start : len(ex.ids) - 1].cpu().half()
        for ex in examples
    ]


def engine_acceptance(
    target: Any,
    draft: Any,
    prompts: list[list[int]],
    max_tokens: int,
    temperatures: tuple[float, ...] = (0.0, 0.7),
    draft_len: int = 4,
) -> dict[str, Any]:
    """The engine's acceptance (accepted / drafted) in picospec mode, and greedy identity."""
    from picospec.speculation.engine import generate
    from picospec.speculation.spec import Mode, SpecConfig

    out: dict[str, Any] = {}
    for t in temperatures:
        drafted = accepted = 0
        identical = True
        for seed, prompt in enumerate(prompts):
            params = SamplingParams(temperature=t, seed=seed)
            spec = SpecConfig(mode=Mode.PICOSPEC, draft_len=draft_len)
            got = generate(target, draft, prompt, params, spec, max_tokens)
            drafted += got.speculation.drafted
            accepted += got.speculation.accepted
            if params.greedy:
                ar = generate(target, None, prompt, params, SpecConfig(mode=Mode.AR), max_tokens)
                identical = identical and ar.tokens == got.tokens
        out[_key(t)] = accepted / drafted if drafted else 0.0
        if SamplingParams(temperature=t).greedy:
            out["greedy_identical_to_ar"] = identical
    return out


def step_time_s(model: Any, prompt: list[int], steps: int = 24) -> float:
    """Median seconds of one one-token decode step after a prefill of ``prompt``."""
    cache = model.new_cache()
    logits = cache.extend(prompt)
    times = []
    token = int(logits[-1].argmax())
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = cache.extend([token])
        times.append(time.perf_counter() - t0)
        token = int(logits[-1].argmax())
    return statistics.median(times[2:] if len(times) > 4 else times)


def step_time_ratio(target: Any, draft: Any, prompt: list[int]) -> dict[str, float]:
    """Draft and target step times (interleaved, twice, best of the two) and their ratio."""
    d = min(step_time_s(draft, prompt), step_time_s(draft, prompt))
    t = min(step_time_s(target, prompt), step_time_s(target, prompt))
    return {
        "draft_step_ms": d * 1e3,
        "target_step_ms": t * 1e3,
        "ratio": d / t,
        "threads": torch.get_num_threads(),
    }
