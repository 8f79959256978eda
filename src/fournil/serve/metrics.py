"""Counters for ``GET /metrics``, in Prometheus' text format."""
from __future__ import annotations

import threading
from collections import Counter

from fournil.generate.compiled import decoding_step


class Metrics:
    def __init__(self, *schedulers):
        self.schedulers = schedulers  # every model's (the arena has several)
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> count
        self.latency_sum: Counter = Counter()  # path -> seconds
        self.prompt_tokens = self.completion_tokens = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[path, status] += 1
            self.latency_sum[path] += seconds

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP fournil_requests_total HTTP requests answered, by path and status.",
                     "# TYPE fournil_requests_total counter"]
            lines += [f'fournil_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
            lines += ["# HELP fournil_request_seconds Time to answer HTTP requests, by path (a stream: until its end).",
                      "# TYPE fournil_request_seconds summary"]
            for p in sorted(self.latency_sum):
                count = sum(n for (q, _), n in self.requests.items() if q == p)
                lines += [f'fournil_request_seconds_sum{{path="{p}"}} {self.latency_sum[p]:.6f}',
                          f'fournil_request_seconds_count{{path="{p}"}} {count}']
            lines += ["# HELP fournil_prompt_tokens_total Prompt tokens read.", "# TYPE fournil_prompt_tokens_total counter",
                      f"fournil_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP fournil_completion_tokens_total Tokens generated.",
                      "# TYPE fournil_completion_tokens_total counter",
                      f"fournil_completion_tokens_total {self.completion_tokens}"]
        lines += ["# HELP fournil_queue_depth Requests waiting for a row of the batch.", "# TYPE fournil_queue_depth gauge",
                  f"fournil_queue_depth {sum(s.queued for s in self.schedulers)}",
                  "# HELP fournil_active_sequences Sequences being generated.", "# TYPE fournil_active_sequences gauge",
                  f"fournil_active_sequences {sum(len(s.active) for s in self.schedulers)}",
                  "# HELP fournil_compiled_decoding Models that decode with a compiled step (--compile; 0 while it "
                  "compiles or loads in the background).", "# TYPE fournil_compiled_decoding gauge",
                  f"fournil_compiled_decoding {sum(decoding_step(s.model) is not None for s in self.schedulers)}"]
        timings = [s.timings for s in self.schedulers]
        for name, about, total, count in (
                ("step", "Steps of the model, new prompts read included: each gives every sequence being generated "
                 "its next token (or several, from a draft).",
                 sum(t.step_seconds for t in timings), sum(t.steps for t in timings)),
                ("time_to_first_token", "From a request's arrival to its first token.",
                 sum(t.first_token_seconds for t in timings), sum(t.first_tokens for t in timings))):
            lines += [f"# HELP fournil_{name}_seconds {about}", f"# TYPE fournil_{name}_seconds summary",
                      f"fournil_{name}_seconds_sum {total:.6f}", f"fournil_{name}_seconds_count {count}"]
        return "\n".join(lines) + "\n"
