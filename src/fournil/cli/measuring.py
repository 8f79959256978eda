"""``fournil eval``, ``bench``, ``sample``, ``explain``, ``attention`` and ``embeddings``: scores, samples and pictures
of a model."""
from __future__ import annotations

import sys
from pathlib import Path

from fournil.cli.flags import DEVICE, LATEST, SCORE_DTYPE, add_sampling_args, parse_picture, scored
from fournil.errors import FournilError, named

ANIMAL = "The animal didn't cross the street because it was too tired"
CAPITAL = "The capital of France is Paris, and the capital of Italy is Rome."


def add_run_commands(sub) -> None:
    p = sub.add_parser("eval", help="NLL, perplexity and bits per character on val and test (seq2seq: and the exact-"
                                    "match accuracy and character error rate of its outputs), or on a text --data")
    p.add_argument("run", nargs="*", help=f"{LATEST}; with --data, any model (a .gguf file, a Hugging Face folder, "
                                          f"smollm2); several: one table, a row each")
    p.add_argument("--data", help="score this text instead of the run's splits: a UTF-8 text file, whole, or a bundled "
                                  "dataset's test split (names, prenoms, villes, shakespeare, miserables); or the "
                                  "answers of instructions (a file's, all; rasbt_instructions, gsm8k_train...: the "
                                  "test split)")
    p.add_argument("--tokens", type=int, help="with --data: score its first N tokens (instructions: about N answer "
                                              "tokens, from examples of every length; default: all)")
    p.add_argument("--beam", type=int, default=1,
                   help="seq2seq: decode with a beam search of this width (default: greedy)")
    p.add_argument("--plot", type=parse_picture, metavar="FILE",
                   help="several runs: draw their validation curves, from training, on one picture (.png, .svg...)")
    p.add_argument("--device", **DEVICE)
    p.add_argument("--dtype", **SCORE_DTYPE)

    p = sub.add_parser("bench", help="standard benchmarks through lm-evaluation-harness on bundled data: HellaSwag, "
                                     "GSM8K, bits per byte (default: smollm2 on HellaSwag)")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("--tasks", default="hellaswag",
                   help="comma-separated: hellaswag, gsm8k, gsm8k_chat, bpb, or tasks of --include-path")
    p.add_argument("--limit", type=int, help="only the first N rows of each task")
    p.add_argument("--shots", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--include-path", help="a folder of lm-eval YAML tasks over local files")
    p.add_argument("--out", help="folder for results.json and report.md (default: bench/MODEL)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens scored per forward pass")
    p.add_argument("--device", **DEVICE)
    p.add_argument("--dtype", **SCORE_DTYPE)

    p = sub.add_parser("sample", help="sample text from a trained run")
    p.add_argument("run", nargs="?", help=LATEST)
    p.add_argument("-n", "--num", type=int, help="how many samples (default 20; seq2seq: of the first held-out "
                                                  "sources, or 1 for --prompt)")
    p.add_argument("--prompt", default="", help="text every sample starts with (seq2seq: the source to write a "
                                                "target for)")
    p.add_argument("--temperature", type=float, help="0 = always the most likely token (default 1; seq2seq: 0)")
    add_sampling_args(p)
    p.add_argument("--max-new-tokens", type=int,
                   help="the longest sample, in tokens (default: twice the context on lines, 500 on running text)")
    p.add_argument("--beam", type=int, default=1, help="seq2seq: the best output of a beam search of this width")
    p.add_argument("--device", **DEVICE)

    p = sub.add_parser("explain", help="the probability of each token of a text given the ones before, what the model "
                       "expected instead, and the NLL; as a table and a PNG bar chart (default: smollm2)")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("text", nargs="?", help=f"default: a run's first held-out document, else {CAPITAL!r}")
    p.add_argument("--top", type=int, default=3, help="alternatives shown at each token (default 3)")
    p.add_argument("--question", help="the text is a chat model's answer to this question: explain the answer's tokens "
                   "(and the one that ends its turn), read after the question in the model's chat template")
    p.add_argument("--out", default="explain.png", type=parse_picture, help="the picture to write (.png, .svg...)")
    p.add_argument("--device", **DEVICE)
    p.add_argument("--dtype", **SCORE_DTYPE)


def add_pictures(sub) -> None:
    p = sub.add_parser("attention", help="a picture of which tokens each token attends to (gpt and llama models; "
                                         "seq2seq: which source tokens each token it writes reads)")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("text", nargs="?", help=f"a seq2seq model's: a source (default: a run's first held-out document, "
                                           f"else {ANIMAL!r})")
    p.add_argument("--layer", type=int, default=-1,
                   help="which layer (default: the last; negative counts from the end)")
    p.add_argument("--head", type=int, help="one head (default: every head of the layer, and their average)")
    p.add_argument("--token", help="show the row of the first token that reads as this (default: it, if the text "
                                   "has it)")
    p.add_argument("--out", default="attention.png", type=parse_picture, help="the picture to write (.png, .svg...)")
    p.add_argument("--device", **DEVICE)
    p = sub.add_parser("embeddings", help="a picture of the token embeddings: their two principal components")
    p.add_argument("model", nargs="?", help="a run (mlp, rnn, gpt, llama, seq2seq), .gguf file or Hugging Face "
                                            "folder (default: the run under runs/ started last)")
    p.add_argument("--limit", type=int, default=300, help="show the first N tokens of the vocabulary (default 300)")
    p.add_argument("--out", default="embeddings.png", type=parse_picture, help="the picture to write (.png, .svg...)")


def check_beam(run, beam: int) -> None:
    """A beam search is of a seq2seq model's outputs: refused for other models, which would ignore it."""
    if beam != 1 and run.mode != "pairs":
        raise FournilError(f"--beam searches a seq2seq model's outputs, and the model of {run.path} is "
                           f"{run.model.family}: leave --beam out")  # (not "a ngram")


def run_eval(args) -> None:
    from fournil.models.lora import lora_state
    from fournil.runs import Run, latest_run

    if args.tokens is not None and args.data is None:
        raise FournilError("--tokens goes with --data: the run's own splits are scored whole")
    if len(args.run) > 1:
        return compare_runs(args)
    if args.plot:
        raise FournilError("--plot draws several runs' validation curves on one picture; a run's own are in its "
                           "loss.png")
    # (merge=False: a LoRA run is scored as it trained, its adapter apart)
    run = Run.load(args.run[0] if args.run else latest_run(), args.device, args.dtype, merge=False)
    check_beam(run, args.beam)
    if args.data is not None:
        name, result = run.score_text(args.data, args.tokens, args.beam)
        results = {name: result}
    else:
        results = run.evaluate(beam=args.beam)
    adapter = sum(t.numel() for t in lora_state(run.model).values())
    print(f"{run.path}: {run.model.family}, {run.model.num_params() - adapter:,} parameters"
          f"{f' and a LoRA adapter of {adapter:,}' if adapter else ''}; {scored(run)}")
    if run.config.align and args.data is None:
        for name, r in results.items():
            print(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.items()))
        return
    pairs = run.mode == "pairs"
    width = max(6, *map(len, results))
    print(f"{'split' if args.data is None else 'text':<{width}} {'tokens':>9} {'nll':>8} {'ppl':>8} {'bits/char':>10} "
          f"{'bits/byte':>10}" + (f" {'exact':>8} {'CER':>8}" if pairs else ""))
    for name, r in results.items():
        print(f"{name:<{width}} {r['tokens']:>9,} {r['nll']:>8.4f} {r['ppl']:>8.3f} {r['bpc']:>10.4f} "
              f"{r['bpb']:>10.4f}" + (f" {100 * r['exact']:>7.2f}% {100 * r['cer']:>7.2f}%" if pairs else ""))
    if pairs:
        how = f"a beam search of width {args.beam}" if args.beam > 1 else "greedy decoding"
        print(f"exact: outputs equal to their target ({how}); CER: character edits per target character")


