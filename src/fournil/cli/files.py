"""``fournil convert``, ``info``, ``tokenizer``, ``prepare`` and ``tokenize``: models and tokenizers on disk."""
from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from fournil.cli.flags import MODEL_HELP, parse_picture
from fournil.config import DataConfig
from fournil.data.sources import BUNDLED, resolve
from fournil.errors import FournilError, named, typed

# names that say "one file": a folder named so (a Hugging Face folder, a run) is a typo waiting to be loaded as one
FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".ggml", ".gguf"}
SENTENCE = "Tokenizers cut text into pieces: \"unbelievable\" may be one token, or three. Ça coûte 3 € !"


def add_model_files(sub) -> None:
    p = sub.add_parser("convert", help="convert between GGUF, Hugging Face folder and run directory")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="OUT.gguf, or a folder")
    p.add_argument("--to", choices=["hf", "gguf", "run"], help="output format (default: gguf for *.gguf, else hf)")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF weight type: f32, f16 (half the size), q8_0 (about a quarter: 8-bit blocks), q4_0 or "
                        "q4_1 (about an eighth: 4-bit blocks, the embeddings and output layer in q8_0)")

    p = sub.add_parser("info", help="architecture, parameters, dtype, context length, size on disk")
    p.add_argument("model", nargs="?", default="smollm2", help=MODEL_HELP)


def add_tokenizer_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus (default: train on shakespeare)")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="learn a byte-level BPE vocabulary (GPT-4 style) from the train split")
    t.add_argument("--data", default="shakespeare",
                   help=f"a bundled dataset ({', '.join(BUNDLED)}) or a UTF-8 text file")
    t.add_argument("--mode", default="auto", choices=["auto", "lines", "text"],
                   help="lines: one document per line; text: running text (default: inferred)")
    t.add_argument("--vocab-size", type=int, default=1024, help="tokens in the vocabulary: 256 bytes and the merges")
    t.add_argument("--out", help="folder for tokenizer.json (default: tokenizers/DATA-bpeN)")

    p = sub.add_parser("prepare", help="tokenize a large corpus (a file or a folder of .txt) into token shards "
                                       "(default: shakespeare)")
    p.add_argument("--data", default="shakespeare",
                   help=f"a UTF-8 text file, a folder of .txt files (read recursively; .jsonl files of "
                        f"{{\"text\": ...}} documents too), or a bundled dataset ({', '.join(BUNDLED)})")
    p.add_argument("--tokenizer", default="bpe:4096",
                   help="bpe:N (learned from the corpus first), char, or a tokenizer.json")
    p.add_argument("--out", help="folder for the shards (default: shards/DATA-TOKENIZER); train on it with "
                                 "`fournil train --data OUT`")

    p = sub.add_parser("tokenize", help="show where tokenizers cut a text and how much they compress it, in the "
                                        "terminal and as a picture")
    p.add_argument("text", nargs="?", default=SENTENCE, help="the text to cut (default: a sentence of English "
                                                            "and French, with quotes, accents, a digit and €)")
    p.add_argument("--tokenizer", action="append",
                   help="a tokenizer.json, a folder with one (a run, a Hugging Face model, `fournil tokenizer train` "
                        "output), a model (smollm2) or char (the text's own characters); repeat to compare; default: a "
                        "1,024-token BPE trained on shakespeare now")
    p.add_argument("--chat", action="store_true", help="lay the text out as a user's message in the tokenizer's chat "
                   "template, ready for the answer: what a chat model reads, its special tokens and all")
    p.add_argument("--out", default="tokens.png", type=parse_picture, help="the picture to write (.png, .svg...)")


