"""The arena's HTTP server: ``/arena``, where two anonymous contestants answer a prompt side by side and a person
votes, and ``/leaderboard``.

Every contestant is held by this one server: a model loaded here generates through a continuous-batching scheduler
of its own (battles running together share its forward passes), a remote one (``openai:...``) through its endpoint.
Both answers stream to the page as server-sent events; the battle is stored once both are complete, and a vote is
committed to the database before the page hears it is recorded.
"""
from __future__ import annotations

import asyncio
import io
import json
import random
import secrets
import threading
from dataclasses import dataclass
from html import escape
from importlib import resources

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response, \
    StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException

from fournil.arena.ranking import agreement, leaderboard, plot_win_rates, table
from fournil.arena.store import VERDICTS, Store
from fournil.errors import FournilError
from fournil.generate import SamplingParams, Scheduler
from fournil.generate.answerers import Local
from fournil.serve.guard import Guard, http_message
from fournil.serve.metrics import Metrics
from fournil.serve.schemas import Body, explain


@dataclass
class ArenaSettings:
    temperature: float = 0.7  # what a battle uses unless the page asks otherwise
    max_tokens: int = 256
    max_batch: int = 8
    max_waiting: int = 64
    max_request_bytes: int = 2**20
    hosts: tuple[str, ...] | None = None
    bootstrap: int = 200  # rounds behind the leaderboard's intervals


class BattleRequest(Body):
    prompt: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, lt=2**63)  # with ``models``: replay a battle
    models: tuple[str, str] | None = None


class VoteRequest(Body):
    battle: str
    verdict: str
    voter: str = Field("anonymous", max_length=200)


