"""Battles and votes, in a real database: SQLite (the standard library's, WAL mode) by default, PostgreSQL for a
shared deployment (``--db postgresql://...``, with ``psycopg`` installed; the same SQL).

A battle is two models' answers to one prompt, with the settings and the seed that replay it; a vote is one voter's
verdict on a battle (a person's from the page, or a judge model's). Every write is committed before the caller hears
it is recorded, so a server killed at any moment loses no vote it acknowledged.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fournil.errors import FournilError, typed

SCHEMA_VERSION = 1
VERDICTS = ("a", "b", "tie", "bad")  # A better, B better, a tie, both bad
VOTERS = ("person", "judge")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL,
    settings TEXT NOT NULL, seed BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    id TEXT PRIMARY KEY, battle TEXT NOT NULL REFERENCES battles (id), verdict TEXT NOT NULL,
    voter_kind TEXT NOT NULL, voter TEXT NOT NULL, created REAL NOT NULL, UNIQUE (battle, voter_kind, voter));
"""


@dataclass
class Battle:
    id: str
    prompt: str
    model_a: str
    model_b: str
    answer_a: str
    answer_b: str
    settings: dict
    seed: int
    created: float = 0.0


@dataclass
class Vote:
    battle: Battle
    verdict: str
    voter_kind: str
    voter: str


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def placed(url: str) -> None:
    """Refuse an SQLite path that cannot hold a database (before any model loads, where the database comes after)."""
    path = Path(url)
    if path.is_dir():
        raise FournilError(f"--db {url} is a folder: give the database's file, such as {typed(path / 'arena.sqlite')}")
    if not path.parent.is_dir():
        raise FournilError(f"--db {url}: the folder {path.parent} does not exist; create it first or choose another "
                           f"path")


class Store:
    """The database at ``url``: a file path (SQLite) or ``postgresql://...``. Safe to share between threads."""

    def __init__(self, url: str | Path, create: bool = True):
        self.url = str(url)
        self.postgres = is_postgres(self.url)
        if not self.postgres and (create or Path(self.url).is_dir()):
            placed(self.url)
        elif not self.postgres and not Path(self.url).is_file():
            raise FournilError(f"--db {self.url}: no such database (an arena writes one: fournil arena MODEL MODEL "
                               f"--db {typed(self.url)})")
        self._local = threading.local()
        with self._write() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise FournilError(f"{self.url} holds arena data of schema version {row[0]}; this fournil reads "
                                   f"version {SCHEMA_VERSION}: use the fournil that wrote it, or another --db")

    def _connection(self):
        """This thread's connection (SQLite connections are not shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _connect(self):
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise FournilError("a PostgreSQL --db needs the psycopg package: pip install 'psycopg[binary]'") from None
            return _Postgres(psycopg.connect(self.url))
        path = Path(self.url)
        if not path.parent.is_dir():
            raise FournilError(f"--db {path}: no folder {path.parent} to hold it")
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise FournilError(f"--db {path} is not an arena database ({e})") from None
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it is acknowledged
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _write(self):
        """A transaction, committed when the block ends (rolled back if it raises)."""
        db = self._connection()
        db.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")  # SQLite: take the write lock now, not halfway
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- writing
    def add_battle(self, prompt: str, models: tuple[str, str], answers: tuple[str, str], settings: dict,
                   seed: int) -> Battle:
        battle = Battle(uuid.uuid4().hex, prompt, *models, *answers, settings, seed, time.time())
        with self._write() as db:
            db.execute("INSERT INTO battles (id, created, prompt, model_a, model_b, answer_a, answer_b, settings, seed) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (battle.id, battle.created, prompt, *models, *answers, json.dumps(settings), seed))
        return battle

    def vote(self, battle_id: str, verdict: str, voter_kind: str, voter: str) -> Battle:
        """Record (or replace) ``voter``'s verdict on a battle; returns the battle, whose models may now be shown."""
        if verdict not in VERDICTS:
            raise FournilError(f"verdict {verdict!r}: one of {', '.join(VERDICTS)}")
        if voter_kind not in VOTERS:
            raise FournilError(f"voter kind {voter_kind!r}: one of {', '.join(VOTERS)}")
        battle = self.battle(battle_id)
        with self._write() as db:
            db.execute("DELETE FROM votes WHERE battle = ? AND voter_kind = ? AND voter = ?", (battle_id, voter_kind, voter))
            db.execute("INSERT INTO votes (id, battle, verdict, voter_kind, voter, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (uuid.uuid4().hex, battle_id, verdict, voter_kind, voter, time.time()))
        return battle

    # ---- reading
    def battle(self, battle_id: str) -> Battle:
        row = self._connection().execute(f"SELECT {BATTLE_COLUMNS} FROM battles WHERE id = ?", (battle_id,)).fetchone()
        if row is None:
            raise FournilError(f"no battle {battle_id!r} in {self.url}")
        return _battle(row)

    def votes(self, voters: str = "all") -> list[Vote]:
        """Every vote of ``voters`` (``people``, ``judges`` or ``all``), oldest first."""
        kinds = {"people": ("person",), "judges": ("judge",), "all": VOTERS}.get(voters)
        if kinds is None:
            raise FournilError(f"--voters {voters}: people, judges or all")
        rows = self._connection().execute(
            f"SELECT {', '.join('b.' + c for c in BATTLE_COLUMNS.split(', '))}, v.verdict, v.voter_kind, v.voter "
            f"FROM votes v JOIN battles b ON b.id = v.battle "
            f"WHERE v.voter_kind IN ({', '.join('?' for _ in kinds)}) ORDER BY v.created", kinds).fetchall()
        return [Vote(_battle(r[:9]), *r[9:]) for r in rows]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


BATTLE_COLUMNS = "id, prompt, model_a, model_b, answer_a, answer_b, settings, seed, created"


def _battle(row) -> Battle:
    id_, prompt, a, b, answer_a, answer_b, settings, seed, created = row
    return Battle(id_, prompt, a, b, answer_a, answer_b, json.loads(settings), int(seed), float(created))


class _Postgres:
    """A psycopg connection that takes SQLite's ``?`` placeholders, in autocommit mode (transactions by BEGIN)."""

    def __init__(self, connection):
        connection.autocommit = True
        self.connection = connection

    def execute(self, sql: str, params=()):
        return self.connection.execute(sql.replace("?", "%s"), params)

    def close(self) -> None:
        self.connection.close()


def preference_pairs(votes: list[Vote]) -> list[dict]:
    """``prompt``/``chosen``/``rejected`` records (what ``fournil align --data`` reads) from the votes that name a
    better answer; ties, "both bad", and answers that are the same text are left out."""
    pairs = []
    for v in votes:
        b = v.battle
        if v.verdict in ("a", "b") and b.answer_a.strip() != b.answer_b.strip():
            chosen, rejected = (b.answer_a, b.answer_b) if v.verdict == "a" else (b.answer_b, b.answer_a)
            pairs.append({"prompt": b.prompt, "chosen": chosen, "rejected": rejected, "battle": b.id,
                          "voter": f"{v.voter_kind}:{v.voter}"})
    return pairs