def compare_runs(args) -> None:
    """Several models in one table, a row each: their val and test splits' scores, or their scores on --data."""
    from fournil.data.instructions import is_instructions
    from fournil.data.sources import BUNDLED
    from fournil.runs import Run

    if args.plot and args.data:
        raise FournilError("--plot draws the runs' validation curves, from their training, not scores on --data: "
                           "give one or the other")
    if data := next((r for r in args.run[1:] if r in BUNDLED or r == "nombres"), None):
        raise FournilError(f"{data} is a dataset, not a run: score a run on it with "
                           f"`fournil eval {' '.join(r for r in args.run if r != data)} --data {data}`")
    rows = []
    for path in args.run:
        run = Run.load(path, args.device, args.dtype, merge=False)
        if run.config.align and not args.data:
            raise FournilError(f"{run.path} was tuned on preferences: its scores are its method's, not NLLs; "
                               f"`fournil eval {run.path}` alone gives them, and --data scores a text or the "
                               f"answers of instructions")
        check_beam(run, args.beam)
        rows.append((run, {"text": run.score_text(args.data, args.tokens, args.beam)[1]} if args.data else
                     run.evaluate(beam=args.beam)))
    pairs = any("exact" in r["text" if args.data else "test"] for _, r in rows)
    width = max(3, *map(len, args.run))  # (each as given: smollm2, not the path of its file)
    figures = (f"{'tokens':>9} {'nll':>8}" if args.data else f"{'val nll':>8} {'test nll':>8}")
    print(f"{'run':<{width}} {'model':<8} {'parameters':>12} {figures} {'ppl':>8} {'bits/char':>10} {'bits/byte':>10}"
          + (f" {'exact':>8} {'CER':>8}" if pairs else ""))
    for given, (run, r) in zip(args.run, rows):
        last = r["text"] if args.data else r["test"]
        shown = (f"{last['tokens']:>9,} {last['nll']:>8.4f}" if args.data else
                 f"{r['val']['nll']:>8.4f} {last['nll']:>8.4f}")
        exact = f" {100 * last['exact']:>7.2f}% {100 * last['cer']:>7.2f}%" if "exact" in last else " " * 18
        print(f"{given:<{width}} {run.model.family:<8} {run.model.num_params():>12,} {shown} "
              f"{last['ppl']:>8.3f} {last['bpc']:>10.4f} {last['bpb']:>10.4f}{exact if pairs else ''}".rstrip())
    on = ("the answers" if is_instructions(args.data) else "the text") if args.data else "test"
    print(f"nll: nats per token; ppl, bits per character and per byte: on {on}; "
          + ", ".join(sorted({scored(run) for run, _ in rows})))
    alike = len({(type(run.tokenizer).__name__, run.tokenizer.vocab_size) for run, _ in rows}) == 1
    if not args.data and len({(d.data, d.mode, d.train, d.split, d.seed) if (d := run.config.data) else None
                              for run, _ in rows}) > 1:
        print("these runs learned from different data or splits: their scores do not compare; score them on the "
              "same text with --data", file=sys.stderr)
    elif not alike:
        print("these runs cut text into different tokens: nll and ppl are per token and do not compare; bits per "
              "character and per byte do", file=sys.stderr)
    if args.plot:
        plot_curves(rows, alike, args.plot)


