"""``fournil train``, ``finetune``, ``merge``, ``align``, ``reward`` and ``distill``: what they take, and what a
finished run shows."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from fournil.cli.flags import (AUTOMATIC, DEVICE, LOW_MEMORY, SCORE_DTYPE, TRAIN_FLAGS, add_key_env_arg, add_loop_args,
                               add_recipe_parser, add_tuning_args, check_key_env, loop_config, lora_config,
                               model_settings, parse_split, renamed, scored, setting_help)
from fournil.config import DataConfig, RunConfig, TrainConfig, coerce, command_of, read_recipe
from fournil.data.sources import BUNDLED
from fournil.errors import FournilError, typed
from fournil.models import FAMILIES, config_class


def add_train(sub) -> None:
    p = add_recipe_parser(sub, "train", help="train a model (defaults: gpt on prenoms)",
                          description="Train a language model. With no flags: the gpt model on the bundled French "
                                      "first names (a seq2seq model: on nombres).")
    p.add_argument("--data", help=f"a bundled dataset ({', '.join(BUNDLED)}), a UTF-8 text file, a .jsonl or .parquet "
                   "corpus (a text field), or (source, target) pairs for seq2seq: nombres (digits to French words, "
                   "made by code), a .jsonl or .parquet (source, target fields) or .tsv file (default: prenoms; for "
                   "seq2seq, nombres)")
    p.add_argument("--model", default="gpt", help=f"model family: {', '.join(FAMILIES)}")
    p.add_argument("--mode", default="auto", choices=["auto", "lines", "text"],
                   help="lines: one document per line; text: running text (default: inferred)")
    p.add_argument("--tokenizer",
                   help="char (default; for shards of fournil prepare, theirs), bpe:N (a byte-level BPE of N tokens "
                        "trained on the train split), or a tokenizer.json")
    p.add_argument("--split", type=parse_split, default=(0.9, 0.05, 0.05), help="train,val,test fractions")
    p.add_argument("--split-seed", type=int, default=1337, help="seed of the split's document shuffle")
    p.add_argument("--train", dest="train_file", help="explicit training file (with --val and --test)")
    p.add_argument("--val", dest="val_file", help="explicit validation file (with --train and --test)")
    p.add_argument("--test", dest="test_file", help="explicit test file (with --train and --val)")
    add_loop_args(p, steps="", batch="sequences per forward pass (per process)", lr="")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step: accumulates gradients to reach it")
    p.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="adamw, or muon for the hidden weight matrices (default: muon for gpt on lines, else adamw)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across processes (FSDP)")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard")
    group = p.add_argument_group("model settings (each applies to the families named after it, "
                                 "with their defaults)")
    for name, kind in model_settings().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"model_{name}", metavar=kind.__name__.upper(), type=str,
                           help=setting_help(name))


def add_finetune(sub) -> None:
    p = add_recipe_parser(sub, "finetune", help="instruction-tune a model, every weight or a LoRA adapter (default: "
                                                "smollm2)",
                          description="Supervised fine-tuning on instruction/response examples: loss on the answers "
                                      "only.")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("--data", default="rasbt_instructions",
                   help="rasbt_instructions (default), fr_oasst1, fr_oasst1_chat, gsm8k_train, or a JSONL, JSON or "
                        "Parquet file of Alpaca (instruction, input, output), chat (messages), ShareGPT "
                        "(conversations), prompt-completion or question-answer examples")
    add_tuning_args(p)
    p.add_argument("--pack", action="store_true", help="join short training examples into rows of --max-length tokens")
    add_loop_args(p, steps=" (default 200)", batch="examples per step (default 8)",
                  lr=" (default 1e-3 with LoRA, 5e-5 without)")
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model, as a run directory",
                       description="fournil merge [BASE] ADAPTER OUT: the base model with the adapter folded into its "
                                   "weights, a plain model again (a fournil run names its own base).")
    p.add_argument("base", nargs="?", help="the base model: a run, .gguf file, Hugging Face folder or smollm2 "
                                           "(default: the one a fournil LoRA run was tuned from)")
    p.add_argument("adapter",
                   help="a folder with adapter_config.json and adapter_model.safetensors (fournil's or PEFT's)")
    p.add_argument("out", help="the run directory to write")


PREFERENCE_DATA = ("rasbt_preferences (default), hh_rlhf_harmless, or a JSONL, JSON or Parquet file of records with "
                   "'prompt', 'chosen' and 'rejected' (or only the last two, whole conversations)")


def add_align(sub) -> None:
    p = add_recipe_parser(sub, "align", help="learn from preferences: DPO, or GRPO against a reward (default: DPO on "
                                             "smollm2)",
                          description="Align a chat model with human preferences: DPO on chosen/rejected pairs, or "
                                      "GRPO (sampled answers scored by a reward model or a function, with a KL "
                                      "penalty).")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("--data", default="rasbt_preferences", help=PREFERENCE_DATA + " (grpo: its prompts; an instruction "
                                                                                   "set's prompts work too)")
    p.add_argument("--method", default="dpo", choices=["dpo", "grpo"],
                   help="dpo: learn from chosen/rejected pairs (default); grpo: sample answers and learn from a reward")
    p.add_argument("--beta", type=float, help="dpo: preference strength (default 0.1); grpo: KL penalty (default 0.04)")
    p.add_argument("--reference", default="model", choices=["model", "precomputed"],
                   help="dpo: keep the reference model (with LoRA: the model without its adapter, free), or compute "
                        "its log-probabilities of every answer once (no second model in memory)")
    p.add_argument("--reward", help="grpo: a reward model's run (fournil reward train), a built-in reward (brevity: "
                                    "fewer words; correct: the reference answer's final number, as GSM8K's), or "
                                    "FILE.py:FUNCTION")
    p.add_argument("--group", type=int, default=4, help="grpo: answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="grpo: length limit of sampled answers")
    p.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature")
    add_tuning_args(p)
    add_loop_args(p, steps=" (default 200)", batch="pairs per step (dpo, default 8); answers per step (grpo, "
                                                   "default 2 x --group)", lr=" (default: set by the method)")
    p = sub.add_parser("reward", help="train a reward model on preference pairs, or score answers with one "
                                      "(default: train on smollm2)")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="a scalar head on a model, trained so that chosen answers score higher")
    t.set_defaults(recipe_train={}, recipe_data={})  # (what a recipe parser gives the commands it serves)
    t.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    t.add_argument("--data", default="rasbt_preferences", help=PREFERENCE_DATA)
    add_tuning_args(t)
    add_loop_args(t, steps=" (default 200)", batch="pairs per step (default 8)", lr=" (default 1e-3 with LoRA, "
                                                                                    "1e-5 without)")
    s = actions.add_parser("score", help="rewards of answers, or the accuracy on preference pairs")
    s.add_argument("run", help="a reward model's run directory")
    s.add_argument("--prompt", help="a user message; give --answer once or more")
    s.add_argument("--answer", action="append", default=[], help="an answer to score (repeatable)")
    s.add_argument("--data", help="preference pairs to score (default: the run's own val and test pairs)")
    s.add_argument("--max-length", type=int, help="with --data: pairs longer than this many tokens are skipped "
                                                  "(default: the length the reward model was trained on)")
    s.add_argument("--device", **DEVICE)
    s.add_argument("--dtype", **SCORE_DTYPE)


def add_distill(sub) -> None:
    p = add_recipe_parser(sub, "distill", help="train a smaller student to imitate a teacher, and compare them "
                                               "(default: smollm2 into 4 of its layers)",
                          description="Distillation: a student learns a teacher's next-token distributions (or its "
                                      "answers, --sequences); the same student is trained without the teacher, and a "
                                      "report compares parameters, size, decoding speed and val NLL.")
    p.add_argument("--teacher", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2; or "
                                                        "openai:NAME@BASE_URL, whose answers teach (--sequences N "
                                                        "--kd-weight 0; the student a model of its own)")
    add_key_env_arg(p, "an openai:NAME@URL teacher")
    p.add_argument("--student",
                   help="layers:N (N of the teacher's layers and its embeddings), a model config .json (from scratch, "
                        "the teacher's vocabulary), or a run with the teacher's tokenizer (default: layers:4, or half "
                        "the layers of a teacher of fewer than 8)")
    p.add_argument("--data",
                   help="running text or lines (a bundled corpus or a text file) or an instruction set "
                        "(rasbt_instructions, a .jsonl); default: what the teacher run was trained on, or shakespeare")
    p.add_argument("--kd-temperature", type=float, default=2.0, help="softens both distributions")
    p.add_argument("--kd-weight", type=float, default=0.5,
                   help="weight of the distillation loss (the next-token loss gets 1 - this)")
    renamed(p, "--alpha", "--kd-weight")
    renamed(p, "--temperature", "--kd-temperature")
    p.add_argument("--reverse", action="store_true", help="KL(student || teacher) instead of KL(teacher || student)")
    p.add_argument("--context", type=int,
                   help="tokens per row of running text, longest example otherwise (default: the teacher's context, at "
                        "most 256)")
    p.add_argument("--sequences", type=int, default=0,
                   help="sequence-level: the teacher answers this many training prompts of an instruction set and the "
                        "student learns its answers")
    p.add_argument("--no-baseline", action="store_true", help="do not train the same student without the teacher")
    add_loop_args(p, steps=" (default 100)", batch="rows per step (default 8)", lr=" (default 1e-3)")


def run_train(args) -> None:
    from fournil.data.shards import is_prepared
    from fournil.train import train
    from fournil.train.trainer import check_shards

    budget = {k: getattr(args, k) for k in ("steps", "time") if getattr(args, k) is not None}
    if args.resume:
        report(train(resume=args.resume, budget=budget, progress=not args.quiet))
        return
    if args.config:
        read_recipe(args.config, "train")  # what the parser could not read: a missing file
    cfg_cls = config_class(args.model)
    own = {f.name for f in dataclasses.fields(cfg_cls)}
    model = {"family": args.model, **args.recipe_model}
    for name in model_settings():
        value = getattr(args, f"model_{name}")
        if value is None:
            continue
        if name not in own:
            settable = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(own - AUTOMATIC))
            raise FournilError(f"--{name.replace('_', '-')} does not apply to the {args.model} model; it takes "
                               f"{settable}")
        model[name] = coerce(cfg_cls, name, value)
    data = args.data or args.train_file or ("nombres" if args.model == "seq2seq" else DataConfig.data)  # (by default)
    data = DataConfig(data, args.mode, args.split, args.split_seed, args.train_file, args.val_file, args.test_file,
                      tokenizer=args.tokenizer or DataConfig.tokenizer)
    if args.tokenizer == "char" and is_prepared(data.data):
        check_shards(data, Path(data.data), char_asked=True)
    config = RunConfig(
        model=model,
        data=data,
        train=TrainConfig(**args.recipe_train, **{name: getattr(args, name) for name in TRAIN_FLAGS},
                          low_memory=LOW_MEMORY[args.low_memory]),
    )
    run = train(config, out=args.out, progress=not args.quiet)
    report(run)


def run_finetune(args, align=None) -> None:
    from fournil.train.finetune import finetune

    budget = {k: getattr(args, k) for k in ("steps", "time") if getattr(args, k) is not None}
    if getattr(args, "config", None):
        read_recipe(args.config, args.command)  # what the parser could not read: a missing file
    if args.resume:
        report(finetune(resume=args.resume, budget=budget, progress=not args.quiet))
        return
    data = DataConfig(args.data, **args.recipe_data)  # (a recipe's split and seed)
    report(finetune(args.model, data, lora_config(args), loop_config(args), args.max_length,
                    getattr(args, "pack", False), args.out, progress=not args.quiet, align=align))


def run_align(args) -> None:
    from fournil.config import AlignConfig

    run_finetune(args, AlignConfig(method=args.method, beta=args.beta, reference=args.reference, reward=args.reward,
                                   group=args.group, max_new_tokens=args.max_new_tokens, temperature=args.temperature))


def run_reward(args) -> None:
    from fournil.config import AlignConfig

    if args.action == "train":
        run_finetune(args, AlignConfig(method="reward"))
        return
    from fournil.data.instructions import pad_id
    from fournil.data.preferences import PreferenceData, render_pairs
    from fournil.train.objectives import PairwiseReward
    from fournil.train.rewards import RewardModelScorer

    if args.prompt is not None or args.answer:
        if args.prompt is None or not args.answer:
            raise FournilError("give --prompt and at least one --answer to score")
        if args.data or args.max_length is not None:
            raise FournilError(f"--{'data' if args.data else 'max-length'} scores preference pairs, --prompt and "
                               f"--answer the answers given: choose one")
    elif args.max_length is not None and not args.data:
        raise FournilError("--max-length skips the pairs of --data that are longer: give --data FILE too (the run's "
                           "own pairs are those it was trained with)")
    scorer = RewardModelScorer(args.run, args.device, args.dtype)
    if args.prompt is not None:
        for answer, reward in zip(args.answer, scorer([[{"role": "user", "content": args.prompt}]] * len(args.answer),
                                                      args.answer)):
            print(f"{reward:+.4f}  {answer}")
        return
    run, objective = scorer.run, PairwiseReward()
    if args.data:
        pairs = render_pairs(args.data, run.tokenizer, run.config.finetune.max_length if args.max_length is None
                             else args.max_length)
        if not pairs:
            raise FournilError(f"{args.data} has no pair to score")
        splits = {args.data: PreferenceData(pairs, pad_id(run.tokenizer), Path(args.data).name)}
    else:
        splits = {name: part for name, part in run.data().items() if name != "train"}
    print(f"{run.path}: {scored(run)}")
    for name, part in splits.items():
        scores = objective.validate(scorer.model, part, run.tokenizer, run.measure_dtype, None)
        print(f"{name}: {len(part):,} pair{'s' * (len(part) != 1)}, chosen scored higher in "
              f"{100 * scores['accuracy']:.1f} %, mean margin {scores['margin']:+.3f}, loss {scores['loss']:.4f}")


def run_distill(args) -> None:
    from fournil.config import DistillConfig
    from fournil.train.distill import distill

    check_key_env(args.api_key_env, [args.teacher])
    budget = {k: getattr(args, k) for k in ("steps", "time") if getattr(args, k) is not None}
    if args.config:
        read_recipe(args.config, "distill")  # what the parser could not read: a missing file
    settings = DistillConfig(teacher=args.teacher, student=args.student, temperature=args.kd_temperature,
                             alpha=args.kd_weight, reverse=args.reverse, context=args.context, sequences=args.sequences,
                             baseline=not args.no_baseline)
    data = DataConfig(args.data, **args.recipe_data) if args.data and args.recipe_data else args.data
    run = distill(data=data, settings=settings, train=loop_config(args), out=args.out, resume=args.resume,
                  budget=budget, progress=not args.quiet, api_key_env=args.api_key_env)
    path = typed(run.path)
    print(f"saved to {run.path}; next: fournil generate {path} TEXT  |  fournil eval {path}")


def run_merge(args) -> None:

    from fournil.formats import check_output, source_kind
    from fournil.formats.peft import ADAPTER_CONFIG, load_adapter, read_adapter_config
    from fournil.models.lora import merge_lora
    from fournil.runs import CONFIG, TOKENIZER, Run, read_config
    from fournil.tokenizers import load_tokenizer

    check_output(Path(args.out))  # before the model loads
    adapter = Path(args.adapter)
    kind = source_kind(adapter)[0]  # a Hugging Face folder has a config.json too, not a run's
    tuned = read_config(adapter) if kind == "run" and (adapter / CONFIG).is_file() else None
    if tuned and tuned.scores_answers:
        raise FournilError(f"{adapter} is a reward model: merged without its score head, it would neither "
                           f"write nor score; use the run itself (fournil reward score {typed(adapter)}, fournil align "
                           f"--method grpo --reward {typed(adapter)})")
    lora = tuned and tuned.finetune and tuned.finetune.lora
    if not lora and not (adapter / ADAPTER_CONFIG).is_file() and (tuned or kind != "run"):
        raise FournilError(f"{adapter} is a whole model, not a LoRA adapter: there is nothing to merge; use it as it "
                           f"is (fournil generate {typed(adapter)} TEXT, fournil convert {typed(adapter)} OUT)")
    if args.base is None:
        if not lora:
            read_adapter_config(adapter)  # (says so first if it is no adapter's folder at all)
            raise FournilError(f"{adapter} names no base model (it is not a LoRA run of fournil): give the base "
                               f"first, fournil merge BASE {typed(adapter)} {typed(args.out)}")
        args.base = tuned.finetune.base
    run = Run.load(args.base, "cpu")
    config = load_adapter(run.model, Path(args.adapter))
    merge_lora(run.model)
    if (Path(args.adapter) / TOKENIZER).exists():  # a fournil run: its tokenizer holds the template it was tuned with
        run.tokenizer = load_tokenizer(Path(args.adapter) / TOKENIZER)
    run.config = RunConfig(model=run.config.model, data=None, train=None)
    run.save(Path(args.out))
    print(f"merged a rank-{config.rank} adapter on {len(config.targets)} kinds of layers into {args.base} -> "
          f"{args.out}")


# what a model tuned on a bundled set is then measured by: the test set's questions, asked in the chat template (the
# whole set, 1,319 answers of up to 256 tokens, takes hours on a CPU; 50 take minutes)
BENCHMARK_OF = {"gsm8k_train": "gsm8k_chat --limit 50"}


def report(run) -> None:
    """What a finished training run shows: its best val score, a few samples, what to do next."""
    if run is None:  # a process other than rank 0 of a multi-process run
        return
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    before = vals.pop(0)["val_loss"] if command_of(run.config) == "finetune" and vals[0]["step"] == 0 else None
    best = min(vals, key=lambda r: r["val_loss"])
    samples = (run.path / "samples.txt").read_text(encoding="utf-8").splitlines()
    if run.config.align:
        scores = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in best.items()
                           if k.startswith("val_"))
        print(f"best val (step {best['step']}): {scores}; saved to {run.path}")
    else:
        nll = best["val_loss"]
        start = "" if before is None else f"val NLL {before:.4f} before tuning, "
        print(f"{start}best val NLL {nll:.4f} nats/token ({nll / math.log(2):.3f} bits); saved to {run.path}")
    if samples:
        print("samples:" + (" " + ", ".join(samples[:10]) if run.mode == "lines" else "\n" + "\n".join(samples[:15])))
    if run.mode == "pairs":
        val = run.evaluate(("val",), max_tokens=run.config.train.eval_tokens)["val"]  # as far as it validated
        print(f"val: {100 * val['exact']:.2f} % of {val['outputs']:,} held-out outputs exactly right (greedy), "
              f"character error rate {100 * val['cer']:.2f} %")
    path = typed(run.path)
    if command_of(run.config) == "reward train":
        print(f"next: fournil reward score {path} --prompt TEXT --answer TEXT --answer TEXT  |  "
              f"fournil align MODEL --method grpo --reward {path}")
        return
    if run.config.finetune:  # (a bundled set's test split: the base beside the tuned model, on answers neither saw)
        from fournil.data.instructions import BUNDLED_INSTRUCTIONS

        data = run.config.data.data
        compare = f" {typed(run.config.finetune.base)} {path} --data {data}" if data in BUNDLED_INSTRUCTIONS else \
            f" {path}"
        bench = f"  |  fournil bench {path} --tasks {BENCHMARK_OF[data]}" if data in BENCHMARK_OF else ""
        print(f"next: fournil chat {path}  |  fournil eval{compare}{bench}")
        return
    if run.mode == "pairs":  # a source to translate, not a text to score
        print(f"next: fournil eval {path}  |  fournil sample {path} --prompt SOURCE  |  fournil embeddings {path}")
        return
    print(f"next: fournil eval {path}  |  fournil sample {path}  |  fournil explain {path} TEXT")


COMMANDS = {"train": run_train, "finetune": run_finetune, "align": run_align, "reward": run_reward,
            "distill": run_distill, "merge": run_merge}