def run_convert(args) -> None:

    from fournil.formats import check_output, export
    from fournil.runs import Run

    out = Path(args.out)
    kind = args.to or ("gguf" if out.suffix.lower() == ".gguf" else "hf")
    if kind == "gguf" and out.suffix.lower() != ".gguf":  # loaders, fournil's included, know a GGUF by its name
        raise FournilError(f"{out}: name a GGUF file OUT.gguf, as llama.cpp, ollama and fournil expect")
    if kind != "gguf" and out.suffix.lower() in FILE_SUFFIXES:
        raise FournilError(f"{out}: --to {kind} writes a folder (config.json, model.safetensors, the tokenizer), not "
                           f"one {out.suffix} file: give a folder's name, such as {out.with_suffix('')}, or OUT.gguf "
                           f"for a single file")
    if kind != "gguf" and args.type != "f32":
        raise FournilError(f"--type {args.type} is a GGUF weight type: give OUT.gguf, or leave --type out for a "
                           f"{kind} folder")
    check_output(out)  # before the model loads
    run = Run.load(args.model, "cpu")
    if run.config.scores_answers:
        raise FournilError(f"{run.path} is a reward model: convert writes language models, and its body without "
                           f"its score head would neither write nor score; use the run itself (fournil reward score "
                           f"{typed(run.path)}, fournil align --method grpo --reward {typed(run.path)})")
    export(run, out, kind, args.type)
    if kind != "gguf":
        print(f"wrote {args.out} ({kind})")
        return
    from fournil.formats.gguf_reader import read_gguf_file

    tensors = read_gguf_file(out)[1]
    kinds = Counter(t.kind for t in tensors)
    print(f"wrote {args.out} (gguf: {', '.join(f'{k} x{n}' for k, n in kinds.most_common())})")
    widths = sorted({t.dims[0] for t in tensors if t.kind == "F16"})
    if args.type.startswith("q") and widths:
        print(f"fournil: {kinds['F16']} matrices are in F16, not {args.type}: their rows, of "
              f"{' or '.join(map(str, widths))} values, are not whole blocks of 32; a model whose widths are multiples "
              f"of 32 is quantized whole", file=sys.stderr)


def run_info(args) -> None:
    from fournil.runs import Run

    run = Run.load(args.model, "cpu")
    for key, value in run.info().items():
        print(f"{key + ':':<16}{value}")


def run_tokenizer(args) -> None:

    from fournil.data import load_splits
    from fournil.tokenizers.bpe import train_bpe
    from fournil.tokenizers.compression import compression

    splits, _ = load_splits(DataConfig(args.data, args.mode))
    texts = lambda part: [part] if splits.mode == "text" else part  # noqa: E731
    tokenizer = train_bpe(texts(splits.train), args.vocab_size, progress=True)
    name = args.data if args.data in BUNDLED else named(args.data)
    out = Path(args.out or f"tokenizers/{name}-bpe{args.vocab_size}")
    own_folder(out, "tokenizer", r"tokenizer(_config)?\.json")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    val = compression(tokenizer, texts(splits.val))
    print(f"{tokenizer.vocab_size:,} tokens -> {out}/tokenizer.json")
    print(f"val split: {val['bytes']:,} bytes, {val['chars']:,} characters, {val['tokens']:,} tokens: "
          f"{val['bytes_per_token']:.2f} bytes per token, {val['chars'] / val['tokens']:.2f} characters per token")
    print(f"next: fournil tokenize TEXT --tokenizer {typed(out)}  |  fournil train --data {typed(args.data)} "
          f"--tokenizer {typed(out)}")


def own_folder(out: Path, command: str, writes: str) -> None:
    """A folder ``command`` writes into (again on a second run): refused when it holds files it did not write (names
    not matching ``writes``), a run's say, whose tokenizer.json it would replace."""
    others = sorted((p.name for p in out.iterdir() if not re.fullmatch(writes, p.name)),
                    key=lambda name: (name.startswith("."), name)) if out.is_dir() else []  # (a run's .lock last)
    if others or out.is_file():
        held = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "") if others else "it is a file"
        raise FournilError(f"{out} is not a folder of fournil {command}'s own ({held}): it would write over what is "
                           f"there; choose another --out")


