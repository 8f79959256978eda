"""``fournil <command>``: parse, call the Python API, print. Errors are one line and exit code 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import typing
from pathlib import Path

from fournil.config import STAGES, DataConfig, RunConfig, TrainConfig, coerce, read_recipe
from fournil.data.sources import BUNDLED
from fournil.device import dtype_name
from fournil.errors import FournilError
from fournil.generate.quantize import PRECISIONS
from fournil.models import FAMILIES, config_class

AUTOMATIC = {"vocab_size", "boundary_id", "bos_id", "eos_id"}  # model settings taken from the data, not from flags
COMMANDS_OF_CHAT = "/reset, /system TEXT, /exit"
LOW_MEMORY = {"auto": None, "on": True, "off": False}
WEIGHT_PRECISIONS = ["auto", *PRECISIONS]  # --dtype of the commands that generate
LATEST = "a run directory, e.g. runs/prenoms-gpt (default: the run under runs/ started last)"
SCORE_DTYPE = {"default": "auto", "choices": ["auto", "float32", "bfloat16", "float16"],
               "help": "precision of the scores (default: float32, the same figures on every machine)"}


def parse_duration(text: str) -> float:
    """'90', '90s', '2m', '1h30m' -> seconds."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 90s, 2m or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return 3600 * h + 60 * m + s


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give three fractions, e.g. 0.9,0.05,0.05")
    return parts


