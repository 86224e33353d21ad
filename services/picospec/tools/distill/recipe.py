"""The recipe of a draft and the options of a run (light: the command line imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Recipe:
    """Everything that determines a draft (the work directory's ``recipe.json``)."""

    target: str = "smollm2"
    layers: str = "4"  # "4" spread over the target's layers, "first:4", or "0,10,20,29"
    head_size: int = 8192  # 0 = the full head
    sources: str = "chat,docs"
    prompt_set: str = "short"  # the chat prompts: short (one-line) or long (multi-part) requests
    prompts: int = 0  # chat prompts to answer (0 = every synthesised prompt)
    prompt_offset: int = 0  # skip this many synthesised prompts (those an earlier run answered)
    max_new_tokens: int = 192
    temperatures: str = "0,0.7"  # the target answers prompt i at temperatures[i % n]
    gen_batch: int = 8
    shard_prompts: int = 64
    topk: int = 32
    steps: int = 2000
    batch_tokens: int = 2048
    max_len: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    kd: str = "both"  # token (soft top-k KL), seq (CE on the target's tokens) or both
    hard_weight: float = 0.2
    eval_prompts: int = 16
    eval_max_new_tokens: int = 96
    eval_every: int = 200
    ckpt_every: int = 50
    seed: int = 0
    dtype: str = "float32"
    # a work directory of an earlier run of the same target, layers and head: the draft starts
    # from its last checkpoint (and keeps its head), and its training data joins this run's;
    # or a finished draft (a shipped name such as smollm2-draft, or a directory with draft.json):
    # the draft starts from its weights and head, with no data of its own
    init: str = ""

    def layer_list(self, total: int) -> list[int]:
        from picospec.runtime.drafts.student import parse_layers

        return parse_layers(self.layers, total)

    @property
    def temperature_list(self) -> list[float]:
        return [float(t) for t in self.temperatures.split(",") if t.strip()]

    @property
    def source_list(self) -> list[str]:
        out = [s.strip() for s in self.sources.split(",") if s.strip()]
        bad = set(out) - {"chat", "docs"}
        if bad:
            raise ValueError(f"unknown data sources {sorted(bad)}: use chat and/or docs")
        return out


@dataclass
class Options:
    """How to run (not part of the recipe: changing these never changes the draft)."""

    work: Path = Path("build/distill/smollm2")
    out: Path | None = None
    device: str = "auto"
    threads: int | None = None
    max_time_s: float | None = None
    progress: bool = True
    timing: bool = True
    engine_prompts: int = 4
    engine_max_tokens: int = 64
    eval_mtbench: int = 0  # the report also measures the first N MT-Bench questions (eval only)
    report_only: bool = False  # report on (and save) the latest checkpoint, without training
    prompt_source: list[str] | None = field(default=None, repr=False)  # tests: fixed prompts