def run_prepare(args) -> None:
    from fournil.data.shards import META, TOKENIZER, made_with, prepare, source_texts
    from fournil.tokenizers import CharTokenizer, load_tokenizer
    from fournil.tokenizers.bpe import bpe_size, train_bpe
    from fournil.tokenizers.char import BOUNDARY

    spec, source = args.tokenizer, str(resolve(args.data)) if args.data in BUNDLED else args.data
    out = Path(args.out or f"shards/{named(args.data)}-{Path(spec.replace(':', '')).stem}")
    own_folder(out, "prepare", r"(train|val|test)_\d{5}\.bin|meta\.json|tokenizer(_config)?\.json|\.lock")
    if (out / META).exists():  # prepared before, or interrupted: with the same tokenizer, carry on
        tokenizer = load_tokenizer(out / TOKENIZER)
        if not made_with(out, spec):
            held = "characters" if isinstance(tokenizer, CharTokenizer) else \
                f"a {tokenizer.vocab_size:,}-token BPE ({out / TOKENIZER})"
            raise FournilError(f"{out} holds shards made with {held}, not {spec}: give --tokenizer {typed(out)} to "
                               f"go on with theirs, or choose another --out")
    elif size := bpe_size(spec):
        texts = source_texts(source)  # (which refuses a source with no text before anything is said)
        print(f"learning a {size:,}-token byte-level BPE from {args.data}", file=sys.stderr)
        tokenizer = train_bpe(texts, size, progress=True, asked="--tokenizer bpe:{}")
    elif spec == "char":
        chars = set().union(*map(set, source_texts(source)))
        tokenizer = CharTokenizer(sorted(chars), [BOUNDARY])
    else:
        tokenizer = load_tokenizer(spec)
    meta = prepare(source, tokenizer, out, progress=True)
    counts = {name: sum(s["tokens"] for s in shards) for name, shards in meta["shards"].items()}
    print(f"{out}: " + ", ".join(f"{name} {n:,} tokens" for name, n in counts.items())
          + f" ({meta['dtype']}, vocabulary {tokenizer.vocab_size:,})")
    print(f"next: fournil train --data {typed(out)}")


def tokenizer_for(spec: str | None, text: str):
    """What `fournil tokenize` cuts with: a tokenizer file or folder, a model's, or the text's own characters."""
    from fournil.data.sources import read_text
    from fournil.formats import read_tokenizer
    from fournil.tokenizers import CharTokenizer
    from fournil.tokenizers.bpe import train_bpe

    if spec is None:
        print("(a 1,024-token byte-level BPE trained on shakespeare; --tokenizer to use another)", file=sys.stderr)
        return "shakespeare BPE 1,024", train_bpe([read_text("shakespeare")], 1024)
    if spec == "char":
        return "characters", CharTokenizer.train([text], boundary=False)
    return spec, read_tokenizer(spec)


def run_tokenize(args) -> None:

    from fournil.plots.tokens import plot_tokens
    from fournil.tokenizers.compression import compression, piece, pieces

    if not args.text:
        raise FournilError("the text is empty: give one to cut, e.g. fournil tokenize \"Hello, world\" (or none, "
                           "for the default sentence)")
    panels = []
    for spec in args.tokenizer or [None]:
        name, tokenizer = tokenizer_for(spec, args.text)
        try:
            if not args.chat:
                cut = pieces(tokenizer, args.text)
            elif not getattr(tokenizer, "chat_template", None):
                raise FournilError("it has no chat template, so no layout of a conversation to show: leave --chat "
                                   "out, or give a chat model's tokenizer (--tokenizer smollm2)")
            else:
                cut = [(i, piece(tokenizer, i)) for i in tokenizer.chat_ids([{"role": "user", "content": args.text}])]
        except FournilError as e:  # (which of several tokenizers)
            raise FournilError(f"{name}: {e}") from None
        c = compression(tokenizer, [args.text])
        if len(args.tokenizer or []) > 1:
            print(f"== {name}")
        if sys.stdout.isatty():  # alternate background colours, as tokenizer pages show tokens
            colours = ["\x1b[30;46m", "\x1b[30;43m", "\x1b[30;42m", "\x1b[30;45m"]
            print("".join(f"{colours[n % 4]}{text}\x1b[0m" for n, (_, text) in enumerate(cut)))
        else:
            print("|".join(text for _, text in cut))
        print("ids:", " ".join(str(i) for i, _ in cut))
        print(f"{c['chars']} characters, {c['bytes']} bytes, {c['tokens']} tokens: {c['bytes_per_token']:.2f} bytes "
              f"per token" + (f"; the chat template's layout around them: {len(cut) - c['tokens']} more" if args.chat
                              else ""))
        shown = f"{name} (in its chat template: {len(cut):,} tokens in all)" if args.chat else name
        panels.append((shown, [text for _, text in cut], c))
    plot_tokens(panels, Path(args.out))
    print(f"-> {args.out}", file=sys.stderr)


COMMANDS = {"convert": run_convert, "info": run_info, "tokenizer": run_tokenizer, "prepare": run_prepare,
            "tokenize": run_tokenize}
