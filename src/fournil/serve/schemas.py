"""The request bodies of the HTTP API, as the OpenAI API defines them (fields fournil does not use are ignored)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


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
