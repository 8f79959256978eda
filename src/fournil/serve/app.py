"""fournil's HTTP server: the OpenAI API (completions, chat completions, models), ``/predict``, health, metrics and a
chat page, over one continuous-batching scheduler: concurrent requests share the model's forward passes.

The scheduler runs in the thread that loaded the model, the HTTP server in another (:func:`run_server`); each HTTP
request submits its sequences (``n`` of them for ``n`` choices) and reads their pieces from an asyncio queue (a
step's pieces for every request arrive together, in one wake-up of the event loop: :class:`Post`), so a slow reader
never holds the model, and a client that goes away frees its rows at the next step. Other work on the
model (scoring an echoed prompt) goes through the scheduler too: every forward pass in one thread. Every request
first passes :class:`fournil.serve.guard.Guard` (host, key, size).
A request's mistake is answered 4xx with what to change; a 500 is the server's own fault, logged, never detailed.
"""
from __future__ import annotations

import asyncio
import codecs
import errno
import json
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from fournil.errors import FournilError, NotAChatModel
from fournil.generate import Busy, SamplingParams, Scheduler, score
from fournil.generate.engine import row_params
from fournil.generate.scheduler import drive
from fournil.generate.seq2seq import encoded_source, sample_targets
from fournil.serve.guard import Guard, http_message
from fournil.serve.metrics import Metrics
from fournil.serve.responses import Response, conversation
from fournil.serve.schemas import (EXAMPLES, ChatRequest, CompletionRequest, DetokenizeRequest, PredictRequest,
                                   ResponsesRequest, Sampling, TokenizeRequest, explain)
from fournil.tokenizers.compression import piece_bytes

OPEN = ("/", "/health")  # what answers without the API key