def plot_curves(rows: list, alike: bool, path: str) -> dict[str, list]:
    """The runs' validation curves against their training time, drawn, and returned: in nats per token where their
    tokens are alike, else in bits per byte (each run's val NLL scaled as its val split's bytes and tokens scale it)."""
    from fournil.plots import plot_runs
    from fournil.train.metrics import MetricsLog

    curves = {}
    for run, r in rows:
        scale = 1 if alike else r["val"]["bpb"] / r["val"]["nll"]
        curves[str(run.path)] = [(m.get("time"), m["val_loss"] * scale)
                                 for m in MetricsLog(run.path, False).read() if "val_loss" in m]
    plot_runs(curves, Path(path), "val NLL (nats per token)" if alike else "val bits per byte")
    print(f"-> {path}")
    return curves


def run_bench(args) -> None:
    try:
        from fournil.evaluate.bench import bench, table
    except ImportError:
        raise FournilError("fournil bench needs lm-evaluation-harness: pip install 'fournil[bench]'") from None

    out = Path(args.out) if args.out else Path("bench") / named(args.model)
    results = bench(args.model, args.tasks, args.limit, args.shots, args.include_path, args.device, args.dtype,
                    args.batch_tokens, out)
    print(table(results))
    print(f"results in {out}/results.json and {out}/report.md")


def run_sample(args) -> None:
    from fournil.runs import Run, latest_run

    if args.num is not None and args.num < 1:
        raise FournilError(f"-n (--num) must be a whole number, at least 1 (got {args.num})")
    run = Run.load(args.run or latest_run(), args.device)
    check_beam(run, args.beam)
    if run.mode == "pairs":
        return sample_pairs(run, args)
    temperature = 1.0 if args.temperature is None else args.temperature
    samples = run.sample(args.num or 20, args.prompt, temperature, args.top_k, args.top_p, args.seed,
                         args.max_new_tokens)
    for s in samples:
        print(s)
    say_if_greedy(len(samples), temperature, args.top_k)
    if run.mode == "lines" and run.config.data is not None:  # (an imported model has no training set)
        try:
            seen = set(run.splits().train)
        except FournilError as e:  # the data moved or changed: the samples stand without the count
            print(f"(not compared with the training set: {e})", file=sys.stderr)
            return
        known = sum(s in seen for s in samples)
        print(f"{known} of {len(samples)} samples are in the training set", file=sys.stderr)


