"""The request bodies of the HTTP API, as the OpenAI API defines them (fields fournil does not use are ignored, as
other servers of the API do), and of fournil's own endpoints."""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fournil.text import HALF_PAIR, unpaired


# what a request may ask that fournil cannot do (in OpenAI's API, then in vLLM's extensions to it), the values that
# ask nothing, and what fournil does instead: refused rather than ignored, since the answer would silently not be what
# was asked for
NO_GRAMMAR = ((None,), "it answers freely, never held to a schema or grammar")
UNSUPPORTED = {"response_format": ((None, {"type": "text"}), "it answers in plain text"),
               "tools": ((None, []), "it calls no tools"), "functions": ((None, []), "it calls no tools"),
               "best_of": ((None, 1), "one answer per choice"),
               "suffix": ((None, ""), "it inserts no text before a suffix"),
               "min_tokens": ((None, 0), "an answer ends where the model ends it, or with ignore_eos at max_tokens"),
               "use_beam_search": ((None, False), "it samples, without beam search"),
               "stop_token_ids": ((None, []), "stop takes strings"),
               "bad_words": ((None, []), "it bans no word"), "allowed_token_ids": ((None,), "it bans no token"),
               "prompt_logprobs": ((None,), "echo with logprobs gives the prompt's"),
               "guided_json": NO_GRAMMAR, "guided_regex": NO_GRAMMAR, "guided_choice": NO_GRAMMAR,
               "guided_grammar": NO_GRAMMAR, "structured_outputs": NO_GRAMMAR,
               # the Responses API's
               "previous_response_id": ((None,), "it keeps no responses: send the whole conversation as input"),
               "conversation": ((None,), "it keeps no conversations: send the whole conversation as input"),
               "background": ((None, False), "it answers within the request")}


# the members of this API's unions, as pydantic names them in an error's place, in words
MEMBERS = {"str": "a string", "list[str]": "a list of strings", "list[int]": "a list of token ids",
           "list[list[int]]": "a list of lists of token ids",
           "list[Part]": 'a list of parts {"type": "text", "text": ...}'}


# a body each endpoint takes, for a message about a body that is not one
EXAMPLES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
            "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 16},
            "/predict": {"text": "Hi", "max_tokens": 32},
            "/v1/responses": {"input": "Hi"}, "/tokenize": {"prompt": "Hi"}, "/detokenize": {"tokens": [1, 2, 3]}}


def explain(errors: list[dict], example: dict) -> tuple[str | None, str]:
    """Where a body is wrong and what to change, from pydantic's errors: a body that is not one JSON object (such as
    ``example``), or a field that is none of its union's members, in words (pydantic reports one error per member, at
    places such as ``prompt.list[int].0``)."""
    first = errors[0]
    send = f"send one JSON object, such as {json.dumps(example)}"
    if first["type"] == "json_invalid":
        return None, f"the body is not valid JSON ({first['ctx']['error']} at character {first['loc'][-1]}): {send}"
    if first["loc"] == ("body",) and first["type"] == "missing":
        return None, f"the request has no body: {send}"
    if first["loc"] == ("body",) and isinstance(first["input"], bytes):  # FastAPI reads JSON only if its type says so
        return None, ("the body was not read as JSON: send it with the header Content-Type: application/json "
                      "(curl: -H 'Content-Type: application/json')")
    if first["loc"] == ("body",) and first["type"] == "model_attributes_type":
        return None, f"the body should be {send.removeprefix('send ')} (got {json.dumps(first['input'])[:80]})"
    place = [p for p in first["loc"] if p != "body"]
    where = ".".join(map(str, place))
    if first["type"] == "extra_forbidden":
        return where, (f"{where} is not a field here: this endpoint takes {', '.join(example)} (and answers "
                       f"greedily); /v1/completions and /v1/chat/completions take sampling settings")
    tag = next((i for i, p in enumerate(place) if p in MEMBERS), None)
    if tag is None:
        said = first["msg"].removeprefix("Value error, ")  # (pydantic's prefix to a validator's own message)
        return where or None, f"{where}: {said}" if where else said
    field = place[:tag]
    places = [[p for p in e["loc"] if p != "body"] for e in errors]
    members = [p[tag] for p in places if p[:tag] == field and len(p) > tag and p[tag] in MEMBERS]
    got = next((e["input"] for e, p in zip(errors, places) if p[:tag] == field and len(p) == tag + 1), None)
    where = ".".join(map(str, field))
    return where, (f"{where} should be {', or '.join(MEMBERS[m] for m in dict.fromkeys(members))} "
                   f"(got {json.dumps(got)[:80]})")


