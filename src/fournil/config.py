"""Configuration as dataclasses, saved to and read from a run's ``config.json``.

Model configs live beside their models (``fournil.models.*``); data and training configs live here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fournil.errors import FournilError, typed


def check_split(fractions) -> tuple[float, float, float]:
    """Train/val/test fractions, refused unless there are three, each positive, adding up to 1."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise FournilError(f"--split must be three positive fractions that add up to 1, e.g. 0.9,0.05,0.05 (got "
                           f"{','.join(f'{f:g}' for f in fractions)})")
    return tuple(fractions)


@dataclass
class DataConfig:
    data: str = "prenoms"  # a bundled dataset name or a path to a UTF-8 text file
    mode: str = "auto"  # auto, lines or text (a run's config holds the mode the data was read in)
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 1337  # seeds the document shuffle of the split
    train: str | None = None  # explicit split files instead of splitting `data`
    val: str | None = None
    test: str | None = None
    tokenizer: str = "char"  # char, bpe:N (byte-level BPE of N tokens trained on the train split), or a tokenizer.json

    def __post_init__(self):
        self.split = tuple(self.split)  # JSON gives a list back
        for name in ("data", "train", "val", "test"):  # a pathlib.Path is a path too, written to JSON as text
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))


@dataclass
class TrainConfig:
    steps: int | None = None  # stop after this many optimizer steps...
    time: float | None = None  # ...or after this many seconds, whichever comes first
    batch_size: int | None = None  # sequences per forward pass and process; None picks one for the model
    batch_tokens: int | None = None  # target tokens per optimizer step, reached by accumulating gradients
    grad_accum: int = 1  # forward passes per optimizer step (set from batch_tokens when that is given)
    lr: float | None = None  # peak learning rate; None picks one for the model
    optimizer: str | None = None  # adamw, or muon (hidden matrices; AdamW for the rest); None picks one for the model
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio (decaying to zero measured best)
    warmup: int = 200  # linear warmup steps
    weight_decay: float | None = None  # on weight matrices and embeddings, not biases or norms; None: the model's, or 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int | None = None  # validate (and checkpoint) every this many steps; None: see trainer.eval_every
    eval_tokens: int | None = None  # cap on the tokens validation scores; None: see trainer.eval_tokens (`fournil
    # eval` scores everything)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # torch.compile the model (pays on GPUs; costs compile time first)
    low_memory: bool | None = None  # recompute each Transformer layer in the backward pass, and read each batch in
    # passes of at most 1,024 tokens; None: for a batch whose layers' activations would take more than
    # device.activation_budget (an eighth of a CPU's memory)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state across processes (FSDP)
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)
    samples: int = 20  # written to samples.txt at the end

    @property
    def decay(self) -> float:
        return 0.1 if self.weight_decay is None else self.weight_decay

    @property
    def budget(self) -> str:
        """The budget as a run announces it: "1 step", "3,000 steps", "120 s", or both (the run stops at the first)."""
        steps = self.steps and f"{self.steps:,} step{'s' * (self.steps != 1)}"
        if steps and self.time:
            return f"{steps} or {self.time:g} s, whichever ends first"
        return steps or (self.time and f"{self.time:g} s") or ""

    def check(self) -> None:
        """Refuse what no run can use, before defaults fill what the user left open."""
        for name in ("steps", "batch_size", "batch_tokens", "eval_every", "eval_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FournilError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.time is not None and not self.time > 0:
            raise FournilError(f"--time must be longer than 0 s (got {self.time:g} s): give e.g. 90s, 5m or 1h")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise FournilError(f"--lr must be a positive learning rate, e.g. 1e-3 (got {self.lr:g})")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise FournilError(f"the weight decay must not be negative (got {self.weight_decay:g})")
        for wrong, error in (
                (self.grad_accum < 1, f"grad_accum must be at least 1 (got {self.grad_accum})"),
                (self.warmup < 0, f"warmup must not be negative (got {self.warmup} steps)"),
                (not 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio:g})"),
                (not 0 <= self.beta2 < 1, f"beta2 must be in [0, 1) (got {self.beta2:g})"),
                (not self.grad_clip >= 0, f"grad_clip must not be negative (got {self.grad_clip:g}; 0: no clipping)"),
                (self.samples < 0, f"samples must not be negative (got {self.samples})")):
            if wrong:
                raise FournilError(error)


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # names of the linear layers to adapt (q_proj, ...); empty: all but the output layer
    rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (rank-stabilized LoRA)

    def check(self) -> None:
        if self.rank < 1:
            raise FournilError(f"--lora-rank must be at least 1 (got {self.rank})")
        if not 0 <= self.dropout < 1:
            raise FournilError(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        if not 0 < self.alpha < math.inf:
            raise FournilError(f"--lora-alpha must be positive (got {self.alpha:g}): the adapter's update is scaled by "
                               f"alpha / rank, and 0 would leave the model as it is")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclass
class FinetuneConfig:
    base: str  # the model tuned: a run directory, a .gguf file, a Hugging Face folder or a known name (smollm2)
    lora: LoraConfig | None = None  # None: every weight trains
    max_length: int | None = None  # longer examples are skipped; None: 512, or the model's context if shorter
    pack: bool = False  # join short training examples into rows of max_length tokens

    def check(self) -> None:
        if self.lora:
            self.lora.check()
        if self.max_length is not None and self.max_length < 1:
            raise FournilError(f"--max-length must be at least 1 token (got {self.max_length}): longer examples are "
                               f"skipped")


@dataclass
class AlignConfig:
    """Learning from preferences, on top of fine-tuning's settings."""

    method: str = "dpo"  # dpo; reward (train a reward model); grpo (policy gradient on sampled answers' rewards)
    beta: float | None = None  # dpo: how far the policy may move for a preference (0.1); grpo: KL penalty weight
    # (0.04); None: the method's default, filled in by check()
    reference: str = "model"  # dpo: "model" (the base model, frozen) or "precomputed" (its log-probabilities, once)
    reward: str | None = None  # grpo: a reward model's run directory, or a built-in reward's name
    group: int = 4  # grpo: answers sampled for each prompt, compared with each other
    max_new_tokens: int = 64  # grpo: length limit of a sampled answer
    temperature: float = 1.0  # grpo: sampling temperature

    def check(self) -> None:
        if self.method not in ("dpo", "reward", "grpo"):
            raise FournilError(f"unknown alignment method {self.method!r}: choose dpo or grpo (or train a reward model "
                               f"with `fournil reward train`)")
        if self.reference not in ("model", "precomputed"):
            raise FournilError(f"--reference {self.reference}: choose model or precomputed")
        if self.beta is not None and self.beta < 0:
            raise FournilError(f"--beta must not be negative (got {self.beta})")
        if self.beta == 0 and self.method == "dpo":  # -log sigmoid(0) whatever the answers: no gradient
            raise FournilError("--beta 0 leaves DPO nothing to learn (its loss is log 2 whatever the model does): "
                               "give a positive beta, e.g. 0.1 (smaller lets the policy move further from its base)")
        if self.beta is None:  # recorded in the run's configuration, as used
            self.beta = {"dpo": 0.1, "grpo": 0.04}.get(self.method)
        grpo_only = [f"--{k.replace('_', '-')}" for k in ("reward", "group", "max_new_tokens", "temperature")
                     if getattr(self, k) != getattr(AlignConfig, k)]  # (the class holds the defaults)
        if self.method != "grpo" and grpo_only:  # (DPO went on without them)
            one = len(grpo_only) == 1
            raise FournilError(f"{', '.join(grpo_only)} {'is' if one else 'are'} GRPO's: add --method grpo to learn "
                               f"from sampled answers' rewards, or leave {'it' if one else 'them'} out for "
                               f"{self.method}")
        if self.method != "dpo" and self.reference != AlignConfig.reference:
            raise FournilError(f"--reference {self.reference} is DPO's: leave it out for {self.method}")
        if self.method == "grpo" and not self.reward:
            raise FournilError("grpo needs a reward: --reward RUN (a reward model, see `fournil reward train`), a "
                               "built-in one (brevity, correct), or FILE.py:FUNCTION")
        if self.method == "grpo" and (self.group < 2 or self.max_new_tokens < 1 or self.temperature <= 0):
            raise FournilError("grpo compares answers to the same prompt: --group must be at least 2, "
                               "--max-new-tokens at least 1 and --temperature above 0")


@dataclass
class DistillConfig:
    """A student trained to imitate a teacher."""

    teacher: str  # a run, a .gguf file, a Hugging Face folder or a known name (smollm2)
    student: str | None = None  # layers:N (N of the teacher's layers, evenly spaced, and its embeddings), a model
    # config in JSON (trained from scratch; the teacher's vocabulary), or a run sharing the teacher's tokenizer; None:
    # layers:4, or half the layers of a teacher of fewer than 8 (written so in the run's config once the teacher loads)
    temperature: float = 2.0  # both distributions are softened by it; the distillation loss is scaled by its square
    alpha: float = 0.5  # weight of the distillation loss; the next-token loss gets 1 - alpha (0: no teacher)
    reverse: bool = False  # KL(student || teacher), mode-seeking, instead of KL(teacher || student)
    context: int | None = None  # tokens per training row of running text (None: the teacher's context, at most 256)
    sequences: int = 0  # sequence-level: the teacher answers this many prompts of an instruction set; the student learns those answers
    baseline: bool = True  # also train the same student without the teacher (RUN/baseline), for the report to compare

    def check(self) -> None:
        for wrong, error in ((not self.temperature > 0, f"--kd-temperature must be above 0 (got {self.temperature:g})"),
                             (not 0 <= self.alpha <= 1, f"--kd-weight must be in [0, 1] (got {self.alpha:g})"),
                             (self.context is not None and self.context < 2,
                              f"--context must be at least 2 (got {self.context})"),
                             (self.sequences < 0, f"--sequences must not be negative (got {self.sequences})")):
            if wrong:
                raise FournilError(error)
        if self.alpha == 0 and not self.sequences:  # (it trained the student alone, and called it distilled)
            raise FournilError("--kd-weight 0 leaves the teacher out: the student would learn the data alone, as the "
                               "student without teacher does; give a weight above 0, or --sequences N to learn the "
                               "teacher's answers")
        shaping = [flag for flag, given in (("--kd-temperature", self.temperature != DistillConfig.temperature),
                                            ("--reverse", self.reverse)) if given]
        if self.alpha == 0 and shaping:
            one = len(shaping) == 1
            raise FournilError(f"{', '.join(shaping)} {'shapes' if one else 'shape'} the distillation loss, which "
                               f"--kd-weight 0 leaves out: drop {'it' if one else 'them'}, or give a weight above 0")


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"family": "gpt"})  # {"family": "gpt", "n_layer": 4}; or a name
    data: DataConfig | None = field(default_factory=DataConfig)  # None for a model imported from elsewhere
    train: TrainConfig | None = field(default_factory=TrainConfig)
    fingerprints: dict = field(default_factory=dict)  # hashes of the data files, to detect later changes
    budget: dict = field(default_factory=dict)  # how the budget-aware default sized the model (fournil.train.sizing)
    finetune: FinetuneConfig | None = None  # for a fine-tuned model: its base and how it was tuned
    align: AlignConfig | None = None  # for a model tuned on preferences (or a reward model): how
    distill: DistillConfig | None = None  # for a student distilled from a teacher: which, and how

    @property
    def scores_answers(self) -> bool:
        """A reward model's: its body learned to score answers, through a head of its own, and writes none."""
        return bool(self.align and self.align.method == "reward")

    def __post_init__(self):
        if isinstance(self.model, str):
            self.model = {"family": self.model}
        if not isinstance(self.model, dict):
            raise FournilError(f"model={self.model!r}: give a family's name ('gpt') or its settings "
                               f"({{'family': 'gpt', 'n_layer': 4}})")


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, values: dict, what: str):
    """Build dataclass ``cls`` from ``values``, with a clear error on unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FournilError(f"unknown {what} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FournilError(f"the {what} settings need {', '.join(missing)}")
    check_types(cls, values, what)
    return cls(**values)


KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a text"}


@functools.cache
def field_types(cls) -> dict:
    """A dataclass's fields' types, resolved once: the settings of each of 20,000 samples are checked, and resolving
    them every time took 5 of the 23 seconds."""
    return typing.get_type_hints(cls)


def check_types(cls, values: dict, what: str) -> None:
    """A clear error for a setting of the wrong type (a recipe's ``steps = "ten"``, a JSON's ``"n_layer": 2.5``),
    before it fails deep inside the model or the training loop."""
    hints = field_types(cls)
    for key, value in values.items():
        if key in hints and not fits(hints[key], value):
            raise FournilError(f"{what} setting {key} = {value!r}: expected {described(hints[key])}")


def section(value, cls, name: str, what: str, example: str = "", required: bool = False):
    """``value``, a ``cls`` whose settings have their types (or None, unless ``required``): from Python, a section of
    another kind (``lora=True``, ``train={"steps": 5}``) failed deep inside, with an AttributeError."""
    if value is None and not required:
        return None
    if not isinstance(value, cls):
        raise FournilError(f"{what} needs {name}={cls.__name__}(...), not {value!r}{example}")
    check_types(cls, vars(value), name)
    return value


def options(kind) -> tuple:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def fits(kind, value) -> bool:
    """Whether ``value`` can be a ``kind``: numbers for numbers (a whole one for an int, not a bool), lists for
    tuples; the nested sections and free-form dicts are checked where they are built."""
    for option in options(kind):
        if option is bool:
            ok = isinstance(value, bool)
        elif option in (int, float):
            ok = isinstance(value, numbers.Integral if option is int else numbers.Real) and not isinstance(value, bool)
        elif option in (str, type(None)):
            ok = isinstance(value, option)
        elif typing.get_origin(option) is tuple:
            parts = typing.get_args(option)
            ok = isinstance(value, (list, tuple)) and (parts[-1] is ... or len(value) == len(parts)) and \
                all(fits(parts[0], v) for v in value)
        else:
            ok = True
        if ok:
            return True
    return False


def described(kind) -> str:
    said = []
    for option in [o for o in options(kind) if o is not type(None)]:  # (TOML has no null to write)
        if typing.get_origin(option) is tuple:
            parts = typing.get_args(option)
            count = "" if parts[-1] is ... else f"{len(parts)} "
            said.append(f"a list of {count}{KINDS.get(parts[0], parts[0].__name__).removeprefix('a ')}s")
        else:
            said.append(KINDS.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(said)


def coerce(cls, key: str, text: str):
    """Parse ``text`` as the type of field ``key`` of dataclass ``cls`` (a model flag such as ``--n-embd 64``)."""
    hints = field_types(cls)
    if key not in hints:
        raise FournilError(f"{cls.__name__} has no setting {key!r}; known: {', '.join(sorted(hints))}")
    kind = hints[key]
    base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    target = base[0]
    try:
        if target is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return target(text)
    except ValueError:
        raise FournilError(f"{key}={text!r}: expected {KINDS.get(target, target.__name__)}") from None


STAGES = {"train": (), "finetune": ("finetune",), "align": ("finetune", "align"), "distill": ("distill",)}


def command_of(config: RunConfig) -> str:
    """The command that trains a run of ``config``, and continues it (``--resume``)."""
    if config.align:
        return "reward train" if config.align.method == "reward" else "align"
    return "distill" if config.distill else "finetune" if config.finetune else "train"


def read_recipe(path: str | Path, stage: str = "train") -> RunConfig:
    """A run's settings from a file: a recipe in TOML or YAML, or the ``config.json`` a run wrote, with the sections
    :class:`RunConfig` has. ``stage`` is the command that reads it: ``train`` (sections model, with its ``family``,
    data and train), ``finetune`` (and a finetune section), ``align`` (finetune and align) or ``distill``."""
    return recipe_config(recipe_sections(path, stage), path, stage)


def recipe_sections(path: str | Path, stage: str) -> dict:
    """The sections of a recipe file as they are written (a setting left out is not there), checked to be known."""
    path = Path(path)
    if not path.is_file():
        raise FournilError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise FournilError(f"--config {path}: a recipe is a .toml, .yaml or .json file")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
                import tomli as tomllib

            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(e) from None
    except ValueError as e:  # what TOML's, JSON's (and here YAML's) parse errors are
        raise FournilError(f"--config {path} does not parse: {' '.join(str(e).split())}") from None
    wanted = STAGES[stage]
    if not isinstance(raw, dict):
        raise FournilError(f"--config {path}: expected the sections {', '.join(('model', 'data', 'train') + wanted)}")
    if "model_type" in raw:  # (a folder's config.json, given for the folder)
        raise FournilError(f"--config {path} is a Hugging Face model's config ({raw['model_type']}), not a recipe: "
                           f"give the model's folder itself where a command takes a model (fournil finetune "
                           f"{typed(path.parent)}); a recipe (recipes/) or a run's config.json has the sections "
                           f"{', '.join(('model', 'data', 'train') + wanted)}")
    unknown = sorted(set(raw) - {"model", "data", "train", "fingerprints", "budget", "finetune", "align", "distill"})
    if unknown:
        raise FournilError(f"--config {path}: unknown section(s) {', '.join(unknown)}; a recipe has "
                           f"{', '.join(('model', 'data', 'train') + wanted)}")
    for name in ("model", "data", "train", "finetune", "align", "distill"):
        if not isinstance(raw.get(name) or {}, dict):
            raise FournilError(f"--config {path}: {name} must be a table of settings (name = value)")
    return raw


def recipe_config(raw: dict, path: str | Path, stage: str) -> RunConfig:
    """The settings of a recipe's ``raw`` sections, for the command ``stage``."""
    made_by = next((s for s, sections in reversed(STAGES.items()) if sections and all(raw.get(k) for k in sections)),
                   "train")
    if made_by != stage:
        raise FournilError(f"--config {path} is for fournil {made_by}: give it to fournil {made_by} --config")
    config = RunConfig(model=dict(raw.get("model") or {}), data=from_dict(DataConfig, raw.get("data") or {}, "data"),
                       train=from_dict(TrainConfig, raw.get("train") or {}, "train"))
    if stage != "train" and (files := [f for f in ("train", "val", "test") if getattr(config.data, f)]):
        raise FournilError(f"--config {path}: fournil {stage} splits one data set (split, seed): give it as data, "
                           f"not {', '.join(files)}")
    if stage == "train":
        config.model = config.model or {"family": "gpt"}
        if "family" not in config.model:
            raise FournilError(f"--config {path}: the model section needs a family (gpt, llama, mlp, ...)")
    if raw.get("finetune"):
        tuned = dict(raw["finetune"])
        if tuned.get("lora"):
            tuned["lora"] = from_dict(LoraConfig, {**tuned["lora"], "targets": tuple(tuned["lora"].get("targets", ()))},
                                      "lora")
        config.finetune = from_dict(FinetuneConfig, tuned, "finetune")
    if raw.get("align"):
        config.align = from_dict(AlignConfig, raw["align"], "align")
    if raw.get("distill"):
        config.distill = from_dict(DistillConfig, raw["distill"], "distill")
    return config
