"""The documentation stays honest: README.md and docs/*.md name only real commands and links.

- Every command quoted in a code block or in inline code that starts with ``picospec`` (or
  ``.venv/bin/picospec``) is parsed by the live ``picospec`` argparse parser, so a renamed
  subcommand or flag, a bad choice or a missing value fails here; flags added later are accepted
  without touching this file. A quote that stops before a required argument (``picospec
  generate`` in a sentence) is fine; an unknown or abbreviated flag is not.
- Every ``make`` command names targets of the Makefile and variables it defines;
  ``UP_ARGS``/``BENCH_ARGS`` values are parsed as ``picospec up``/``picospec bench`` flags.
- Every relative link (and image) resolves to a file, and a ``#fragment`` to a heading of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from picospec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAKE_RULE = re.compile(r"^([A-Za-z0-9_.%/ -]+?)\s*:(?!=)")
MAKE_VAR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|\+)?=")
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}
PROGRAM_PREFIXES = (".venv/bin/", "$(BIN)/", "./")
ARG_PARSERS = {"UP_ARGS": "up", "BENCH_ARGS": "bench"}


# -- reading the documents -------------------------------------------------------------------


def code_snippets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, snippet) for every shell line of a fenced code block and every inline code
    span outside them. Continuation lines (``\\``) are joined."""
    in_block = False
    lang = ""
    pending = ""
    start = 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence:
            in_block = not in_block
            lang = line.strip()[3:].strip() if in_block else ""
            continue
        if in_block:
            if lang not in ("", "bash", "sh", "shell", "console"):
                continue
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            if not pending:
                start = n
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            yield start, pending + stripped
            pending = ""
            continue
        for m in INLINE.finditer(line):
            yield n, m.group(1)


def commands(snippet: str) -> Iterator[list[str]]:
    """The simple commands of a shell snippet as word lists, without redirections; nothing for
    a snippet that is not shell (Python, JSON, prose in backticks)."""
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: not a shell command
        return
    current: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in SEPARATORS:
            if current:
                yield current
            current = []
        elif word in REDIRECTS:
            skip_next = True
        else:
            current.append(word)
    if current:
        yield current


def program(words: list[str]) -> tuple[str, list[str]] | None:
    """(``picospec`` or ``make``, arguments) when the command runs one of them."""
    if not words:
        return None
    head = words[0]
    for prefix in PROGRAM_PREFIXES:
        if head.startswith(prefix):
            head = head[len(prefix) :]
    if head not in ("picospec", "make"):
        return None
    args = []
    for word in words[1:]:
        # `[--tls]` marks an optional flag; `…` and `...` elide the rest.
        word = word.strip("[]")
        if word and word not in ("…", "..."):
            args.append(word)
    return head, args


# -- checking commands -----------------------------------------------------------------------


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Docs must spell flags out: argparse would otherwise accept any unique prefix."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def _parser() -> argparse.ArgumentParser:
    parser = build_parser()
    _no_abbreviations(parser)
    return parser


def picospec_error(args: list[str]) -> str | None:
    """None if ``picospec ARGS`` parses (or only lacks required arguments), else the error."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            _parser().parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help, --version
            return None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "?"
        if "the following arguments are required" in message:
            return None  # a quote that stops early, e.g. `picospec generate` in a sentence
        return message
    return None


def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile."""
    targets: set[str] = set()
    variables: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        var = MAKE_VAR.match(line)
        if var:
            variables.add(var.group(1))
            continue
        rule = MAKE_RULE.match(line)
        if rule:
            targets.update(t for t in rule.group(1).split() if "$" not in t and t[0] != ".")
    return targets, variables


def make_errors(args: list[str]) -> list[str]:
    targets, variables = makefile()
    errors = []
    for arg in args:
        if arg.startswith("-"):
            continue
        if "=" in arg:
            name, value = arg.split("=", 1)
            if name not in variables:
                errors.append(f"make variable {name} is not defined in the Makefile")
            elif name in ARG_PARSERS:
                try:
                    words = shlex.split(value)
                except ValueError:
                    words = value.split()
                error = picospec_error([ARG_PARSERS[name], *words])
                if error:
                    errors.append(f"{name}: {error}")
        elif arg not in targets:
            errors.append(f"no make target {arg!r}")
    return errors


