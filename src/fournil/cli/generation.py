"""``fournil generate``, ``chat`` and ``serve``: a model answers, in the terminal or over HTTP."""
from __future__ import annotations

import logging
import os
import re
import stat
import sys
from pathlib import Path

from fournil.cli.flags import (MODEL_HELP, WEIGHT_PRECISIONS, add_compile_arg, add_draft_args, add_listen_args,
                               is_loopback)
from fournil.errors import ContextFull, FournilError
from fournil.text import is_text

COMMANDS_OF_CHAT = "/reset, /system TEXT, /exit"


def add_generation(sub) -> None:
    answerer_help = MODEL_HELP + ", or openai:NAME@BASE_URL (a model of an OpenAI-compatible endpoint)"

    def sampling(p, temperature: float) -> None:
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = always the most likely token")
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--min-p", type=float, help="keep tokens at least this fraction as likely as the best")
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
        p.add_argument("--frequency-penalty", type=float, default=0.0)
        p.add_argument("--presence-penalty", type=float, default=0.0)
        p.add_argument("--stop", action="append", default=[], help="end the answer before this text (repeatable)")
        p.add_argument("--seed", type=int)
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", choices=WEIGHT_PRECISIONS,
                       help="weights for generation: bfloat16 takes half of float32's memory, int8 about a third, "
                            "int4 a quarter (CPU only; the embeddings stay in bfloat16)")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="the environment variable holding the key of an openai:NAME@URL model")
        add_draft_args(p)
        add_compile_arg(p)

    p = sub.add_parser("generate", help="continue a prompt with any model, streamed (default: smollm2, from nothing)")
    p.add_argument("model", nargs="?", default="smollm2", help=answerer_help)
    p.add_argument("prompt", nargs="?", default="", help="the text to continue (default: none; -: read it from "
                                                           "the standard input, e.g. a file: - < prompt.txt)")
    sampling(p, 0.8)

    p = sub.add_parser("chat", help=f"chat in the terminal ({COMMANDS_OF_CHAT})")
    p.add_argument("model", nargs="?", default="smollm2", help=answerer_help)
    p.add_argument("--system", help="a system message to start with")
    sampling(p, 0.7)

    p = sub.add_parser("serve", help="an HTTP server: the OpenAI API, /predict and a chat page (default: smollm2)")
    p.add_argument("model", nargs="?", default="smollm2", help=MODEL_HELP)
    add_listen_args(p)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every endpoint but /health and the page")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond those; more are answered 503")
    p.add_argument("--batch-invariant", action="store_true",
                   help="each answer computed as if it were alone, whatever else is generated (identical requests get "
                        "identical answers under load too); costs the batch's throughput")
    p.add_argument("--keep-conversation", action="store_true",
                   help="keep the last answer's keys and values while idle, so that a chat's next turn reads only its "
                        "new tokens (one person chatting: the page, a terminal); an idle server's answers then "
                        "depend in their last bits on the one before")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies are refused (413) before they are read (default 4 MiB)")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host names to answer besides localhost, 127.0.0.1 and [::1] (a server bound "
                        "to a loopback address refuses others: a web page could reach it through DNS rebinding)")
    p.add_argument("--cors-origins", default="",
                   help="comma-separated origins of web pages allowed to call the API from a browser (default: none)")
    p.add_argument("--name", help="the model's name in the API (default: the model's file or folder name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=WEIGHT_PRECISIONS,
                   help="weights in memory: bfloat16, int8 and int4 (CPU only) take less and decode faster on a CPU")
    add_draft_args(p)  # (a request decodes with it while it is the only one)
    add_compile_arg(p)


def sampling_params(args, max_new_tokens: int):
    from fournil.generate import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          seed=args.seed, stop=tuple(args.stop))


def compile_decoding_step(run, max_batch: int) -> None:
    from fournil.generate.compiled import compile_decoding

    print("compiling the decoding step (minutes the first time on this machine, seconds after)", file=sys.stderr,
          flush=True)
    print(f"compiled in {compile_decoding(run.model, run.dtype, max_batch):.0f} s", file=sys.stderr, flush=True)


def load_answerer(args):
    """The model of ``generate`` and ``chat``, with its decoding step compiled for one answer at a time if asked
    (``--compile`` is refused before loading for what it cannot speed up: a remote model, a draft's passes)."""
    from fournil.generate.answerers import answerer, is_remote

    if args.compile and is_remote(args.model):
        raise FournilError(f"--compile speeds up a model loaded here; {args.model} answers from elsewhere")
    if args.compile and args.draft:
        raise FournilError("--compile and --draft do not go together here: a draft's passes are not compiled; "
                           "choose one (fournil serve takes both: the draft while a request is alone)")
    model = answerer(args.model, args.device, args.dtype, args.api_key_env, args.draft, args.draft_tokens,
                     conversation=args.command == "chat")
    if args.compile:
        compile_decoding_step(model.run, 1)
    return model


