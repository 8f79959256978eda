"""Flags that several commands share, and how they are read: durations, ports, the training loop's, recipes
(``--config``), LoRA, compilation, drafts."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from fournil.config import STAGES, DataConfig, RunConfig, TrainConfig, field_types, recipe_config, recipe_sections
from fournil.device import dtype_name
from fournil.errors import FournilError
from fournil.generate.answerers import is_remote
from fournil.generate.quantize import PRECISIONS
from fournil.models import DEFAULTS, FAMILIES

AUTOMATIC = {"vocab_size", "boundary_id", "bos_id", "eos_id"}  # model settings taken from the data, not from flags
LOW_MEMORY = {"auto": None, "on": True, "off": False}
WEIGHT_PRECISIONS = ["auto", *PRECISIONS]  # --dtype of the commands that generate
MODEL_HELP = "a run directory, a .gguf file, a Hugging Face folder, or a known model (smollm2)"
LATEST = "a run directory, e.g. runs/prenoms-gpt (default: the run under runs/ started last)"
DEVICE = {"default": "auto", "help": "auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps"}
SCORE_DTYPE = {"default": "auto", "choices": ["auto", "float32", "bfloat16", "float16"],
               "help": "precision of the scores (default: float32, the same figures on every machine)"}
KEY_ENV = "OPENAI_API_KEY"  # --api-key-env's default, as the openai client's


def add_key_env_arg(p, whose: str) -> None:
    p.add_argument("--api-key-env", default=KEY_ENV, metavar="VAR",
                   help=f"the environment variable holding the key of {whose} (default: {KEY_ENV})")


def check_loaded_here(args, models: list) -> None:
    """``--device`` and ``--dtype`` choose how a model loaded here computes: with every one of ``models`` remote
    (``openai:...``), they are refused (they were ignored)."""
    given = [f"--{k}" for k in ("device", "dtype") if getattr(args, k, "auto") != "auto"]
    if given and all(map(is_remote, models)):
        raise FournilError(f"{' and '.join(given)} choose{'s' * (len(given) == 1)} how a model loaded here computes; "
                           f"{' and '.join(map(str, models))} answer{'s' * (len(models) == 1)} from elsewhere: leave "
                           f"{'it' if len(given) == 1 else 'them'} out")


def check_key_env(given: str, models: list) -> None:
    """``--api-key-env`` names the key of a remote model (``openai:...``): given another variable than the default
    with none among ``models``, it is refused (it was ignored)."""
    if given != KEY_ENV and not any(map(is_remote, models)):
        here = " and ".join(map(str, models))
        raise FournilError(f"--api-key-env {given} names the key of a remote model (openai:NAME@URL), and {here} "
                           f"{'is' if len(models) == 1 else 'are'} loaded here: leave it out")


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
    """A TCP port to listen on: 1 to 65535, or 0 for a free one (the server prints which)."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535, e.g. 8000 (or 0: "
                                         f"a free one)")
    return int(text)


PICTURES = ("png", "svg", "pdf", "jpg", "jpeg", "webp")  # formats matplotlib writes, by the name's suffix


def parse_picture(text: str) -> str:
    """A picture's file name: its suffix says the format (matplotlib would add .png to a name without one, and fail
    on one it does not know, after the work)."""
    if Path(text).suffix.lower()[1:] not in PICTURES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a picture's name: end it with .png (or "
                                         f"{', '.join('.' + k for k in PICTURES[1:])})")
    return text


def add_listen_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=parse_port, default=8000,
                   help="port to listen on (default: 8000; 0: a free one, printed)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what the server binds to) is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_settings() -> dict[str, type]:
    """Every model setting of every family, for flags like --n-layer."""
    found = {}
    for _, cfg in FAMILIES.values():
        for f in dataclasses.fields(cfg):
            if f.name not in AUTOMATIC:
                kinds = [k for k in typing.get_args(field_types(cfg)[f.name]) if k is not type(None)]
                kind = (kinds or [field_types(cfg)[f.name]])[0]
                if kind in (int, float, str, bool):  # structured settings (rope_scaling) come from imported configs
                    found.setdefault(f.name, kind)
    return found


