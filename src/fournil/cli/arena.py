"""``fournil arena``: battles between models, people's and judges' votes, the leaderboard, the votes as preference
pairs."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fournil.cli.flags import (DEVICE, WEIGHT_PRECISIONS, add_key_env_arg, add_listen_args, check_key_env,
                               check_loaded_here, is_loopback, renamed)
from fournil.errors import FournilError, typed

ARENA_ACTIONS = ("serve", "leaderboard", "judge", "export")


class ArenaParser(argparse.ArgumentParser):
    """``fournil arena MODEL MODEL ...`` is ``fournil arena serve MODEL MODEL ...``: battles are what the arena does
    unless another action is named."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and (not args or args[0] not in (*ARENA_ACTIONS, "-h", "--help")):
            args = ["serve", *args]
        return super().parse_known_args(args, namespace)


def add_arena(sub) -> None:
    models = "models to compare: runs, .gguf files, Hugging Face folders, smollm2, or openai:NAME@BASE_URL"
    sub._parser_class, default = ArenaParser, sub._parser_class  # only `arena` reads its first word this way
    p = sub.add_parser("arena", help="models answer side by side, people and judges vote, a leaderboard ranks them",
                       description="fournil arena MODEL MODEL [MODEL ...]: a page where two anonymous models answer "
                                   "each prompt and people vote. Then: leaderboard, judge, export.")
    sub._parser_class = default
    actions = p.add_subparsers(dest="action", required=True, parser_class=argparse.ArgumentParser)

    def common(q) -> None:
        q.add_argument("--db", default="arena.sqlite",
                       help="the votes' database: a SQLite file, or postgresql://... (needs psycopg)")

    def answering(q) -> None:
        q.add_argument("--temperature", type=float, default=0.7, help="the same for both answers of a battle")
        q.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens")
        renamed(q, "--max-tokens", "--max-new-tokens")  # (as generate, chat and bench name it)
        q.add_argument("--device", **DEVICE)
        q.add_argument("--dtype", default="auto", choices=WEIGHT_PRECISIONS,
                       help="weights of the local models (auto: on a CPU, a quantized GGUF file's own bits, else as "
                            "loaded)")
        add_key_env_arg(q, "openai:NAME@URL models")

    q = actions.add_parser("serve", help="the battle page, /arena, and the leaderboard, /leaderboard (the default)")
    q.add_argument("models", nargs="*", help=models)
    common(q)
    answering(q)
    add_listen_args(q)
    q.add_argument("--max-batch", type=int, default=8, help="sequences each model generates together")
    q.add_argument("--allowed-hosts", default="", help="comma-separated Host names to answer besides localhost")
    q = actions.add_parser("leaderboard", help="Bradley-Terry scores with 95 %% intervals, and the win-rate matrix")
    common(q)
    q.add_argument("--voters", default="all", choices=["people", "judges", "all"], help="whose votes count")
    q.add_argument("--out", default="leaderboard", help="folder for leaderboard.md and win_rates.png")
    q.add_argument("--bootstrap", type=int, default=1000, help="refits behind the intervals")
    q = actions.add_parser("judge", help="a judge model votes: on new battles between MODELS, or on people's battles")
    q.add_argument("models", nargs="*", help=models + " (none: judge the battles people voted on)")
    q.add_argument("--judge", required=True, help="the judge: a model here, or openai:NAME@BASE_URL")
    q.add_argument("--prompts", default="rasbt_instructions",
                   help="an instruction, preference or prompt set (a bundled name, or a .jsonl, .json or .parquet "
                        "file in any form finetune and align read), or a .txt file of one prompt per line")
    q.add_argument("-n", "--num", type=int, default=40, help="how many prompts (the last ones of the set)")
    renamed(q, "--n", "-n")  # (train's --n is an n-gram's order; -n is how many, as in fournil sample)
    q.add_argument("--seed", type=int, default=0,
                   help="every battle's answers are sampled with it, and stored with it to be replayed")
    common(q)
    answering(q)
    q = actions.add_parser("export", help="the votes as prompt/chosen/rejected pairs for fournil align")
    common(q)
    q.add_argument("--voters", default="all", choices=["people", "judges", "all"], help="whose votes to export")
    q.add_argument("--out", default="prefs.jsonl", help="the JSONL file to write")


def run_arena(args) -> None:
    from fournil.arena.store import Store

    if args.action == "leaderboard":
        arena_leaderboard(args, Store(args.db, create=False))
    elif args.action == "export":
        from fournil.arena.store import preference_pairs

        pairs = preference_pairs(Store(args.db, create=False).votes(args.voters))
        if not pairs:
            raise FournilError(no_votes(args, "a better answer"))
        from fournil.checkpoint import atomic_write

        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"))
        print(f"{len(pairs):,} preference pair{'s' * (len(pairs) != 1)} -> {args.out} (fournil align --data "
              f"{typed(args.out)})")
    elif args.action == "judge":
        arena_judge(args)
    else:
        arena_serve(args)


def existing(db: str):
    """The votes' database if it exists, opened (a wrong one is said before the models load); None if it does not:
    it is created once they have loaded, so that a refused command leaves no empty database behind."""
    from fournil.arena.store import Store, is_postgres, placed

    if is_postgres(db) or Path(db).exists():
        return Store(db)
    placed(db)
    return None


