"""Models that answer from another server (``openai:NAME@URL``, through the official openai client): a second
`fournil serve` on 127.0.0.1 stands for OpenAI, Mistral's API or vLLM."""
import http.server
import json
import socket
import threading

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
    here = cli("chat", bpe_llama, *args, input="Hello\nWho are you?\n", env=FP32)
    there = cli("chat", remote, *args, "--api-key-env", "REMOTE_KEY", input="Hello\nWho are you?\n", env=KEY)
    assert there.stdout == here.stdout and here.stdout.count("\n") >= 2  # an answer to each line (of newlines, from so
    # small a model), each said to be cut at 12 tokens by either, or by neither
    cut = "(the answer was cut: --max-new-tokens 12 allows longer ones)"
    assert there.stderr.count(cut) == here.stderr.count(cut)
    assert f"({bpe_llama.name} was pretrained on shakespeare, not tuned to chat: it answers by continuing text like " \
           f"its data; tune it on instructions first with `fournil finetune {bpe_llama}`)" in here.stderr.splitlines()
    assert "not tuned to chat" not in there.stderr  # (what a remote model was tuned on, it does not say)


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


def test_the_flags_of_a_model_loaded_here_are_refused_for_a_remote_one(cli, remote):
    for flags, said in ((("--dtype", "int8"), "--dtype chooses"), (("--device", "cpu", "--dtype", "float32"),
                                                                     "--device and --dtype choose")):
        result = cli("generate", remote, "Hi", *flags, "--api-key-env", "REMOTE_KEY", check=False, env=KEY)
        assert result.returncode == 2 and f"{said} how a model loaded here computes; {remote} answers from " \
                                          f"elsewhere: leave" in result.stderr  # (ignored, without a word)
    # in the arena, where every model (the judge's too) answers from elsewhere
    result = cli("arena", "judge", remote, f"openai:other@{remote.partition('@')[2]}", "--judge", remote, "--device",
                 "cpu", "--api-key-env", "REMOTE_KEY", check=False, env=KEY)
    assert result.returncode == 2 and "--device chooses how a model loaded here computes" in result.stderr


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
                           "--student layers:1 is built from a teacher's weights or tokenizer"),
                          (("--sequences", "3", "--kd-weight", "0"), "shares neither its weights nor its tokenizer: "
                                                                     "give --student, the model to train")):
        result = cli("distill", "--teacher", remote, "--data", "rasbt_instructions", *args, "--api-key-env",
                     "REMOTE_KEY", check=False, env=KEY)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


class Breaking(http.server.BaseHTTPRequestHandler):
    """An OpenAI-like endpoint that serves the model "flaky" and starts every answer, then breaks: closes the
    connection in the middle of a chunk (/cut/v1), or ends the stream without a finish_reason (/short/v1)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send(b'{"object": "list", "data": [{"id": "flaky", "object": "model", "created": 0, "owned_by": "me"}]}')

    def send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = {"text": "Once upon"} if self.path.endswith("/completions") and "/chat/" not in self.path else \
            {"delta": {"role": "assistant", "content": "Once upon"}}
        chunk = {"id": "1", "object": "chat.completion.chunk", "created": 0, "model": "flaky",
                 "choices": [{"index": 0, **piece, "finish_reason": None}]}
        event = f"data: {json.dumps(chunk)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if self.path.startswith("/cut/"):
            self.wfile.write(b"40\r\ndata: {")  # 64 bytes announced, 7 sent
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def breaking():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Breaking)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("way, message", [("cut", "broke off its answer (peer closed connection"),
                                          ("short", "ended its answer without a finish_reason: it was cut off")])
def test_an_answer_broken_off_is_said_and_the_chat_goes_on(cli, breaking, way, message):
    """Half an answer is never taken for a whole one; in the chat, the question is left out and the next is asked."""
    result = cli("chat", f"openai:flaky@{breaking}/{way}/v1", input="Hi\nTell me a story\n", check=False)
    assert result.returncode == 0 and result.stderr.count(message) == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("the question is left out of the conversation") == 2
    result = cli("generate", f"openai:flaky@{breaking}/{way}/v1", "Hi", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
