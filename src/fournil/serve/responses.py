"""OpenAI's Responses API, which its newer clients and agent frameworks call: a conversation in, one answer out as an
output message; streamed, as typed and numbered events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``)."""
from __future__ import annotations

import json

from fournil.serve.schemas import ResponsesRequest

# of a sequence that ended so (None: cancelled, as the server stops)
STATUS = {"stop": "completed", "length": "incomplete", "error": "failed", None: "cancelled"}
FAILED = {"code": "server_error", "message": "generation failed (the server's log has the details)"}


def conversation(body: ResponsesRequest) -> list[dict]:
    """The messages the chat template reads: the instructions as the system's, then the input's."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return system + [{"role": m.role, "content": m.content} for m in body.input]


def usage_of(usage: dict) -> dict:
    """The Responses API's names for the chat API's usage."""
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


class Response:
    """One response, as a whole object (``finished``) or as the events of its stream."""

    def __init__(self, head: dict, body: ResponsesRequest, message_id: str):
        self.head, self.body, self.message_id, self.number = head, body, message_id, 0
        self.where = {"item_id": message_id, "output_index": 0, "content_index": 0}  # (of the one text part)

    def whole(self, status: str, output: list, usage: dict | None = None) -> dict:
        return {**self.head, "object": "response", "status": status, "output": output, "usage": usage,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": FAILED if status == "failed" else None, "instructions": self.body.instructions,
                "max_output_tokens": self.body.max_output_tokens, "temperature": self.body.temperature,
                "top_p": self.body.top_p, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                "text": {"format": {"type": "text"}}, "previous_response_id": None, "store": False, "metadata": {}}

    def message(self, status: str, parts: list) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": parts}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def finished(self, text: str, finish: str, usage: dict) -> dict:
        status = STATUS[finish]
        return self.whole(status, [self.message(status, [self.part(text)])], usage_of(usage))

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def opening(self) -> list[str]:
        return [self.event("response.created", response=self.whole("in_progress", [])),
                self.event("response.in_progress", response=self.whole("in_progress", [])),
                self.event("response.output_item.added", output_index=0, item=self.message("in_progress", [])),
                self.event("response.content_part.added", **self.where, part=self.part(""))]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", **self.where, delta=text, logprobs=[])

    def closing(self, text: str, finish: str, usage: dict) -> list[str]:
        whole = self.finished(text, finish, usage)
        return [self.event("response.output_text.done", **self.where, text=text, logprobs=[]),
                self.event("response.content_part.done", **self.where, part=self.part(text)),
                self.event("response.output_item.done", output_index=0, item=whole["output"][0]),
                self.event(f"response.{whole['status']}", response=whole)]
