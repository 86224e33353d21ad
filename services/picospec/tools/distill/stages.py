"""The stages before training: the data (the target's own answers to synthetic prompts, never
a benchmark's), the held-out evaluation set, where training starts (``--init``); and the run's
status file, log and time budget, which every stage keeps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from picospec.tools.distill import data as D
from picospec.tools.distill.recipe import Options, Recipe

# --- status ---------------------------------------------------------------------------------


def write_status(work: Path, **fields: Any) -> None:
    path = work / "status.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    tmp.replace(path)


def status_text(work: Path) -> str:
    path = Path(work) / "status.json"
    if not path.is_file():
        return f"no distillation run in {work}"
    s = json.loads(path.read_text())
    lines = [f"{k}: {v}" for k, v in s.items() if k != "curve"]
    for p in s.get("curve", []):
        lines.append(
            f"  tokens {p['tokens']:>10,}  step {p['step']:>6}  "
            f"greedy {p['greedy']:.3f}  t0.7 {p['t0.7']:.3f}"
        )
    return "\n".join(lines)


# --- data stage -----------------------------------------------------------------------------


def _chat_prompts(recipe: Recipe, opts: Options) -> list[str]:
    prompts = opts.prompt_source or D.synthesise_prompts(recipe.seed, prompt_set=recipe.prompt_set)
    prompts = D.exclude_benchmark(prompts)[recipe.prompt_offset :]
    return prompts[: recipe.prompts] if recipe.prompts else prompts


def build_data(target: Any, recipe: Recipe, opts: Options) -> list[D.Example]:
    """Generate (or reuse) the training shards; returns every training example."""
    shards = opts.work / "data"
    shards.mkdir(parents=True, exist_ok=True)
    examples: list[D.Example] = []
    generate = not opts.report_only  # a report uses the shards there are, and makes none
    if generate and "docs" in recipe.source_list and not (shards / "docs.pt").is_file():
        texts = D.project_texts()
        docs = D.text_examples(target, texts, recipe.max_len // 2)
        D.teacher_topk(target, docs, recipe.topk)
        D.save_examples(shards / "docs.pt", docs, {"source": "docs"})
    if generate and "chat" in recipe.source_list:
        prompts = _chat_prompts(recipe, opts)
        groups = [
            prompts[i : i + recipe.shard_prompts]
            for i in range(0, len(prompts), recipe.shard_prompts)
        ]
        for g, group in enumerate(groups):
            path = shards / f"shard-{g:05d}.pt"
            if path.is_file():
                continue
            write_status(opts.work, stage="data", shard=g, shards=len(groups))
            t0 = time.time()
            batch = list(
                D.target_responses(
                    target,
                    group,
                    max_new_tokens=recipe.max_new_tokens,
                    temperatures=recipe.temperature_list,
                    batch_size=recipe.gen_batch,
                    seed=recipe.seed + g,
                )
            )
            D.teacher_topk(target, batch, recipe.topk)
            D.save_examples(path, batch, {"source": "chat", "group": g})
            n = sum(e.trained for e in batch)
            msg = f"data shard {g + 1}/{len(groups)}: {n} tokens in {time.time() - t0:.0f}s"
            log_line(opts.work, msg)
            if opts.progress:
                print(msg, file=sys.stderr)
            if out_of_time(opts):
                raise TimeUp
    for path in sorted(shards.glob("*.pt")):
        examples += D.load_examples(path)[0]
    for earlier in init_chain(recipe):
        for path in sorted((Path(earlier) / "data").glob("*.pt")):
            examples += D.load_examples(path)[0]
    return examples


def init_draft(recipe: Recipe) -> Path | None:
    """The finished draft ``init`` names (a shipped name or a directory with draft.json), or
    None when ``init`` is a work directory (or unset)."""
    from picospec.runtime.drafts import draft_dir

    return draft_dir(recipe.init) if recipe.init else None


def init_chain(recipe: Recipe) -> list[str]:
    """The work directories this run continues, nearest first (``init``, its ``init``, …); a
    finished draft brings no data, and ends the chain."""
    out: list[str] = []
    init = "" if init_draft(recipe) else recipe.init
    while init:
        if init in out:
            raise ValueError(f"--init {recipe.init}: the runs' inits form a cycle at {init}")
        out.append(init)
        old = Path(init) / "recipe.json"
        init = json.loads(old.read_text()).get("init", "") if old.is_file() else ""
    return out


def init_state(recipe: Recipe, target: Any) -> Any:
    """The trained tensors ``init`` starts this run from: an earlier run's last checkpoint, or
    a finished draft's weights (its deltas applied to the target's layers)."""
    draft = init_draft(recipe)
    if draft is None:  # cursor, optimiser and curve stay behind
        blob = torch.load(Path(recipe.init) / "ckpt.pt", weights_only=False)
        return blob["student"].items()
    from safetensors.torch import load_file

    from picospec.runtime.drafts.format import TENSORS, read_meta, unpack
    from picospec.runtime.drafts.student import source_state

    layers = [int(i) for i in read_meta(draft)["layers"]]
    tensors = load_file(str(draft / TENSORS))
    return unpack(tensors, source_state(target.model, layers)).items()


def check_init(recipe: Recipe) -> None:
    """``init``, if set, must be a run with a checkpoint of the same target, layers and head."""
    if not recipe.init:
        return
    draft = init_draft(recipe)
    if draft is not None:
        from picospec.runtime.drafts.format import read_meta

        meta = read_meta(draft)
        theirs = {"target": meta["target"], "head_size": int(meta.get("head_size") or 0)}
        mine = {"target": recipe.target, "head_size": recipe.head_size}
        differ = [k for k in theirs if theirs[k] != mine[k]]
        if differ:
            raise ValueError(f"--init {recipe.init} is a draft of another kind ({differ})")
        return
    work = Path(recipe.init)
    if not (work / "recipe.json").is_file() or not (work / "ckpt.pt").is_file():
        raise ValueError(f"--init {work}: not a distill work directory with a checkpoint")
    old = json.loads((work / "recipe.json").read_text())
    differ = [k for k in ("target", "layers", "head_size") if old.get(k) != getattr(recipe, k)]
    if differ:
        raise ValueError(f"--init {work} was a run of another draft (differs in {differ})")
    path = work / "status.json"
    status = json.loads(path.read_text()) if path.is_file() else {}
    if status.get("stage") != "done":
        raise ValueError(
            f"--init {work} has not finished (stage {status.get('stage')!r}): run it to the "
            "end first"
        )


def build_eval(target: Any, recipe: Recipe, opts: Options) -> list[D.Example]:
    path = opts.work / "eval.pt"
    if path.is_file():
        return D.load_examples(path)[0]
    if opts.prompt_source is not None:
        prompts = opts.prompt_source[-recipe.eval_prompts :]
    else:
        prompts = D.synthesise_prompts(recipe.seed, held_out=True)[: recipe.eval_prompts]
    prompts = D.exclude_benchmark(prompts)
    ex = list(
        D.target_responses(
            target,
            prompts,
            max_new_tokens=recipe.eval_max_new_tokens,
            temperatures=[0.0],
            batch_size=recipe.gen_batch,
        )
    )
    D.save_examples(path, ex, {"source": "eval", "prompts": prompts})
    return ex


# --- the time budget ------------------------------------------------------------------------


class TimeUp(Exception):
    """``--max-time-s`` reached: the run stopped at a checkpoint and can be resumed."""


_START = time.time()


def start_clock() -> None:
    """``--max-time-s`` counts from now."""
    global _START
    _START = time.time()


def out_of_time(opts: Options) -> bool:
    return opts.max_time_s is not None and time.time() - _START > opts.max_time_s


def log_line(work: Path, msg: str) -> None:
    with (work / "train.log").open("a") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + msg + "\n")