def piped(stream) -> bool:
    """Whether ``stream`` is a pipe or a file: not a terminal, nor /dev/null, nor a stream without a file."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # (None, closed, or pytest's capture, which has no file)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def run_generate(args) -> None:
    params = sampling_params(args, args.max_new_tokens)
    params.check()  # before the model loads
    if args.prompt == "-":  # (less the newline that ends the input, as echo and editors end it)
        args.prompt = sys.stdin.read().removesuffix("\n")
    elif not args.prompt and piped(sys.stdin):  # (a pipe is not read unasked: it may never end)
        print("(generating from nothing: the standard input is read as the prompt with -, as in "
              "fournil generate MODEL -)", file=sys.stderr)
    model = load_answerer(args)
    pieces = model.generate(args.prompt, params)  # the prompt is checked here
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if getattr(model, "speculation", None):
        print(f"draft: {model.speculation.tokens_per_pass:.2f} tokens per pass of the model "
              f"({model.speculation.tokens} in {model.speculation.passes})", file=sys.stderr)


def run_chat(args) -> None:
    from fournil.generate.answerers import Local, check_chats

    params = sampling_params(args, args.max_new_tokens)
    params.check()
    model = load_answerer(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    check_chats(model, start)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused below, not a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        about = f"{model.run.model.num_params():,} parameters" if isinstance(model, Local) else model.url
        print(f"chatting with {model} ({about}); {COMMANDS_OF_CHAT}; Ctrl-C stops an answer")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        command, _, rest = line.strip().partition(" ")
        if not command:
            continue
        if not is_text(line):  # bytes that were not UTF-8: a terminal in another encoding
            print(f"(that line is not UTF-8 text, at {os.fsencode(line)!r}: set the terminal to UTF-8 and type it "
                  f"again)", file=sys.stderr)
            continue
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            print("(new conversation)")
            continue
        if command == "/system":  # (alone: no system message, so the chat template's own default applies)
            start = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
            messages = start + [m for m in messages if m["role"] != "system"]
            print("(system message set)" if start else "(system message removed)")
            continue
        if re.fullmatch(r"/[A-Za-z?]+", command):
            print(f"(no command {command}: {COMMANDS_OF_CHAT}; to send a message that begins with /, begin it with //)")
            continue
        line = line[1:] if line.startswith("//") else line
        try:
            pieces = model.chat(messages + [{"role": "user", "content": line}], params)
        except ContextFull as e:
            earlier = any(m["role"] != "system" for m in messages)
            print(f"({e}: {'/reset to start over, or ' if earlier else ''}send a shorter message)", file=sys.stderr)
            continue
        except FournilError as e:
            print(f"({e}; the question is left out of the conversation)", file=sys.stderr)
            continue
        answer = ""
        try:
            for piece in pieces:
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat; what was shown stays in the conversation
            pieces.close()
            print(" (stopped)", end="")
        except FournilError as e:  # a remote model that broke off: the chat goes on without this question
            print(f"\n({e}; the question is left out of the conversation)", file=sys.stderr)
            continue
        print()
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def run_serve(args) -> None:
    from fournil.generate.answerers import load_local
    from fournil.generate.scheduler import check_capacity
    from fournil.serve.app import ServeSettings, create_app, listen, run_server
    from fournil.serve.guard import LOOPBACK_HOSTS

    check_capacity(args.max_batch, args.max_waiting)  # before the model loads
    if args.draft:
        from fournil.generate.speculative import check_draft_tokens

        check_draft_tokens(args.draft_tokens)
    if args.max_request_bytes < 1:
        raise FournilError(f"--max-request-bytes must be at least 1 (got {args.max_request_bytes})")
    logging.basicConfig(format="fournil: %(levelname)s: %(message)s")  # a server fault's traceback, on stderr
    extra = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    local = is_loopback(args.host)
    warning = None if local or args.api_key else (
        f"this server listens on {args.host} without an API key: anyone who can reach this machine can use it "
        f"(start it with --api-key KEY)")
    settings = ServeSettings(args.name or Path(str(args.model)).stem, args.api_key, args.max_batch, args.max_waiting,
                             args.batch_invariant, args.max_request_bytes,
                             (*LOOPBACK_HOSTS, *extra) if local else (extra or None),
                             tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()), warning,
                             args.keep_conversation)
    sock = listen(args.host, args.port)
    run, draft = load_local(args.model, args.device, args.dtype, args.draft)
    if args.compile:
        compile_decoding_step(run, args.max_batch)
    app, schedulers = create_app(run, settings, draft, args.draft_tokens)
    print(f"serving {settings.name} ({run.model.num_params():,} parameters; {run.precision}) on "
          f"http://{args.host}:{sock.getsockname()[1]}: chat page at /, OpenAI API at /v1", flush=True)
    if warning:
        logging.getLogger("fournil.serve").warning(warning)
    run_server(app, schedulers, sock)  # on Ctrl-C, answers in progress get 5 seconds to end


COMMANDS = {"generate": run_generate, "chat": run_chat, "serve": run_serve}
