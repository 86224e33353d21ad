"""The report a distillation run writes next to its draft (report.json and report.md):
acceptance against the target (held-out and MT-Bench), step times, the head's coverage."""

from __future__ import annotations

import time
from typing import Any

import torch

from picospec.runtime.drafts.student import (
    ReducedHead,
)
from picospec.tools.distill import data as D
from picospec.tools.distill.evaluate import (
    acceptance,
    engine_acceptance,
    step_time_ratio,
)
from picospec.tools.distill.recipe import Options, Recipe


def make_report(
    target: Any,
    student: torch.nn.Module,
    eval_ex: list[D.Example],
    recipe: Recipe,
    opts: Options,
    layers: list[int],
    trained: dict[str, Any],
    examples: list[D.Example],
) -> dict[str, Any]:
    from picospec.runtime.model import LanguageModel

    draft = LanguageModel(
        model=student, tokenizer=target.tokenizer, name="draft", device=target.device
    )
    report: dict[str, Any] = {
        "target": recipe.target,
        "layers": layers,
        "head_size": recipe.head_size or None,
        "train_examples": len(examples),
        "train_tokens_available": sum(e.trained for e in examples),
        "steps": trained["step"],
        "tokens_seen": trained["tokens"],
        "acceptance_teacher_forced": acceptance(target, student, eval_ex) if eval_ex else None,
        "curve": trained["curve"],
        "head_coverage": _head_coverage(student, eval_ex),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if opts.eval_mtbench:
        report["acceptance_mtbench_teacher_forced"] = mtbench_acceptance(
            target, student, recipe, opts.eval_mtbench
        )
    if opts.engine_prompts and eval_ex:
        prompts = [e.ids[: e.start + 1] for e in eval_ex[: opts.engine_prompts]]
        report["acceptance_engine"] = engine_acceptance(
            target, draft, prompts, opts.engine_max_tokens
        )
    if opts.timing and eval_ex:
        report["step_time"] = step_time_ratio(target, draft, eval_ex[0].ids[: eval_ex[0].start + 1])
    return report


def mtbench_acceptance(
    target: Any, student: torch.nn.Module, recipe: Recipe, n: int
) -> dict[str, Any]:
    """Teacher-forced acceptance on the target's greedy answers to the first ``n`` MT-Bench
    questions (never trained on), overall and per category."""
    from picospec.tools.prompts import mtbench_categorised

    chosen = mtbench_categorised()[:n]
    answers = list(
        D.target_responses(
            target,
            [q for _, q in chosen],
            max_new_tokens=recipe.eval_max_new_tokens,
            temperatures=[0.0],
            batch_size=recipe.gen_batch,
        )
    )
    # target_responses drops a prompt only if the answer is empty: match by the prompt's ids
    by_prompt = {tuple(e.ids[: e.start + 1]): e for e in answers}
    per_cat: dict[str, list[D.Example]] = {}
    for cat, q in chosen:
        ex = by_prompt.get(tuple(target.encode_chat([{"role": "user", "content": q}])))
        if ex is not None:
            per_cat.setdefault(cat or "?", []).append(ex)
    out: dict[str, Any] = {**acceptance(target, student, answers), "prompts": n}
    if len(per_cat) > 1:
        out["categories"] = {cat: acceptance(target, student, exs) for cat, exs in per_cat.items()}
    return out


def _head_coverage(student: torch.nn.Module, examples: list[D.Example]) -> float | None:
    """The share of the held-out answers' tokens inside the reduced head (an upper bound on
    greedy acceptance; None for a full head)."""
    head = student.lm_head
    if not isinstance(head, ReducedHead) or not examples:
        return None
    ids = set(head.ids.tolist())
    nxt = [t for e in examples for t in e.ids[e.start + 1 :]]
    return sum(t in ids for t in nxt) / max(1, len(nxt))


def report_markdown(r: dict[str, Any]) -> str:
    acc = r.get("acceptance_teacher_forced") or {}
    lines = [
        f"# Draft report ({r['date']})",
        "",
        f"target `{r['target']}`, layers {r['layers']}, head {r['head_size'] or 'full'}; "
        f"{r['steps']} steps, {r['tokens_seen']:,} training tokens seen "
        f"(of {r['train_tokens_available']:,} available)",
        "",
        "| measure | greedy | T=0.7 |",
        "|---|---|---|",
        f"| per-token acceptance, teacher-forced, held-out prompts | {acc.get('greedy', 0):.3f} "
        f"| {acc.get('t0.7', 0):.3f} |",
    ]
    mt = r.get("acceptance_mtbench_teacher_forced")
    if mt:
        lines.append(
            f"| per-token acceptance, teacher-forced, {mt['prompts']} MT-Bench questions | "
            f"{mt['greedy']:.3f} | {mt['t0.7']:.3f} |"
        )
        lines += [
            f"| … of which {cat} ({int(c['positions'])} tokens) | {c['greedy']:.3f} "
            f"| {c['t0.7']:.3f} |"
            for cat, c in (mt.get("categories") or {}).items()
        ]
    eng = r.get("acceptance_engine")
    if eng:
        lines.append(
            f"| engine acceptance (picospec, γ=4), held-out prompts | {eng.get('greedy', 0):.3f} "
            f"| {eng.get('t0.7', 0):.3f} |"
        )
        lines += ["", f"greedy output identical to ar: {eng.get('greedy_identical_to_ar')}"]
    if r.get("head_coverage") is not None:
        lines += ["", f"held-out answer tokens inside the reduced head: {r['head_coverage']:.3f}"]
    st = r.get("step_time")
    if st:
        lines += [
            "",
            f"step time: draft {st['draft_step_ms']:.1f} ms, target {st['target_step_ms']:.1f} ms "
            f"({st['threads']} threads): ratio {st['ratio']:.2f}",
        ]
    if r.get("curve"):
        lines += ["", "| training tokens | step | greedy | T=0.7 |", "|---|---|---|---|"]
        lines += [
            f"| {p['tokens']:,} | {p['step']} | {p['greedy']:.3f} | {p['t0.7']:.3f} |"
            for p in r["curve"]
        ]
    return "\n".join(lines)