def parse_port(text: str) -> int:
    """A TCP port to listen on: 1 to 65535 (uvicorn takes a larger number without an error, and listens nowhere)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535, e.g. 8000")
    return int(text)


def add_listen_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=parse_port, default=8000, help="port to listen on (default: 8000)")


def model_settings() -> dict[str, type]:
    """Every model setting of every family, for flags like --n-layer."""
    found = {}
    for _, cfg in FAMILIES.values():
        for f in dataclasses.fields(cfg):
            if f.name not in AUTOMATIC:
                kinds = [k for k in typing.get_args(typing.get_type_hints(cfg)[f.name]) if k is not type(None)]
                kind = (kinds or [typing.get_type_hints(cfg)[f.name]])[0]
                if kind in (int, float, str, bool):  # structured settings (rope_scaling) come from imported configs
                    found.setdefault(f.name, kind)
    return found


def add_loop_args(p, steps: str, batch: str, lr: str) -> None:
    """The training loop's flags, which pretraining and fine-tuning share."""
    p.add_argument("--steps", type=int, help=f"stop after this many steps{steps}")
    p.add_argument("--time", type=parse_duration, help="stop after this much wall-clock time (90s, 2m, 1h)")
    p.add_argument("--batch-size", type=int, help=batch)
    p.add_argument("--lr", type=float, help=f"peak learning rate{lr}")
    p.add_argument("--eval-every", type=int, default=250, help="validate and checkpoint every N steps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware runs it fast), float32, bfloat16, float16")
    p.add_argument("--low-memory", choices=["auto", "on", "off"], default="auto",
                   help="recompute each Transformer layer in the backward pass and read a step in passes of at most "
                        "1,024 tokens (auto: when the layers' activations would take more than a GiB)")
    p.add_argument("--out", help="run directory (default: runs/DATA-MODEL)")
    p.add_argument("--resume", metavar="RUN", help="continue a run that stopped (--steps/--time set a new budget)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


LOOP_FLAGS = ("steps", "time", "batch_size", "lr", "eval_every", "seed", "device", "dtype")  # every training command's
TRAIN_FLAGS = (*LOOP_FLAGS, "batch_tokens", "optimizer", "compile", "fsdp", "tensorboard")  # and `fournil train`'s own


class RecipeParser(argparse.ArgumentParser):
    """``fournil train|finetune|align|distill --config FILE``: the file's settings become the flags' defaults, so that
    flags given beside it override it, and its settings without a flag (warmup, weight decay...) are kept as they
    are. ``stage`` is the command."""

    stage = "train"

    def parse_known_args(self, args=None, namespace=None):
        files = [a.removeprefix("--config=") for a in args or [] if a.startswith("--config=")]
        files += [args[i + 1] for i, a in enumerate(args or []) if a == "--config" and i + 1 < len(args)]
        if files and Path(files[-1]).is_file():  # (a missing file is said when the command runs)
            try:
                self.set_defaults(**recipe_defaults(read_recipe(files[-1], self.stage), self.stage))
            except FournilError as e:
                self.error(str(e))
        return super().parse_known_args(args, namespace)


def add_recipe_parser(sub, stage: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of a training command, which reads ``--config FILE``."""
    sub._parser_class, default = RecipeParser, sub._parser_class
    p = sub.add_parser(stage, **kwargs)
    sub._parser_class = default
    p.stage = stage
    what = "sections model, data, train" if stage == "train" else \
        f"sections {', '.join(('data', 'train') + STAGES[stage])}"
    p.add_argument("--config", metavar="FILE",
                   help=f"a recipe: a .toml or .yaml file ({what}; see recipes/) or a run's config.json, to train it "
                        f"again; flags given beside it override it")
    p.set_defaults(recipe_train={}, recipe_model={})
    return p


def recipe_defaults(config: RunConfig, stage: str) -> dict:
    """The flag values (argparse destinations) that say what ``config`` says."""
    d, t = config.data, config.train
    flags = TRAIN_FLAGS if stage == "train" else LOOP_FLAGS
    values = {"data": d.data, "low_memory": next(k for k, v in LOW_MEMORY.items() if v == t.low_memory),
              **{name: getattr(t, name) for name in flags}}
    values["recipe_train"] = {k: v for k, v in dataclasses.asdict(t).items() if k not in flags and k != "low_memory"}
    if stage == "train":
        settings = model_settings()
        values |= {"model": config.model["family"], "mode": d.mode, "split": tuple(d.split), "split_seed": d.seed,
                   "train_file": d.train, "val_file": d.val, "test_file": d.test, "tokenizer": d.tokenizer}
        values |= {f"model_{k}": str(v) for k, v in config.model.items() if k in settings and v is not None}
        values["recipe_model"] = {k: v for k, v in config.model.items()
                                  if k not in settings and k not in AUTOMATIC and k != "family"}
    if config.finetune:
        ft, lora = config.finetune, config.finetune.lora
        values |= {"model": ft.base, "max_length": ft.max_length, "pack": ft.pack, "lora": lora is not None}
        if lora:
            values |= {"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                       "lora_targets": ",".join(lora.targets)}
    if config.align:
        a = config.align
        values |= {"method": a.method, "beta": a.beta, "reference": a.reference, "reward": a.reward, "group": a.group,
                   "max_new_tokens": a.max_new_tokens, "temperature": a.temperature}
    if config.distill:
        k = config.distill
        values |= {"teacher": k.teacher, "student": k.student, "kd_temperature": k.temperature, "kd_weight": k.alpha,
                   "reverse": k.reverse, "context": k.context, "sequences": k.sequences}
    return values


def add_compile_arg(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (torch.compile): faster tokens, after a first compilation of "
                        "minutes on this machine (seconds on the next launch)")


def compile_decoding_step(run, max_batch: int) -> None:
    from fournil.generate.compiled import compile_decoding

    print("compiling the decoding step (minutes the first time on this machine, seconds after)", file=sys.stderr,
          flush=True)
    print(f"compiled in {compile_decoding(run.model, run.dtype, max_batch):.0f} s", file=sys.stderr, flush=True)


def add_draft_args(p) -> None:
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding: a smaller model of the same tokenizer proposes tokens that the model "
                        "checks several at a time (e.g. the layers:N student of fournil distill); the text is the "
                        "model's own")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per check")


def add_train(sub) -> None:
    p = add_recipe_parser(sub, "train", help="train a model (defaults: gpt on prenoms)",
                          description="Train a language model. With no flags: the gpt model on the bundled French "
                                      "first names.")
    p.add_argument("--data", default="prenoms", help=f"a bundled dataset ({', '.join(BUNDLED)}), a UTF-8 text file, or "
                   "(source, target) pairs for seq2seq: nombres (digits to French words, made by code), a .jsonl "
                   "(source, target fields) or .tsv file")
    p.add_argument("--model", default="gpt", help=f"model family: {', '.join(FAMILIES)}")
    p.add_argument("--mode", default="auto", choices=["auto", "lines", "text"],
                   help="lines: one document per line; text: running text (default: inferred)")
    p.add_argument("--tokenizer", default="char",
                   help="char (default), bpe:N (a byte-level BPE of N tokens trained on the train split), or a tokenizer.json")
    p.add_argument("--split", type=parse_split, default=(0.9, 0.05, 0.05), help="train,val,test fractions")
    p.add_argument("--split-seed", type=int, default=1337, help="seed of the split's document shuffle")
    p.add_argument("--train", dest="train_file", help="explicit training file (with --val and --test)")
    p.add_argument("--val", dest="val_file")
    p.add_argument("--test", dest="test_file")
    add_loop_args(p, steps="", batch="sequences per forward pass (per process)", lr="")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step: accumulates gradients to reach it")
    p.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="adamw, or muon for the hidden weight matrices (default: muon for gpt on lines, else adamw)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across processes (FSDP)")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard")
    group = p.add_argument_group("model settings (each applies to the families that have it)")
    for name, kind in model_settings().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"model_{name}", metavar=kind.__name__.upper(), type=str)


class Renamed(argparse.Action):
    """A flag's old spelling: refused, with the new one (each flag name means one thing in every command)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def renamed(p, old: str, new: str) -> None:
    p.add_argument(old, action=Renamed, new=new, dest=f"renamed_{old}")


def add_tuning_args(p) -> None:
    """The flags that fine-tuning and learning from preferences share: LoRA, and the longest example."""
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA alpha (the update is scaled by alpha / rank)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="",
                   help="comma-separated layer names to adapt (default: every linear layer)")
    for old in ("rank", "alpha", "targets"):
        renamed(p, f"--{old}", f"--lora-{old}")
    p.add_argument("--max-length", type=int,
                   help="examples longer than this many tokens are skipped (default 512, or the model's context)")


PREFERENCE_DATA = ("rasbt_preferences (default), hh_rlhf_harmless, or a JSONL/JSON file of records with 'prompt', "
                   "'chosen' and 'rejected'")


def add_align(sub) -> None:
    p = add_recipe_parser(sub, "align", help="learn from preferences: DPO, or GRPO against a reward (default: DPO on "
                                             "smollm2)",
                          description="Align a chat model with human preferences: DPO on chosen/rejected pairs, or GRPO "
                                      "(sampled answers scored by a reward model or a function, with a KL penalty).")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("--data", default="rasbt_preferences", help=PREFERENCE_DATA + " (grpo: its prompts; an instruction "
                                                                                   "set's prompts work too)")
    p.add_argument("--method", default="dpo", choices=["dpo", "grpo"])
    p.add_argument("--beta", type=float, help="dpo: preference strength (default 0.1); grpo: KL penalty (default 0.04)")
    p.add_argument("--reference", default="model", choices=["model", "precomputed"],
                   help="dpo: keep the reference model (with LoRA: the model without its adapter, free), or compute its "
                        "log-probabilities of every answer once (no second model in memory)")
    p.add_argument("--reward", help="grpo: a reward model's run (fournil reward train), a built-in reward (brevity), "
                                    "or FILE.py:FUNCTION")
    p.add_argument("--group", type=int, default=4, help="grpo: answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="grpo: length limit of sampled answers")
    p.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature")
    add_tuning_args(p)
    add_loop_args(p, steps=" (default 200)", batch="pairs per step (dpo, default 8); answers per step (grpo, "
                                                   "default 2 x --group)", lr=" (default: set by the method)")
    p = sub.add_parser("reward", help="train a reward model on preference pairs, or score answers with one")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="a scalar head on a model, trained so that chosen answers score higher")
    t.set_defaults(recipe_train={})
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
    s.add_argument("--device", default="auto")
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
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="the environment variable holding the key of an openai:NAME@URL teacher")
    p.add_argument("--student", default="layers:4",
                   help="layers:N (N of the teacher's layers and its embeddings), a model config .json (from scratch, "
                        "the teacher's vocabulary), or a run with the teacher's tokenizer")
    p.add_argument("--data", default="shakespeare",
                   help="running text (a bundled corpus or a text file) or an instruction set (rasbt_instructions, a "
                        ".jsonl)")
    p.add_argument("--kd-temperature", type=float, default=2.0, help="softens both distributions")
    p.add_argument("--kd-weight", type=float, default=0.5,
                   help="weight of the distillation loss (the next-token loss gets 1 - this)")
    renamed(p, "--alpha", "--kd-weight")
    renamed(p, "--temperature", "--kd-temperature")
    p.add_argument("--reverse", action="store_true", help="KL(student || teacher) instead of KL(teacher || student)")
    p.add_argument("--context", type=int, default=256, help="tokens per row of running text; longest example otherwise")
    p.add_argument("--sequences", type=int, default=0,
                   help="sequence-level: the teacher answers this many training prompts of an instruction set and the "
                        "student learns its answers")
    p.add_argument("--no-baseline", action="store_true", help="do not train the same student without the teacher")
    add_loop_args(p, steps=" (default 100)", batch="rows per step (default 8)", lr=" (default 1e-3)")


