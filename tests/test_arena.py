"""The arena: votes in SQLite, the Bradley-Terry leaderboard, judges, export to preference pairs, the page."""
import math
import threading
from pathlib import Path

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


# ---- end to end: the server, a browser, judges, export
import http.client  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import urllib.request  # noqa: E402

from conftest import CLI, Server, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def poet(tmp_path_factory):
    """A second contestant: a small chat model like the first, trained less, from another seed."""
    root = tmp_path_factory.mktemp("poet")
    CLI(root)("train", "--data", "shakespeare", "--model", "llama", "--tokenizer", "bpe:400", "--n-embd", "32",
              "--n-layer", "1", "--block-size", "1024", "--batch-size", "4", "--steps", "10", "--eval-every", "10",
              "--seed", "7", "--quiet", "--out", "poet")
    return root / "poet"


@pytest.fixture(scope="module")
def position_judge(bpe_llama, tmp_path_factory):
    """A judge taught to answer "[[A]]" whatever the answers: it prefers the first position, not an answer."""
    from fournil.arena.judge import judge_messages

    root = tmp_path_factory.mktemp("judge")
    words = ["rain", "bread", "tides", "kings", "ships", "roses", "crowns", "fools"]
    rows = [{"messages": judge_messages(f"Tell me of {w}.", f"Of {w} I know {v}.", f"No {v} at all.") +
             [{"role": "assistant", "content": "[[A]]"}]} for w in words for v in words[:4]]
    write_jsonl(root / "verdicts.jsonl", rows)
    CLI(root)("finetune", bpe_llama, "--data", root / "verdicts.jsonl", "--steps", "60", "--lr", "1e-2",
              "--batch-size", "4", "--eval-every", "30", "--quiet", "--out", "judge")
    return root / "judge"


def post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def battle(url: str, **body) -> tuple[str, dict]:
    """A battle fought through the API: its id and both answers, from the event stream."""
    status, raw = post(url + "/arena/battles", {"prompt": "Speak of the sea.", "max_tokens": 8, **body})
    assert status == 200, raw
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    answers = {s: "".join(e["text"] for e in events if e.get("side") == s) for s in "ab"}
    return events[-1]["battle"], answers


