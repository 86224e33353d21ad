"""The distillation pipeline: data, student, training loop, report; every stage resumable.

A run lives in a work directory::

    recipe.json            the recipe (a resumed run must use the same one)
    data/shard-NNNNN.pt    training examples with cached teacher top-k, one shard per group
    eval.pt                held-out examples (the target's greedy answers to held-out prompts)
    ckpt.pt                the latest checkpoint: trained tensors, optimiser, step, data cursor,
                           RNG states, the acceptance curve
    status.json            where the run is (stage, step, tokens, loss, tokens/s, ETA, curve)
    train.log              one line per logged step (background runs)

Running the same command again continues where the last one stopped (after a crash, a kill,
or ``--max-time-s``). At the end the draft is saved to ``--out`` with its report
(``report.json``, ``report.md``) next to it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from picospec.distill import data as D
from picospec.distill.evaluate import (
    acceptance,
    cache_target_logits,
    engine_acceptance,
    step_time_ratio,
)
from picospec.distill.format import save_draft
from picospec.distill.recipe import Options, Recipe
from picospec.distill.student import (
    ReducedHead,
    build_student,
    decoder_layers,
    load_trainable_state,
    student_logits,
    trainable_parameters,
    trainable_state,
)

log = logging.getLogger(__name__)


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
            _log_line(opts.work, msg)
            if opts.progress:
                print(msg, file=sys.stderr)
            if _out_of_time(opts):
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
    from picospec.distill.format import draft_dir

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


def _init_state(recipe: Recipe, target: Any) -> Any:
    """The trained tensors ``init`` starts this run from: an earlier run's last checkpoint, or
    a finished draft's weights (its deltas applied to the target's layers)."""
    draft = init_draft(recipe)
    if draft is None:  # cursor, optimiser and curve stay behind
        blob = torch.load(Path(recipe.init) / "ckpt.pt", weights_only=False)
        return blob["student"].items()
    from safetensors.torch import load_file

    from picospec.distill.format import TENSORS, read_meta, unpack
    from picospec.distill.student import source_state

    layers = [int(i) for i in read_meta(draft)["layers"]]
    tensors = load_file(str(draft / TENSORS))
    return unpack(tensors, source_state(target.model, layers)).items()


def check_init(recipe: Recipe) -> None:
    """``init``, if set, must be a run with a checkpoint of the same target, layers and head."""
    if not recipe.init:
        return
    draft = init_draft(recipe)
    if draft is not None:
        from picospec.distill.format import read_meta

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


# --- training -------------------------------------------------------------------------------


class TimeUp(Exception):
    """``--max-time-s`` reached: the run stopped at a checkpoint and can be resumed."""


_START = time.time()


def _out_of_time(opts: Options) -> bool:
    return opts.max_time_s is not None and time.time() - _START > opts.max_time_s


def _log_line(work: Path, msg: str) -> None:
    with (work / "train.log").open("a") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + msg + "\n")


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = min(1.0, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
    low = recipe.lr * recipe.min_lr_ratio
    return low + (recipe.lr - low) * 0.5 * (1 + math.cos(math.pi * frac))


class Batches:
    """Examples in a fresh seeded order every epoch, packed into token budgets; its position
    (epoch, index) is part of the checkpoint."""

    def __init__(self, examples: list[D.Example], recipe: Recipe) -> None:
        self.examples = [e for e in examples if e.top_ids is not None and e.trained > 0]
        if not self.examples:
            raise ValueError("no training examples")
        self.recipe = recipe
        self.epoch, self.index = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.recipe.seed * 7919 + self.epoch).shuffle(order)
        return order

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._perm()

    def next(self) -> list[D.Example]:
        out: list[D.Example] = []
        tokens = 0
        while True:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            ex = self.examples[self._order[self.index]]
            n = min(len(ex.ids), self.recipe.max_len)
            if out and tokens + n > self.recipe.batch_tokens:
                return out
            out.append(ex)
            tokens += n
            self.index += 1


def loss_on(
    student: torch.nn.Module,
    batch: list[D.Example],
    recipe: Recipe,
    head_pos: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation loss of one batch and its parts (soft KL to the teacher's renormalised
    top-k over the head's tokens, hard CE on the target's own next tokens)."""
    width = max(min(len(e.ids), recipe.max_len) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):
        seq = e.ids[:width]
        ids[r, : len(seq)] = torch.tensor(seq)
    logits = student_logits(student, ids.to(device))
    rows, top_ids, top_logp, nxt = [], [], [], []
    for r, e in enumerate(batch):
        end = min(len(e.ids), width) - 1  # positions start..end-1 predict ids[start+1..end]
        if end <= e.start:
            continue
        rows.append(logits[r, e.start : end])
        top_ids.append(e.top_ids[: end - e.start].long())
        top_logp.append(e.top_logp[: end - e.start].float())
        nxt.append(torch.tensor(e.ids[e.start + 1 : end + 1]))
    logp = torch.log_softmax(torch.cat(rows).float(), dim=-1)
    t_ids, t_logp, nxt_t = torch.cat(top_ids), torch.cat(top_logp), torch.cat(nxt)
    if head_pos is not None:  # vocabulary id -> index in the reduced head (-1: not in it)
        t_ids, nxt_t = head_pos[t_ids], head_pos[nxt_t]
    t_ids, t_logp, nxt_t = t_ids.to(device), t_logp.to(device), nxt_t.to(device)
    parts: dict[str, float] = {}
    total = logp.new_zeros(())
    if recipe.kd in ("token", "both"):
        p = t_logp.exp() * (t_ids >= 0)
        mass = p.sum(-1, keepdim=True)
        ok = mass.squeeze(-1) > 0
        p = p[ok] / mass[ok]
        s_logp = logp[ok].gather(-1, t_ids[ok].clamp(min=0))
        ce = -(p * s_logp).sum(-1)
        ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
        n = max(1, int(ok.sum()))  # rows whose teacher top-k misses the head are skipped
        total = total + ce.sum() / n
        parts["kl"] = float((ce - ent).sum().detach()) / n
    if recipe.kd in ("seq", "both"):
        ok = nxt_t >= 0
        hard = -logp[ok].gather(-1, nxt_t[ok, None]).sum() / max(1, int(ok.sum()))
        total = total + (recipe.hard_weight if recipe.kd == "both" else 1.0) * hard
        parts["ce"] = float(hard.detach())
    parts["tokens"] = float(logp.shape[0])
    return total, parts


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def train(
    target: Any,
    student: torch.nn.Module,
    examples: list[D.Example],
    eval_ex: list[D.Example],
    recipe: Recipe,
    opts: Options,
) -> dict[str, Any]:
    """Train ``student`` for ``recipe.steps`` steps (resuming from ``ckpt.pt``); returns
    ``{"step", "tokens", "curve"}`` (the acceptance curve)."""
    device = target.device
    params = trainable_parameters(student)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    batches = None if opts.report_only else Batches(examples, recipe)
    head = student.lm_head
    head_pos = None
    if isinstance(head, ReducedHead):
        head_pos = torch.full((head.vocab_size,), -1, dtype=torch.long)
        head_pos[head.ids.cpu()] = torch.arange(head.size)
    step, seen, curve = 0, 0, []
    ckpt = opts.work / "ckpt.pt"
    if recipe.init and not ckpt.is_file():  # the earlier run's draft, not its optimiser,
        load_trainable_state(student, {k: v.to(device) for k, v in _init_state(recipe, target)})
        _log_line(opts.work, f"initialised from {recipe.init}")
    if ckpt.is_file():
        blob = torch.load(ckpt, weights_only=False)
        load_trainable_state(student, {k: v.to(device) for k, v in blob["student"].items()})
        opt.load_state_dict(blob["optimizer"])
        if batches is not None:
            batches.restore(blob["batches"])
        step, seen, curve = blob["step"], blob["tokens"], blob["curve"]
        torch.set_rng_state(blob["rng"]["torch"])
        random.setstate(blob["rng"]["python"])
        _log_line(opts.work, f"resumed at step {step} ({seen} tokens)")
    if batches is None:  # --report-only
        student.eval()
        return {"step": step, "tokens": seen, "curve": curve}
    eval_logits = cache_target_logits(target, eval_ex) if eval_ex else None

    def evaluate_now() -> None:
        if not eval_ex:
            return
        student.eval()
        acc = acceptance(target, student, eval_ex, target_logits=eval_logits)
        student.train()
        point = {"step": step, "tokens": seen, "greedy": acc["greedy"], "t0.7": acc["t0.7"]}
        curve.append(point)
        _log_line(opts.work, f"eval {json.dumps(point)}")

    def checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "student": {k: v.cpu() for k, v in trainable_state(student).items()},
                "optimizer": opt.state_dict(),
                "batches": batches.state(),
                "step": step,
                "tokens": seen,
                "curve": curve,
                "rng": _rng_state(),
                "recipe": asdict(recipe),
            },
            tmp,
        )
        tmp.replace(ckpt)

    if not curve:
        evaluate_now()
    student.train()
    progress = _progress(opts.progress)
    task = (
        progress.add_task("distill", total=recipe.steps, completed=step, info="")
        if progress
        else None
    )
    t_start, seen_start, step_start = time.time(), seen, step
    train_s = 0.0  # time in training steps alone (no evaluation, no checkpoints)
    last: dict[str, float] = {}
    try:
        if progress:
            progress.start()
        while step < recipe.steps:
            t_step = time.time()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, recipe)
            loss, last = loss_on(student, batches.next(), recipe, head_pos, device)
            last["loss"] = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            seen += int(last["tokens"])
            train_s += time.time() - t_step
            rate = (seen - seen_start) / max(1e-9, train_s)
            eta = (recipe.steps - step) * (time.time() - t_start) / max(1, step - step_start)
            info = (
                f"loss {last['loss']:.3f} kl {last.get('kl', float('nan')):.3f} "
                f"{rate:,.0f} tok/s {seen:,} tok"
            )
            if progress and task is not None:
                progress.update(task, completed=step, info=info)
            if step % recipe.eval_every == 0 or step == recipe.steps:
                evaluate_now()
            if step % recipe.ckpt_every == 0 or step == recipe.steps or _out_of_time(opts):
                checkpoint()
                write_status(
                    opts.work,
                    stage="train",
                    step=step,
                    steps=recipe.steps,
                    tokens=seen,
                    loss=round(last["loss"], 4),
                    kl=round(last.get("kl", float("nan")), 4),
                    lr=lr_at(step, recipe),
                    train_tokens_per_s=round(rate, 1),
                    eta_s=round(eta),
                    curve=curve,
                )
                _log_line(opts.work, f"step {step} {info}")
                if _out_of_time(opts) and step < recipe.steps:
                    raise TimeUp
    finally:
        if progress:
            progress.stop()
    student.eval()
    return {"step": step, "tokens": seen, "curve": curve}


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