def lora_config(args):
    from fournil.config import LoraConfig

    if not args.lora:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


def loop_config(args) -> TrainConfig:
    return TrainConfig(**args.recipe_train, **{name: getattr(args, name) for name in LOOP_FLAGS},
                       low_memory=LOW_MEMORY[args.low_memory])


def add_finetune(sub) -> None:
    p = add_recipe_parser(sub, "finetune", help="instruction-tune a model, every weight or a LoRA adapter (default: "
                                                "smollm2)",
                          description="Supervised fine-tuning on instruction/response examples: loss on the answers "
                                      "only.")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("--data", default="rasbt_instructions",
                   help="rasbt_instructions (default), fr_oasst1, fr_oasst1_chat, or a JSONL/JSON file of Alpaca "
                        "(instruction, input, output) or chat (messages) examples")
    add_tuning_args(p)
    p.add_argument("--pack", action="store_true", help="join short training examples into rows of --max-length tokens")
    add_loop_args(p, steps=" (default 200)", batch="examples per step (default 8)",
                  lr=" (default 1e-3 with LoRA, 5e-5 without)")
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model, as a run directory")
    p.add_argument("base", help="the base model: a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("adapter", help="a folder with adapter_config.json and adapter_model.safetensors (fournil's or PEFT's)")
    p.add_argument("out", help="the run directory to write")


ANIMAL = "The animal didn't cross the street because it was too tired"
SENTENCE = "Tokenizers cut text into pieces: \"unbelievable\" may be one token, or three. Ça coûte 3 € !"
CAPITAL = "The capital of France is Paris, and the capital of Italy is Rome."


def add_run_commands(sub) -> None:
    p = sub.add_parser("eval", help="NLL, perplexity and bits per character on val and test (seq2seq: and the exact-"
                                    "match accuracy and character error rate of its outputs)")
    p.add_argument("run", nargs="?", help=LATEST)
    p.add_argument("--beam", type=int, default=1, help="seq2seq: decode with a beam search of this width (default: greedy)")
    p.add_argument("--device", default="auto")
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
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", **SCORE_DTYPE)

    p = sub.add_parser("sample", help="sample text from a trained run")
    p.add_argument("run", nargs="?", help=LATEST)
    p.add_argument("-n", "--num", type=int, default=20, help="how many samples")
    p.add_argument("--prompt", default="", help="text every sample starts with")
    p.add_argument("--temperature", type=float, help="0 = always the most likely token (default 1; seq2seq: 0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--beam", type=int, default=1, help="seq2seq: the best output of a beam search of this width")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help="the probability of each token of a text given the ones before, what the model "
                       "expected instead, and the NLL; as a table and a PNG bar chart (default: smollm2)")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("text", nargs="?", default=CAPITAL)
    p.add_argument("--top", type=int, default=3, help="alternatives shown at each token (default 3)")
    p.add_argument("--out", default="explain.png", help="the PNG to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", **SCORE_DTYPE)


