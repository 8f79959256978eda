"""``fournil <command>``: parse, call the Python API, print. Errors are one line and exit code 2.

Each module holds its commands' flags beside the code that runs them: :mod:`~fournil.cli.training` (train, finetune,
merge, align, reward, distill), :mod:`~fournil.cli.measuring` (eval, bench, sample, explain, attention, embeddings),
:mod:`~fournil.cli.generation` (generate, chat, serve), :mod:`~fournil.cli.arena`, :mod:`~fournil.cli.files`
(convert, info, tokenizer, prepare, tokenize); :mod:`~fournil.cli.flags` holds the flags they share.
"""
from __future__ import annotations

import argparse
import sys

from fournil.cli import arena, files, generation, measuring, training
from fournil.errors import FournilError

COMMANDS = {**training.COMMANDS, **measuring.COMMANDS, **generation.COMMANDS, **arena.COMMANDS, **files.COMMANDS}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fournil", allow_abbrev=False,
                                description="Build, train, measure and sample language models, from a bigram up.")
    sub = p.add_subparsers(dest="command", required=True)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FournilError, OSError) as e:  # OSError: a file that cannot be read or written, with the system's reason
        print(f"fournil: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fournil: interrupted", file=sys.stderr)
        return 130
    return 0