# what each model setting means; its families and their defaults are added from the configs (fournil.models)
SETTING_HELP = {
    "block_size": "the context length in tokens (default: the longest document on lines, 128 on running text)",
    "n": "the n-gram's order (2 = bigram, 3 = trigram)", "smoothing": "add-k smoothing, a count given to every pair",
    "context": "tokens the MLP reads", "n_embd": "width of the embeddings and hidden states",
    "n_hidden": "width of the hidden layers", "n_layer": "layers", "dropout": "dropout rate while training",
    "cell": "the recurrent cell, gru or lstm", "n_head": "attention heads",
    "bias": "biases in the linear layers and norms",
    "tie_embeddings": "the output layer shares the input embeddings' weights",
    "activation": "the MLP's GELU: gelu (exact), gelu_new or gelu_pytorch_tanh (tanh approximation)",
    "n_kv_head": "key/value heads, shared by groups of query heads (grouped-query attention)",
    "head_dim": "width of each head (default: n_embd / n_head)",
    "intermediate_size": "width of the SwiGLU MLP (default: about 8/3 of n_embd)",
    "rope_theta": "base of the rotary position angles", "rms_norm_eps": "epsilon of RMSNorm",
    "qk_norm": "an RMSNorm on each head's queries and keys before the rotation (Qwen3)",
    "qkv_bias": "biases in the query/key/value projections", "o_bias": "a bias in the attention's output projection",
    "mlp_bias": "biases in the MLP", "sliding_window": "each token sees at most this many tokens (default: all)",
    "shared_embeddings": "one token embedding table for the encoder and the decoder",
}


def setting_help(name: str) -> str:
    """What a model setting means, then the families that have it, each with its default (on lines, and on running
    text where that differs; none for a 0 or None whose meaning says how it is derived)."""
    where = []
    for family, (_, cfg) in FAMILIES.items():
        field = next((f for f in dataclasses.fields(cfg) if f.name == name), None)
        if field is None:
            continue
        by_mode = [tuned.get(name, field.default) for (f, _), (tuned, _) in DEFAULTS.items() if f == family]
        shown = list(dict.fromkeys(str(v).lower() for v in by_mode
                                   if v is not None and not (type(v) is int and v == 0)))
        where.append(" ".join([family, *shown[:1]]) + (f" ({shown[1]} on text)" if len(shown) > 1 else ""))
    return SETTING_HELP[name] + ("" if len(where) == len(FAMILIES) else f": {', '.join(where)}")


def add_sampling_args(p) -> None:
    """How tokens are drawn, beside the temperature: the flags of sample, generate and chat."""
    p.add_argument("--top-k", type=int, help="draw among the k most likely tokens only")
    p.add_argument("--top-p", type=float,
                   help="draw among the most likely tokens that together hold this much probability (nucleus)")
    p.add_argument("--seed", type=int, help="the same seed, prompt and settings give the same text (default: a new "
                                            "draw each time)")