def add_model_commands(sub) -> None:
    model_help = "a run directory, a .gguf file, a Hugging Face folder, or a known model (smollm2)"
    answerer_help = model_help + ", or openai:NAME@BASE_URL (a model of an OpenAI-compatible endpoint)"

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

    p = sub.add_parser("generate", help="continue a prompt with any model, streamed")
    p.add_argument("model", help=answerer_help)
    p.add_argument("prompt", nargs="?", default="")
    sampling(p, 0.8)

    p = sub.add_parser("chat", help=f"chat in the terminal ({COMMANDS_OF_CHAT})")
    p.add_argument("model", nargs="?", default="smollm2", help=answerer_help)
    p.add_argument("--system", help="a system message to start with")
    sampling(p, 0.7)

    p = sub.add_parser("serve", help="an HTTP server: the OpenAI API, /predict and a chat page (default: smollm2)")
    p.add_argument("model", nargs="?", default="smollm2", help=model_help)
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

    p = sub.add_parser("attention", help="a picture of which tokens each token attends to (gpt and llama models)")
    p.add_argument("model", nargs="?", default="smollm2", help="a run, .gguf file, Hugging Face folder or smollm2")
    p.add_argument("text", nargs="?", default=ANIMAL)
    p.add_argument("--layer", type=int, default=-1, help="which layer (default: the last; negative counts from the end)")
    p.add_argument("--head", type=int, help="one head (default: every head of the layer, and their average)")
    p.add_argument("--token", default="it", help="show the row of the first token that reads as this (default: it)")
    p.add_argument("--out", default="attention.png", help="the PNG to write")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("embeddings", help="a picture of the token embeddings: their two principal components")
    p.add_argument("model", nargs="?", help="a run (mlp, rnn, gpt, llama), .gguf file or Hugging Face folder "
                                            "(default: the run under runs/ started last)")
    p.add_argument("--limit", type=int, default=300, help="show the first N tokens of the vocabulary (default 300)")
    p.add_argument("--out", default="embeddings.png", help="the PNG to write")
    p = sub.add_parser("convert", help="convert between GGUF, Hugging Face folder and run directory")
    p.add_argument("model", help=model_help)
    p.add_argument("out", help="OUT.gguf, or a folder")
    p.add_argument("--to", choices=["hf", "gguf", "run"], help="output format (default: gguf for *.gguf, else hf)")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type")

    p = sub.add_parser("info", help="architecture, parameters, dtype, context length, size on disk")
    p.add_argument("model", nargs="?", default="smollm2", help=model_help)


def add_tokenizer_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="learn a byte-level BPE vocabulary (GPT-4 style) from the train split")
    t.add_argument("--data", default="shakespeare", help=f"a bundled dataset ({', '.join(BUNDLED)}) or a UTF-8 text file")
    t.add_argument("--mode", default="auto", choices=["auto", "lines", "text"])
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--out", help="folder for tokenizer.json (default: tokenizers/DATA-bpeN)")

    p = sub.add_parser("prepare", help="tokenize a large corpus (a file or a folder of .txt) into token shards")
    p.add_argument("--data", required=True, help="a UTF-8 text file, or a folder of .txt files (read recursively)")
    p.add_argument("--tokenizer", default="bpe:4096", help="bpe:N (learned from the corpus first), char, or a tokenizer.json")
    p.add_argument("--out", required=True, help="folder for the shards; train on it with `fournil train --data OUT`")

    p = sub.add_parser("tokenize", help="show where tokenizers cut a text and how much they compress it, in the terminal "
                       "and as a picture")
    p.add_argument("text", nargs="?", default=SENTENCE)
    p.add_argument("--tokenizer", action="append", help="a tokenizer.json, a folder with one (a run, a Hugging Face model, "
                   "`fournil tokenizer train` output), a model (smollm2) or char (the text's own characters); repeat to "
                   "compare; default: a 1,024-token BPE trained on shakespeare now")
    p.add_argument("--out", default="tokens.png", help="the PNG to write")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fournil", allow_abbrev=False,
                                description="Build, train, measure and sample language models, from a bigram up.")
    sub = p.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_finetune(sub)
    add_align(sub)
    add_distill(sub)
    add_run_commands(sub)
    add_model_commands(sub)
    add_arena(sub)
    add_tokenizer_commands(sub)
    return p


ARENA_ACTIONS = ("serve", "leaderboard", "judge", "export")


