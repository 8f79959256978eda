"""The arena: votes in SQLite, the Bradley-Terry leaderboard, judges, export to preference pairs, the page."""
import math
import threading

import numpy as np
import pytest

from fournil.arena.ranking import ELO_MEAN, fit, leaderboard, points_matrix, table
from fournil.arena.store import Battle, Store, Vote


def vote(a: str, b: str, verdict: str, kind: str = "person", voter: str = "v") -> Vote:
    return Vote(Battle("x", "prompt", a, b, "answer a", "answer b", {}, 0), verdict, kind, voter)


def test_bradley_terry_finds_the_true_order_and_covers_the_true_scores():
    """2,000 battles between 4 models of known Elo scores: the fit puts them in order, each true score in its 95 %
    interval (the scores average 1,000, as the fit's do)."""
    true = {"w": 1150.0, "x": 1050.0, "y": 950.0, "z": 850.0}
    rng = np.random.default_rng(7)
    names, votes = list(true), []
    for _ in range(2000):
        a, b = rng.choice(4, 2, replace=False)
        p = 1 / (1 + 10 ** ((true[names[b]] - true[names[a]]) / 400))
        votes.append(vote(names[a], names[b], "a" if rng.random() < p else "b"))
    standings = leaderboard(votes, rounds=300)
    assert [s.model for s in standings] == ["w", "x", "y", "z"]
    for s in standings:
        assert s.low <= true[s.model] <= s.high, (s, true[s.model])
        assert s.high - s.low < 120  # 1,000 battles each: an interval of tens of points, not hundreds
    assert sum(s.battles for s in standings) == 4000


def test_bradley_terry_equals_the_fit_by_hand_and_ties_count_half():
    """A beats B 2-1, B beats C 2-1, A beats C 4-1: each model's expected wins equal its wins when A's odds against B
    and B's against C are 2 (log-odds ln 2), so the scores are 1000 + 400 log10(2) x (1, 0, -1)."""
    votes = [vote("A", "B", "a")] * 2 + [vote("A", "B", "b")] + [vote("B", "C", "a")] * 2 + [vote("B", "C", "b")] + \
        [vote("A", "C", "a")] * 4 + [vote("A", "C", "b")]
    step = 400 * math.log10(2)
    scores = fit(points_matrix(["A", "B", "C"], [(v.battle.model_a, v.battle.model_b, {"a": 1, "b": 0}[v.verdict])
                                                 for v in votes]))
    assert np.allclose(scores, [ELO_MEAN + step, ELO_MEAN, ELO_MEAN - step], atol=1e-3)
    # two ties are one win each; "both bad" is kept out of the fit
    tied = [vote("A", "B", "a"), vote("A", "B", "tie"), vote("A", "B", "tie"), vote("B", "A", "a"), vote("A", "B", "bad")]
    standings = leaderboard(tied, rounds=0)
    assert [s.battles for s in standings] == [4, 4] and [s.win_rate for s in standings] == [0.5, 0.5]
    assert all(abs(s.score - ELO_MEAN) < 1e-6 for s in standings)
    assert "| 1 | A | 1000 | 1000 to 1000 | 4 | 50.0% |" in table(standings)


def test_votes_from_many_threads_all_land(tmp_path):
    store = Store(tmp_path / "arena.sqlite")
    battles = [store.add_battle(f"prompt {i}", ("m1", "m2"), ("x", "y"), {"temperature": 0.7}, i) for i in range(50)]

    def cast(i: int) -> None:
        Store(tmp_path / "arena.sqlite").vote(battles[i].id, "ab"[i % 2], "person", f"voter {i}")

    threads = [threading.Thread(target=cast, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    votes = Store(tmp_path / "arena.sqlite").votes()
    assert len(votes) == 50 and {v.voter for v in votes} == {f"voter {i}" for i in range(50)}
    assert sorted(v.battle.seed for v in votes) == list(range(50))


def test_a_voter_changing_their_mind_replaces_their_vote_and_bad_input_is_refused(tmp_path):
    from fournil.errors import FournilError

    store = Store(tmp_path / "arena.sqlite")
    battle = store.add_battle("p", ("m1", "m2"), ("x", "y"), {}, 3)
    store.vote(battle.id, "a", "person", "me")
    store.vote(battle.id, "b", "person", "me")
    store.vote(battle.id, "a", "judge", "smollm2")
    assert sorted((v.voter_kind, v.verdict) for v in store.votes()) == [("judge", "a"), ("person", "b")]
    assert [v.verdict for v in store.votes("people")] == ["b"]
    with pytest.raises(FournilError, match="verdict 'c': one of a, b, tie, bad"):
        store.vote(battle.id, "c", "person", "me")
    with pytest.raises(FournilError, match="no battle 'nope'"):
        store.vote("nope", "a", "person", "me")
    (tmp_path / "junk.sqlite").write_text("not a database, but a text file that is long enough " * 40)
    with pytest.raises(FournilError, match="is not an arena database"):
        Store(tmp_path / "junk.sqlite")
