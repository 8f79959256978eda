"""The HTTP server, tested as users meet it: a real server process on 127.0.0.1, the official openai client."""
import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from conftest import Server

from fournil.generate import SamplingParams, complete, score
from fournil.generate.scheduler import Piece
from fournil.runs import Run
from fournil.serve.app import Post, Sink
from fournil.tokenizers.compression import piece_bytes


@pytest.fixture(scope="module")
def chat_run(bpe_llama):
    return bpe_llama


@pytest.fixture(scope="module")
def server(chat_run):
    s = Server(chat_run)
    yield s
    s.stop()


def test_completions_through_the_openai_client(server, chat_run):
    run = Run.load(chat_run, "cpu")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["chat"]
    out = client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0)
    # the server loads the model as Run.load does: generation in the same precision
    ours = complete(run.model, run.tokenizer, [run.tokenizer.prompt_ids("KING")], SamplingParams(12, temperature=0),
                    run.dtype)[0]
    assert out.choices[0].text == ours.text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(run.tokenizer.prompt_ids("KING"))
    streamed = list(client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ours.text
    assert streamed[-1].usage == out.usage and not streamed[-1].choices
    echoed = client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0, stream=True,
                                       echo=True)  # the prompt first, as without stream (it was left out)
    assert "".join(c.choices[0].text for c in echoed) == "KING" + ours.text
    # streamed logprobs: each chunk's offsets are in the whole text, as without stream (each chunk's began at 0)
    whole = client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0, echo=True, logprobs=1)
    chunks = client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0, echo=True,
                                       logprobs=1, stream=True)
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset and offsets[-1] > len("KING")
    with pytest.raises(openai.BadRequestError, match="^Error code: 400 - best_of is not supported"):
        client.completions.create(model="chat", prompt="KING", max_tokens=2, best_of=3)

    # a stop string ends the text before it
    stop = ours.text[4:7]
    cut = client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == ours.text[: ours.text.index(stop)] and cut.choices[0].finish_reason == "stop"

    # echo with logprobs: the prompt's own tokens and their log-probabilities, as evaluations need
    scored = client.completions.create(model="chat", prompt="To be or not", max_tokens=1, temperature=0, echo=True,
                                       logprobs=2)
    lp = scored.choices[0].logprobs
    ids = run.tokenizer.prompt_ids("To be or not")
    assert scored.choices[0].text.startswith("To be or not")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    # a measurement: fp32 on every CPU, the same computation as fournil's own scoring
    assert run.measure_dtype == torch.float32
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(score(run.model, ids, 1, run.measure_dtype), abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # a character in tokens of its bytes (no merge of Shakespeare's covers it): each named by them, as OpenAI names
    # them (not "\ufffd", which they shared), and placed where the character begins (each counted one character)
    smile = client.completions.create(model="chat", prompt="king \U0001f642 queen", max_tokens=1, temperature=0,
                                      echo=True, logprobs=1).choices[0].logprobs
    at = smile.tokens.index("bytes:\\xf0")
    assert smile.tokens[at : at + 4] == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x99", "bytes:\\x82"]
    assert smile.text_offset[at - 1 : at + 5] == [4, 5, 5, 5, 5, 6]  # the space, the four bytes, what follows
    assert all(len(top) == 1 for top in smile.top_logprobs[1:])  # (alternatives named alike were one key of a dict)
    ids = run.tokenizer.encode("\U0001f642")
    echoed = client.completions.create(model="chat", prompt=ids, max_tokens=1, echo=True).choices[0].text
    assert echoed[0] == "\U0001f642"  # (it was the four tokens' "\ufffd" each)

    # n > 1 and a list of prompts
    many = client.completions.create(model="chat", prompt=["KING", "QUEEN"], max_tokens=5, n=3, seed=4)
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert len({c.text for c in many.choices[:3]}) > 1  # three different samples of one prompt
    prompts = sum(len(run.tokenizer.prompt_ids(p)) for p in ("KING", "QUEEN"))  # once each, as OpenAI counts
    assert many.usage.prompt_tokens == prompts and many.usage.total_tokens == prompts + many.usage.completion_tokens
    assert 6 < many.usage.completion_tokens <= 6 * 5  # every answer's (x n)


def test_vllm_s_sampling_extensions_are_applied_not_ignored(server, chat_run):
    """top_k, min_p and repetition_penalty, which clients for local servers send (as vLLM takes them): each changes the
    answer as the engine's own setting of that name does; and OpenAI's logit_bias."""
    run = Run.load(chat_run, "cpu")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

    def served(**extra) -> str:
        return client.completions.create(model="chat", prompt="KING", max_tokens=12, seed=5, temperature=1.5,
                                         extra_body=extra).choices[0].text

    def engine(**settings) -> str:
        params = SamplingParams(12, **{"temperature": 1.5, "seed": 5, **settings})
        return complete(run.model, run.tokenizer, [run.tokenizer.prompt_ids("KING")], params, run.dtype)[0].text

    hot = engine()
    assert served(top_k=-1) == served(top_k=0, min_p=0) == served() == hot  # vLLM's "every token"
    for setting in ({"top_k": 1}, {"min_p": 1.0}):  # only the most likely tokens are left: greedy, hot as it is
        assert served(**setting) == engine(**setting) != hot
    penalized = engine(temperature=0, repetition_penalty=2.0)
    assert penalized != engine(temperature=0)  # (a tiny model repeats itself: the penalty changes its answer)
    assert client.completions.create(model="chat", prompt="KING", max_tokens=12, temperature=0,
                                     extra_body={"repetition_penalty": 2.0}).choices[0].text == penalized
    for bad, field in (({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 1e-308}, "rep")):
        with pytest.raises(openai.BadRequestError, match=field):
            served(**bad)

    # OpenAI's logit_bias (refused before): -100 bans a token, so the greedy answer takes the model's second choice;
    # 100 forces one; the logprobs stay the model's own
    chat = [{"role": "user", "content": "Speak."}]
    greedy = client.chat.completions.create(model="chat", messages=chat, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=2).choices[0].logprobs.content
    first, second = greedy[0].top_logprobs
    ids = {piece_bytes(run.tokenizer, i): i for i in range(run.tokenizer.vocab_size)}  # (as the API's "bytes" are)
    banned = client.chat.completions.create(model="chat", messages=chat, max_tokens=4, temperature=0, logprobs=True,
                                            logit_bias={str(ids[bytes(first.bytes)]): -100}).choices[0].logprobs.content
    assert banned[0].token == second.token and banned[0].logprob == pytest.approx(second.logprob, abs=1e-5)
    forced = client.completions.create(model="chat", prompt="KING", max_tokens=5, temperature=1, seed=3,
                                       logit_bias={str(ids[b" the"]): 100})
    assert forced.choices[0].text == " the" * 5
    with pytest.raises(openai.BadRequestError, match="logit_bias token 99999 is outside this model's vocabulary"):
        served(logit_bias={"99999": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias.5: Input should be less than or equal to 100"):
        served(logit_bias={"5": 101})


def test_chat_streaming_and_errors(server, chat_run):
    run = Run.load(chat_run, "cpu")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Speak, good sir."}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0)
    assert whole.usage.prompt_tokens == len(run.tokenizer.chat_ids(messages))
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    # unasked, no usage chunk: every chunk has a choice, as the OpenAI examples' loops over choices[0] expect
    plain = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == whole.choices[0].message.content

    probs = client.chat.completions.create(model="chat", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = probs.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    with pytest.raises(openai.BadRequestError, match="come with logprobs: set logprobs to true"):  # not ignored
        client.chat.completions.create(model="chat", messages=messages, max_tokens=4, top_logprobs=3)

    refused = r"the prompt has \d+ tokens; this model's context is 1024 tokens, which must hold the prompt and at"
    with pytest.raises(openai.BadRequestError, match=refused):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "word " * 2000}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="chat", messages=messages, max_tokens=10_000)
    status, body = server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and "role" in body["error"]["message"]

    # as clients that also send images write them: a "developer" message is the system's, parts of text are joined
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak,\ngood sir."}]
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Speak,"}, {"type": "text", "text": "good sir."}]}]
    answers = [client.chat.completions.create(model="chat", messages=m, max_tokens=12, temperature=0)
               for m in (system, parts)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens == len(run.tokenizer.chat_ids(system))
    with pytest.raises(openai.BadRequestError, match="messages.0.content: this model reads text only, not a part of "
                                                     "type 'image_url'"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    # what it cannot do is refused, not ignored; the values that ask nothing are accepted
    plain = client.chat.completions.create(model="chat", messages=system, max_tokens=12, temperature=0, tools=[],
                                           response_format={"type": "text"})
    assert plain.choices[0].message.content == answers[0].choices[0].message.content
    for asked in ({"response_format": {"type": "json_object"}},
                  {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]}):
        with pytest.raises(openai.BadRequestError, match=f"^Error code: 400 - {next(iter(asked))} is not supported"):
            client.chat.completions.create(model="chat", messages=system, **asked)
    for asked in ({"min_tokens": 20}, {"guided_json": {"type": "object"}}, {"stop_token_ids": [3]}):  # vLLM's
        with pytest.raises(openai.BadRequestError, match=f"^Error code: 400 - {next(iter(asked))} is not supported"):
            client.chat.completions.create(model="chat", messages=system, extra_body=asked)
    assert client.chat.completions.create(model="chat", messages=system, max_tokens=12, temperature=0, extra_body={
        "min_tokens": 0, "use_beam_search": False}).choices[0].message.content == plain.choices[0].message.content

    # a model asked for by name; what the server does not have, said in the API's error (it said "Not Found")
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-4o' here: this server serves 'chat'"):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError, match="no such endpoint: this server answers GET /v1/models, .*, POST "
                                                   "/v1/chat/completions, "):
        client.embeddings.create(model="chat", input="Speak")
    status, body = server.post("/health", {})
    assert status == 405 and body["error"]["message"] == "this endpoint answers GET requests, not POST"

    status, body = server.post("/predict", {"text": "Speak, good sir."})
    assert status == 200 and isinstance(body["text"], str) and body["finish_reason"] in ("stop", "length")
    status, cut = server.post("/predict", {"text": "Speak, good sir.", "max_tokens": 1})
    assert (status, cut["finish_reason"]) == (200, "length") and body["text"].startswith(cut["text"])
    status, body = server.post("/predict", {"text": "Speak, good sir.", "max_tokens": 4, "temperature": 1.5})
    assert status == 400 and body["error"]["param"] == "temperature"  # (it answered greedily, as if not asked)
    assert body["error"]["message"].startswith("temperature is not a field here: this endpoint takes text, max_tokens")
    assert server.get("/health")[0] == 200
    metrics = server.get("/metrics")[1]
    assert 'fournil_requests_total{path="/v1/chat/completions",status="200"}' in metrics
    assert 'fournil_requests_total{path="/v1/models/{model}",status="404"} 1' in metrics  # (gpt-4o: "other")
    assert "fournil_queue_depth 0" in metrics


def test_the_responses_api_answers_as_chat_completions_do(server, chat_run):
    """OpenAI's Responses API, which its newer clients and agents call: the greedy answer /v1/chat/completions gives
    the same conversation (the instructions as the system's message), whole or streamed as numbered, typed events."""
    tok = Run.load(chat_run, "cpu").tokenizer
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    ended = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens")}  # (a chat's finish_reason)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak, good sir."},
                {"role": "assistant", "content": "I speak."}, {"role": "user", "content": "Again."}]
    chat = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0)
    out = client.responses.create(model="chat", instructions="Be brief.", max_output_tokens=12, temperature=0, input=[
        {"role": "user", "content": "Speak, good sir."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "I speak."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again."}]}])
    assert out.output_text == chat.choices[0].message.content and out.id.startswith("resp_") and out.model == "chat"
    reason = out.incomplete_details and out.incomplete_details.reason
    assert (out.status, reason) == ended[chat.choices[0].finish_reason]
    assert (out.usage.input_tokens, out.usage.output_tokens) == (len(tok.chat_ids(messages)),
                                                                 chat.usage.completion_tokens)

    # a string is a message of the user's; streamed: the events in their order, numbered, their deltas the answer
    alone = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Speak, good sir."}],
                                           max_tokens=12, temperature=0)
    events = list(client.responses.create(model="chat", input="Speak, good sir.", max_output_tokens=12, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * (len(kinds) - 8),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{ended[alone.choices[0].finish_reason][0]}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == alone.choices[0].message.content
    assert events[-1].response.usage.output_tokens == alone.usage.completion_tokens

    # what it cannot do is refused, saying so
    for asked, said in (({"previous_response_id": "resp_1"}, "it keeps no responses: send the whole conversation"),
                        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "it calls no tools"),
                        ({"text": {"format": {"type": "json_object"}}}, "text.format of type 'json_object' is not"),
                        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]},
                         "input.0: an item of type 'function_call_output' is not a message"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "not a part of type 'input_image'")):
        with pytest.raises(openai.BadRequestError, match=re.escape(said)):
            client.responses.create(**{"model": "chat", "input": "hi", **asked})