def say_if_greedy(n: int, temperature: float, top_k: int | None) -> None:
    """Several samples of greedy decoding are all the same text: say why (ten times the same name looked like a bug)."""
    if n > 1 and (temperature == 0 or top_k == 1):
        how, other = ("temperature 0", "a temperature above 0") if temperature == 0 else \
            ("--top-k 1", "a higher --top-k")
        print(f"({how} is greedy decoding: each sample is the most likely text, the same every time; {other} "
              f"samples others)", file=sys.stderr)


def sample_pairs(run, args) -> None:
    """A seq2seq run's outputs: ``-n`` of them (1 by default) for ``--prompt``, or for the first ``-n`` held-out
    sources (20 by default), each marked right or wrong."""
    from fournil.generate import SamplingParams

    drawn = [flag for flag, value in (("--temperature", args.temperature or None), ("--top-k", args.top_k),
                                      ("--top-p", args.top_p), ("--seed", args.seed)) if value is not None]
    if args.beam > 1 and drawn:
        raise FournilError(f"--beam {args.beam} searches for the most likely output, and {drawn[0]} is for drawing "
                           f"one: give one or the other")
    limit = run.model.config.block_size if args.max_new_tokens is None else args.max_new_tokens
    params = SamplingParams(max_new_tokens=limit,
                            temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompt:
        if args.beam > 1 and (args.num or 1) > 1:
            raise FournilError(f"--beam {args.beam} gives one output, the most likely: leave -n out, or draw several "
                               f"with --temperature 1")
        outputs = run.translate([read_as_source(run, args.prompt)] * (args.num or 1), args.beam, params)
        print("\n".join(outputs))
        say_if_greedy(len(outputs), params.temperature, args.top_k)
        return
    if run.config.data is None:
        raise FournilError(f"{run.path} was imported, not trained here: it has no held-out sources of its own; give "
                           f"one with --prompt SOURCE")
    pairs = run.splits().val[: args.num or 20]
    outputs = run.translate([s for s, _ in pairs], args.beam, params)
    for (source, target), output in zip(pairs, outputs):
        print(f"{source} -> {output}" + ("" if output == target else f"   (expected: {target})"))
    print(f"{sum(o == t for o, (_, t) in zip(outputs, pairs))} of {len(pairs)} held-out sources right", file=sys.stderr)


def read_as_source(run, text: str) -> str:
    """``text`` as a seq2seq run's sources are written (nombres: ``71080`` is ``71 080``), saying so if it changes."""
    if (read := run.as_sources([text])[0]) != text:
        print(f"(read as {read!r}, as the training sources write it)", file=sys.stderr)
    return read


def text_for(run, given: str | None, sentence: str) -> str:
    """The text to look at: the one given; else a pretraining run's first held-out document (its model knows only
    the characters and words of its data: the English ``sentence`` would be refused, or all unknown); else that."""
    from fournil.data.shards import Shards

    if given is not None:  # (a seq2seq run's source as its sources are written: nombres reads 71080 as 71 080)
        return read_as_source(run, given) if run.mode == "pairs" else given
    config = run.config
    if config.data is None or config.finetune or config.align or config.distill:
        return sentence
    try:
        val = run.splits().val
    except FournilError:  # (its data changed since)
        return sentence
    if run.mode in ("lines", "pairs"):
        text = val[0][0] if run.mode == "pairs" else val[0]  # (a pair's source)
    else:  # the first words of running text, as many tokens as fit a picture and the context
        n = min(24, run.model.config.block_size)
        ids = val.window(0, n).tolist() if isinstance(val, Shards) else run.tokenizer.encode(val[:16 * n])[:n]
        text = run.tokenizer.decode(ids)
        text = text[:text.rfind(" ")] if " " in text.strip() else text
    what = "source" if run.mode == "pairs" else "document"
    print(f"(the first held-out {what} of {run.path}: {text!r}; give a TEXT for another)", file=sys.stderr)
    return text


def heading(run, text: str, most: int = 60) -> str:
    """A picture's title: the model's name and the text, cut to ``most`` characters with an ellipsis that says so (cut
    without one, "... and the capital of Italy is" read as the whole text)."""
    return f"{run.path.name}: {text if len(text) <= most else text[:most - 1] + '…'}"


def run_explain(args) -> None:

    from fournil.generate.cache import half_context
    from fournil.plots.explain import coloured_text, legend, plot_token_probs
    from fournil.runs import Run

    run = Run.load(args.model, args.device, args.dtype)
    text = text_for(run, args.text, CAPITAL)
    result = run.explain(text, args.top, args.question)  # (a seq2seq model's: of what it writes for the source)
    rows = result["rows"]
    if run.model.family == "seq2seq":
        print(f"{text!r} -> {result['written']!r}")
    if sys.stdout.isatty():
        print(coloured_text(result))
        print(legend())
    width = max(len(r["label"]) for r in rows)
    for r in rows:
        others = "  ".join(f"{token} {p:.3f}" for token, p in r["top"])
        rank = f"{r['rank']}" if r["rank"] <= args.top else f">{args.top}"
        print(f"{r['label']:<{width}} {r['prob']:.4f}  rank {rank:<3} most likely: {others}")
    scored_what = (f"{len(rows)} token{'s' * (len(rows) != 1)} of the answer (the last ends its turn)" if args.question
                   else f"{len(rows)} transition{'s' * (len(rows) != 1)}")
    print(f"NLL {result['nll']:.4f} nats over {scored_what}; average {result['avg_nll']:.4f}; {scored(run)}")
    block = run.model.config.block_size
    if len(rows) > block:
        print(f"(the text is longer than the model's context of {block} tokens: past it, each token was predicted from "
              f"the {block - half_context(block) + 1} to {block} tokens before it)")
    plot_token_probs(result, Path(args.out), heading(run, f"{args.question} → {text}" if args.question else text))
    print(f"-> {args.out}", file=sys.stderr)


def run_attention(args) -> None:

    from fournil.evaluate.attention import attention_maps, cross_attention_maps
    from fournil.plots.attention import plot_attention, token_labels
    from fournil.runs import Run

    run = Run.load(args.model, args.device)
    text = text_for(run, args.text, ANIMAL)
    source = None  # an encoder-decoder's: what the tokens it writes read
    if run.model.family == "seq2seq":
        source, tokens, weights = cross_attention_maps(run.model, run.tokenizer, text)
        print(f"{text!r} -> {''.join(t for t in tokens if t != '<end>')!r}; the decoder's cross-attention: which "
              f"source tokens each token it writes reads")
    else:
        tokens, weights = attention_maps(run.model, run.tokenizer, text)
    n_layer, n_head = weights.shape[:2]
    if not -n_layer <= args.layer < n_layer:
        raise FournilError(f"--layer {args.layer}: the model has {n_layer} layers (0 to {n_layer - 1}, or -1 for the "
                           f"last)")
    if args.head is not None and not 0 <= args.head < n_head:
        raise FournilError(f"--head {args.head}: the model has {n_head} heads per layer (0 to {n_head - 1})")
    layer = args.layer % n_layer
    focus = next((i for i, t in enumerate(tokens) if t.strip() == (args.token or "it").strip()), None)
    if focus is None and args.token is not None:
        raise FournilError(f"--token {args.token!r}: no token of the text reads as this; its tokens are "
                           f"{', '.join(map(repr, token_labels(tokens)[:40]))}{' ...' * (len(tokens) > 40)}")
    plot_attention(tokens, weights[layer], Path(args.out), layer, args.head, focus, heading(run, text), source)
    print(f"{len(tokens)} token{'s' * (len(tokens) != 1)}, {n_layer} layer{'s' * (n_layer != 1)} x {n_head} "
          f"head{'s' * (n_head != 1)}; layer {layer} -> {args.out}")
    if focus is not None:
        row = (weights[layer].mean(0) if args.head is None else weights[layer, args.head])[focus]
        top = row.topk(min(5, len(source) if source else focus + 1))
        labels, read = token_labels(tokens), token_labels(source or tokens)
        print(f"{labels[focus]!r} attends most to: " +
              ", ".join(f"{read[i]!r} {w:.3f}" for w, i in zip(top.values.tolist(), top.indices.tolist())))


def run_embeddings(args) -> None:

    from fournil.evaluate.explain import shown
    from fournil.plots.embeddings import (
        plot_embeddings,
        principal_components,
        token_embeddings,
    )
    from fournil.runs import Run, latest_run

    run = Run.load(args.model or latest_run(), "cpu")
    if args.limit < 3:
        raise FournilError(f"--limit {args.limit}: show at least 3 tokens")
    weights = token_embeddings(run.model)[: args.limit]
    points, shares = principal_components(weights)
    labels = [shown(run.tokenizer, i) for i in range(len(weights))]
    plot_embeddings(points, labels, shares, Path(args.out), f"{run.path.name}: {len(weights)} token embeddings")
    print(f"{len(weights)} of {run.tokenizer.vocab_size:,} token embeddings of width {weights.shape[1]}; the two first "
          f"principal components explain {100 * shares.sum():.1f} % of their variance -> {args.out}")


COMMANDS = {"eval": run_eval, "bench": run_bench, "sample": run_sample, "explain": run_explain,
            "attention": run_attention, "embeddings": run_embeddings}
