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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from picospec.runtime.drafts.format import save_draft
from picospec.runtime.drafts.student import (
    ReducedHead,
    build_student,
    decoder_layers,
    load_trainable_state,
    student_logits,
    trainable_parameters,
    trainable_state,
)
from picospec.tools.distill import data as D
from picospec.tools.distill.evaluate import (
    acceptance,
    cache_target_logits,
)
from picospec.tools.distill.recipe import Options, Recipe
from picospec.tools.distill.report import make_report, report_markdown
from picospec.tools.distill.stages import (
    TimeUp,
    build_data,
    build_eval,
    check_init,
    init_draft,
    init_state,
    log_line,
    out_of_time,
    start_clock,
    write_status,
)

log = logging.getLogger(__name__)


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
    head_pos = _head_positions(student.lm_head)
    step, seen, curve = 0, 0, []
    ckpt = opts.work / "ckpt.pt"
    if recipe.init and not ckpt.is_file():  # the earlier run's draft, not its optimiser,
        load_trainable_state(student, {k: v.to(device) for k, v in init_state(recipe, target)})
        log_line(opts.work, f"initialised from {recipe.init}")
    if ckpt.is_file():
        step, seen, curve = _resume(ckpt, student, opt, batches, device)
        log_line(opts.work, f"resumed at step {step} ({seen} tokens)")
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
        log_line(opts.work, f"eval {json.dumps(point)}")

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
            last = _step(student, opt, params, batches.next(), recipe, head_pos, step, device)
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
            if step % recipe.ckpt_every == 0 or step == recipe.steps or out_of_time(opts):
                _save(
                    ckpt,
                    student,
                    opt,
                    batches,
                    {"step": step, "tokens": seen, "curve": curve},
                    recipe,
                )
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
                log_line(opts.work, f"step {step} {info}")
                if out_of_time(opts) and step < recipe.steps:
                    raise TimeUp
    finally:
        if progress:
            progress.stop()
    student.eval()
    return {"step": step, "tokens": seen, "curve": curve}


def _head_positions(head: Any) -> torch.Tensor | None:
    """A reduced head's row of each vocabulary id (-1: not in the head); None for a full one."""
    if not isinstance(head, ReducedHead):
        return None
    pos = torch.full((head.vocab_size,), -1, dtype=torch.long)
    pos[head.ids.cpu()] = torch.arange(head.size)
    return pos


def _save(
    ckpt: Path,
    student: torch.nn.Module,
    opt: Any,
    batches: Batches,
    progress: dict[str, Any],
    recipe: Recipe,
) -> None:
    """Write the checkpoint :func:`_resume` reads (atomically: a stop mid-write keeps the
    last one): the student's trainable weights, the optimiser, the batches, ``progress``
    (step, tokens, curve) and the random generators."""
    tmp = ckpt.with_suffix(".tmp")
    blob = {
        "student": {k: v.cpu() for k, v in trainable_state(student).items()},
        "optimizer": opt.state_dict(),
        "batches": batches.state(),
        **progress,
        "rng": _rng_state(),
        "recipe": asdict(recipe),
    }
    torch.save(blob, tmp)
    tmp.replace(ckpt)


def _resume(
    ckpt: Path, student: torch.nn.Module, opt: Any, batches: Batches | None, device: Any
) -> tuple[int, int, list[dict[str, Any]]]:
    """Load the checkpoint into the student, the optimiser, the batches and the random
    generators; returns its step, tokens seen and acceptance curve."""
    blob = torch.load(ckpt, weights_only=False)
    load_trainable_state(student, {k: v.to(device) for k, v in blob["student"].items()})
    opt.load_state_dict(blob["optimizer"])
    if batches is not None:
        batches.restore(blob["batches"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    return blob["step"], blob["tokens"], blob["curve"]


def _step(
    student: torch.nn.Module,
    opt: Any,
    params: list[torch.nn.Parameter],
    batch: Any,
    recipe: Recipe,
    head_pos: torch.Tensor | None,
    step: int,
    device: Any,
) -> dict[str, float]:
    """One optimiser step at ``step``'s learning rate; the batch's loss and statistics."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, recipe)
    loss, last = loss_on(student, batch, recipe, head_pos, device)
    last["loss"] = float(loss.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return last


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
    from picospec.runtime.loading import load_model

    return load_model(recipe.target, device=opts.device, dtype=recipe.dtype, threads=opts.threads)


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
    start_clock()
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
            from picospec.runtime.drafts.format import read_meta

            if [int(i) for i in read_meta(draft)["layers"]] != layers:
                raise ValueError(f"--init {recipe.init} has other layers than --layers gives")
        head_ids = None
        head_path = opts.work / "head_ids.pt"  # fixed once: a resumed run keeps its head
        if recipe.head_size and recipe.init and not head_path.is_file():
            draft = init_draft(recipe)
            if draft is not None:  # a finished draft keeps its head in its tensors file
                from safetensors.torch import load_file

                from picospec.runtime.drafts.format import TENSORS

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
