"""``fournil <command>``: parse, call the Python API, print. Errors are one line and exit code 2.

Each module holds its commands' flags beside the code that runs them: :mod:`~fournil.cli.training` (train, finetune,
merge, align, reward, distill), :mod:`~fournil.cli.measuring` (eval, bench, sample, explain, attention, embeddings),
:mod:`~fournil.cli.generation` (generate, chat, serve), :mod:`~fournil.cli.arena`, :mod:`~fournil.cli.files`
(convert, info, tokenizer, prepare, tokenize); :mod:`~fournil.cli.flags` holds the flags they share.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import gc
import os
import platform
import sys
from pathlib import Path

import torch

from fournil import __version__
from fournil.cli import arena, files, generation, measuring, training
from fournil.errors import FournilError, typed
from fournil.text import is_text

COMMANDS = {**training.COMMANDS, **measuring.COMMANDS, **generation.COMMANDS, **arena.COMMANDS, **files.COMMANDS}


class CommandList(argparse.HelpFormatter):
    """Each command's name beside what it does. Python 3.11 measures the names without their indentation, so that
    the longest (embeddings, attention, tokenizer) went on lines of their own, their purpose below."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += self._indent_increment


class WithDefaults(argparse.HelpFormatter):
    """A flag's help ends with its default, unless the help says it already (or there is none to say)."""

    def _get_help_string(self, action):
        said, default = action.help, action.default
        if not said or "default" in said or default in (None, False, "", [], argparse.SUPPRESS):
            return said
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        return f"{said} (default: {shown.replace('%', '%%')})"