def arena_contestants(args) -> dict:
    from fournil.generate import SamplingParams
    from fournil.generate.answerers import answerer, check_chats, name_of

    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature).check()
    names = [name_of(m) for m in args.models]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = args.models[names.index(name)]
            if os.path.abspath(first) == os.path.abspath(args.models[i]):
                raise FournilError(f"{first} is given twice: the arena compares different models")
            raise FournilError(f"{first} and {args.models[i]} would both be called {name} on the leaderboard (a model "
                               "is named by its folder or file): rename one, or copy it under another name")
    contestants = {}
    for name, spec in zip(names, args.models):
        print(f"loading {spec}", flush=True)
        contestants[name] = answerer(spec, args.device, args.dtype, args.api_key_env)
        check_chats(contestants[name])
    return contestants


def arena_serve(args) -> None:
    from fournil.arena.app import ArenaSettings, create_arena_app
    from fournil.arena.store import Store
    from fournil.generate.scheduler import check_capacity
    from fournil.serve.app import listen, run_server
    from fournil.serve.guard import LOOPBACK_HOSTS

    check_key_env(args.api_key_env, args.models)
    check_loaded_here(args, args.models)

    if len(args.models) < 2:
        raise FournilError("the arena needs two models or more: fournil arena MODEL MODEL [MODEL ...]")
    check_capacity(args.max_batch, 64)
    extra = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    settings = ArenaSettings(args.temperature, args.max_new_tokens, args.max_batch,
                             hosts=(*LOOPBACK_HOSTS, *extra) if is_loopback(args.host) else (extra or None))
    sock = listen(args.host, args.port)
    store = existing(args.db)
    contestants = arena_contestants(args)
    app, schedulers = create_arena_app(contestants, store or Store(args.db), settings)
    print(f"the arena of {', '.join(args.models)} on http://{args.host}:{sock.getsockname()[1]}/arena (votes in "
          f"{args.db}); leaderboard at /leaderboard", flush=True)
    run_server(app, schedulers, sock)


def no_votes(args, naming: str) -> str:
    whose = {"all": "", "people": " by people", "judges": " by judges"}[args.voters]
    db = typed(args.db)
    return (f"{args.db} holds no vote{whose} that names {naming} yet: vote on the page of fournil arena MODEL MODEL "
            f"--db {db}, or let a judge vote (fournil arena judge MODEL MODEL --judge JUDGE --db {db})")


def arena_leaderboard(args, store) -> None:
    from fournil.arena.ranking import agreement, leaderboard, plot_win_rates, table

    if args.bootstrap < 0:
        raise FournilError(f"--bootstrap must be 0 or more (got {args.bootstrap})")
    votes = store.votes(args.voters)
    board = leaderboard(votes, args.bootstrap)
    if not board:
        raise FournilError(no_votes(args, "a better answer or a tie"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(board)
    rate, both = agreement(store.votes("all"))
    text += f"\n{len(votes):,} votes of {args.voters}. " + (
        f"People and judges agree on {rate:.0%} of the {both:,} battles both voted on.\n" if both else
        "No battle has both a person's and a judge's vote yet.\n")
    (out / "leaderboard.md").write_text(text, encoding="utf-8")
    plot_win_rates(votes, board, out / "win_rates.png")
    print(text, end="")
    print(f"-> {out / 'leaderboard.md'}, {out / 'win_rates.png'}", file=sys.stderr)


def arena_judge(args) -> None:
    from fournil.arena.judge import Judge, check_fits, judge_battle, read_prompts, tournament
    from fournil.arena.store import Store
    from fournil.generate import SamplingParams
    from fournil.generate.answerers import answerer, name_of

    check_key_env(args.api_key_env, [*args.models, args.judge])
    check_loaded_here(args, [*args.models, args.judge])
    if args.num < 1:
        raise FournilError(f"-n must be at least 1 (got {args.num})")
    if len(args.models) == 1:
        raise FournilError("give two models or more to judge new battles, or none to judge the battles people voted on")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    params.check()
    prompts = read_prompts(args.prompts, args.num) if args.models else None
    if args.models:
        store = existing(args.db)
        contestants = arena_contestants(args)
        for model in contestants.values():  # (before the judge loads, the database is made, and any answer)
            check_fits(model, prompts, params)
        judge = Judge(answerer(args.judge, args.device, "auto", args.api_key_env))
        votes = tournament(contestants, judge, prompts, store or Store(args.db), params)
        asked = len(prompts) * len(contestants) * (len(contestants) - 1) // 2
    else:
        name, store = name_of(args.judge), Store(args.db, create=False)  # people's battles: in a database already
        judged = {v.battle.id for v in store.votes("judges") if v.voter == name}
        battles = {v.battle.id: v.battle for v in store.votes("people") if v.battle.id not in judged}
        if not battles:
            raise FournilError(f"{args.db} has no battle people voted on that {name} has not judged yet")
        judge = Judge(answerer(args.judge, args.device, "auto", args.api_key_env))
        votes = sum(judge_battle(judge, b, store) for b in battles.values())
        asked = len(battles)
    print(f"{name_of(args.judge)} gave {votes} verdict{'s' * (votes != 1)} -> {args.db} (fournil arena leaderboard "
          f"--db {typed(args.db)})")
    if votes < asked:
        print(f"fournil: {asked - votes} of {asked} battles got no verdict: the judge's answer named none ([[A]], "
              f"[[B]] or [[C]]) in one of the orders, or the battle did not fit its context", file=sys.stderr)


COMMANDS = {"arena": run_arena}
