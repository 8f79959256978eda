"""Models that answer from another server (``openai:NAME@URL``, through the official openai client): a second
`fournil serve` on 127.0.0.1 stands for OpenAI, Mistral's API or vLLM."""
import pytest
from conftest import Server, free_port

pytest.importorskip("openai")
FP32 = {"FOURNIL_CPU_BF16": "0"}  # both sides of a comparison in fp32, on every CPU: the same greedy tokens
KEY = {"REMOTE_KEY": "s3cret", **FP32}


@pytest.fixture(scope="module")
def remote(bpe_llama):
    server = Server(bpe_llama, "--api-key", "s3cret", "--name", "bard", env=FP32)
    yield f"openai:bard@{server.url}/v1"
    server.stop()


def test_generate_and_chat_answer_through_the_remote_as_they_do_here(cli, bpe_llama, remote):
    args = ("To be, or not", "--max-new-tokens", "12", "--temperature", "0")
    here = cli("generate", bpe_llama, *args, env=FP32).stdout
    there = cli("generate", remote, *args, "--api-key-env", "REMOTE_KEY", env=KEY).stdout
    assert there == here and len(here) > len("To be, or not\n")
    args = ("--max-new-tokens", "12", "--temperature", "0")
    here = cli("chat", bpe_llama, *args, input="Hello\nWho are you?\n", env=FP32).stdout
    there = cli("chat", remote, *args, "--api-key-env", "REMOTE_KEY", input="Hello\nWho are you?\n", env=KEY).stdout
    assert there == here and here.count("\n") >= 2  # an answer (of newlines, from so small a model) to each line


@pytest.mark.parametrize("spec, env, message", [
    ("{remote}", {"REMOTE_KEY": "wrong"}, "refused the API key in REMOTE_KEY (401): set it to a valid key"),
    ("{remote}", {}, "refused the API key in REMOTE_KEY (401)"),
    ("openai:nope@{url}", KEY, "has no model 'nope'; it serves bard"),
    ("openai:bard@http://127.0.0.1:{port}/v1", KEY, "cannot reach http://127.0.0.1:{port}/v1"),
    ("openai:", KEY, "openai:: name the model, as openai:NAME or openai:NAME@BASE_URL"),
    ("openai:gpt-4o", {}, "openai:gpt-4o: set REMOTE_KEY to your API key"),
])
def test_a_remote_that_refuses_is_one_line(cli, remote, spec, env, message):
    port = free_port()
    url = remote.partition("@")[2]
    spec, message = (s.format(remote=remote, url=url, port=port) for s in (spec, message))
    result = cli("generate", spec, "Hi", "--api-key-env", "REMOTE_KEY", check=False, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_remote_contestant_battles_one_held_here(bpe_llama, remote, tmp_path):
    """The same weights here and behind the remote, greedy: both sides of the battle write the same answer."""
    import json

    from fournil.arena.store import Store

    arena = Server(bpe_llama, remote, "--db", tmp_path / "arena.sqlite", "--api-key-env", "REMOTE_KEY", env=KEY,
                   command="arena")
    try:
        status, health = arena.get("/health")
        assert json.loads(health)["models"] == ["bard", "chat"]
        import urllib.request

        request = urllib.request.Request(arena.url + "/arena/battles", json.dumps(
            {"prompt": "Speak of the sea.", "temperature": 0, "max_tokens": 12, "models": ["chat", "bard"]}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: ")]
    finally:
        arena.stop()
    battle = Store(tmp_path / "arena.sqlite").battle(events[-1]["battle"])
    assert (battle.model_a, battle.model_b) == ("chat", "bard")
    assert battle.answer_a == battle.answer_b and battle.answer_a


def test_a_remote_teacher_answers_for_sequence_level_distillation(cli, bpe_llama, remote, tmp_path):
    """The teacher behind the remote is the student's own weights: its answers, asked in the chat template through
    the API, are those the same teacher writes here."""
    import json

    common = ("--data", "rasbt_instructions", "--sequences", "3", "--kd-weight", "0", "--context", "400", "--steps", "2",
              "--no-baseline", "--quiet")
    cli("distill", "--teacher", remote, "--student", bpe_llama, *common, "--out", tmp_path / "there",
        "--api-key-env", "REMOTE_KEY", env=KEY)
    cli("distill", "--teacher", bpe_llama, "--student", bpe_llama, *common, "--out", tmp_path / "here", env=FP32)
    there, here = ([json.loads(line) for line in (tmp_path / side / "teacher_answers.jsonl").read_text().splitlines()]
                   for side in ("there", "here"))
    assert len(there) == 3 and there == here
    for args, message in (((), "gives answers, not next-token distributions: distil it with --sequences N --kd-weight 0"),
                          (("--sequences", "3", "--kd-weight", "0", "--student", "layers:1"),
                           "--student layers:1 is built from a teacher's weights or tokenizer")):
        result = cli("distill", "--teacher", remote, "--data", "rasbt_instructions", *args, "--api-key-env",
                     "REMOTE_KEY", check=False, env=KEY)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