def create_arena_app(contestants: dict, store: Store, settings: ArenaSettings):
    """``contestants``: name -> a :class:`Local` or :class:`fournil.generate.answerers.Remote` model. Returns the ASGI
    application and the schedulers of the local ones, to drive (:func:`fournil.serve.app.run_server`)."""
    if len(contestants) < 2:
        raise FournilError("the arena needs two models or more")
    wake = threading.Condition()  # one for all: they are driven in turn by one thread (run_server)
    schedulers = {name: Scheduler(m.run.model, m.run.tokenizer, m.run.dtype, settings.max_batch, settings.max_waiting,
                                  wake=wake)
                  for name, m in contestants.items() if isinstance(m, Local)}
    metrics = Metrics(*schedulers.values())
    app = FastAPI(title="fournil arena")

    @app.exception_handler(FournilError)
    async def mistake(_, e: FournilError):
        return JSONResponse({"error": {"message": str(e)}}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        example = {"prompt": "Hi"} if request.url.path == "/arena/battles" else {"battle": "ID", "verdict": "a"}
        return JSONResponse({"error": {"message": explain(e.errors(), example)[1]}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": {"message": http_message(app, request, e)}}, status_code=e.status_code,
                            headers=e.headers)

    def start(name: str, prompt: str, params: SamplingParams, put) -> callable:
        """Start contestant ``name`` answering; its pieces of text, then None, go to ``put``. Returns a canceller."""
        model, messages = contestants[name], [{"role": "user", "content": prompt}]
        if isinstance(model, Local):
            ids, room = model.chat_prompt(messages, params)
            request = schedulers[name].submit(ids, room, Pieces(put))
            return request.cancel

        stop = threading.Event()

        def answer():  # a remote model's stream, read in a thread of its own
            try:
                for text in model.chat(messages, params):
                    if stop.is_set():
                        break
                    put(text)
            except FournilError as e:
                put(f"[this model failed to answer: {e}]")
            put(None)

        threading.Thread(target=answer, daemon=True).start()
        return stop.set

    @app.post("/arena/battles")
    async def battle(body: BattleRequest):
        """Two contestants answer ``prompt``, streamed as events ``{"side": "a"|"b", "text": ...}``, then
        ``{"battle": ID}`` once the battle is stored (the names come with the vote)."""
        names = body.models or tuple(random.sample(sorted(contestants), 2))
        if unknown := [n for n in names if n not in contestants]:
            raise FournilError(f"no contestant {unknown[0]!r} here: {', '.join(sorted(contestants))}")
        if names[0] == names[1]:
            raise FournilError(f"models names {names[0]!r} twice: a battle is between two contestants")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        temperature = settings.temperature if body.temperature is None else body.temperature
        max_tokens = body.max_tokens or settings.max_tokens
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        cancels = []
        try:
            for side, name in zip("ab", names):
                cancels.append(start(name, body.prompt, params, lambda text, side=side: loop.call_soon_threadsafe(
                    queue.put_nowait, (side, text))))
        except BaseException:
            for cancel in cancels:
                cancel()
            raise

        async def events():
            answers, left = {"a": "", "b": ""}, 2
            try:
                while left:
                    side, text = await queue.get()
                    if text is None:
                        left -= 1
                    elif text:
                        answers[side] += text
                        yield sse({"side": side, "text": text})
            finally:
                for cancel in cancels:
                    cancel()
            stored = await asyncio.to_thread(store.add_battle, body.prompt, names, (answers["a"], answers["b"]),
                                             {"temperature": temperature, "max_tokens": max_tokens}, seed)
            yield sse({"battle": stored.id})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/arena/votes")
    async def vote(body: VoteRequest):
        if body.verdict not in VERDICTS:
            raise FournilError(f"verdict {body.verdict!r}: one of {', '.join(VERDICTS)}")
        battle = await asyncio.to_thread(store.vote, body.battle, body.verdict, "person", body.voter)
        return {"recorded": True, "model_a": battle.model_a, "model_b": battle.model_b}

    def standings(voters: str):
        """The votes of ``voters``, the leaderboard they make, and how often people and judges agree."""
        votes = store.votes(voters)
        return votes, leaderboard(votes, settings.bootstrap), agreement(store.votes("all"))

    @app.get("/leaderboard.json")
    async def leaderboard_json(voters: str = "all"):
        votes, board, (rate, both) = await asyncio.to_thread(standings, voters)
        return {"voters": voters, "votes": len(votes), "agreement": {"rate": rate, "battles": both},
                "models": [s.__dict__ for s in board]}

    @app.get("/leaderboard.png")
    async def leaderboard_png(voters: str = "all"):
        votes, board, _ = await asyncio.to_thread(standings, voters)
        if not board:
            raise FournilError("no votes yet")
        picture = io.BytesIO()
        await asyncio.to_thread(plot_win_rates, votes, board, picture)
        return Response(picture.getvalue(), media_type="image/png")

    @app.get("/leaderboard")
    async def leaderboard_page(voters: str = "all"):
        votes, board, together = await asyncio.to_thread(standings, voters)
        rows = "".join(f"<tr><td>{r}</td><td>{escape(s.model)}</td><td>{s.score:.0f}</td><td>{s.low:.0f} to "
                       f"{s.high:.0f}</td><td>{s.battles}</td><td>{s.win_rate:.1%}</td></tr>"
                       for r, s in enumerate(board, 1))
        agree = f"people and judges agree on {together[0]:.0%} of the {together[1]} battles both voted on" \
            if together[1] else "no battle has both a person's and a judge's vote yet"
        html = (resources.files("fournil.arena") / "leaderboard.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{ROWS}}", rows or '<tr><td colspan="6">no votes yet</td></tr>')
                            .replace("{{VOTERS}}", escape(voters)).replace("{{VOTES}}", str(len(votes)))
                            .replace("{{AGREEMENT}}", agree).replace("{{PICTURE}}", f'<img alt="win rates" '
                            f'src="/leaderboard.png?voters={escape(voters)}">' if board else ""))

    @app.get("/leaderboard.md")
    async def leaderboard_markdown(voters: str = "all"):
        return PlainTextResponse(table((await asyncio.to_thread(standings, voters))[1]))  # the command's table

    @app.get("/arena")
    async def page():
        html = (resources.files("fournil.arena") / "arena.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{SETTINGS}}", json.dumps({"temperature": settings.temperature,
                                                                      "max_tokens": settings.max_tokens})))

    @app.get("/")
    async def home():
        return RedirectResponse("/arena")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(contestants)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    guard = Guard(app, metrics, None, settings.max_request_bytes, settings.hosts, (), app.routes)
    return guard, list(schedulers.values())


class Pieces:
    """The scheduler's sink for one answer: each piece's text, then None, to ``put``."""

    def __init__(self, put):
        self.put_text = put

    def put(self, piece) -> None:
        self.put_text(None if piece is None else piece.text)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