def test_tokenize_lays_out_a_text_or_a_conversation_as_vllm_does(server, chat_run):
    """vLLM's /tokenize, which learners and clients call to see what the model reads: a conversation laid out by the
    chat template (the assistant's turn begun, or not), each token's text when asked; what it cannot do, refused."""
    tok = Run.load(chat_run, "cpu").tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak \U0001f642"}]
    status, laid = server.post("/tokenize", {"messages": messages, "return_token_strs": True})
    assert status == 200 and laid["tokens"] == tok.chat_ids(messages) and laid["count"] == len(laid["tokens"])
    strs, text = laid["token_strs"], tok.chat_text(messages)
    assert strs[0] == "<|im_start|>" and laid["max_model_len"] == 1024
    assert "".join(s for s in strs if not s.startswith("bytes:")) == text.replace("\U0001f642", "")
    assert "bytes:\\xf0" in strs  # (the emoji's bytes, named as in logprobs)
    status, begun = server.post("/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert begun["tokens"] == tok.encode(tok.chat_text(messages, add_generation_prompt=False))
    assert laid["tokens"][: len(begun["tokens"])] == begun["tokens"] and len(laid["tokens"]) > len(begun["tokens"])
    status, plain = server.post("/tokenize", {"prompt": "To be"})
    assert (status, plain["tokens"], plain["token_strs"]) == (200, tok.prompt_ids("To be"), None)
    for body, said in (({}, "give prompt (a text) or messages"), ({"prompt": "a", "messages": messages}, "one of them"),
                       ({"messages": messages, "add_special_tokens": True}, "leave add_special_tokens out"),
                       ({"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt is for messages"),
                       ({"messages": []}, "messages")):
        status, refused = server.post("/tokenize", body)
        assert status == 400 and said in refused["error"]["message"], refused


def test_usage_counts_the_prompt_tokens_a_request_took_from_one_running_beside_it(server, chat_run):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``: the system prompt a request shares with a running one is
    copied, not read again; a request to an idle server reads all of its prompt."""
    tok = Run.load(chat_run, "cpu").tokenizer
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    system = {"role": "system", "content": "You are the king of Navarre, and you answer in verse."}
    questions = [[system, {"role": "user", "content": q}] for q in ("Who art thou?", "What of the queen?")]
    alone = client.chat.completions.create(model="chat", messages=questions[1], max_tokens=3)
    assert alone.usage.prompt_tokens_details.cached_tokens == 0
    running = client.chat.completions.create(model="chat", messages=questions[0], max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True})  # (it runs until closed)
    next(iter(running))  # its prompt is in the cache
    joining = client.chat.completions.create(model="chat", messages=questions[1], max_tokens=3)
    running.close()
    shared = len(os.path.commonprefix([tok.chat_ids(q) for q in questions]))
    assert shared > len(tok.encode(system["content"]))
    assert joining.usage.prompt_tokens_details.cached_tokens == shared
    assert joining.usage.prompt_tokens == alone.usage.prompt_tokens == len(tok.chat_ids(questions[1]))


def test_keep_conversation_lets_an_idle_servers_next_turn_go_on_from_the_last_answer(server, chat_run):
    """With --keep-conversation, a chat's second turn, asked of an idle server, copies what it shares with the first
    turn's prompt and answer from what the server kept; without it, an idle server keeps nothing (its answers
    reproducible)."""
    tok = Run.load(chat_run, "cpu").tokenizer
    first = [{"role": "user", "content": "Who art thou?"}]
    keeping = Server(chat_run, "--keep-conversation")
    try:
        for s, kept in ((server, False), (keeping, True)):
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
            answer = client.chat.completions.create(model="chat", messages=first, max_tokens=8, temperature=0)
            assert answer.usage.prompt_tokens_details.cached_tokens == 0
            second = [*first, {"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And whence comest thou?"}]
            turn = client.chat.completions.create(model="chat", messages=second, max_tokens=4, temperature=0)
            copied = turn.usage.prompt_tokens_details.cached_tokens
            assert turn.usage.prompt_tokens == len(tok.chat_ids(second))
            if kept:  # what the second prompt shares with the first (whose last token, "\n", the answer's text
                # may take in when the conversation is read whole) at least, and what of the answer reads back the same
                shared = len(os.path.commonprefix([tok.chat_ids(first), tok.chat_ids(second)]))
                assert shared >= len(tok.chat_ids(first)) - 1
                assert shared <= copied < turn.usage.prompt_tokens
            else:
                assert copied == 0
    finally:
        keeping.stop()


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    def generated() -> int:
        return int(re.search(r"^fournil_completion_tokens_total (\d+)$", server.get("/metrics")[1], re.M).group(1))

    before = generated()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    stream = client.completions.create(model="chat", prompt="KING", max_tokens=80, stream=True, temperature=1)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while "fournil_active_sequences 0" not in server.get("/metrics")[1]:
        assert time.time() < deadline, "the abandoned sequence kept its row"
        time.sleep(0.1)
    assert generated() - before >= 1  # what it had generated is counted, though its answer never ended


def test_metrics_give_the_models_steps_and_each_requests_time_to_its_first_token(server):
    """A lone answer of n tokens is n steps of the model, taken within its request's time, its first token after its
    arrival: ``/metrics`` gives both, so that the model's share of a request's time can be told from the server's."""
    def read() -> dict[str, float]:
        found = re.findall(r"^fournil_(step|time_to_first_token)_seconds_(sum|count) (\S+)$", server.get("/metrics")[1],
                           re.M)
        return {f"{name} {what}": float(value) for name, what, value in found}

    deadline = time.time() + 10
    while "fournil_active_sequences 0" not in server.get("/metrics")[1]:  # (nothing else runs beside it)
        assert time.time() < deadline
        time.sleep(0.1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    before, start = read(), time.perf_counter()
    out = client.completions.create(model="chat", prompt="KING", max_tokens=9, temperature=0)
    took, after = time.perf_counter() - start, read()
    grew = {key: after[key] - before[key] for key in after}
    assert len(grew) == 4 and out.usage.completion_tokens > 1
    assert grew["step count"] == out.usage.completion_tokens and grew["time_to_first_token count"] == 1
    assert 0 < grew["step sum"] < took and 0 < grew["time_to_first_token sum"] < took


def test_a_steps_pieces_reach_the_event_loop_together_once_the_step_ends():
    """The scheduler's thread holds a step's pieces for every stream and sends them on in one wake-up of the event
    loop, in the order they were made; pieces made while the server stops are dropped, not raised in the scheduler."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    post = Post()
    post.loop = loop
    queues = [asyncio.Queue(), asyncio.Queue()]
    pieces = [Piece("a", 1, -0.5), Piece("b", 2, -1.0), Piece("c", 3, -0.25)]
    Sink(post, queues[0], 0).put(pieces[0])
    Sink(post, queues[1], 1).put(pieces[1])
    Sink(post, queues[0], 0).put(pieces[2])
    Sink(post, queues[1], 1).put(None)
    time.sleep(0.05)
    assert [q.qsize() for q in queues] == [0, 0]  # held while the step runs

    async def drained():
        return [[q.get_nowait() for _ in range(q.qsize())] for q in queues]

    post.send()
    got = asyncio.run_coroutine_threadsafe(drained(), loop).result(5)
    assert got == [[(0, pieces[0]), (0, pieces[2])], [(1, pieces[1]), (1, None)]]
    assert post.items == []
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    Sink(post, queues[0], 0).put(pieces[0])
    post.send()  # the loop is closed: nothing to deliver to, and no error
    assert post.items == []


def test_a_streams_pieces_reach_the_event_loop_at_most_every_interval_its_first_and_its_end_at_once():
    """A stream that goes on wakes the event loop at most every ``Post.INTERVAL`` seconds, with every piece held
    since; its first piece (the time to the first token) and the end of an answer are sent at the step's end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    post, queue = Post(), asyncio.Queue()
    post.loop, post.INTERVAL = loop, 3600.0
    sink, pieces = Sink(post, queue, 0), [Piece(c, i, -0.5) for i, c in enumerate("abcd")]

    async def drained():
        return [queue.get_nowait() for _ in range(queue.qsize())]

    def delivered():
        return asyncio.run_coroutine_threadsafe(drained(), loop).result(5)

    try:
        sink.put(pieces[0])
        post.send()
        assert delivered() == [(0, pieces[0])]  # the first piece at once
        for piece in pieces[1:3]:
            sink.put(piece)
            post.send()
            assert delivered() == []  # within the interval: held
        post.INTERVAL = 0.0  # (the interval has passed)
        post.send()
        assert delivered() == [(0, pieces[1]), (0, pieces[2])]
        post.INTERVAL = 3600.0
        sink.put(pieces[3])
        sink.put(None)
        post.send()
        assert delivered() == [(0, pieces[3]), (0, None)]  # the end at once, with what was held
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_an_api_key_is_required_when_set_and_overload_says_retry_later(chat_run):
    server = Server(chat_run, "--api-key", "sesame", "--max-batch", "1", "--max-waiting", "1")
    key = {"Authorization": "Bearer sesame"}
    try:
        # ten requests at once for one row and one place in the queue: most are turned away, to come back later
        answers = {}

        def ask(i):
            request = urllib.request.Request(server.url + "/v1/completions", json.dumps(
                {"prompt": "KING", "max_tokens": 1000, "ignore_eos": True}).encode(),  # (none ends at once)
                {"Content-Type": "application/json", **key})
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    answers[i] = (r.status, None)
            except urllib.error.HTTPError as e:
                answers[i] = (e.code, e.headers["Retry-After"], json.loads(e.read())["error"]["message"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        refused = [a for a in answers.values() if a[0] == 503]
        assert len(answers) == 10 and refused and {a[0] for a in answers.values()} == {200, 503}
        assert all(retry == "1" and "busy" in message for _, retry, message in refused)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
        assert [m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="sesame").models.list()] == ["chat"]
        assert server.get("/health")[0] == 200  # open: for load balancers
        for path, asked in (("/predict", {"text": "hi"}), ("/v1/responses", {"input": "hi"})):
            status, body = server.post(path, asked)
            assert status == 401 and "API key" in body["error"]["message"]
    finally:
        server.stop()


def test_the_chat_page_streams_an_answer_and_stops_it(server):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.goto(server.url + "/")
        # the tiny model writes 900 tokens in about a second: the browser receives them at 4 KB/s, so that the answer
        # is still arriving when it is stopped, however fast the machine
        network = page.context.new_cdp_session(page)
        network.send("Network.enable")
        network.send("Network.emulateNetworkConditions",
                     {"offline": False, "latency": 0, "downloadThroughput": 4000, "uploadThroughput": -1})
        page.fill("#max-tokens", "900")
        page.fill("#temperature", "0")  # greedy: this model's answer then runs to the limit (sampled, it may end at once)
        page.fill("#question", "Speak, <b>good</b> sir.")
        page.press("#question", "Enter")
        answer = page.locator(".msg.assistant").last
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 20")
        assert answer.get_attribute("data-done") is None  # still streaming, shown as it comes
        page.dispatch_event("#stop", "click")  # at once: the button moves as the answer grows, so never "stable"
        page.wait_for_function("document.querySelector('.msg.assistant').dataset.done === 'true'")
        shown = answer.text_content()
        assert page.is_disabled("#stop") and page.is_enabled("#send")
        page.wait_for_timeout(500)
        assert answer.text_content() == shown  # nothing more arrives after stop
        assert 20 < len(shown) and "<b>" in page.locator(".msg.user").text_content()  # text, never HTML
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        # a question the server refuses is shown with its error, and left out of the conversation sent next
        last_done = "[...document.querySelectorAll('.msg.assistant, .msg.error')].pop().dataset.done === 'true'"
        page.fill("#max-tokens", "4")
        page.fill("#question", "word " * 2000)
        page.press("#question", "Enter")
        page.wait_for_function(last_done)
        assert "shorten it (this question is not part of" in page.locator(".msg.error").text_content()
        page.fill("#question", "Speak.")
        page.press("#question", "Enter")
        page.wait_for_function(f"document.querySelectorAll('.msg').length === 4 && {last_done}")
        sent = page.evaluate("() => messages")
        assert [m["role"] for m in sent] == ["user", "assistant"] and sent[0]["content"] == "Speak."
        browser.close()
    deadline = time.time() + 10
    while "fournil_active_sequences 0" not in server.get("/metrics")[1]:  # the stopped answer freed its row
        assert time.time() < deadline
        time.sleep(0.1)


def test_the_chat_page_sends_its_system_message_and_says_when_an_answer_was_cut(server):
    """The system's message typed in the page goes first in each request (the conversation kept holds the turns
    only); an answer that max tokens cut is followed by a note saying so, as the terminal's chat says it. With
    "probabilities", each token is shown coloured by its probability, its alternatives in its tooltip."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "4")
        page.fill("#system", "You are a poet.")
        page.check("#probabilities")
        with page.expect_request("**/v1/chat/completions") as asked:
            page.fill("#question", "Speak.")
            page.press("#question", "Enter")
        page.wait_for_function("document.querySelector('.msg.assistant').dataset.done === 'true'")
        body = asked.value.post_data_json
        shown, notes = page.locator(".msg.assistant").text_content(), page.locator(".note").all_text_contents()
        tokens = page.eval_on_selector_all(".msg.assistant .token", "spans => spans.map(s => [s.textContent, "
                                           "Number(s.dataset.logprob), s.title, s.style.background])")
        kept = page.evaluate("() => messages")
        browser.close()
    sent = body["messages"]
    assert sent == [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Speak."}]
    assert (body["logprobs"], body["top_logprobs"]) == (True, 5)
    assert [m["role"] for m in kept] == ["user", "assistant"]
    status, greedy = server.post("/v1/chat/completions", {"messages": sent, "max_tokens": 4, "temperature": 0,
                                                          "logprobs": True, "top_logprobs": 5})
    assert status == 200 and shown == greedy["choices"][0]["message"]["content"]
    cut = greedy["choices"][0]["finish_reason"] == "length"
    assert notes == ["(the answer was cut: max tokens 4 allows longer ones)"] * cut
    # (this model writes whole characters here: a token each)
    expected = greedy["choices"][0]["logprobs"]["content"][: len(tokens)]
    assert [t[0] for t in tokens] == [t["token"] for t in expected] and "".join(t[0] for t in tokens) == shown
    assert [t[1] for t in tokens] == pytest.approx([t["logprob"] for t in expected], abs=1e-5)
    for (text, _, title, colour), t in zip(tokens, expected):
        first, *alternatives = title.split("\n")
        said, percent = first.rsplit(": ", 1)
        assert said == json.dumps(text, ensure_ascii=False) and percent.endswith(" %")
        assert float(percent[:-2]) == pytest.approx(100 * math.exp(t["logprob"]), rel=0.05)  # (two digits)
        best = json.dumps(t["top_logprobs"][0]["token"], ensure_ascii=False)
        assert len(alternatives) == 5 and alternatives[0].startswith(f"  {best} ")
        assert colour.startswith("rgb(")


def test_the_page_continues_a_text_with_a_model_that_cannot_chat(trained):
    """A model without a chat template (first names, in characters): the page says so, and streams the continuation of
    what is typed from /v1/completions, asking for half the model's context (it asked for 256 tokens: refused)."""
    from playwright.sync_api import sync_playwright

    server = Server(trained["gpt"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page()
            page.goto(server.url + "/")
            assert "no chat template: it continues the text you begin" in page.text_content("#model")
            page.fill("#temperature", "0")
            page.check("#probabilities")  # (from /v1/completions' logprobs here)
            page.fill("#question", "ma")
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelector('.msg.assistant, .msg.error').dataset.done === 'true'")
            assert page.locator(".msg.error").count() == 0
            shown, asked = page.locator(".msg.assistant").text_content(), int(page.input_value("#max-tokens"))
            tokens = page.eval_on_selector_all(".msg.assistant .token", "spans => spans.map(s => [s.textContent, "
                                               "Number(s.dataset.logprob), s.title.split('\\n').length])")
            browser.close()
        status, greedy = server.post("/v1/completions", {"prompt": "ma", "temperature": 0, "max_tokens": asked,
                                                        "logprobs": 5})
        assert status == 200 and shown == greedy["choices"][0]["text"]
        lp = greedy["choices"][0]["logprobs"]
        assert [t[0] for t in tokens] == lp["tokens"] and {t[2] for t in tokens} == {6}
        assert [t[1] for t in tokens] == pytest.approx(lp["token_logprobs"], abs=1e-5)
        # vLLM's ignore_eos: the answer goes on past the name's end (its boundary) to max_tokens
        status, whole = server.post("/v1/completions", {"prompt": "ma", "temperature": 0, "max_tokens": asked,
                                                       "ignore_eos": True})
        assert (whole["usage"]["completion_tokens"], whole["choices"][0]["finish_reason"]) == (asked, "length")
        assert whole["choices"][0]["text"].startswith(greedy["choices"][0]["text"])
        assert asked == Run.load(trained["gpt"], "cpu").model.config.block_size // 2
        # echo: the offsets are where each token stands in the text; the boundary read before it takes none of it
        status, echoed = server.post("/v1/completions", {"prompt": "ma", "temperature": 0, "max_tokens": 3,
                                                        "echo": True, "logprobs": 1})
        text, lp = echoed["choices"][0]["text"], echoed["choices"][0]["logprobs"]
        assert status == 200 and text == "ma" + greedy["choices"][0]["text"][:3] and lp["tokens"][0] == "\n"
        assert lp["text_offset"] == [0, 0, 1, 2, 3, 4][: len(lp["tokens"])]
        # /tokenize: a text as generation starts from it, after the boundary (vLLM's add_special_tokens), or alone
        boundary = Run.load(trained["gpt"], "cpu").tokenizer.boundary_id
        assert server.post("/tokenize", {"prompt": "ma"})[1]["tokens"][0] == boundary
        assert boundary not in server.post("/tokenize", {"prompt": "ma", "add_special_tokens": False})[1]["tokens"]
        status, refused = server.post("/tokenize", {"messages": [{"role": "user", "content": "ma"}]})
        assert (status, refused["error"]["message"]) == (400, "this model has no chat template (it is not a chat "
                                                              "model): tokenize a prompt instead")
        assert "".join(lp["tokens"][1:]) == text
    finally:
        server.stop()


def test_a_port_in_use_is_one_line_and_ctrl_c_stops_the_server(cli, bpe_llama):
    """A port that is taken ends the command with a clear error before the model loads (nothing says "serving"),
    and SIGINT stops the HTTP server's thread and the one that drives the model cleanly."""
    import signal

    server = Server(bpe_llama)
    try:
        taken = cli("serve", bpe_llama, "--port", server.port, check=False, timeout=120)
        assert taken.returncode == 2 and f"could not listen on 127.0.0.1:{server.port}" in taken.stderr
        assert "Traceback" not in taken.stderr and "serving" not in taken.stdout
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
    finally:
        if server.process.poll() is None:
            server.stop()


def test_the_server_benchmark_refuses_an_unknown_device_in_one_line_before_loading():
    script = Path(__file__).parent.parent / "benchmarks" / "serve_sequential.py"
    result = subprocess.run([sys.executable, script, "--device", "gpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr  # (a FournilError's traceback before)
    assert result.stderr.splitlines()[-1] == ("serve_sequential.py: error: unknown device 'gpu': use auto, cpu, cuda, "
                                              "cuda:N or mps")