class ArenaParser(argparse.ArgumentParser):
    """``fournil arena MODEL MODEL ...`` is ``fournil arena serve MODEL MODEL ...``: battles are what the arena does
    unless another action is named."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and (not args or args[0] not in (*ARENA_ACTIONS, "-h", "--help")):
            args = ["serve", *args]
        return super().parse_known_args(args, namespace)


def add_arena(sub) -> None:
    models = "models to compare: runs, .gguf files, Hugging Face folders, smollm2, or openai:NAME@BASE_URL"
    sub._parser_class, default = ArenaParser, sub._parser_class  # only `arena` reads its first word this way
    p = sub.add_parser("arena", help="models answer side by side, people and judges vote, a leaderboard ranks them",
                       description="fournil arena MODEL MODEL [MODEL ...]: a page where two anonymous models answer "
                                   "each prompt and people vote. Then: leaderboard, judge, export.")
    sub._parser_class = default
    actions = p.add_subparsers(dest="action", required=True, parser_class=argparse.ArgumentParser)

    def common(q) -> None:
        q.add_argument("--db", default="arena.sqlite",
                       help="the votes' database: a SQLite file, or postgresql://... (needs psycopg)")

    def answering(q) -> None:
        q.add_argument("--temperature", type=float, default=0.7, help="the same for both answers of a battle")
        q.add_argument("--max-tokens", type=int, default=256, help="the longest answer, in tokens")
        q.add_argument("--device", default="auto")
        q.add_argument("--dtype", default="auto", choices=WEIGHT_PRECISIONS)
        q.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="the environment variable holding the key of openai:NAME@URL models")

    q = actions.add_parser("serve", help="the battle page, /arena, and the leaderboard, /leaderboard (the default)")
    q.add_argument("models", nargs="*", help=models)
    common(q)
    answering(q)
    add_listen_args(q)
    q.add_argument("--max-batch", type=int, default=8, help="sequences each model generates together")
    q.add_argument("--allowed-hosts", default="", help="comma-separated Host names to answer besides localhost")
    q = actions.add_parser("leaderboard", help="Bradley-Terry scores with 95 %% intervals, and the win-rate matrix")
    common(q)
    q.add_argument("--voters", default="all", choices=["people", "judges", "all"])
    q.add_argument("--out", default="leaderboard", help="folder for leaderboard.md and win_rates.png")
    q.add_argument("--bootstrap", type=int, default=1000, help="refits behind the intervals")
    q = actions.add_parser("judge", help="a judge model votes: on new battles between MODELS, or on people's battles")
    q.add_argument("models", nargs="*", help=models + " (none: judge the battles people voted on)")
    q.add_argument("--judge", required=True, help="the judge: a model here, or openai:NAME@BASE_URL")
    q.add_argument("--prompts", default="rasbt_instructions",
                   help="an instruction set (bundled name or .jsonl), or a .txt file of one prompt per line")
    q.add_argument("--n", type=int, default=40, help="how many prompts (the last ones of the set)")
    q.add_argument("--seed", type=int, default=0)
    common(q)
    answering(q)
    q = actions.add_parser("export", help="the votes as prompt/chosen/rejected pairs for fournil align")
    common(q)
    q.add_argument("--voters", default="all", choices=["people", "judges", "all"])
    q.add_argument("--out", default="prefs.jsonl")


def run_train(args) -> None:
    from fournil.train import train

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
            raise FournilError(f"--{name.replace('_', '-')} does not apply to the {args.model} model; it takes {settable}")
        model[name] = coerce(cfg_cls, name, value)
    config = RunConfig(
        model=model,
        data=DataConfig(args.data, args.mode, args.split, args.split_seed, args.train_file, args.val_file, args.test_file,
                        tokenizer=args.tokenizer),
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
    report(finetune(args.model, args.data, lora_config(args), loop_config(args), args.max_length,
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

    scorer = RewardModelScorer(args.run, args.device, args.dtype)
    if args.prompt is not None or args.answer:
        if args.prompt is None or not args.answer:
            raise FournilError("give --prompt and at least one --answer to score")
        for answer, reward in zip(args.answer, scorer([[{"role": "user", "content": args.prompt}]] * len(args.answer),
                                                      args.answer)):
            print(f"{reward:+.4f}  {answer}")
        return
    run, objective = scorer.run, PairwiseReward()
    print(f"{run.path}: {scored(run)}")
    if args.data:
        pairs = render_pairs(args.data, run.tokenizer, run.config.finetune.max_length)
        splits = {args.data: PreferenceData(pairs, pad_id(run.tokenizer), "scored")}
    else:
        splits = {name: part for name, part in run.data().items() if name != "train"}
    for name, part in splits.items():
        scores = objective.validate(scorer.model, part, run.tokenizer, run.measure_dtype, None)
        print(f"{name}: {len(part):,} pairs, chosen scored higher in {100 * scores['accuracy']:.1f} %, "
              f"mean margin {scores['margin']:+.3f}, loss {scores['loss']:.4f}")


def run_distill(args) -> None:
    from fournil.config import DistillConfig
    from fournil.train.distill import distill

    budget = {k: getattr(args, k) for k in ("steps", "time") if getattr(args, k) is not None}
    if args.config:
        read_recipe(args.config, "distill")  # what the parser could not read: a missing file
    settings = DistillConfig(teacher=args.teacher, student=args.student, temperature=args.kd_temperature,
                             alpha=args.kd_weight, reverse=args.reverse, context=args.context, sequences=args.sequences)
    run = distill(data=args.data, settings=settings, train=loop_config(args), out=args.out, resume=args.resume,
                  budget=budget, baseline=not args.no_baseline, progress=not args.quiet, api_key_env=args.api_key_env)
    print(f"saved to {run.path}; next: fournil generate {run.path} TEXT  |  fournil eval {run.path}")


def run_merge(args) -> None:

    from fournil.formats.peft import load_adapter
    from fournil.models.lora import merge_lora
    from fournil.runs import TOKENIZER, Run
    from fournil.tokenizers import load_tokenizer

    run = Run.load(args.base, "cpu")
    config = load_adapter(run.model, Path(args.adapter))
    merge_lora(run.model)
    if (Path(args.adapter) / TOKENIZER).exists():  # a fournil run: its tokenizer holds the template it was tuned with
        run.tokenizer = load_tokenizer(Path(args.adapter) / TOKENIZER)
    run.config = RunConfig(model=run.config.model, data=None, train=None)
    run.save(Path(args.out))
    print(f"merged a rank-{config.rank} adapter on {len(config.targets)} kinds of layers into {args.base} -> {args.out}")


def report(run) -> None:
    """What a finished training run shows: its best val score, a few samples, what to do next."""
    if run is None:  # a process other than rank 0 of a multi-process run
        return
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])
    samples = (run.path / "samples.txt").read_text(encoding="utf-8").splitlines()
    if run.config.align:
        scores = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in best.items() if k.startswith("val_"))
        print(f"best val (step {best['step']}): {scores}; saved to {run.path}")
    else:
        nll = best["val_loss"]
        print(f"best val NLL {nll:.4f} nats/token ({nll / math.log(2):.3f} bits); saved to {run.path}")
    if samples:
        print("samples:", ", ".join(samples[:10]) if run.mode == "lines" else "\n" + "\n".join(samples[:15]))
    if run.mode == "pairs":
        val = run.evaluate(("val",))["val"]
        print(f"val: {100 * val['exact']:.2f} % of {val['outputs']:,} held-out outputs exactly right (greedy), character "
              f"error rate {100 * val['cer']:.2f} %")
    if run.config.finetune:
        print(f"next: fournil chat {run.path}  |  fournil eval {run.path}")
        return
    print(f"next: fournil eval {run.path}  |  fournil sample {run.path}  |  fournil explain {run.path} TEXT")


def scored(run) -> str:
    return f"scored in {dtype_name(run.measure_dtype)} on {run.model.device.type}"


def run_eval(args) -> None:
    from fournil.runs import Run, latest_run

    run = Run.load(args.run or latest_run(), args.device, args.dtype)
    results = run.evaluate(beam=args.beam)
    print(f"{run.path}: {run.model.family}, {run.model.num_params():,} parameters; {scored(run)}")
    if run.config.align:
        for name, r in results.items():
            print(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.items()))
        return
    pairs = run.mode == "pairs"
    print(f"{'split':<6} {'tokens':>9} {'nll':>8} {'ppl':>8} {'bits/char':>10} {'bits/byte':>10}"
          + (f" {'exact':>8} {'CER':>8}" if pairs else ""))
    for name, r in results.items():
        print(f"{name:<6} {r['tokens']:>9,} {r['nll']:>8.4f} {r['ppl']:>8.3f} {r['bpc']:>10.4f} {r['bpb']:>10.4f}"
              + (f" {100 * r['exact']:>7.2f}% {100 * r['cer']:>7.2f}%" if pairs else ""))
    if pairs:
        how = f"a beam search of width {args.beam}" if args.beam > 1 else "greedy decoding"
        print(f"exact: outputs equal to their target ({how}); CER: character edits per target character")


def run_bench(args) -> None:
    try:
        from fournil.evaluate.bench import bench, table
    except ImportError:
        raise FournilError("fournil bench needs lm-evaluation-harness: pip install 'fournil[bench]'") from None

    out = Path(args.out) if args.out else Path("bench") / Path(str(args.model)).stem
    results = bench(args.model, args.tasks, args.limit, args.shots, args.include_path, args.device, args.dtype,
                    args.batch_tokens, out)
    print(table(results))
    print(f"results in {out}/results.json and {out}/report.md")


def run_sample(args) -> None:
    from fournil.runs import Run, latest_run

    run = Run.load(args.run or latest_run(), args.device)
    if run.mode == "pairs":
        return sample_pairs(run, args)
    temperature = 1.0 if args.temperature is None else args.temperature
    samples = run.sample(args.num, args.prompt, temperature, args.top_k, args.top_p, args.seed, args.max_new_tokens)
    for s in samples:
        print(s)
    if run.mode == "lines":
        seen = set(run.splits().train)
        known = sum(s in seen for s in samples)
        print(f"{known} of {len(samples)} samples are in the training set", file=sys.stderr)


def sample_pairs(run, args) -> None:
    """A seq2seq run's outputs: for ``--prompt``, or for the first held-out sources, each marked right or wrong."""
    from fournil.generate import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens or run.model.config.block_size,
                            temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompt:
        print(run.translate([args.prompt], args.beam, params)[0])
        return
    pairs = run.splits().val[: args.num]
    outputs = run.translate([s for s, _ in pairs], args.beam, params)
    for (source, target), output in zip(pairs, outputs):
        print(f"{source} -> {output}" + ("" if output == target else f"   (expected: {target})"))
    print(f"{sum(o == t for o, (_, t) in zip(outputs, pairs))} of {len(pairs)} held-out sources right", file=sys.stderr)


