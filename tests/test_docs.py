"""The README and the docs say only what is true of the code: every `fournil ...` line of their command blocks parses
with the real argument parser, every flag they name exists, every link to the repository resolves, and the README's
test command is the one CI runs."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from fournil.cli import parser
from fournil.cli.flags import Renamed

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "course" / "README.md"]
OTHER_TOOLS = {"--no-deps", "--index-url", "--nproc_per_node", "--model_args", "--include_path"}  # pip, torchrun, lm_eval


def blocks(text: str) -> list[str]:
    """The lines of the page's fenced blocks of shell commands."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    return [line for lang, body in found if lang in ("", "bash", "sh", "console") for line in body.splitlines()]


def fournil_commands(line: str) -> list[list[str]]:
    """The arguments of each `fournil` (or `python -m fournil`) call on a shell line."""
    commands, current, starting = [], None, True
    for word in shlex.split(line, comments=True):
        if word in ("&&", "||", ";", "|"):
            current, starting = None, True
        elif word in ("<", ">", ">>", "2>"):  # a redirection: the file that follows is the shell's
            current, starting = None, False
        elif current is not None:
            current.append(word)
        elif word == "fournil" and starting:
            current = []
            commands.append(current)
        else:
            starting = word in ("-m", "$")  # `python -m fournil`, a prompt's `$ fournil`
    return commands


def options(p: argparse.ArgumentParser) -> set[str]:
    """Every flag of ``p`` and its subcommands (not the old spellings kept only to be refused)."""
    found = set()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options(sub)
        elif not isinstance(action, Renamed):
            found |= {o for o in action.option_strings if o.startswith("--")}
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_of_the_page_parses(page):
    lines = [line for line in blocks(page.read_text(encoding="utf-8")) if fournil_commands(line)]
    if page == ROOT / "README.md":
        assert len(lines) >= 5  # the blocks were found
    for line in lines:
        for args in fournil_commands(line):
            try:
                parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{page.name}: `fournil {' '.join(args)}` does not parse")


def test_every_flag_named_exists():
    known = options(parser()) | OTHER_TOOLS
    for script in [*(ROOT / "benchmarks").glob("*.py"), ROOT / "tests" / "conftest.py"]:  # theirs, and the tests'
        known |= set(re.findall(r'add(?:_argument|option)\("(--[a-z0-9-]+)"', script.read_text()))
    for page in PAGES:
        text = re.sub(r"https?://\S+", "", page.read_text(encoding="utf-8"))
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text))
        assert not named - known, f"{page.name} names flags that no command has: {sorted(named - known)}"


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_the_repository_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                assert anchor in {slug(h) for h in headings}, f"{page.name} links to {target}: no such heading"


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci) == 1 and ci[0] in blocks(readme)