def test_a_battle_in_the_browser_streams_both_answers_takes_a_vote_and_names_the_models(bpe_llama, poet, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    server = Server(bpe_llama, poet, "--db", tmp_path / "arena.sqlite", command="arena")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            page.goto(server.url + "/arena")
            page.fill("#prompt", "Speak, <b>good</b> sir.")
            page.fill("#temperature", "1")
            page.fill("#max-tokens", "300")
            # no vote can be cast while the battle is on: the click and the check in one task of the page (the form's
            # handler disables the votes before it awaits the answers; a check after page.click could come after both
            # sampled answers had ended, as it once did in CI)
            assert page.evaluate("() => { document.querySelector('#go').click(); "
                                 "return [...document.querySelectorAll('.vote')].every((b) => b.disabled); }")
            expect(page.locator("#answer-a")).not_to_be_empty(timeout=60_000)
            expect(page.locator("#answer-b")).not_to_be_empty(timeout=60_000)
            expect(page.locator("#status")).to_have_text("which answer is better?", timeout=120_000)
            assert page.locator("#answer-a b").count() == 0  # the prompt and answers are text, never HTML
            assert page.locator("#name-a").inner_text() == "Model A"  # anonymous until the vote
            page.click("text=A is better")
            expect(page.locator("#status")).to_have_text("vote recorded")
            names = {page.locator("#name-a").inner_text()[3:], page.locator("#name-b").inner_text()[3:]}
            assert names == {"chat", "poet"}
            winner = page.locator("#name-a").inner_text()[3:]
            page.click("text=leaderboard")
            first = page.locator("#leaderboard tbody tr").first.locator("td")
            assert first.nth(1).inner_text() == winner and first.nth(4).inner_text() == "1"
            browser.close()
    finally:
        server.stop()
    votes = Store(tmp_path / "arena.sqlite").votes()
    assert len(votes) == 1 and votes[0].voter_kind == "person" and votes[0].battle.prompt == "Speak, <b>good</b> sir."
    assert votes[0].battle.settings == {"temperature": 1.0, "max_tokens": 300}


def test_a_battle_replays_from_its_seed_and_bad_requests_say_why(bpe_llama, poet, tmp_path):
    server = Server(bpe_llama, poet, "--db", tmp_path / "arena.sqlite", command="arena")
    try:
        first, answers = battle(server.url, temperature=1.0)
        stored = Store(tmp_path / "arena.sqlite").battle(first)
        assert (stored.answer_a, stored.answer_b) == (answers["a"], answers["b"])
        again = battle(server.url, temperature=1.0, seed=stored.seed, models=[stored.model_a, stored.model_b])[1]
        assert again == answers
        status, body = post(server.url + "/arena/votes", {"battle": first, "verdict": "c"})
        assert status == 400 and json.loads(body)["error"]["message"] == "verdict 'c': one of a, b, tie, bad"
        status, body = post(server.url + "/arena/votes", {"battle": "nope", "verdict": "a"})
        assert status == 400 and "no battle 'nope'" in json.loads(body)["error"]["message"]
        status, body = post(server.url + "/arena/battles", {"prompt": "hi", "models": ["chat", "gpt-5"]})
        assert status == 400 and "no contestant 'gpt-5' here: chat, poet" in json.loads(body)["error"]["message"]
        status, body = post(server.url + "/arena/battles", {"prompt": "hi", "models": ["poet", "poet"]})
        assert status == 400 and json.loads(body)["error"]["message"] == (
            "models names 'poet' twice: a battle is between two contestants")  # (a self-battle was stored before)
        status, body = post(server.url + "/arena/battles", {"prompt": "hi\ud83d"})
        assert status == 400 and json.loads(body)["error"]["message"].startswith(
            "prompt holds half of a UTF-16 surrogate pair")
        request = urllib.request.Request(server.url + "/arena/votes", b"[]", {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # the server's words, with the endpoint's example
            urllib.request.urlopen(request, timeout=30)
        assert json.loads(refused.value.read())["error"]["message"] == (
            'the body should be one JSON object, such as {"battle": "ID", "verdict": "a"} (got [])')
        status, body = post(server.url + "/arena/vote", {"battle": first, "verdict": "a"})  # (it said "Not Found")
        assert status == 404 and "no such endpoint: this server answers POST /arena/battles, POST /arena/votes, " \
            in json.loads(body)["error"]["message"]
    finally:
        server.stop()


def test_a_server_killed_while_votes_arrive_keeps_every_acknowledged_one(bpe_llama, poet, tmp_path):
    """Votes from 8 threads; the server is SIGKILLed after 40 were acknowledged, others in flight: the database opens,
    passes SQLite's integrity check, and holds every acknowledged vote."""
    db = tmp_path / "arena.sqlite"
    server = Server(bpe_llama, poet, "--db", db, command="arena")
    ids = [battle(server.url)[0] for _ in range(3)]
    acknowledged, lock = [], threading.Lock()

    def voter(n: int) -> None:
        for i in range(1000):
            try:
                status, _ = post(server.url + "/arena/votes", {"battle": ids[i % 3], "verdict": "ab"[n % 2],
                                                              "voter": f"{n}-{i}"})
            except (OSError, http.client.HTTPException):  # refused, reset, or cut in the middle of the answer
                return
            if status == 200:
                with lock:
                    acknowledged.append(f"{n}-{i}")

    threads = [threading.Thread(target=voter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    while len(acknowledged) < 40:
        pass
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    for t in threads:
        t.join()
    import sqlite3

    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = {v.voter for v in Store(db).votes()}
    assert len(acknowledged) >= 40 and set(acknowledged) <= kept


def test_a_judge_that_follows_the_position_gives_ties_and_votes_become_preference_pairs(cli, bpe_llama, poet,
                                                                                       position_judge, tmp_path):
    from fournil.arena.judge import Judge
    from fournil.generate.answerers import answerer

    judge = Judge(answerer(str(position_judge)))
    assert judge.prefers("Which sea?", "The grey one.", "The blue one.") == "a"
    assert judge.prefers("Which sea?", "The blue one.", "The grey one.") == "a"  # whatever is shown first
    prompts = ["Speak of the sea.", "Name a king.", "What is bread?", "Sing of roses.", "Who is the fool?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    db = tmp_path / "arena.sqlite"
    result = cli("arena", "judge", bpe_llama, poet, "--judge", position_judge, "--prompts", tmp_path / "prompts.txt",
                 "-n", "5", "--max-new-tokens", "8", "--db", db)
    assert "judge gave 5 verdicts" in result.stdout
    votes = Store(db).votes("judges")
    assert len(votes) == 5 and {v.verdict for v in votes} == {"tie"} and {v.voter for v in votes} == {"judge"}
    assert sorted(v.battle.prompt for v in votes) == sorted(prompts)

    # people vote on the same battles; the leaderboard shows each kind of voter, and how often they agree
    store = Store(db)
    for v, verdict in zip(votes, ("tie", "a", "b", "b", "a")):
        store.vote(v.battle.id, verdict, "person", "me")
    board = cli("arena", "leaderboard", "--db", db, "--voters", "people", "--out", tmp_path / "board").stdout
    assert "| 1 |" in board and "| 2 |" in board and "agree on 20% of the 5 battles" in board
    assert (tmp_path / "board" / "win_rates.png").stat().st_size > 5_000

    result = cli("arena", "export", "--db", db, "--voters", "people", "--out", tmp_path / "prefs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    decided = [v for v in store.votes("people")  # (answers that differ only in spaces make no pair)
               if v.verdict in "ab" and v.battle.answer_a.strip() != v.battle.answer_b.strip()]
    assert len(pairs) == len(decided) >= 3 and f"{len(pairs)} preference pairs" in result.stdout
    for pair, v in zip(pairs, decided):
        assert pair["chosen"] == (v.battle.answer_a if v.verdict == "a" else v.battle.answer_b)
    cli("align", bpe_llama, "--data", tmp_path / "prefs.jsonl", "--steps", "2", "--eval-every", "2", "--quiet",
            "--out", tmp_path / "aligned")


def test_a_remote_judge_writes_its_verdict_on_the_battles_people_voted_on(cli, bpe_llama, poet, position_judge,
                                                                       tmp_path):
    """The position-following judge behind `fournil serve`, asked through openai:judge@URL: it writes "[[A]]" in both
    orders, which is recorded as a tie."""
    db = tmp_path / "arena.sqlite"
    store = Store(db)
    for n, prompt in enumerate(("Speak of the sea.", "Name a king.")):
        b = store.add_battle(prompt, ("chat", "poet"), (f"The sea is grey {n}.", "Blue."), {}, n)
        store.vote(b.id, "a", "person", "me")
    server = Server(position_judge, "--name", "judge")
    try:
        result = cli("arena", "judge", "--judge", f"openai:judge@{server.url}/v1", "--db", db)
    finally:
        server.stop()
    assert "judge gave 2 verdicts" in result.stdout
    assert [v.verdict for v in Store(db).votes("judges")] == ["tie", "tie"]
    again = cli("arena", "judge", "--judge", "openai:judge@http://127.0.0.1:9/v1", "--db", db, check=False)
    assert again.returncode == 2 and "has no battle people voted on that judge has not judged yet" in again.stderr
    tied = cli("arena", "export", "--db", db, "--voters", "judges", "--out", tmp_path / "p.jsonl", check=False)
    assert tied.returncode == 2 and f"{db} holds no vote by judges that names a better answer yet: vote" in tied.stderr


@pytest.mark.parametrize("args, message", [
    (("arena", "only-one"), "the arena needs two models or more"),
    (("arena", "leaderboard", "--db", "missing.sqlite"), "--db missing.sqlite: no such database"),
    (("arena", "judge", "smollm2", "--judge", "smollm2"), "give two models or more to judge new battles"),
    (("arena", "export", "--db", "missing.sqlite"), "no such database"),
    (("arena", "judge", "--judge", "smollm2", "--db", "missing.sqlite"), "--db missing.sqlite: no such database"),
    (("arena", "judge", "smollm2", "{running_text}", "--judge", "smollm2", "--db", "missing.sqlite"),
     "has no chat template (it is not a chat model)"),
    (("arena", "judge", "smollm2", "{running_text}", "--judge", "smollm2", "--db", "nope/missing.sqlite"),  # (said
     "--db nope/missing.sqlite: the folder nope does not exist; create it first"),  # after the models, as not a db)
    (("arena", "export", "--db", "."), "--db . is a folder: give the database's file, such as arena.sqlite"),
    (("arena", "judge", "{running_text}", "{running_text}/", "--judge", "smollm2"),
     "{running_text} is given twice: the arena compares different models"),
    (("arena", "judge", "{running_text}", "elsewhere/{name}", "--judge", "smollm2"),  # (once: "give each its own
     "{running_text} and elsewhere/{name} would both be called {name} on the leaderboard"),  # folder", which they had)
])
def test_arena_commands_refuse_in_one_line(cli, running_text, tmp_path, args, message):
    named = {"running_text": running_text, "name": Path(running_text).name}
    result = cli(*(str(a).format(**named) for a in args), check=False)
    message = message.format(**named)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "missing.sqlite").exists()  # a refused command leaves no empty database behind


def test_a_contestant_whose_context_cannot_hold_a_prompt_is_refused_before_any_answer(cli, bpe_llama, tmp_path):
    (tmp_path / "asked.txt").write_text("Name a fruit.\nSay it. " + "the king " * 600 + "\n", encoding="utf-8")
    result = cli("arena", "judge", bpe_llama, "smollm2", "--judge", "smollm2", "--prompts", "asked.txt", "--db",
                 "a.sqlite", check=False)  # (it failed without the model's name, once the other had answered)
    assert result.returncode == 2 and "answers" not in result.stdout and not (tmp_path / "a.sqlite").exists()
    assert f"fournil: error: {bpe_llama.name} cannot answer prompt 2 of 2 ('Say it. the king the king the king the " \
           f"k'): the conversation, " in result.stderr and "tokens, fills the model's context of 1,024; leave it " \
           "out, or give shorter prompts with --prompts FILE" in result.stderr


def test_a_judge_s_prompts_come_from_any_set_fine_tuning_or_alignment_reads(tmp_path):
    """The first user message of each conversation, whatever the form; a text file: one prompt a line."""
    from conftest import write_jsonl

    from fournil.arena.judge import read_prompts
    from fournil.errors import FournilError

    sharegpt = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Question {i}?"},
        {"from": "gpt", "value": "Yes."}]} for i in range(5)])
    assert read_prompts(str(sharegpt), 2) == ["Question 3?", "Question 4?"]  # (a ShareGPT file was refused)
    assert read_prompts("rasbt_preferences", 1) == ["Change the sentence 'You should have called me.' into a question."]
    assert read_prompts("hh_rlhf_harmless", 1)[0].startswith("Looking to buy a child")  # (the whole "Human: ..."
    # transcript before)
    (tmp_path / "asked.txt").write_text("Name a fruit.\n\nName a colour.\n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "asked.txt"), 5) == ["Name a fruit.", "Name a colour."]
    with pytest.raises(FournilError, match="missing 'instruction' and 'output' \\(it has 'question'"):
        read_prompts(str(write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?"}])), 1)