def run_explain(args) -> None:

    from fournil.plots.explain import coloured_text, legend, plot_token_probs
    from fournil.runs import Run

    if args.top < 1:
        raise FournilError(f"--top {args.top}: show at least 1 alternative")
    run = Run.load(args.model, args.device, args.dtype)
    result = run.explain(args.text, args.top)
    rows = result["rows"]
    if sys.stdout.isatty():
        print(coloured_text(result))
        print(legend())
    width = max(len(r["label"]) for r in rows)
    for r in rows:
        others = "  ".join(f"{token} {p:.3f}" for token, p in r["top"])
        rank = f"{r['rank']}" if r["rank"] <= args.top else f">{args.top}"
        print(f"{r['label']:<{width}} {r['prob']:.4f}  rank {rank:<3} most likely: {others}")
    print(f"NLL {result['nll']:.4f} nats over {len(rows)} transitions; average {result['avg_nll']:.4f}; {scored(run)}")
    plot_token_probs(result, Path(args.out), f"{run.path.name}: {args.text[:60]}")
    print(f"-> {args.out}", file=sys.stderr)


def sampling_params(args, max_new_tokens: int):
    from fournil.generate import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          seed=args.seed, stop=tuple(args.stop))


def run_serve(args) -> None:
    from fournil.generate.answerers import load_local
    from fournil.generate.scheduler import check_capacity
    from fournil.serve.app import ServeSettings, create_app, run_server
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
    run, draft = load_local(args.model, args.device, args.dtype, args.draft)
    if args.compile:
        compile_decoding_step(run, args.max_batch)
    app, schedulers = create_app(run, settings, draft, args.draft_tokens)
    print(f"serving {settings.name} ({run.model.num_params():,} parameters; {run.precision}) on "
          f"http://{args.host}:{args.port}: chat page at /, OpenAI API at /v1", flush=True)
    if warning:
        logging.getLogger("fournil.serve").warning(warning)
    run_server(app, schedulers, args.host, args.port)  # on Ctrl-C, answers in progress get 5 seconds to end


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what the server binds to) is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


