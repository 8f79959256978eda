"""The server as a hostile or careless client meets it: bodies too large, hosts it was not started for, mistakes that
are the request's (4xx, never 500), keys that never leak, browsers of other origins, and a fuzzer over its schema."""
import json
import socket
import time

import openai
import pytest
from conftest import Server
from fournil.generate import SamplingParams, complete
from fournil.runs import Run

KEY = "sesame-0123456789"


def resident_kib(pid: int) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))


def raw(server: Server, head: str, body_chunks=(), wait: float = 30) -> tuple[int, dict]:
    """Send a request by hand (``head``: request line and headers), then what ``body_chunks`` yields, as far as the
    server lets it; the status and JSON body of its answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading, as it should: its answer is waiting
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) >= int(
                    next((line.split(b":")[1] for line in answer.split(b"\r\n") if line.lower().startswith(
                        b"content-length:")), b"0")):
                break
    return int(answer.split(b" ", 2)[1]), json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}")


@pytest.fixture(scope="module")
def server(bpe_llama):
    s = Server(bpe_llama, "--max-request-bytes", "1000000")
    yield s
    s.stop()


def test_a_body_too_large_is_refused_before_it_is_read(server, bpe_llama):
    before = resident_kib(server.process.pid)
    megabyte = b"x" * 2**20
    # 200 MB announced: refused on its Content-Length, the body never read
    status, body = raw(server, f"POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                               f"Content-Length: {200 * 2**20}\n", (megabyte for _ in range(200)))
    assert status == 413 and "larger than this server takes (1,000,000 bytes)" in body["error"]["message"]
    # the same sent in chunks without a length: refused once a million bytes have come
    chunked = (b"%x\r\n%s\r\n" % (len(megabyte), megabyte) for _ in range(200))
    status, body = raw(server, "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                               "Transfer-Encoding: chunked\n", chunked)
    assert status == 413 and "--max-request-bytes" in body["error"]["message"]
    assert resident_kib(server.process.pid) - before < 20_000  # memory flat: well under the 400 MB sent
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")  # under the limit, all is as before:
    out = client.completions.create(model="chat", prompt="KING " * 150, max_tokens=2, temperature=0)
    run = Run.load(bpe_llama, "cpu")  # the engine's own greedy answer (it may end at the end-of-text token)
    ours = complete(run.model, run.tokenizer, [run.tokenizer.prompt_ids("KING " * 150)],
                    SamplingParams(2, temperature=0), run.dtype)[0]
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ours.text, ours.finish_reason)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (601, len(ours.tokens))


def test_a_loopback_server_answers_only_the_hosts_it_was_started_for(server, bpe_llama):
    status, body = raw(server, "GET /v1/models HTTP/1.1\nHost: evil.example.com\n")
    assert status == 400
    assert body["error"]["message"] == ("this server does not answer for the host 'evil.example.com': it answers "
                                        "localhost, 127.0.0.1, [::1]; start it with --allowed-hosts evil.example.com "
                                        "to add one")
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "LOCALHOST"):
        assert raw(server, f"GET /v1/models HTTP/1.1\nHost: {host}\n")[0] == 200, host
    assert raw(server, "GET / HTTP/1.1\nHost: evil.example.com:80\n")[0] == 400  # the page too: no rebinding
    widened = Server(bpe_llama, "--allowed-hosts", "evil.example.com,other.example")
    try:
        assert raw(widened, "GET /v1/models HTTP/1.1\nHost: evil.example.com\n")[0] == 200
        assert raw(widened, "GET /v1/models HTTP/1.1\nHost: third.example\n")[0] == 400
    finally:
        widened.stop()


def test_a_server_open_to_the_network_without_a_key_says_so(bpe_llama):
    server = Server(bpe_llama, "--host", "0.0.0.0")
    try:
        page = server.get("/")[1]
        assert 'const WARNING = "this server listens on 0.0.0.0 without an API key' in page  # on the page
        assert raw(server, "GET /v1/models HTTP/1.1\nHost: fournil.lan\n")[0] == 200  # any name reaches it there
    finally:
        server.stop()
    logged = server.output()
    assert "fournil: WARNING: this server listens on 0.0.0.0 without an API key" in logged  # and in its log
    keyed = Server(bpe_llama, "--host", "0.0.0.0", "--api-key", KEY)
    try:
        assert "const WARNING = null;" in keyed.get("/")[1]
    finally:
        keyed.stop()


def test_a_mistake_of_the_request_is_a_4xx_that_says_what_to_change(trained):
    server = Server(trained["gpt"])  # characters of English names: no digits, no capitals
    try:
        status, body = server.post("/v1/completions", {"prompt": "Zebra 42", "max_tokens": 3})
        assert status == 400 and "not in the model's vocabulary" in body["error"]["message"]
        status, body = server.post("/v1/completions", {"prompt": ["ann"] * 5, "n": 16, "max_tokens": 2})
        assert status == 400 and "asks for 80 sequences" in body["error"]["message"]
        status, body = server.post("/v1/completions", {"prompt": "ann", "seed": 2**64})
        assert status == 400 and "seed" in body["error"]["message"]
        for path, asked in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/responses", {"input": "hi"})):
            status, body = server.post(path, asked)
            assert status == 400 and body["error"]["message"] == (  # (not a command to run)
                "this model has no chat template (it is not a chat model): send a prompt to /v1/completions")
        # the body's shape: in words, at the field (pydantic names a union's members, as in "prompt.list[int].0")
        status, body = raw(server, "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                                   "Content-Length: 9\n", [b"{prompt: "])
        assert status == 400 and body["error"]["message"].startswith(
            "the body is not valid JSON (Expecting property name enclosed in double quotes at character 1): send one")
        status, body = server.post("/v1/completions", {"prompt": [1.5], "max_tokens": 2})
        assert status == 400 and body["error"]["param"] == "prompt" and body["error"]["message"] == (
            "prompt should be a string, or a list of strings, or a list of token ids, or a list of lists of token ids "
            "(got [1.5])")
        # a string JSON can spell but no text holds: half of a surrogate pair (a 500 from the tokenizer before)
        for path, body, where in (("/v1/completions", {"prompt": ["ann", "x\ud83d"]}, "prompt.1"),
                                  ("/v1/completions", {"prompt": "ann", "stop": ["\udfff"]}, "stop.0"),
                                  ("/predict", {"text": "\ud800"}, "text"),
                                  ("/tokenize", {"prompt": "a\ud800"}, "prompt")):
            status, body = server.post(path, body)
            assert status == 400 and body["error"]["message"].startswith(
                f"{where} holds half of a UTF-16 surrogate pair (an escape \\ud800 to \\udfff without its partner)")
        # a body that is not one JSON object, or not sent as JSON (curl -d without a type): the endpoint's example
        status, body = raw(server, "POST /predict HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                                   "Content-Length: 6\n", [b"[1, 2]"])
        assert status == 400 and body["error"]["message"] == (
            'the body should be one JSON object, such as {"text": "Hi", "max_tokens": 32} (got [1, 2])')
        status, body = raw(server, "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 0\n")
        assert status == 400 and body["error"]["message"] == (
            'the request has no body: send one JSON object, such as {"prompt": "Once upon a time", "max_tokens": 16}')
        status, body = raw(server, "POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\n"
                                   "Content-Type: application/x-www-form-urlencoded\nContent-Length: 17\n",
                           [b'{"prompt": "ann"}'])
        assert status == 400 and "send it with the header Content-Type: application/json" in body["error"]["message"]
    finally:
        server.stop()
    assert "Traceback" not in server.output()  # nothing the server would call its own fault


def test_the_key_is_compared_whole_and_never_shown(bpe_llama):
    server = Server(bpe_llama, "--api-key", KEY)
    try:
        for key in (KEY[:-1], KEY + "x", KEY.upper()):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
        assert raw(server, "GET /v1/models HTTP/1.1\nHost: localhost\n")[0] == 401  # no key at all
        assert openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data[0].id == "chat"
        assert raw(server, f"GET /{KEY} HTTP/1.1\nHost: localhost\nAuthorization: Bearer {KEY}\n")[0] == 404
        metrics = server.get("/metrics", {"Authorization": f"Bearer {KEY}"})[1]
        assert 'path="other",status="404"' in metrics  # unknown paths are counted together, never by name
    finally:
        server.stop()
    assert KEY not in metrics and KEY not in server.output()


def test_browsers_of_other_origins_only_when_allowed(bpe_llama, server):
    preflight = ("OPTIONS /v1/chat/completions HTTP/1.1\nHost: localhost\nOrigin: https://app.example\n"
                 "Access-Control-Request-Method: POST\nAccess-Control-Request-Headers: authorization,content-type\n")
    allowed = Server(bpe_llama, "--cors-origins", "https://app.example", "--api-key", KEY)
    try:
        with socket.create_connection(("127.0.0.1", allowed.port)) as s:
            s.sendall(preflight.replace("\n", "\r\n").encode() + b"\r\n")
            time.sleep(0.5)
            answer = s.recv(65536).decode().lower()
        assert answer.startswith("http/1.1 200") and "access-control-allow-origin: https://app.example" in answer
    finally:
        allowed.stop()
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # none by default
        s.sendall(preflight.replace("\n", "\r\n").encode() + b"\r\n")
        time.sleep(0.5)
        assert "access-control-allow-origin" not in s.recv(65536).decode().lower()


def test_a_fuzzer_over_the_openapi_schema_finds_no_server_error(server):
    """Schemathesis generates requests from /openapi.json, valid and invalid, with a fixed seed: none gets a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen = []
    for result, mode in ((r, m) for r in schema.get_all_operations() for m in schemathesis.GenerationMode):
        operation = result.ok()

        @settings(max_examples=25, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # no shrinking: the first failing request is reported
        @given(case=operation.as_strategy(generation_mode=mode))
        def no_server_error(case):
            for limit in ("max_tokens", "max_completion_tokens", "max_output_tokens"):  # at most 64 tokens an answer
                if isinstance(case.body, dict) and isinstance(case.body.get(limit, 0), int | None):
                    case.body[limit] = min(case.body.get(limit) or 64, 64)
            response = case.call(base_url=server.url, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

        try:
            no_server_error()
        except Unsatisfiable:  # nothing invalid to send to an operation without parameters (GET /health)
            assert mode == schemathesis.GenerationMode.NEGATIVE
    assert len(seen) > 150 and {200, 400} <= set(seen)