# --- the whole pipeline ---------------------------------------------------------------------


def load_target(recipe: Recipe, opts: Options) -> Any:
    from picospec.models import LanguageModel

    return LanguageModel.load(
        recipe.target, device=opts.device, dtype=recipe.dtype, threads=opts.threads
    )


def check_recipe(work: Path, recipe: Recipe) -> None:
    """A work directory belongs to one recipe: resuming with another one is refused."""
    path = work / "recipe.json"
    if path.is_file():
        old = {**asdict(Recipe()), **json.loads(path.read_text())}  # new fields: defaults
        if old != asdict(recipe):
            differ = sorted(
                k for k in old.keys() | asdict(recipe).keys() if old.get(k) != asdict(recipe).get(k)
            )
            raise ValueError(
                f"{work} holds a run of another recipe (differs in {differ}): use another "
                "--work directory, or the same options to resume"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(recipe), indent=2) + "\n")


def run(recipe: Recipe, opts: Options, target: Any = None) -> dict[str, Any]:
    """Data, student, training, report; returns the report (and saves the draft to ``out``)."""
    global _START
    _START = time.time()
    if recipe.kd not in ("token", "seq", "both"):
        raise ValueError(f"unknown --kd {recipe.kd!r}: use token, seq or both")
    recipe.source_list  # noqa: B018 (validates)
    if recipe.prompt_set not in D.PROMPT_SETS:
        raise ValueError(f"unknown --prompt-set {recipe.prompt_set!r}: use {D.PROMPT_SETS}")
    check_init(recipe)
    check_recipe(opts.work, recipe)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    target = target or load_target(recipe, opts)
    for p in target.model.parameters():
        p.requires_grad_(False)
    try:
        examples = build_data(target, recipe, opts)
        eval_ex = build_eval(target, recipe, opts)
        layers = recipe.layer_list(len(decoder_layers(target.model)))
        draft = init_draft(recipe)
        if draft is not None:
            from picospec.distill.format import read_meta

            if [int(i) for i in read_meta(draft)["layers"]] != layers:
                raise ValueError(f"--init {recipe.init} has other layers than --layers gives")
        head_ids = None
        head_path = opts.work / "head_ids.pt"  # fixed once: a resumed run keeps its head
        if recipe.head_size and recipe.init and not head_path.is_file():
            draft = init_draft(recipe)
            if draft is not None:  # a finished draft keeps its head in its tensors file
                from safetensors.torch import load_file

                from picospec.distill.format import TENSORS

                torch.save(load_file(str(draft / TENSORS))["head_ids"].long(), head_path)
            else:
                head_path.write_bytes((Path(recipe.init) / "head_ids.pt").read_bytes())
        if recipe.head_size and head_path.is_file():
            head_ids = torch.load(head_path)
        elif recipe.head_size:
            counts = D.token_counts(examples, target.vocab_size)
            always = set(target.eos_ids)
            tok = target.tokenizer
            if tok is not None:
                always |= set(getattr(tok, "all_special_ids", []) or [])
            head_ids = D.head_ids_from(counts, min(recipe.head_size, target.vocab_size), always)
            if not opts.report_only:
                torch.save(head_ids, head_path)
        student = build_student(target.model, layers, head_ids)
        stage = "report" if opts.report_only else "train"
        write_status(opts.work, stage=stage, examples=len(examples), layers=layers)
        trained = train(target, student, examples, eval_ex, recipe, opts)
    except TimeUp:
        write_status(opts.work, stage="paused (time budget): run the same command to resume")
        return {"paused": True}
    report = make_report(target, student, eval_ex, recipe, opts, layers, trained, examples)
    out = opts.out or opts.work / "draft"
    save_draft(
        out,
        student,
        target.model,
        target_name=recipe.target,
        layers=layers,
        recipe=asdict(recipe),
        report=report,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report) + "\n")
    write_status(opts.work, stage="done", out=str(out))
    return report


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
    from picospec.models import LanguageModel

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
    from picospec.bench.run import mtbench_categorised

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
