"""The request bodies of the HTTP API, as the OpenAI API defines them (fields fournil does not use are ignored)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


# what a request may ask that fournil cannot do, and the values that ask nothing: refused rather than ignored, since
# the answer would silently not be what was asked for (plain text, no tool calls, no biased tokens)
UNSUPPORTED = {"response_format": (None, {"type": "text"}), "tools": (None, []), "functions": (None, []),
               "logit_bias": (None, {})}


class Sampling(BaseModel):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def supported(cls, body):
        for field, harmless in UNSUPPORTED.items():
            if isinstance(body, dict) and body.get(field) not in harmless:
                raise ValueError(f"{field} is not supported here: leave it out (fournil serve answers in plain text, "
                                 f"without tools or biased tokens)")
        return body

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
        other = next((part.type for part in content if part.type != "text" or part.text is None), None)
        if other is not None:
            raise ValueError(f"this model reads text only, not a part of type {other!r}: send the content as a "
                             f"string, or as parts of type 'text' with their text")
        return "\n".join(part.text for part in content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class PredictRequest(BaseModel):
    text: str
    max_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]