class Body(BaseModel):
    """A request's body: its strings are text."""

    @model_validator(mode="before")
    @classmethod
    def characters(cls, body):
        where = unpaired(body)
        if where is not None:
            raise ValueError(f"{where or 'the body'} {HALF_PAIR}: send the character itself, or both halves of its "
                             f"pair")
        return body


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage and no choices (which a client must then expect)


class Sampling(Body):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    # vLLM's extensions, which clients for local servers send: top_k 0 or -1 and min_p 0 keep every token
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)  # (as SamplingParams takes it)
    ignore_eos: bool = False  # answers of exactly max_tokens, as serving benchmarks ask
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (a JSON key) -> its bias
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def supported(cls, body):
        for field, (harmless, instead) in UNSUPPORTED.items():
            if isinstance(body, dict) and body.get(field) not in harmless:
                raise ValueError(f"{field} is not supported here: leave it out ({instead})")
        return body

    def streams_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return tuple(stop)


class CompletionRequest(Sampling):
    # text, texts, token ids, or lists of token ids (what evaluation harnesses send)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=0)  # the OpenAI default for completions; 0 with echo: score the prompt only


class Part(BaseModel):
    """A part of a message's content: clients that also send images send text this way too."""
    type: str
    text: str | None = None


TEXT_PARTS = ("text", "input_text", "output_text")  # (the last two: the Responses API's, of a question and an answer)


class Message(BaseModel):
    """A message as the chat template reads it: OpenAI's "developer" role is the system's, parts of text are joined."""
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]

    @field_validator("role")
    @classmethod
    def system(cls, role: str) -> str:
        return "system" if role == "developer" else role

    @field_validator("content")
    @classmethod
    def text(cls, content: str | list[Part]) -> str:
        if isinstance(content, str):
            return content
        other = next((part.type for part in content if part.type not in TEXT_PARTS or part.text is None), None)
        if other is not None:
            raise ValueError(f"this model reads text only, not a part of type {other!r}: send the content as a "
                             f"string, or as parts of type 'text' ('input_text' in the Responses API) with their text")
        return "\n".join(part.text for part in content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def alternatives(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs asks for each token's alternatives, which come with logprobs: set logprobs "
                             "to true too")
        return self


class InputMessage(Message):
    """A message of the Responses API's input (items of other types, such as a tool's output, are not messages)."""
    type: Literal["message"] = "message"

    @model_validator(mode="before")
    @classmethod
    def a_message(cls, item):
        if isinstance(item, dict) and item.get("type", "message") != "message":
            raise ValueError(f"an item of type {item['type']!r} is not a message: this server reads messages (it "
                             f"calls no tools)")
        return item


class TextFormat(BaseModel):
    type: str = "text"


class TextConfig(BaseModel):
    format: TextFormat | None = None


class ResponsesRequest(Sampling):
    """OpenAI's Responses API: the conversation in ``input`` (a string is one message of the user's)."""
    input: list[InputMessage] = Field(min_length=1)
    instructions: str | None = None  # the system's message
    max_output_tokens: int | None = Field(None, ge=1)
    text: TextConfig | None = None  # {"format": {"type": "text"}}: plain text, the one format fournil writes
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("input", mode="before")
    @classmethod
    def one_message(cls, given):
        return [{"role": "user", "content": given}] if isinstance(given, str) else given

    @model_validator(mode="after")
    def plain_text(self):
        asked = self.text.format.type if self.text and self.text.format else "text"
        if asked != "text":
            raise ValueError(f"text.format of type {asked!r} is not supported here: leave it out (it answers in plain "
                             f"text)")
        if self.top_logprobs:
            raise ValueError("top_logprobs is not supported here: leave it out (/v1/chat/completions gives "
                             "log-probabilities)")
        return self


class PredictRequest(Body):
    """fournil's own endpoint, greedy: a field it does not have (temperature, n...) is refused, not ignored, since
    no client library sends it unasked."""
    model_config = ConfigDict(extra="forbid")
    text: str
    max_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(Body):
    """vLLM's: a text, or a conversation as the chat template lays it out; each token's text too if asked."""
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # a text's BOS (or boundary), as vLLM's default; the template writes its own
    add_generation_prompt: bool | None = None  # the assistant's turn begun after the messages (default: true)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt (a text) or messages (a conversation, which the chat template lays out), "
                             "one of them")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("the chat template writes the special tokens of messages itself: leave add_special_tokens "
                             "out")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("add_generation_prompt is for messages (it begins the assistant's turn after them): leave "
                             "it out with a prompt")
        return self


class DetokenizeRequest(Body):
    tokens: list[int]