def command_errors(text: str) -> list[str]:
    """``line: command: problem`` for every command of ``text`` that names something unreal."""
    errors = []
    for line, snippet in code_snippets(text):
        for words in commands(snippet):
            found = program(words)
            if found is None:
                continue
            name, args = found
            if name == "picospec":
                error = picospec_error(args)
                problems = [error] if error else []
            else:
                problems = make_errors(args)
            errors.extend(f"{line}: {snippet!r}: {p}" for p in problems)
    return errors


# -- checking links --------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (outside code blocks)."""
    out: set[str] = set()
    in_block = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def link_errors(text: str, base: Path) -> list[str]:
    errors = []
    in_block = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            in_block = not in_block
        if in_block:
            continue
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            path = (base / path_part).resolve()
            if not path.exists():
                errors.append(f"{n}: link {target!r}: {path_part} does not exist")
                continue
            if not fragment or (path_part and path.suffix != ".md"):
                continue
            heading_text = path.read_text() if path_part else text
            if fragment not in anchors(heading_text):
                errors.append(f"{n}: link {target!r}: no heading #{fragment} in {path_part}")
    return errors


# -- the tests -------------------------------------------------------------------------------


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_commands_name_real_subcommands_flags_and_targets(doc: Path) -> None:
    assert command_errors(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_resolve(doc: Path) -> None:
    assert link_errors(doc.read_text(), doc.parent) == []


def test_the_docs_quote_commands_at_all() -> None:
    """The checks above must have something to check: the README's two commands at least."""
    quoted = {
        " ".join([found[0], *found[1][:1]])
        for doc in DOCS
        for _, snippet in code_snippets(doc.read_text())
        for words in commands(snippet)
        if (found := program(words))
    }
    assert {"make run", "make test", "picospec generate", "picospec bench", "picospec up"} <= quoted


def test_no_document_refers_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|shared/(DESIGN|CONVENTIONS)\.md")
    for path in [*DOCS, *ROOT.glob("services/**/*.py"), *ROOT.glob("observability/**/*.md")]:
        assert not outside.search(path.read_text()), path


BAD_DOC = """\
# A page

```bash
picospec bench --quick --no-such-flag
make run UP_ARGS="--verifiers 2 --observabilty"
make no-such-target
```

Run `picospec up --topology moon` or `picospec frobnicate`, or `picospec up --obs`, or
`make tset`, or `make run NO_SUCH_VAR=1`. See [missing](docs/missing.md) and
[a heading](docs/api.md#no-such-heading), [here](#nowhere) but [there](#a-page).
"""


def test_the_checks_catch_what_they_should() -> None:
    """The test can fail: every kind of mistake in BAD_DOC is reported."""
    problems = "\n".join(command_errors(BAD_DOC))
    for expected in (
        "unrecognized arguments: --no-such-flag",
        "unrecognized arguments: --observabilty",
        "no make target 'no-such-target'",
        "invalid choice: 'moon'",
        "invalid choice: 'frobnicate'",
        "unrecognized arguments: --obs",  # an abbreviation of --observability
        "no make target 'tset'",
        "NO_SUCH_VAR is not defined",
    ):
        assert expected in problems, expected
    links = "\n".join(link_errors(BAD_DOC, ROOT))
    assert "docs/missing.md does not exist" in links
    assert "no heading #no-such-heading" in links
    assert "no heading #nowhere" in links
    assert "#a-page" not in links


def test_good_commands_pass() -> None:
    good = """\
```bash
picospec generate "Hi there" --mode picospec --json
.venv/bin/picospec bench --quick --profiles lan,4g > out.json
make run UP_ARGS="--verifiers 2 --observability"
picospec cluster -n picospec scale-verifiers 3
```
`picospec up --secure [--tls]`, `picospec generate`, `make chart-files manifests`, `make …`
"""
    assert command_errors(good) == []


def test_settings_table_is_generated_from_settings() -> None:
    """docs/configuration.md's settings table is `make docs`'s output: one row per field of
    ``Settings``, each with a description and the roles that read it."""
    import importlib.util

    from picospec.config import Settings

    spec = importlib.util.spec_from_file_location(
        "picospec_docs_settings_table", ROOT / "docs" / "hack" / "settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert gen.current(text) == gen.table(), "run `make docs`"
    rows = [line for line in gen.current(text).splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [n.upper() for n in Settings.model_fields]
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.strip(), f"{name}: no description"
        roles = gen.metadata(field).get("roles")
        assert roles, f"{name}: no roles (json_schema_extra={{'roles': [...]}})"
        assert set(roles) <= set(gen.ROLES), f"{name}: unknown roles {roles}"
        assert "all" not in roles or roles == ["all"], f"{name}: 'all' and other roles"