def run_generate(args) -> None:
    params = sampling_params(args, args.max_new_tokens)
    params.check()  # before the model loads
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
    from fournil.generate.answerers import Local

    params = sampling_params(args, args.max_new_tokens)
    params.check()
    model = load_answerer(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    if isinstance(model, Local):  # a model without a chat template fails now, not later
        model.run.tokenizer.chat_ids(messages + [{"role": "user", "content": ""}])
    interactive = sys.stdin.isatty()
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
        except FournilError as e:
            print(f"({e}: /reset to start over)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        answer = ""
        try:
            for piece in pieces:
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat; what was shown stays in the conversation
            pieces.close()
            print(" (stopped)", end="")
        print()
        messages.append({"role": "assistant", "content": answer})


def run_arena(args) -> None:
    from fournil.arena.store import Store

    store = Store(args.db, create=args.action in ("serve", "judge"))
    if args.action == "leaderboard":
        arena_leaderboard(args, store)
    elif args.action == "export":
        from fournil.arena.store import preference_pairs

        pairs = preference_pairs(store.votes(args.voters))
        if not pairs:
            raise FournilError(f"{args.db} has no vote of {args.voters} that names a better answer yet")
        from fournil.checkpoint import atomic_write

        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"))
        print(f"{len(pairs):,} preference pairs -> {args.out} (fournil align --data {args.out})")
    elif args.action == "judge":
        arena_judge(args, store)
    else:
        arena_serve(args, store)


def arena_contestants(args) -> dict:
    from fournil.generate import SamplingParams
    from fournil.generate.answerers import answerer, name_of

    SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature).check()
    names = [name_of(m) for m in args.models]
    if len(set(names)) < len(names):
        raise FournilError(f"two contestants would have the same name ({', '.join(names)}): give each its own folder")
    contestants = {}
    for name, spec in zip(names, args.models):
        print(f"loading {spec}", flush=True)
        contestants[name] = answerer(spec, args.device, args.dtype, args.api_key_env)
    return contestants


def arena_serve(args, store) -> None:
    from fournil.arena.app import ArenaSettings, create_arena_app
    from fournil.generate.scheduler import check_capacity
    from fournil.serve.app import run_server
    from fournil.serve.guard import LOOPBACK_HOSTS

    if len(args.models) < 2:
        raise FournilError("the arena needs two models or more: fournil arena MODEL MODEL [MODEL ...]")
    check_capacity(args.max_batch, 64)
    extra = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    settings = ArenaSettings(args.temperature, args.max_tokens, args.max_batch,
                             hosts=(*LOOPBACK_HOSTS, *extra) if is_loopback(args.host) else (extra or None))
    app, schedulers = create_arena_app(arena_contestants(args), store, settings)
    print(f"the arena of {', '.join(args.models)} on http://{args.host}:{args.port}/arena (votes in {args.db}); "
          f"leaderboard at /leaderboard", flush=True)
    run_server(app, schedulers, args.host, args.port)


def arena_leaderboard(args, store) -> None:
    from fournil.arena.ranking import agreement, leaderboard, plot_win_rates, table

    if args.bootstrap < 0:
        raise FournilError(f"--bootstrap must be 0 or more (got {args.bootstrap})")
    votes = store.votes(args.voters)
    board = leaderboard(votes, args.bootstrap)
    if not board:
        raise FournilError(f"{args.db} has no vote of {args.voters} that names a better answer or a tie yet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(board)
    rate, both = agreement(store.votes("all"))
    text += f"\n{len(votes):,} votes of {args.voters}. " + (
        f"People and judges agree on {rate:.0%} of the {both:,} battles both voted on.\n" if both else
        "No battle has both a person's and a judge's vote yet.\n")
    (out / "leaderboard.md").write_text(text, encoding="utf-8")
    plot_win_rates(votes, board, out / "win_rates.png")
    print(text, end="")
    print(f"-> {out / 'leaderboard.md'}, {out / 'win_rates.png'}", file=sys.stderr)


def arena_judge(args, store) -> None:
    from fournil.arena.judge import Judge, judge_battle, read_prompts, tournament
    from fournil.generate import SamplingParams
    from fournil.generate.answerers import answerer, name_of

    if args.n < 1:
        raise FournilError(f"--n must be at least 1 (got {args.n})")
    if len(args.models) == 1:
        raise FournilError("give two models or more to judge new battles, or none to judge the battles people voted on")
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    params.check()
    prompts = read_prompts(args.prompts, args.n) if args.models else None
    if args.models:
        contestants = arena_contestants(args)
        votes = tournament(contestants, Judge(answerer(args.judge, args.device, "auto", args.api_key_env)), prompts,
                           store, params)
        asked = len(prompts) * len(contestants) * (len(contestants) - 1) // 2
    else:
        name = name_of(args.judge)
        judged = {v.battle.id for v in store.votes("judges") if v.voter == name}
        battles = {v.battle.id: v.battle for v in store.votes("people") if v.battle.id not in judged}
        if not battles:
            raise FournilError(f"{args.db} has no battle people voted on that {name} has not judged yet")
        judge = Judge(answerer(args.judge, args.device, "auto", args.api_key_env))
        votes = sum(judge_battle(judge, b, store) for b in battles.values())
        asked = len(battles)
    print(f"{name_of(args.judge)} gave {votes} verdicts -> {args.db} (fournil arena leaderboard --db {args.db})")
    if votes < asked:
        print(f"fournil: {asked - votes} of {asked} battles got no verdict: the judge's answer named none ([[A]], [[B]] "
              f"or [[C]]) in one of the orders, or the battle did not fit its context", file=sys.stderr)


def run_attention(args) -> None:

    from fournil.evaluate.attention import attention_maps
    from fournil.plots.attention import plot_attention, token_labels
    from fournil.runs import Run

    run = Run.load(args.model, args.device)
    tokens, weights = attention_maps(run.model, run.tokenizer, args.text)
    n_layer, n_head = weights.shape[:2]
    if not -n_layer <= args.layer < n_layer:
        raise FournilError(f"--layer {args.layer}: the model has {n_layer} layers (0 to {n_layer - 1}, or -1 for the last)")
    if args.head is not None and not 0 <= args.head < n_head:
        raise FournilError(f"--head {args.head}: the model has {n_head} heads per layer (0 to {n_head - 1})")
    layer = args.layer % n_layer
    focus = next((i for i, t in enumerate(tokens) if t.strip() == args.token.strip()), None)
    plot_attention(tokens, weights[layer], Path(args.out), layer, args.head, focus, f"{run.path.name}: {args.text[:60]}")
    print(f"{len(tokens)} tokens, {n_layer} layers x {n_head} heads; layer {layer} -> {args.out}")
    if focus is not None:
        row = (weights[layer].mean(0) if args.head is None else weights[layer, args.head])[focus]
        top = row.topk(min(5, focus + 1))
        labels = token_labels(tokens)
        print(f"{labels[focus]!r} attends most to: " +
              ", ".join(f"{labels[i]!r} {w:.3f}" for w, i in zip(top.values.tolist(), top.indices.tolist())))


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


def run_convert(args) -> None:

    from fournil.formats import check_output, export
    from fournil.runs import Run

    kind = args.to or ("gguf" if args.out.endswith(".gguf") else "hf")
    check_output(Path(args.out))  # before the model loads
    run = Run.load(args.model, "cpu")
    export(run, Path(args.out), kind, args.type)
    print(f"wrote {args.out} ({kind})")


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
    tokenizer = train_bpe(texts(splits.train), args.vocab_size, progress=sys.stderr.isatty())
    name = args.data if args.data in BUNDLED else Path(args.data).stem
    out = Path(args.out or f"tokenizers/{name}-bpe{args.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    val = compression(tokenizer, texts(splits.val))
    print(f"{tokenizer.vocab_size:,} tokens -> {out}/tokenizer.json")
    print(f"val split: {val['bytes']:,} bytes, {val['chars']:,} characters, {val['tokens']:,} tokens: "
          f"{val['bytes_per_token']:.2f} bytes per token, {val['chars'] / val['tokens']:.2f} characters per token")
    print(f"next: fournil tokenize TEXT --tokenizer {out}  |  fournil train --data {args.data} --tokenizer {out}")


def run_prepare(args) -> None:

    from fournil.data.shards import META, TOKENIZER, prepare, source_texts
    from fournil.tokenizers import CharTokenizer, load_tokenizer
    from fournil.tokenizers.bpe import bpe_size, train_bpe
    from fournil.tokenizers.char import BOUNDARY

    out, spec = Path(args.out), args.tokenizer
    if (out / META).exists():  # an interrupted prepare: keep its tokenizer and carry on
        tokenizer = load_tokenizer(out / TOKENIZER)
    elif size := bpe_size(spec):
        print(f"learning a {size:,}-token byte-level BPE from {args.data}", file=sys.stderr)
        tokenizer = train_bpe(source_texts(args.data), size, progress=sys.stderr.isatty())
    elif spec == "char":
        chars = set().union(*map(set, source_texts(args.data)))
        tokenizer = CharTokenizer(sorted(chars), [BOUNDARY])
    else:
        tokenizer = load_tokenizer(spec)
    meta = prepare(args.data, tokenizer, out, progress=sys.stderr.isatty())
    counts = {name: sum(s["tokens"] for s in shards) for name, shards in meta["shards"].items()}
    print(f"{out}: " + ", ".join(f"{name} {n:,} tokens" for name, n in counts.items())
          + f" ({meta['dtype']}, vocabulary {tokenizer.vocab_size:,})")
    print(f"next: fournil train --data {out}")


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
    from fournil.tokenizers.compression import compression, pieces

    panels = []
    for spec in args.tokenizer or [None]:
        name, tokenizer = tokenizer_for(spec, args.text)
        cut = pieces(tokenizer, args.text)
        c = compression(tokenizer, [args.text])
        if len(args.tokenizer or []) > 1:
            print(f"== {name}")
        if sys.stdout.isatty():  # alternate background colours, as tokenizer pages show tokens
            colours = ["\x1b[30;46m", "\x1b[30;43m", "\x1b[30;42m", "\x1b[30;45m"]
            print("".join(f"{colours[n % 4]}{text}\x1b[0m" for n, (_, text) in enumerate(cut)))
        else:
            print("|".join(text for _, text in cut))
        print("ids:", " ".join(str(i) for i, _ in cut))
        print(f"{c['chars']} characters, {c['bytes']} bytes, {c['tokens']} tokens: {c['bytes_per_token']:.2f} bytes per token")
        panels.append((name, [text for _, text in cut], c))
    plot_tokens(panels, Path(args.out))
    print(f"-> {args.out}", file=sys.stderr)


COMMANDS = {"train": run_train, "finetune": run_finetune, "align": run_align, "reward": run_reward, "distill": run_distill, "merge": run_merge, "eval": run_eval, "bench": run_bench, "sample": run_sample, "explain": run_explain, "generate": run_generate,
            "chat": run_chat, "serve": run_serve, "arena": run_arena, "attention": run_attention, "embeddings": run_embeddings, "convert": run_convert, "info": run_info, "tokenizer": run_tokenizer,
            "tokenize": run_tokenize, "prepare": run_prepare}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FournilError, OSError) as e:  # OSError: a file that cannot be read or written, with the system's reason
        print(f"fournil: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fournil: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
