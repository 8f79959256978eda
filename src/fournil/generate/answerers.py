"""What answers a prompt, here or elsewhere, with one interface: ``chat(messages, params)`` and ``generate(prompt,
params)``, each a stream of text pieces.

:class:`Local` is a model fournil loads. ``openai:NAME@BASE_URL`` (:class:`Remote`) names model NAME of an
OpenAI-compatible endpoint (OpenAI itself without ``@BASE_URL``; Mistral's API, a vLLM server, another
``fournil serve``), asked through the official ``openai`` client; its key comes from an environment variable, never
from the command line. Both serve wherever a model answers: ``fournil chat`` and ``generate``, the arena's
contestants and judges, the teacher of ``distill --sequences``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

from fournil.errors import ContextFull, FournilError, NotAChatModel, named, typed
from fournil.generate.sampling import SamplingParams

PREFIX = "openai:"


def is_remote(spec) -> bool:
    return str(spec).startswith(PREFIX)


def name_of(spec) -> str:
    """What a model is called (in the arena, for one): a remote model's NAME, or its file or folder name."""
    spec = str(spec)
    return spec[len(PREFIX):].partition("@")[0] if is_remote(spec) else named(spec)


def answerer(spec: str, device: str = "auto", dtype: str = "auto", api_key_env: str = "OPENAI_API_KEY",
             draft: str | None = None, draft_tokens: int = 4, conversation: bool = False):
    """The model ``spec`` names, ready to answer: remote (``openai:...``) or loaded here (with ``draft``, a smaller
    model of the same tokenizer proposing ``draft_tokens`` tokens per pass: speculative decoding; with
    ``conversation``, answering one conversation, each turn going on from the last: :class:`Local`)."""
    if is_remote(spec):
        if draft:
            raise FournilError(f"--draft speeds up a model loaded here; {spec} answers from elsewhere")
        return Remote(spec, api_key_env)
    run, helper = load_local(spec, device, dtype, draft)
    return Local(run, name_of(spec), helper, draft_tokens, conversation)


def check_chats(model, start: list[dict] = ()) -> None:
    """Refuse, before any answer, a model loaded here that cannot chat (no chat template; ``start``: the system message
    a conversation begins with, which some templates refuse)."""
    if isinstance(model, Local):
        try:
            model.run.tokenizer.chat_ids([*start, {"role": "user", "content": ""}])
        except NotAChatModel as e:
            raise FournilError(f"{model}: {e}; give a chat model (smollm2, or one tuned with fournil finetune), or "
                               f"continue a text with `fournil generate {typed(model.run.path)}`") from None
        except FournilError as e:
            raise FournilError(f"{model}: {e}") from None


def load_local(spec: str, device: str = "auto", dtype: str = "auto", draft: str | None = None):
    """The run ``spec`` names with its weights in ``dtype``, and its ``draft``'s (checked to fit it), or None.

    A draft only proposes: its precision changes the speed, never the text. So ``auto`` gives it int8 weights on a
    CPU: SmolLM2 in int4 with the layers:4 student of ``fournil distill`` as its draft decoded 34.3 tokens/s with the
    draft in int8, 13.0 in fp32 as loaded; int4 was as fast (34.9) but rounds more a model trained here, whose
    weights lie on no 4-bit grid."""
    from fournil.runs import Run

    run = Run.load(spec, device, weights=dtype)
    run.check_writes()
    if not draft:
        return run, None
    from fournil.generate.speculative import check_draft

    int8 = dtype == "auto" and run.model.device.type == "cpu"
    helper = Run.load(draft, device, weights=None if int8 else dtype)
    check_draft(run, helper)  # (before its weights are quantized: an rnn's int8 weights were refused first)
    return run, helper.quantize("int8") if int8 else helper