def with_defaults(p: argparse.ArgumentParser) -> None:
    """Every command's parser, at every depth (arena judge, tokenizer train...), formats with :class:`WithDefaults`."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.formatter_class = WithDefaults
                with_defaults(sub)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fournil", allow_abbrev=False,
                                description="Build, train, measure and sample language models, from a bigram up.",
                                epilog="fournil COMMAND --help: what a command does, and its flags",
                                formatter_class=CommandList)
    # (what a bug report needs: the versions the run depended on)
    p.add_argument("--version", action="version",
                   version=f"fournil {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    training.add_train(sub)
    training.add_finetune(sub)
    training.add_align(sub)
    training.add_distill(sub)
    measuring.add_run_commands(sub)
    generation.add_generation(sub)
    measuring.add_pictures(sub)
    files.add_model_files(sub)
    arena.add_arena(sub)
    files.add_tokenizer_commands(sub)
    with_defaults(p)
    return p


# commands whose actions are subcommands: with none named (only flags, or nothing), the first, on its defaults
DEFAULT_ACTIONS = {"tokenizer": "train", "reward": "train"}


def file_error(e: OSError) -> str:
    """A file the system would not read or write, in words: which, and what to do (not "[Errno 2] ...")."""
    name = e.filename
    if name is None:
        return str(e)
    parent = Path(name).parent
    if e.errno == errno.ENOENT and not parent.exists():
        return f"{name}: the folder {parent} does not exist; create it, or choose another path"
    return {errno.ENOENT: f"{name}: no such file",
            errno.EEXIST: f"{name} already exists: choose another path",
            errno.EACCES: f"{name}: permission denied; choose a path you may write to",
            errno.ENOSPC: f"the disk is full (writing {name}); free some space, or write elsewhere",
            errno.EISDIR: f"{name} is a folder, where a file was expected",
            errno.ENOTDIR: f"{name}: a part of this path is a file, not a folder"}.get(e.errno, f"{name}: {e.strerror}")


def unknown_command(name: str) -> str:
    """A command fournil does not have, in words, with the nearest it has (a typo: trian for train)."""
    near = difflib.get_close_matches(name, COMMANDS, n=1)
    return (f"no command named '{name}'" + (f"; did you mean '{near[0]}'?" if near else "") +
            " (fournil --help lists them)")


def actions_of(command: str) -> list[str]:
    """What a command of several actions can do (reward: train, score)."""
    subs = lambda p: next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: E731
    return list(subs(subs(parser())[command]))


def unknown_action(argv: list[str], actions: list[str]) -> str:
    """A word where a command takes its action, in words: the nearest action (a typo), else the default one put
    first (`fournil reward runs/x`: `fournil reward train runs/x`)."""
    command, word = argv[:2]
    near = difflib.get_close_matches(word, actions, n=1)
    said = f"fournil {command} takes what to do first, {' or '.join(actions)}"
    if near:
        return f"{said}; did you mean '{near[0]}'? (fournil {command} --help)"
    given = " ".join(map(typed, argv[1:]))
    return f"{said}: fournil {command} {DEFAULT_ACTIONS[command]} {given} (fournil {command} --help)"


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; one that no flag takes is refused by the command's own parser, with its usage (not fournil's:
    `fournil prepare corpus` showed `fournil [-h] [--version] COMMAND ...`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        command = p  # down to the (sub)command named: fournil tokenizer train, say
        while sub := next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None):
            if getattr(args, sub.dest, None) not in sub.choices:
                break
            command = sub.choices[getattr(args, sub.dest)]
        places = [a for a in command._actions if not a.option_strings]
        name = lambda a: a.metavar or a.dest.upper()  # noqa: E731 - as the usage line says it
        flagged = next((a for a in places if f"--{a.dest.replace('_', '-')}" in extra), None)
        if flagged:  # --out, as other commands take it, where this one takes OUT in its place: convert MODEL OUT
            order = " ".join(f"[{name(a)}]" if a.nargs == "?" else name(a) for a in places)
            command.error(f"--{flagged.dest.replace('_', '-')} is not a flag of {command.prog}: give {name(flagged)} "
                          f"without it, in its place: {command.prog} {order}")
        words = [w for w in extra if not w.startswith("-")]
        if words and words == extra and (flags := as_flags(command, words, argv)):
            shown = [typed(a) for a in argv]
            at = len(argv)
            for flag, word in reversed(list(zip(flags, words))):  # (the last of equal words: the first was taken)
                at = max(i for i in range(at) if argv[i] == word)
                shown[at] = f"{flag} {shown[at]}"
            what = " ".join(map(typed, words)) + (" as a flag" if len(words) == 1 else " as flags")
            command.error(f"{command.prog} takes {what}: fournil {' '.join(shown)}")
        flag = next((w.split("=")[0] for w in extra if w.startswith("-")), None)
        if flag:
            command.error(no_such_flag(flag, command, p))
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def no_such_flag(flag: str, command: argparse.ArgumentParser, top: argparse.ArgumentParser) -> str:
    """A flag ``command`` does not take, in words: the commands that take it (generate -n: sample), else the nearest
    one it takes (--max-tokens: --max-new-tokens)."""
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    others = [f"fournil {name}" for name, c in commands.items() if any(flag in a.option_strings for a in c._actions)]
    near = difflib.get_close_matches(flag, [s for a in command._actions for s in a.option_strings], n=1)
    hint = (f": it is a flag of {' and '.join(others)}" if len(others) <= 2 else ": other commands take it") \
        if others else f"; did you mean {near[0]}?" if near else ""
    return f"{command.prog} has no flag {flag}{hint} (`{command.prog} --help` lists its flags)"


def as_flags(command: argparse.ArgumentParser, words: list[str], argv: list[str]) -> list[str] | None:
    """The flag that would take each word given where ``command`` takes flags (`fournil train llama`: --model;
    `fournil distill smollm2 shakespeare`: --teacher, then --data) and not in ``argv`` yet; None if one fits none."""
    from fournil.evaluate.bench import TASKS
    from fournil.models import FAMILIES, ORDERS

    has = {s for a in command._actions for s in a.option_strings} - {a.split("=")[0] for a in argv}
    flags = []
    for i, word in enumerate(words):
        fits = [f for f, fit in (("--model", word in FAMILIES or word in ORDERS), ("--tasks", word in TASKS),
                                 ("--teacher", i == 0 and len(words) > 1), ("--data", True)) if fit and f in has]
        if not fits:
            return None
        flags.append(fits[0])
    return flags if len(set(flags)) == len(flags) else None


def beside_resume(argv: list[str], args) -> str | None:
    """The settings given beside ``--resume``, in words: the run would go on without them, with its own."""
    kept = ("resume", "steps", "time", "quiet")
    flags = sorted({a.split("=")[0] for a in argv[1:] if a.startswith("--")} - {f"--{k}" for k in kept})
    if flags:
        return ", ".join(flags)
    command = argv[:2] if args.command in DEFAULT_ACTIONS else argv[:1]
    alone = vars(parser().parse_args([*command, "--resume", args.resume]))
    return next((f"the {k} {v}" for k, v in vars(args).items() if k not in kept and alone.get(k) != v), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # what fournil can do, rather than a usage error
        parser().print_help()
        return 0
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"fournil: error: {unknown_command(argv[0])}", file=sys.stderr)
        return 2
    if argv[0] in DEFAULT_ACTIONS and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, DEFAULT_ACTIONS[argv[0]])
    elif argv[0] in DEFAULT_ACTIONS and argv[1] not in (actions := actions_of(argv[0])) + ["-h", "--help"]:
        print(f"fournil: error: {unknown_action(argv, actions)}", file=sys.stderr)
        return 2
    garbled = next((a for a in argv if not is_text(a)), None)
    if garbled is not None:  # bytes that were not UTF-8, which Python keeps as halves of surrogate pairs
        print(f"fournil: error: the argument {os.fsencode(garbled)!r} is not UTF-8 text: write it in a terminal set to "
              f"UTF-8 (e.g. LANG=C.UTF-8), or convert the file it came from", file=sys.stderr)
        return 2
    try:
        args = parse(argv)
    except FournilError as e:  # a --config FILE that is not a recipe
        print(f"fournil: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "resume", None) and (given := beside_resume(argv, args)):
        print(f"fournil: error: --resume goes on with the settings {args.resume} started with (its config.json), a new "
              f"budget aside: only --steps, --time and --quiet go with it; drop {given}", file=sys.stderr)
        return 2
    # the objects of the modules imported so far (torch's and fournil's, some 170,000) are left out of the garbage
    # collector's full passes, each of which walked them all: one, set off by the 49,000 merges of SmolLM2's
    # tokenizer, took 0.07 s of `fournil chat smollm2`'s first answer
    gc.freeze()
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # (a reader gone shows here, not as the interpreter's exit flushes)
    except BrokenPipeError:  # what reads the output left (`fournil sample -n 1000 | head`): stop as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (what is still buffered goes nowhere)
        return 141  # (128 + SIGPIPE, a shell's status for a writer the pipe stopped)
    except (FournilError, OSError) as e:  # OSError: a file that cannot be read or written, with the system's reason
        print(f"fournil: error: {file_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fournil: interrupted", file=sys.stderr)
        return 130
    finally:  # (for a caller in the same process: a test, a notebook)
        gc.unfreeze()
    return 0
