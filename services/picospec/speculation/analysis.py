"""Measurements behind the README's tables: compression loss against K, and what int8 drafts cost.

Both run on real models (the embedded SmolLM2 by default) and print Markdown tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from picospec.protocol.codec import sparse_from_probs
from picospec.runtime.checkpoints import quantize_int8
from picospec.runtime.loading import load_model
from picospec.runtime.model import LanguageModel
from picospec.speculation.engine import generate
from picospec.speculation.sampling import (
    SamplingParams,
    output_distribution,
    probs_from_logits,
    total_variation,
)
from picospec.speculation.spec import Mode, SpecConfig

PROMPTS = [
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short Python function that checks whether a number is prime.",
    "List three practical tips for saving energy at home.",
    "What causes the seasons on Earth?",
]

SETTINGS = {
    "T=1.0": SamplingParams(temperature=1.0),
    "T=0.7": SamplingParams(temperature=0.7),
    "T=0.7, top-p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
}


def load_pair(args: argparse.Namespace) -> tuple[LanguageModel, LanguageModel]:
    target = load_model(args.verifier, device=args.device, dtype=args.dtype, threads=args.threads)
    if args.drafter == args.verifier:
        draft = target
        if args.quantize_draft == "int8":
            draft = LanguageModel(
                quantize_int8(target.model), target.tokenizer, f"{target.name}:int8", target.device
            )
    else:
        draft = load_model(
            args.drafter, device=args.device, dtype=args.dtype, quantize=args.quantize_draft
        )
    return target, draft


def _positions(target: LanguageModel, n: int) -> list[list[int]]:
    """Real contexts: chat prompts continued by the target itself (sampled, T=1)."""
    per = max(1, n // len(PROMPTS))
    seqs = []
    for i, text in enumerate(PROMPTS):
        prompt = target.encode_chat([{"role": "user", "content": text}])
        run = generate(target, None, prompt, SamplingParams(seed=i), SpecConfig(mode=Mode.AR), per)
        seqs.append(prompt + run.tokens)
    return seqs


@torch.inference_mode()
def _dists(model: LanguageModel, seq: list[int], n_prompt_min: int) -> torch.Tensor:
    return model.new_cache().extend(seq)[n_prompt_min - 1 : -1]


def tvd_table(args: argparse.Namespace) -> str:
    """Mean TVD between the output distribution and the target's, for each compression K."""
    target, draft = load_pair(args)
    ks = [int(k) for k in args.ks.split(",") if int(k) <= target.vocab_size]
    rows: dict[str, list[float]] = {name: [0.0] * len(ks) for name in SETTINGS}
    tails: dict[str, list[float]] = {name: [0.0] * len(ks) for name in SETTINGS}
    support: dict[str, list[int]] = {name: [] for name in SETTINGS}
    count = 0
    for seq in _positions(target, args.positions):
        start = len(seq) - max(1, args.positions // len(PROMPTS))
        p_logits, q_logits = _dists(target, seq, start), _dists(draft, seq, start)
        for name, params in SETTINGS.items():
            p_all, q_all = probs_from_logits(p_logits, params), probs_from_logits(q_logits, params)
            for p, q in zip(p_all, q_all, strict=True):
                support[name].append(int((p > 0).sum()))
                for i, k in enumerate(ks):
                    rows[name][i] += total_variation(output_distribution(p, q, k), p)
                    tails[name][i] += sparse_from_probs(p, k).tail_mass
        count += len(p_logits)
    head = (
        "| K | "
        + " | ".join(f"TVD {n}" for n in SETTINGS)
        + " | "
        + " | ".join(f"tail mass {n}" for n in SETTINGS)
        + " |"
    )
    lines = [
        f"Output TVD from the target per token, {count} real positions, target {target.name}, "
        f"draft {draft.name}. Support of p (median): "
        + ", ".join(f"{n}: {sorted(s)[len(s) // 2]}" for n, s in support.items()),
        "",
        head,
        "|" + "---|" * (1 + 2 * len(SETTINGS)),
    ]
    for i, k in enumerate(ks):
        tvd = " | ".join(f"{rows[n][i] / count:.2e}" for n in SETTINGS)
        tail = " | ".join(f"{tails[n][i] / count:.2e}" for n in SETTINGS)
        lines.append(f"| {k} | {tvd} | {tail} |")
    return "\n".join(lines)


@dataclass
class DraftFigures:
    name: str
    tokens_per_s: float
    acceptance_greedy: float
    acceptance_sampled: float


def draft_report(args: argparse.Namespace) -> str:
    """Draft speed and acceptance against the full-precision verifier, fp32 vs int8 draft."""
    target = load_model(args.verifier, device=args.device, dtype=args.dtype, threads=args.threads)
    int8 = LanguageModel(quantize_int8(target.model), target.tokenizer, f"{target.name}:int8")
    prompts = [target.encode_chat([{"role": "user", "content": t}]) for t in PROMPTS]
    figures = []
    for draft in (target, int8):
        t0, n = time.perf_counter(), 0
        for prompt in prompts:  # the draft model decoding alone: its own speed
            n += len(
                generate(
                    draft,
                    None,
                    prompt,
                    SamplingParams(temperature=0.0),
                    SpecConfig(mode=Mode.AR),
                    args.max_tokens,
                ).tokens
            )
        speed = n / (time.perf_counter() - t0)
        acc = []
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1)):
            drafted = accepted = 0
            for prompt in prompts:
                r = generate(target, draft, prompt, params, SpecConfig(), args.max_tokens)
                drafted, accepted = (
                    drafted + r.speculation.drafted,
                    accepted + r.speculation.accepted,
                )
            acc.append(accepted / max(drafted, 1))
        figures.append(DraftFigures(draft.name, speed, acc[0], acc[1]))
    lines = [
        f"Draft model against the fp32 verifier {target.name}, {len(prompts)} chat prompts, "
        f"{args.max_tokens} tokens each, torch threads={torch.get_num_threads()}",
        "",
        "| draft | draft tokens/s (alone) | acceptance, greedy | acceptance, T=0.7 |",
        "|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.name} | {f.tokens_per_s:.1f} | {f.acceptance_greedy:.3f} | "
            f"{f.acceptance_sampled:.3f} |"
        )
    return "\n".join(lines)