class Local:
    """A model loaded here (a :class:`fournil.runs.Run`), answering through the generation engine, with a ``draft``
    proposing ``draft_tokens`` tokens per pass if given. With ``conversation`` (``fournil chat``) it answers one
    prompt at a time and keeps the keys and values of its last answer, so that a conversation's next turn reads only
    its new tokens, not the whole conversation."""

    def __init__(self, run, name: str | None = None, draft=None, draft_tokens: int = 4, conversation: bool = False):
        from fournil.generate.scheduler import Scheduler
        from fournil.generate.speculative import Speculation
        from fournil.models.base import decoder_only

        decoder_only(run.model, "answering a prompt")  # (before a conversation's first message)
        self.run, self.name, self.draft, self.draft_tokens = run, name or run.path.stem, draft, draft_tokens
        self.cut = None  # once an answer has ended: "length" if max_new_tokens cut it, "context" if the context did
        self.logprob = 0.0  # of the tokens that wrote the last piece of text given (several for a character's bytes)
        self.speculation = Speculation() if draft is not None else None  # passes of the model, over every answer
        self.turns = None
        if conversation:
            self.turns = Scheduler(run.model, run.tokenizer, run.dtype, max_batch=1, max_waiting=1, keep=True,
                                   draft=draft and draft.model, draft_tokens=draft_tokens,
                                   draft_dtype=draft and draft.dtype)
            self.speculation = self.turns.speculation if draft is not None else None

    def __str__(self) -> str:
        return self.name

    def chat_prompt(self, messages: list[dict], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The conversation's token ids, and ``params`` allowing at most what the model's context leaves after it."""
        ids, block = self.run.tokenizer.chat_ids(messages), self.run.model.config.block_size
        if len(ids) >= block:
            raise ContextFull(f"the conversation, {len(ids):,} tokens, fills the model's context of {block:,}")
        return ids, dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, block - len(ids)))

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The answer, at most as many tokens as the model's context leaves after the conversation."""
        ids, room = self.chat_prompt(messages, params)
        return self._stream(ids, room, "length" if room.max_new_tokens == params.max_new_tokens else "context")

    def generate(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        return self._stream(self.run.tokenizer.prompt_ids(prompt), params)

    def _stream(self, ids: list[int], params: SamplingParams, limit: str = "length") -> Iterator[str]:
        from fournil.generate.engine import speculate, stream

        run = self.run
        if self.turns is None and self.draft is not None:
            pieces = speculate(run.model, self.draft.model, run.tokenizer, ids, params, run.dtype, self.draft_tokens,
                               self.speculation, self.draft.dtype)
        else:
            if self.draft is not None:
                from fournil.generate.speculative import check_drafting

                check_drafting(params, self.draft_tokens)
            pieces = stream(run.model, run.tokenizer, ids, params, run.dtype, scheduler=self.turns)

        def texts():
            self.cut, tokens, behind = None, 0, 0.0
            with contextlib.closing(pieces):
                for piece in pieces:
                    tokens += piece.token >= 0  # (the end of turn gives no piece: an answer it ended is shorter)
                    behind += piece.logprob if piece.token >= 0 else 0.0
                    if piece.text:
                        self.logprob, behind = behind, 0.0
                    yield piece.text
            self.cut = limit if tokens == params.max_new_tokens else None
        return texts()


class Remote:
    """Model NAME of the endpoint BASE_URL, checked on creation (reachable, the key accepted, NAME served). Requests
    time out after ``timeout`` seconds and are retried ``retries`` times, with exponential backoff, when the endpoint
    is unreachable, overloaded (429) or failing (5xx)."""

    def __init__(self, spec: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 3):
        import openai

        self.cut = None  # once an answer has ended: "length" if max_tokens cut it

        name, _, url = spec[len(PREFIX):].partition("@")
        if not name:
            raise FournilError(f"{spec}: name the model, as openai:NAME or openai:NAME@BASE_URL "
                               f"(e.g. openai:gpt-4o-mini, openai:smollm2@http://127.0.0.1:8000/v1)")
        self.name, self.url, self.key_env = name, url or "https://api.openai.com/v1", api_key_env
        key = os.environ.get(api_key_env) or None
        if key is None and not url:
            raise FournilError(f"{spec}: set {api_key_env} to your API key (or choose the variable: --api-key-env VAR)")
        self.client = openai.OpenAI(base_url=self.url, api_key=key or "none", timeout=timeout, max_retries=retries)
        served = [m.id for m in self._call(self.client.models.list)]
        if name not in served:
            raise FournilError(f"{self.url} has no model {name!r}; it serves {', '.join(served[:20]) or 'none'}")

    def __str__(self) -> str:
        return self.name

    def _call(self, fn, *args, midway: bool = False, **kwargs):
        """``fn`` with the endpoint's refusals made into one-line errors; ``midway``: reading an answer it started."""
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIConnectionError as e:
            if midway:
                raise FournilError(f"{self.url} broke off its answer ({e.__cause__ or e}): the server stopped or the "
                                   f"connection dropped") from None
            raise FournilError(f"cannot reach {self.url} ({e.__cause__ or e}): check the URL in openai:NAME@URL") \
                from None
        except openai.AuthenticationError:
            raise FournilError(f"{self.url} refused the API key in {self.key_env} (401): set it to a valid key") from None
        except openai.PermissionDeniedError as e:
            raise FournilError(f"{self.url} refused the request (403): {e.message}") from None
        except openai.APITimeoutError:
            raise FournilError(f"{self.url} did not answer in time (after retries)") from None
        except openai.APIStatusError as e:
            raise FournilError(f"{self.url} answered {e.status_code}: {e.message}") from None

    def _settings(self, params: SamplingParams) -> dict:
        unsupported = [flag for flag, value in (("--top-k", params.top_k), ("--min-p", params.min_p),
                                                ("--repetition-penalty", params.repetition_penalty != 1.0 or None))
                       if value is not None]
        if unsupported:
            raise FournilError(f"the OpenAI API has no {', '.join(unsupported)}: leave them out for {PREFIX} models")
        settings = {"model": self.name, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty}
        for key, value in (("top_p", params.top_p), ("seed", params.seed), ("stop", list(params.stop) or None)):
            if value is not None:
                settings[key] = value
        return settings

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The assistant's answer to ``messages``, a piece at a time."""
        chunks = self._call(self.client.chat.completions.create, messages=messages, stream=True,
                            **self._settings(params))
        return self._pieces(chunks, lambda c: c.choices[0].delta.content if c.choices else None)

    def generate(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """A continuation of ``prompt``, a piece at a time."""
        chunks = self._call(self.client.completions.create, prompt=prompt, stream=True, **self._settings(params))
        return self._pieces(chunks, lambda c: c.choices[0].text if c.choices else None)

    def _pieces(self, chunks, text_of) -> Iterator[str]:
        """The text of each chunk; an answer whose stream ends without saying why (a ``finish_reason``, which the
        API's last choice always has) was cut off, and is not taken for a whole one."""
        def pieces():
            stream, finished = iter(chunks), None
            self.cut = None
            while (chunk := self._call(next, stream, None, midway=True)) is not None:
                finished = finished or next((c.finish_reason for c in chunk.choices if c.finish_reason), None)
                if text := text_of(chunk):
                    yield text
            if not finished:
                raise FournilError(f"{self.url} ended its answer without a finish_reason: it was cut off (the server "
                                   f"stopped, or is not OpenAI-compatible)")
            self.cut = "length" if finished == "length" else None
        return pieces()