@dataclass
class ServeSettings:
    name: str  # the model's name in the API
    api_key: str | None = None
    max_batch: int = 8
    max_waiting: int = 64
    batch_invariant: bool = False
    max_request_bytes: int = 4 * 2**20
    hosts: tuple[str, ...] | None = None  # the Host names answered; None: any
    cors_origins: tuple[str, ...] = ()  # web pages of other origins allowed to call the API
    warning: str | None = None  # shown on the chat page (a server open to the network without a key)
    keep: bool = False  # the last answer's keys and values kept while idle, for a conversation's next turn


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_response(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class Post:
    """Pieces from the scheduler's thread to the event loop, each to its HTTP request's asyncio queue, tagged with its
    choice's index: held until the step ends (``send``, in the scheduler's thread too), then delivered in one wake-up
    of the loop. A wake-up per piece is a write to the loop's pipe, after which the scheduler's thread waits for the
    GIL while the loop runs: 6 % of its time with eight streams on 2 cores.

    For streams that go on, the loop is woken at most every ``INTERVAL`` seconds (a few tokens at a time, more often
    than a reader can tell); for an urgent piece at once: a stream's first (its time to the first token) and an
    answer's end. On 2 cores, SmolLM2 in int4 compiled (``benchmarks/serve_sequential.py``, plain client): a lone
    stream went from 0.90-0.93 times the engine's rate to 0.96-0.97, eight at once from 3.65-3.89 times it to
    3.90-3.96."""

    INTERVAL = 0.02

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by its first request
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.urgent, self.sent = False, 0.0

    def put(self, queue: asyncio.Queue, item: tuple, urgent: bool) -> None:
        self.items.append((queue, item))
        self.urgent |= urgent

    def send(self) -> None:
        if self.items and (self.urgent or time.perf_counter() - self.sent >= self.INTERVAL):
            items, self.items, self.urgent, self.sent = self.items, [], False, time.perf_counter()
            try:
                self.loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the loop has closed: the server is stopping, and no one reads them
                pass


def deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


@dataclass
class Sink:
    """Where the scheduler puts one sequence's pieces (``n`` sequences of a request share a queue). A ``whole`` answer
    (not streamed) is held until it ends and posted at once: its reader has nothing to do before, and waking the event
    loop at every step slowed a lone request's decoding by 2-3 % (SmolLM2 in int4, compiled, on 2 cores)."""
    post: Post
    queue: asyncio.Queue
    index: int
    whole: bool = False
    held: list = field(default_factory=list)
    started: bool = False

    def put(self, piece) -> None:
        if not self.whole:
            self.post.put(self.queue, (self.index, piece), urgent=piece is None or not self.started)
            self.started = True
            return
        self.held.append(piece)
        if piece is None:
            for p in self.held:
                self.post.put(self.queue, (self.index, p), urgent=True)


def create_app(run, settings: ServeSettings, draft=None, draft_tokens: int = 4):
    """The server's ASGI application for ``run``, and the scheduler to drive (:func:`run_server`); with a ``draft``
    run, a request alone is decoded speculatively."""
    tok, model, name = run.tokenizer, run.model, settings.name
    block = model.config.block_size
    chat_model = bool(getattr(tok, "chat_template", None))  # else /predict and the page continue text
    seq2seq = model.family == "seq2seq"  # writes a target for a source: /predict and the page, not the OpenAI API
    post = Post()
    scheduler = Scheduler(model, tok, run.dtype, max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                          batch_invariant=settings.batch_invariant, draft=draft and draft.model,
                          draft_tokens=draft_tokens, keep=settings.keep, after_step=post.send,
                          draft_dtype=draft and draft.dtype)
    metrics = Metrics(scheduler)
    created = int(time.time())

    app = FastAPI(title="fournil")

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(FournilError)
    async def mistake(_, e: FournilError):  # what fournil refuses is the request's to change
        return error_response(400, str(e), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # an unknown path or method, a body too large
        return error_response(e.status_code, http_message(app, request, e), "invalid_request_error", headers=e.headers)

    @app.exception_handler(Exception)
    async def fault(_, e: Exception):  # logged with its traceback by the guard, which sees it next
        return error_response(500, "internal server error (the server's log has the details)", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        where, message = explain(e.errors(), EXAMPLES.get(request.url.path, {}))
        return error_response(400, message, "invalid_request_error", where)

    def sampling(body: Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        room = block - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {block} tokens, which "
                           f"must hold the prompt and at least one token of its answer: shorten it", param="prompt")
        new = max_tokens or room
        if new > room:
            raise ApiError(400, f"max_tokens is {new}, but the prompt ({prompt_len} tokens) leaves room for {room} in "
                           f"this model's context of {block} tokens: lower max_tokens or shorten the prompt",
                           param="max_tokens")
        try:
            stop = body.stops()
        except ValueError as e:
            raise ApiError(400, str(e), param="stop") from None
        known(list(body.logit_bias or ()), "logit_bias")
        return SamplingParams(max_new_tokens=new, temperature=body.temperature, top_k=max(body.top_k, 0) or None,
                              top_p=body.top_p if body.top_p < 1 else None, min_p=body.min_p or None,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop,
                              frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                              logprobs=logprobs, ignore_eos=body.ignore_eos, logit_bias=body.logit_bias or None)

    def continues() -> None:
        """Refuse what continues a text or a conversation (the OpenAI API) when the model is seq2seq."""
        if seq2seq:
            raise ApiError(400, f"{name} is a seq2seq model: it writes a target for a source, which POST /predict "
                                f'{{"text": SOURCE}} answers; the OpenAI API continues texts and conversations, which '
                                f"only decoder-only models do", param="model")

    def submit(prompts: list[list[int]], params: list[SamplingParams], stream: bool):
        """Submit every sequence (all or none); returns the requests and the queue their pieces arrive on (as they come
        if ``stream``, else each sequence's all at once when it ends)."""
        room = settings.max_batch + settings.max_waiting
        if len(prompts) > room:
            raise ApiError(400, f"this request asks for {len(prompts)} sequences (prompts x n); this server generates "
                           f"at most {room} at once: ask for fewer", param="n")
        post.loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                requests.append(scheduler.submit(p, sp, Sink(post, queue, i, whole=not stream)))
        except FournilError as e:
            for r in requests:
                r.cancel()
            if isinstance(e, Busy):
                raise ApiError(503, f"the server is busy: {e}", "server_busy", headers={"Retry-After": "1"}) from None
            raise ApiError(400, str(e)) from None
        return requests, queue

    async def pieces(requests, queue):
        """(index, piece) as they come, until every sequence has ended; an abandoned reader cancels them all. The
        tokens are counted in the metrics either way (a client that hangs up had them generated too)."""
        left = len(requests)
        try:
            while left:
                index, piece = await queue.get()
                if piece is None:
                    left -= 1
                    continue
                yield index, piece
        finally:
            for r in requests:
                r.cancel()
            metrics.tokens(sum(len(r.prompt) for r in requests), sum(r.generated for r in requests))

    async def gather(requests, queue) -> list[list]:
        out = [[] for _ in requests]
        async for index, piece in pieces(requests, queue):
            out[index].append(piece)
        if any(r.finish_reason == "error" for r in requests):  # the engine's fault, which it logged
            raise ApiError(500, "generation failed (the server's log has the details)", "server_error")
        return out

    def usage(requests, n: int) -> dict:
        """OpenAI's: each prompt counted once, however many (``n``) answers it gets (requests ``prompt * n + c``)."""
        firsts = requests[::n]
        prompt = sum(len(r.prompt) for r in firsts)
        completion = sum(r.generated for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.shared for r in firsts)}}  # (copied, not read)

    def token_text(i: int) -> str:
        """A token as OpenAI's logprobs name it: its text, or, for a token holding part of a character, its bytes
        (``bytes:\\xf0\\x9f``), not a replacement character that many tokens would share."""
        raw = piece_bytes(tok, i)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    class Offsets:
        """Where each token begins in the text, in characters, given token after token (a stream's pieces one at a
        time); a token that completes a character begins where the character does."""

        def __init__(self, start: int):
            self.decoder, self.at = codecs.getincrementaldecoder("utf-8")("replace"), start

        def __call__(self, ids) -> list[int]:
            offsets = []
            for i in ids:
                offsets.append(self.at)
                self.at += len(self.decoder.decode(piece_bytes(tok, i)))
            return offsets

    # ---- the OpenAI API
    served = {"id": name, "object": "model", "created": created, "owned_by": "fournil"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str):  # (clients ask for it by name before they use it)
        if model != name:
            raise ApiError(404, f"no model {model!r} here: this server serves {name!r}", param="model")
        return served

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        continues()
        prompts, texts, leads = prompt_list(body.prompt)
        if body.max_tokens == 0 and body.stream:
            raise ApiError(400, "max_tokens 0 generates nothing to stream: ask without stream", param="max_tokens")
        params = [sampling(body, len(p), body.max_tokens or 1, body.logprobs) for p in prompts]
        rows = [(i, c) for i in range(len(prompts)) for c in range(body.n)]  # choice index = prompt * n + c
        if body.max_tokens == 0:  # the prompt scored (with echo), nothing generated
            requests, queue = [Scored(prompts[i]) for i, _ in rows], None
            metrics.tokens(sum(len(r.prompt) for r in requests), 0)
        else:
            requests, queue = submit([prompts[i] for i, _ in rows], [row_params(params[i], c) for i, c in rows],
                                     body.stream)
        cid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name}

        def logprobs_of(pieces_, offsets: Offsets) -> dict:
            toks = [p for p in pieces_ if p.token >= 0]
            return {"tokens": [token_text(p.token) for p in toks], "token_logprobs": [p.logprob for p in toks],
                    "top_logprobs": [{token_text(i): v for i, v in (p.top or {}).items()} for p in toks],
                    "text_offset": offsets([p.token for p in toks])}

        def answer_offsets(i: int) -> Offsets:  # the answer's text follows the prompt's where it is echoed
            return Offsets(len(texts[i]) if body.echo else 0)

        if body.stream:
            async def events():
                for index, (i, _) in enumerate(rows if body.echo else ()):  # the prompt first, as without stream
                    lp = None if body.logprobs is None else await prompt_logprobs(prompts[i], leads[i], body.logprobs)
                    yield sse({**head, "choices": [{"text": texts[i], "index": index, "logprobs": lp,
                                                    "finish_reason": None}]})
                offsets = [answer_offsets(i) for i, _ in rows]  # (in the whole text, as vLLM's: not from 0 each)
                async for index, piece in pieces(requests, queue):
                    choice = {"text": piece.text, "index": index, "logprobs": None, "finish_reason": None}
                    if body.logprobs is not None and piece.token >= 0:
                        choice["logprobs"] = logprobs_of([piece], offsets[index])
                    yield sse({**head, "choices": [choice]})
                for index, r in enumerate(requests):
                    yield sse({**head, "choices": [{"text": "", "index": index, "logprobs": None,
                                                    "finish_reason": r.finish_reason}]})
                if body.streams_usage():
                    yield sse({**head, "choices": [], "usage": usage(requests, body.n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        results = await gather(requests, queue) if queue else [[] for _ in requests]
        choices = []
        for index, ((i, _), r, got) in enumerate(zip(rows, requests, results)):
            text = "".join(p.text for p in got)
            lp = None
            if body.echo:
                text = texts[i] + text
            if body.logprobs is not None:
                lp = logprobs_of(got, answer_offsets(i))
                if body.echo:
                    lp = merge(await prompt_logprobs(prompts[i], leads[i], body.logprobs), lp)
            choices.append({"text": text, "index": index, "logprobs": lp, "finish_reason": r.finish_reason})
        return {**head, "choices": choices, "usage": usage(requests, body.n)}

    def prompt_list(prompt) -> tuple[list[list[int]], list[str], list[int]]:
        """The token ids and the text of each prompt of a request (a text, texts, token ids or lists of them), and
        how many of its first ids the model reads before the text (a document boundary, BOS), not in the text."""
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        if any(isinstance(p, str) for p in prompt):
            ids = [tok.prompt_ids(p) for p in prompt]
            return ids, prompt, [len(i) - len(tok.encode(p)) for i, p in zip(ids, prompt)]
        for ids in prompt:
            if not ids:
                raise ApiError(400, "a prompt of token ids is empty", param="prompt")
            known(ids, "prompt")
        texts = [b"".join(piece_bytes(tok, i) for i in ids).decode("utf-8", "replace") for ids in prompt]
        return prompt, texts, [0] * len(prompt)

    def known(ids: list[int], param: str) -> list[int]:
        if bad := [i for i in ids if not 0 <= i < tok.vocab_size]:
            raise ApiError(400, f"{param} token {bad[0]} is outside this model's vocabulary (ids 0 to "
                                f"{tok.vocab_size - 1})", param=param)
        return ids

    async def prompt_logprobs(ids: list[int], lead: int, top: int) -> dict:
        """The prompt's own tokens with their log-probabilities (the first has none), for ``echo``; the ``lead``
        tokens read before the text stand at its start, taking none of it."""
        values = await asyncio.wrap_future(scheduler.call(score, model, ids, 1, run.measure_dtype, max(top, 1)))
        return {"tokens": [token_text(i) for i in ids], "token_logprobs": [None] + [v for v, _ in values],
                "top_logprobs": [None] + [{token_text(i): lp for i, lp in list(alts.items())[:top]} for _, alts in values],
                "text_offset": [0] * lead + Offsets(0)(ids[lead:])}

    def chat_prompt(messages: list[dict], param: str, add_generation_prompt: bool = True,
                    instead: str = "send a prompt to /v1/completions") -> list[int]:
        try:
            return tok.chat_ids(messages, add_generation_prompt)
        except NotAChatModel as e:
            raise ApiError(400, f"{e}: {instead}", param=param) from None
        except FournilError as e:
            raise ApiError(400, str(e), param=param) from None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        continues()
        prompt = chat_prompt([m.model_dump() for m in body.messages], "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens, top)
        requests, queue = submit([prompt] * body.n, [row_params(params, c) for c in range(body.n)], body.stream)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "created": int(time.time()), "model": name}

        def logprobs_of(pieces_) -> dict:
            def entry(i, lp):
                return {"token": token_text(i), "logprob": lp, "bytes": list(piece_bytes(tok, i))}
            return {"content": [{**entry(p.token, p.logprob),
                                 "top_logprobs": [entry(i, v) for i, v in (p.top or {}).items()]}
                                for p in pieces_ if p.token >= 0]}

        if body.stream:
            async def events():
                chunk = {**head, "object": "chat.completion.chunk"}
                for index in range(body.n):
                    yield sse({**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                async for index, piece in pieces(requests, queue):
                    if not piece.text and piece.token < 0:
                        continue
                    lp = logprobs_of([piece]) if body.logprobs else None
                    yield sse({**chunk, "choices": [{"index": index, "delta": {"content": piece.text}, "logprobs": lp,
                                                     "finish_reason": None}]})
                for index, r in enumerate(requests):
                    yield sse({**chunk, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                     "finish_reason": r.finish_reason}]})
                if body.streams_usage():  # as OpenAI: only when asked, since clients read choices[0] of each chunk
                    yield sse({**chunk, "choices": [], "usage": usage(requests, body.n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        results = await gather(requests, queue)
        choices = [{"index": index, "message": {"role": "assistant", "content": "".join(p.text for p in got)},
                    "logprobs": logprobs_of(got) if body.logprobs else None, "finish_reason": r.finish_reason}
                   for index, (r, got) in enumerate(zip(requests, results))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(requests, body.n)}

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest):
        continues()
        prompt = chat_prompt(conversation(body), "input")
        requests, queue = submit([prompt], [sampling(body, len(prompt), body.max_output_tokens, None)], body.stream)
        answer = Response({"id": f"resp_{uuid.uuid4().hex}", "created_at": int(time.time()), "model": name}, body,
                          f"msg_{uuid.uuid4().hex}")
        if body.stream:
            async def events():
                for event in answer.opening():
                    yield event
                text = []
                async for _, piece in pieces(requests, queue):
                    if piece.text:
                        text.append(piece.text)
                        yield answer.delta(piece.text)
                for event in answer.closing("".join(text), requests[0].finish_reason, usage(requests, 1)):
                    yield event

            return StreamingResponse(events(), media_type="text/event-stream")
        got = (await gather(requests, queue))[0]
        return answer.finished("".join(p.text for p in got), requests[0].finish_reason, usage(requests, 1))

    # ---- the tokenizer, as vLLM serves it: evaluation harnesses (lm-eval's local-completions) tokenize through it
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size, "max_model_len": block,
                "eos_token": getattr(tok, "eos", None), "bos_token": getattr(tok, "bos", None), "pad_token": None,
                "chat_template": getattr(tok, "chat_template", None)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.messages is not None:
            messages = [m.model_dump() for m in body.messages]
            begun = body.add_generation_prompt is not False
            ids = chat_prompt(messages, "messages", begun, "tokenize a prompt instead")
        else:
            ids = tok.encode(body.prompt) if body.add_special_tokens is False else tok.prompt_ids(body.prompt)
        return {"count": len(ids), "max_model_len": block, "tokens": ids,
                "token_strs": [token_text(i) for i in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": tok.decode(known(body.tokens, "tokens"))}

    # ---- the classic endpoint, health, metrics, the page
    @app.post("/predict")
    async def predict(body: PredictRequest):
        if seq2seq:
            return await asyncio.wrap_future(scheduler.call(target_of, body.text, body.max_tokens))
        prompt = tok.chat_ids([{"role": "user", "content": body.text}]) if chat_model else tok.prompt_ids(body.text)
        params = sampling(Sampling(temperature=0), len(prompt), body.max_tokens or min(256, block - len(prompt)), None)
        requests, queue = submit([prompt], [params], stream=False)
        got = (await gather(requests, queue))[0]
        return {"text": "".join(p.text for p in got), "finish_reason": requests[0].finish_reason}

    def target_of(text: str, max_tokens: int | None) -> dict:
        """A seq2seq model's greedy target for the source ``text`` (where the steps run), as ``fournil sample RUN
        --prompt TEXT`` writes it: read as the training sources are written (nombres: 71080 as 71 080)."""
        room = block - 1  # (the decoder reads its start token first)
        limit = max_tokens or room
        if limit > room:
            raise ApiError(400, f"max_tokens is {limit}; this model writes targets of at most {room} tokens: lower it",
                           param="max_tokens")
        source = encoded_source(model, tok, run.as_sources([text])[0])
        target = sample_targets(model, [source], SamplingParams(max_new_tokens=limit, temperature=0), run.dtype)[0]
        metrics.tokens(len(source), len(target))
        return {"text": tok.decode(target), "finish_reason": "length" if len(target) == limit else "stop"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        html = (resources.files("fournil.serve") / "page.html").read_text(encoding="utf-8")
        values = {"MODEL": name, "WARNING": settings.warning, "CHAT": chat_model, "SOURCE": seq2seq, "CONTEXT": block}
        for key, value in values.items():
            html = html.replace("{{" + key + "}}", json.dumps(value))
        return HTMLResponse(html)

    inner = app if not settings.cors_origins else CORSMiddleware(
        app, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"])
    guard = Guard(inner, metrics, settings.api_key, settings.max_request_bytes, settings.hosts, OPEN, app.routes)
    return guard, [scheduler]


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the models load: a port that is taken fails at once, and ``--port 0``
    takes a free one (``socket.getsockname()`` says which)."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left by a server just stopped
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        hint = ("is another server on that port? choose another with --port" if e.errno == errno.EADDRINUSE else
                "check --host and --port")
        raise FournilError(f"could not listen on {host}:{port}: {e.strerror or e}; {hint}") from None
    return sock


def run_server(app, schedulers: list[Scheduler], sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (:func:`listen`) with uvicorn in a thread of its own while this thread, the one that
    loaded the models, drives their schedulers (see :mod:`fournil.generate.scheduler` for why). Ctrl-C or SIGTERM
    stops it: answers in progress get 5 seconds to end."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))

    def stop(*_):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http = threading.Thread(target=server.run, args=([sock],), name="fournil-http", daemon=True)
    http.start()
    drive(schedulers, http.is_alive)
    http.join()
    if not server.started:
        raise FournilError("the HTTP server could not start (the reason is above)")


@dataclass
class Scored:
    """A prompt only scored (``max_tokens: 0``), where the answer of a generated one would be."""
    prompt: list[int]
    generated: int = 0
    shared: int = 0
    finish_reason: str = "length"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def merge(prompt: dict, answer: dict) -> dict:
    return {k: prompt[k] + answer[k] for k in prompt}