def add_loop_args(p, steps: str, batch: str, lr: str) -> None:
    """The training loop's flags, which pretraining and fine-tuning share."""
    p.add_argument("--steps", type=int, help=f"stop after this many steps{steps}")
    p.add_argument("--time", type=parse_duration, help="stop after this much wall-clock time (90s, 2m, 1h)")
    p.add_argument("--batch-size", type=int, help=batch)
    p.add_argument("--lr", type=float, help=f"peak learning rate{lr}")
    p.add_argument("--eval-every", type=int, help="validate and checkpoint every N steps (default: 250; when adapting "
                                                  "a model, a quarter of --steps, from 10 to 250)")
    p.add_argument("--eval-tokens", type=int,
                   help="validate on about N of the val split's scored tokens (default: 250,000; when adapting a "
                        "model, an eighth of the answer tokens trained between two validations, at least 4,096; "
                        "`fournil eval` scores all of it)")
    p.add_argument("--seed", type=int, default=1337,
                   help="seeds the weights' initialization, the batches and dropout")
    p.add_argument("--device", **DEVICE)
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 where the hardware runs it fast), float32, bfloat16, float16")
    p.add_argument("--low-memory", choices=["auto", "on", "off"], default="auto",
                   help="recompute each Transformer layer in the backward pass and read a step in passes of at most "
                        "1,024 tokens (auto: for each batch whose layers' activations would take more than an "
                        "eighth of the memory, at least a GiB; on a GPU, a quarter of what is free)")
    p.add_argument("--out", help="run directory (default: runs/DATA-MODEL)")
    p.add_argument("--resume", metavar="RUN", help="continue a run that stopped (--steps/--time set a new budget)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


LOOP_FLAGS = ("steps", "time", "batch_size", "lr", "eval_every", "eval_tokens", "seed", "device",
              "dtype")  # every training command's
TRAIN_FLAGS = (*LOOP_FLAGS, "batch_tokens", "optimizer", "compile", "fsdp", "tensorboard")  # and `fournil train`'s own


def loop_config(args) -> TrainConfig:
    return TrainConfig(**args.recipe_train, **{name: getattr(args, name) for name in LOOP_FLAGS},
                       low_memory=LOW_MEMORY[args.low_memory])


class RecipeParser(argparse.ArgumentParser):
    """``fournil train|finetune|align|distill --config FILE``: the file's settings become the flags' defaults, so that
    flags given beside it override it, and its settings without a flag (warmup, weight decay...) are kept as they
    are. ``stage`` is the command."""

    stage = "train"

    def parse_known_args(self, args=None, namespace=None):
        files = [a.removeprefix("--config=") for a in args or [] if a.startswith("--config=")]
        files += [args[i + 1] for i, a in enumerate(args or []) if a == "--config" and i + 1 < len(args)]
        if files and Path(files[-1]).is_file():  # (a missing file is said when the command runs; a file that is
            # not a recipe, in one line: FournilError, not the usage of every flag, which the file is not about)
            raw = recipe_sections(files[-1], self.stage)
            defaults = recipe_defaults(recipe_config(raw, files[-1], self.stage), self.stage)
            if "data" not in (raw.get("data") or {}):  # the command's own data (finetune got DataConfig's prenoms)
                del defaults["data"]
            self.set_defaults(**defaults)
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
    p.set_defaults(recipe_train={}, recipe_model={}, recipe_data={})
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
                   "train_file": d.train, "val_file": d.val, "test_file": d.test,
                   "tokenizer": None if d.tokenizer == DataConfig.tokenizer else d.tokenizer}  # (as if left out)
        values |= {f"model_{k}": str(v) for k, v in config.model.items() if k in settings and v is not None}
        values["recipe_model"] = {k: v for k, v in config.model.items()
                                  if k not in settings and k not in AUTOMATIC and k != "family"}
    else:  # how the one data set is split (finetune and align set its mode and tokenizer; distill its tokenizer)
        values["recipe_data"] = {"split": tuple(d.split), "seed": d.seed} | ({"mode": d.mode} if stage == "distill"
                                                                              else {})
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
                   "reverse": k.reverse, "context": k.context, "sequences": k.sequences, "no_baseline": not k.baseline}
    return values


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
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16; the update is scaled by alpha / rank)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", help="comma-separated layer names to adapt (default: every linear layer)")
    for old in ("rank", "alpha", "targets"):
        renamed(p, f"--{old}", f"--lora-{old}")
    p.add_argument("--max-length", type=int,
                   help="examples longer than this many tokens are skipped (default 512, or the model's context)")


def lora_config(args):
    from fournil.config import LoraConfig

    given = {name: getattr(args, f"lora_{name}") for name in ("rank", "alpha", "dropout", "targets")}
    given = {name: value for name, value in given.items() if value is not None}
    if not args.lora:
        if given:  # (they were ignored, and every weight trained)
            raise FournilError(f"--lora-{next(iter(given))} sets a LoRA adapter: add --lora, or leave it out to tune "
                               f"every weight")
        return None
    if "targets" in given:
        given["targets"] = tuple(t.strip() for t in given["targets"].split(",") if t.strip())
    config = LoraConfig(**given)
    config.check()  # before the base model is read
    return config


def add_compile_arg(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (torch.compile): faster tokens, after a first compilation of "
                        "minutes on this machine (seconds on the next launch)")


DRAFT_TOKENS = 4  # a draft's tokens per check, unless --draft-tokens says


def add_draft_args(p) -> None:
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding: a smaller model of the same tokenizer proposes tokens that the model "
                        "checks several at a time (e.g. the layers:N student of fournil distill); the text is the "
                        "model's own (on a CPU the draft's weights are int8, unless --dtype says)")
    p.add_argument("--draft-tokens", type=int, help=f"tokens the draft proposes per check (default: {DRAFT_TOKENS})")


def drafted(args) -> int:
    """--draft-tokens, checked before any model loads; alone, without a --draft to propose them, it is refused (it
    was ignored)."""
    from fournil.generate.speculative import check_draft_tokens

    if args.draft_tokens is not None and not args.draft:
        raise FournilError("--draft-tokens is how many tokens a draft model proposes: give it with --draft MODEL, or "
                           "leave it out")
    k = DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
    check_draft_tokens(k)
    return k


def scored(run) -> str:
    return f"scored in {dtype_name(run.measure_dtype)} on {run.model.device.type}"
