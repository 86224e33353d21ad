"""``picospec distill``: the command line of the distillation pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from picospec.tools.distill.recipe import Options, Recipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train a draft for a target (shared tokenizer), resumable; see docs/distill.md",
        description="Distil a draft from a target: data from the target's own answers, the "
        "draft's layers initialised from the target's, KD training with checkpoints, a report. "
        "Run the same command again to resume.",
    )
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"recipe: {f.name} (default {getattr(defaults, f.name)!r})",
        )
    p.add_argument("--work", default="build/distill/smollm2", help="work dir (data, checkpoints)")
    p.add_argument("--out", default=None, help="where the finished draft goes (default WORK/draft)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--max-time-s", type=float, default=None, help="stop (resumably) after this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (background runs)")
    p.add_argument("--no-timing", action="store_true", help="report without the step-time ratio")
    p.add_argument("--engine-prompts", type=int, default=4, help="prompts for engine acceptance")
    p.add_argument(
        "--eval-mtbench",
        type=int,
        default=0,
        help="the report also measures acceptance on the first N MT-Bench questions (never "
        "trained on)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="report on and save the latest checkpoint without training further (the work "
        "directory's recipe is used)",
    )
    p.add_argument("--status", action="store_true", help="print the run's status and exit")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from picospec.tools.distill.report import report_markdown
    from picospec.tools.distill.stages import status_text
    from picospec.tools.distill.train import run

    work = Path(args.work)
    if args.status:
        print(status_text(work))
        return 0
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    if args.report_only and (work / "recipe.json").is_file():  # the run's own recipe
        recipe = Recipe(**json.loads((work / "recipe.json").read_text()))
    opts = Options(
        work=work,
        out=Path(args.out) if args.out else None,
        device=args.device,
        threads=args.threads,
        max_time_s=args.max_time_s,
        progress=not args.no_progress,
        timing=not args.no_timing,
        engine_prompts=args.engine_prompts,
        eval_mtbench=args.eval_mtbench,
        report_only=args.report_only,
    )
    report = run(recipe, opts)
    if report.get("paused"):
        print(f"paused at a checkpoint in {work}: run the same command to resume")
        return 0
    print(report_markdown(report))
    print(json.dumps({"out": str(opts.out or work / "draft")}))
    return 0
