"""Run directories (``runs/NAME/``) and the trained model they hold, as one object to sample, score, explain."""
from __future__ import annotations

import copy
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from fournil.checkpoint import read_safetensors, save_weights, write_json
from fournil.config import (AlignConfig, DataConfig, DistillConfig, FinetuneConfig, LoraConfig, RunConfig, TrainConfig,
                            command_of, from_dict, to_dict)
from fournil.data import load_splits, make_data
from fournil.data.shards import is_prepared
from fournil.device import generation_dtype, generation_weights, pick_device, pick_dtype, precision_text
from fournil.errors import FournilError, NotAChatModel, typed
from fournil.evaluate import evaluate_nll, explain_output, explain_text, output_scores
from fournil.generate import SamplingParams, complete
from fournil.generate.quantize import quantize, quantize_layers
from fournil.models import build_model
from fournil.tokenizers import load_tokenizer

RUNS = Path("runs")
CONFIG, WEIGHTS, TOKENIZER, METRICS, STATE = "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "train_state.safetensors"


def find_run(spec: str | Path) -> Path:
    """A run directory from a path or a name under ``runs/``."""
    path = Path(spec)
    if not path.exists() and (RUNS / path).exists():
        path = RUNS / path
    if path.is_file():
        raise FournilError(f"{spec} is a file but not a model: fournil reads .gguf files, and run directories and "
                           f"Hugging Face folders (give the folder, not a file in it)")
    if not path.is_dir():
        raise FournilError(f"no run directory or model {str(spec)!r}: give a run (e.g. runs/prenoms-gpt, see `ls runs/`), "
                           f"a .gguf file, a Hugging Face folder or a known model (smollm2)")
    return path


def anchored(spec: str | Path) -> str:
    """The model ``spec`` names, as a run records the model it starts from, to be found from any folder: a path (or a
    run under ``runs/``) made absolute, anything else as given (smollm2, layers:N, openai:NAME@URL). A LoRA run that
    recorded ``runs/base`` loaded only from the folder it was trained in."""
    from fournil.formats import KNOWN

    if str(spec) in KNOWN:  # (a known name wins over a folder of that name, as loading reads it)
        return str(spec)
    path = Path(spec).expanduser()
    if not path.exists() and (RUNS / path).exists():
        path = RUNS / path
    return os.path.abspath(path) if path.exists() else str(spec)


def latest_run() -> Path:
    """The run under ``runs/`` started last: what ``sample``, ``eval`` and ``embeddings`` read when given none."""
    found = [p.parent for p in RUNS.glob(f"*/{CONFIG}")]
    if not found:
        raise FournilError(f"no run under {RUNS}/ here: train one with `fournil train`, or give a run directory")
    path = max(found, key=lambda p: (p / CONFIG).stat().st_mtime)
    print(f"{path} (the run started last; give a run directory to choose another)", file=sys.stderr)
    return path


def split_names(names) -> tuple[str, ...]:
    """``names`` of a run's splits, as a tuple ("val" alone too), refused if one is not a split."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if unknown := [n for n in names if n not in ("train", "val", "test")]:
        raise FournilError(f"no split named {unknown[0]!r}: a run is scored on train, val or test")
    return names


def read_config(path: Path) -> RunConfig:
    file = path / CONFIG
    if not file.exists():
        if is_prepared(path):
            raise FournilError(f"{path} holds token shards (of fournil prepare), not a model: train one on them with "
                               f"`fournil train --data {path}`")
        if (path / TOKENIZER).is_file():
            raise FournilError(f"{path} holds a tokenizer, not a model: see where it cuts a text with `fournil "
                               f"tokenize TEXT --tokenizer {path}`, or train a model with it: `fournil train "
                               f"--tokenizer {path}`")
        raise FournilError(f"{path} has no {CONFIG}: fournil reads run directories, Hugging Face folders "
                           f"(config.json, *.safetensors, tokenizer.json) and .gguf files")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        data, train, tuned, align = raw.get("data"), raw.get("train"), raw.get("finetune"), raw.get("align")
        taught = raw.get("distill")
        if tuned:
            lora = tuned.get("lora") and from_dict(LoraConfig, {**tuned["lora"], "targets": tuple(tuned["lora"]["targets"])}, "lora")
            tuned = from_dict(FinetuneConfig, {**tuned, "lora": lora}, "finetune")
        return RunConfig(model=raw["model"], data=data and from_dict(DataConfig, data, "data"),
                         train=train and from_dict(TrainConfig, train, "train"), fingerprints=raw.get("fingerprints", {}),
                         budget=raw.get("budget", {}), finetune=tuned, align=align and from_dict(AlignConfig, align, "align"),
                         distill=taught and from_dict(DistillConfig, taught, "distill"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FournilError(f"{file} is damaged ({e}); train the run again") from None


class Run:
    """A model with its tokenizer: trained here (with the data it was trained on) or imported from a file."""

    def __init__(self, path: Path, config: RunConfig, model, tokenizer, source: dict, dtype: str = "auto"):
        self.path, self.config, self.tokenizer = path, config, tokenizer
        self.model = model.eval()  # for use (no dropout); training switches it back
        self.source = source  # format, architecture and stored dtype, for `fournil info`
        self.dtype = generation_dtype(model.device, dtype)
        self.measure_dtype = pick_dtype(model.device, dtype, measure=True)  # what scores are computed in
        self.quantized: str | None = None  # int8 or int4: the weights of the linear layers, once quantized

    @property
    def precision(self) -> str:
        text = precision_text(self.model.device, self.dtype, self.measure_dtype)
        return f"{text}, {self.quantized} weights" if self.quantized else text

    @classmethod
    def load(cls, spec: str | Path, device: str = "auto", dtype: str = "auto", merge: bool = True,
             weights: str | None = None) -> "Run":
        """A run directory, a GGUF file, a Hugging Face folder or a known model's name (``smollm2``). A LoRA run's
        adapter is folded into its base, unless ``merge`` is false: then the base with the adapter apart, as it
        trained, is also the base alone (:func:`fournil.models.lora.lora_disabled`). With ``weights``, the weights
        in that precision for generation (:meth:`quantize`)."""
        run = cls.read(spec, device, dtype, merge, weights)
        return run.quantize(weights) if weights else run

    @classmethod
    def read(cls, spec: str | Path, device: str, dtype: str, merge: bool, weights: str | None) -> "Run":
        """:meth:`load` up to :meth:`quantize`, which then finishes the work: on a CPU, a file's blocks are already
        in int8 or int4, each quantized as soon as it loaded, so that its weights are never all in fp32 at once
        (SmolLM2 in int4: a peak of 603 MiB instead of 1184; a 7B model's would be about 28 GiB)."""
        from fournil.formats import read_model, source_kind

        kind, path = source_kind(spec)
        dev = pick_device(device)
        if kind != "run":
            settings, tensors, tokenizer, source = read_model(kind, path)
            precision = generation_weights(dev, source.get("bits")) if weights == "auto" else weights
            streams = dev.type == "cpu" and precision in ("int8", "int4")
            loaded = partial(quantize_layers, precision=precision) if streams else None
            model = build_model(settings, tensors, str(path), loaded)
            return cls(path, RunConfig(model=settings, data=None, train=None), model.to(dev), tokenizer, source, dtype)
        path = find_run(spec)
        config = read_config(path)
        if config.finetune and config.finetune.lora:  # an adapter on its base model, folded in
            from fournil.formats.peft import ADAPTER_WEIGHTS, load_adapter
            from fournil.models.lora import merge_lora

            if not (path / ADAPTER_WEIGHTS).exists():
                raise FournilError(f"{path} is incomplete: it has no {ADAPTER_WEIGHTS} (fine-tuning stopped before its "
                                   f"first checkpoint); continue it with `fournil {command_of(config)} --resume "
                                   f"{path}`")
            if Path(config.finetune.base).is_absolute() and not Path(config.finetune.base).exists():  # (moved since)
                raise FournilError(f"{path} is an adapter on {config.finetune.base}, which is not there any more: "
                                   f"give the base where it is now, fournil merge BASE {typed(path)} OUT")
            base = cls.load(config.finetune.base, device)
            load_adapter(base.model, path)
            # (bits: none, since the adapter's updates are not on the file's grid: quantized again, they could be lost)
            source = {**base.source, "format": f"LoRA adapter on {config.finetune.base}", "bits": None}
            model = merge_lora(base.model) if merge else base.model
            return cls(path, config, model, load_tokenizer(path / TOKENIZER), source, dtype)
        for name in (TOKENIZER, WEIGHTS):
            if not (path / name).exists():
                raise FournilError(
                    f"{path} is incomplete: it has no {name} (training stopped before its first checkpoint); "
                    f"continue it with `fournil {command_of(config)} --resume {typed(path)}`"
                )
        model = build_model(config.model, read_safetensors(path / WEIGHTS)[0], str(path / WEIGHTS))
        source = {"format": "fournil run directory", "architecture": config.model["family"], "dtype": "float32"}
        return cls(path, config, model.to(dev), load_tokenizer(path / TOKENIZER), source, dtype)

    def save(self, out: Path) -> None:
        """Write the model as a run directory (how an imported model becomes one)."""
        out = Path(out)
        if (out / CONFIG).exists():
            raise FournilError(f"{out} already holds a model; choose another output")
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(out / TOKENIZER)
        save_weights(self.model, out / WEIGHTS)
        write_json(out / CONFIG, to_dict(self.config))

    def quantize(self, precision: str) -> Run:
        """Weights in ``precision`` (float32, bfloat16, int8, int4) for generation; ``auto``, on a CPU, in the bits of
        a quantized file (:func:`fournil.device.generation_weights`), else as they are (the device's precision then
        comes from autocast). Returns the run itself."""
        if precision == "auto":
            precision = generation_weights(self.model.device, self.source.get("bits"))
            if precision is None:
                return self
        quantize(self.model, precision)
        self.dtype = self.measure_dtype = torch.float32 if precision == "float32" else torch.bfloat16
        self.quantized = precision if precision.startswith("int") else None
        return self

    @property
    def mode(self) -> str:
        if self.config.data is not None and self.config.data.mode != "auto":
            return self.config.data.mode
        if self.model.family == "seq2seq":  # (imported)
            return "pairs"
        return "lines" if self.tokenizer.boundary_id is not None else "text"

    def splits(self):
        """The run's train/val/test splits, rebuilt from its data (which must not have changed since)."""
        if self.config.data is None:
            raise FournilError(f"{self.path} was imported, not trained here: it has no train/val/test data of its own; "
                               f"score it on a text with `fournil eval MODEL --data FILE` (or a bundled dataset: "
                               f"shakespeare...), on benchmarks with `fournil bench MODEL`, or token by token with "
                               f"`fournil explain MODEL TEXT`")
        splits, fingerprints = load_splits(self.config.data)
        if self.config.fingerprints and self.config.fingerprints != fingerprints:
            raise FournilError(f"the data of {self.path} changed since training ({self.config.data.data}); scores would not be comparable")
        return splits

    def data(self, names=("train", "val", "test")) -> dict:
        """The run's train/val/test sets, ready to score: tokenized text (the splits ``names`` holds), or rendered
        instruction examples."""
        if self.config.distill:
            from fournil.train.distill import distill_data

            return distill_data(self.config, self.tokenizer, announce=lambda _: None)
        if self.config.align:
            from fournil.train.align import load_alignment_data

            return load_alignment_data(self.config, self.tokenizer, announce=lambda _: None)
        if self.config.finetune:
            from fournil.data.instructions import load_instructions

            d = self.config.data
            return load_instructions(d.data, self.tokenizer, self.config.finetune.max_length, d.split, d.seed,
                                     announce=lambda _: None)
        return make_data(self.splits(), self.tokenizer, self.model.config.block_size, split_names(names))

    def answer_val_prompts(self, n: int, max_new_tokens: int = 96) -> list[tuple[str, str]]:
        """Greedy answers to the first ``n`` held-out prompts of a fine-tuning run: (the message answered, the answer);
        the system prompt and the chat template's markup are left out of the first."""
        if not self.config.finetune:
            raise FournilError(f"{self.path} was not fine-tuned on instructions: it has no held-out prompts to answer; "
                               f"sample it instead (Run.sample)")
        val = self.data()["val"]
        done = complete(self.model, self.tokenizer, val.prompts(n), SamplingParams(max_new_tokens, temperature=0),
                        self.dtype)
        return [(asked[-1]["content"] if asked else "", c.text) for asked, c in zip(val.prompt_messages(n), done)]

    def evaluate(self, names=("val", "test"), max_tokens: int | None = None, beam: int = 1) -> dict:
        """Average NLL per token (nats), perplexity, bits per character and per byte, for each split named (answer
        tokens only, for a fine-tuning run; target tokens for a seq2seq run, which also gets the exact-match accuracy
        and character error rate of its outputs, greedy or by a ``beam`` search), over about ``max_tokens`` of each
        (a seq2seq run: the outputs of the pairs scored), or all; for a run tuned on preferences, the scores of its
        method."""
        names = split_names(names)
        if max_tokens is not None and max_tokens < 1:
            raise FournilError(f"max_tokens={max_tokens}: score at least 1 token of each split (None: all of them)")
        if self.config.align:
            from fournil.train.align import evaluate_alignment

            return evaluate_alignment(self, names)
        data = self.data(names)
        return {n: self._scores(data[n], max_tokens, beam) for n in names}

    def _scores(self, data, max_tokens: int | None, beam: int = 1) -> dict:
        """The NLL of ``data`` (of its targets, for pairs: then also the exact match and character error rate of the
        outputs for the pairs whose targets were scored)."""
        scores = evaluate_nll(self.model, data, self.tokenizer, self.measure_dtype, max_tokens=max_tokens)
        if self.mode == "pairs":
            sources, targets = zip(*(data.pairs[i] for i in data.scored(max_tokens)))
            outputs = self.translate(list(sources), beam=beam, dtype=self.measure_dtype)
            scores.update(output_scores(outputs, list(targets)))
        return scores

    def score_text(self, data: str, max_tokens: int | None = None, beam: int = 1) -> tuple[str, dict]:
        """NLL per token, perplexity, bits per character and per byte of text other than the run's own, as llama.cpp's
        perplexity tool gives them for a file: a UTF-8 text file, whole, or a bundled dataset's test split (split as
        a run trained on it split it, else by default: what it never saw); at most its first ``max_tokens``. Read as
        the run reads its data: one document per line (a model of names), else running text in windows of the
        context; instructions as fine-tuning reads them (:meth:`score_answers`); a seq2seq run's (source, target)
        pairs as :meth:`evaluate` scores its own, outputs included. Returns what was scored, in words, and the
        scores."""
        from fournil.data.corpus import Splits, documents
        from fournil.data.instructions import is_instructions
        from fournil.data.pairs import GENERATED, PairData, is_pairs, read_pairs
        from fournil.data.sources import BUNDLED, read_text
        from fournil.models.base import decoder_only

        self.check_writes()
        if max_tokens is not None and max_tokens < 1:
            raise FournilError(f"--tokens {max_tokens}: score at least 1 token (leave it out for all of them)")
        if self.mode == "pairs":
            if not is_pairs(data):
                raise FournilError(f"{data}: a seq2seq model scores (source, target) pairs: give a .tsv file of "
                                   f"source<TAB>target lines, a .jsonl file of source and target records, or nombres")
            own = self.config.data if self.config.data and self.config.data.data == data else None
            pairs = load_splits(own or DataConfig(data, mode="pairs"))[0].test if data in GENERATED else \
                read_pairs(data)
            try:
                scored = PairData(pairs, self.tokenizer, "test")
            except FournilError as e:  # (a character the model never saw)
                raise FournilError(f"{data}: {e}") from None
            if scored.longest > (block := self.model.config.block_size):
                raise FournilError(f"{data}: a source or target of {scored.longest} tokens is longer than this model "
                                   f"reads ({block}): shorten or remove it")
            what = f"{data} (test split)" if data in GENERATED else Path(data).name
            return what, self._scores(scored, max_tokens, beam)
        decoder_only(self.model, "scoring a text")
        if is_instructions(data):
            return self.score_answers(data, max_tokens)
        mode = "lines" if self.mode == "lines" else "text"  # (a tuned model, of instructions or pairs: text)
        if data in BUNDLED:  # (split as the run split it, if it trained on it: its test split is then its own)
            own = self.config.data if self.config.data and self.config.data.data == data else None
            text = load_splits(own or DataConfig(data, mode=mode))[0].test
            what = f"{data} (test split)"
        else:
            text, what = read_text(data), Path(data).name
            text = documents(text) if mode == "lines" else text
            block = self.model.config.block_size
            if mode == "lines" and (long := [d for d in text if len(self.tokenizer.encode(d, strict=False)) >= block]):
                are = "is" if len(long) == 1 else "are"
                raise FournilError(f"{data}: {len(long):,} of its {len(text):,} lines {are} longer than this model "
                                   f"reads ({block - 1} tokens, its context but for the line's start), the first "
                                   f"{long[0][:40]!r}: shorten or remove them")
        try:
            scored = make_data(Splits(mode, None, None, text), self.tokenizer, self.model.config.block_size,
                               ("test",))["test"]
        except FournilError as e:
            raise FournilError(f"{data}: {e}") from None
        return what, evaluate_nll(self.model, scored, self.tokenizer, self.measure_dtype, max_tokens=max_tokens)

    def score_answers(self, data: str, max_tokens: int | None = None) -> tuple[str, dict]:
        """The NLL of an instruction set's answers (and of the tokens that end their turns), rendered by the model's
        chat template, as fine-tuning scores them: a bundled set's test split (split as a run tuned on it split it,
        else as fine-tuning splits by default), so that a base and the model tuned from it compare on the examples
        tuning never saw; a file's examples, all. Those longer than fine-tuning's default ``max_length`` (or the
        model's context) are left out, for every model alike."""
        from fournil.data.instructions import BUNDLED_INSTRUCTIONS, InstructionData, load_examples, pad_id
        from fournil.data.instructions import split_examples
        from fournil.train.finetune import DEFAULT_MAX_LENGTH, chat_tokenizer

        if not hasattr(self.tokenizer, "chat_text"):
            raise FournilError(f"{data} holds instructions, whose answers are scored in a chat template, and "
                               f"{self.path} is a character model (it knows only the characters of its data, and no "
                               f"way to end a turn): score it on text, and instructions with a model of byte-level "
                               f"tokens (smollm2)")
        own = self.config.data if self.config.data and self.config.data.data == data else DataConfig(data)
        max_length = min(DEFAULT_MAX_LENGTH, self.model.config.block_size)
        tokenizer, left_out = chat_tokenizer(copy.copy(self.tokenizer)), []  # (a template given here stays here)
        examples = load_examples(data, tokenizer, max_length, announce=left_out.append)
        what = f"{Path(data).name}: {len(examples):,} examples"
        if data in BUNDLED_INSTRUCTIONS:
            examples = split_examples(examples, own.split, own.seed, data)["test"]
            what = f"{data}: test split, {len(examples):,} examples"
        if left_out:
            what += f" (those longer than {max_length:,} tokens left out)"
        scored = InstructionData(examples, pad_id(tokenizer), "test")
        return what, evaluate_nll(self.model, scored, tokenizer, self.measure_dtype, max_tokens=max_tokens)

    def as_sources(self, sources: list[str]) -> list[str]:
        """``sources`` written as the run's data writes them, for a task made by code that has a way (nombres)."""
        from fournil.data.pairs import AS_SOURCE

        d = self.config.data
        written = AS_SOURCE.get(d.data) if d and d.train is None else None  # (--train FILE: the files' own sources)
        return [written(s) for s in sources] if written else sources

    def translate(self, sources: list[str] | str, beam: int = 1, params: SamplingParams | None = None,
                  dtype: torch.dtype | None = None) -> list[str] | str:
        """A seq2seq model's output for each source (for one source given alone, its output): greedy, sampled with
        ``params``, or by a ``beam`` search."""
        from fournil.generate.seq2seq import generate_targets

        if isinstance(sources, str):  # (not each of its characters as a source)
            return self.translate([sources], beam, params, dtype)[0]
        if not (isinstance(sources, (list, tuple)) and all(isinstance(s, str) for s in sources)):
            raise FournilError(f"give the sources to translate as a list of texts (got {str(sources)[:60]})")
        if self.model.family != "seq2seq":
            raise FournilError(f"translating a source needs a seq2seq model, and the model of {self.path} is "
                               f"{self.model.family}")
        if beam < 1:
            raise FournilError(f"--beam {beam}: give a width of 1 (greedy) or more")
        sources = self.as_sources(sources)
        return generate_targets(self.model, self.tokenizer, sources, params, beam, dtype or self.dtype)

    def check_writes(self) -> None:
        """Refuse to generate with a reward model, or to score text by its probabilities: its body learned to score
        answers, and the language head it kept no longer fits it."""
        if self.config.scores_answers:
            raise FournilError(f"{self.path} is a reward model: it scores answers (fournil reward score "
                               f"{typed(self.path)} --prompt ... --answer ...) and does not write them; use the model "
                               f"it was trained from, {self.config.finetune.base}")

    def sample(self, n: int = 20, prompt: str = "", temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """``n`` samples: whole documents (``lines`` data) or passages of running text, starting with ``prompt``."""
        if not isinstance(n, int) or n < 1:
            raise FournilError(f"n must be a whole number, at least 1 (got {n!r})")
        if not isinstance(prompt, str):
            raise FournilError(f"the prompt must be a text (got {type(prompt).__name__} {prompt!r})")
        if self.model.family == "seq2seq":  # (a TypeError from the decoder-only engine before)
            raise FournilError(f"{self.path} is a seq2seq model: it writes a target for a source, given with "
                               f"Run.translate(sources) (fournil sample RUN --prompt SOURCE)")
        self.check_writes()
        if max_new_tokens is None:
            max_new_tokens = 2 * self.model.config.block_size if self.mode == "lines" else 500
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed)
        done = complete(self.model, self.tokenizer, [self.tokenizer.prompt_ids(prompt)] * n, params, self.dtype,
                        truncate=True)
        return [prompt + c.text for c in done]

    def chat(self, messages: str | list[dict], max_new_tokens: int = 256, temperature: float = 0.7,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
        """The answer to a conversation, as `fournil chat` gives it (with its defaults): a user's message, or
        OpenAI-style messages, ``[{"role": "system" | "user" | "assistant", "content": text}, ...]``, read as the
        server reads them (a content of parts of text, the developer's role as the system's)."""
        from fournil.generate.answerers import Local
        from fournil.serve.schemas import Message

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        try:
            if not (isinstance(messages, list) and messages):
                raise ValueError(messages)
            messages = [Message.model_validate(m).model_dump() for m in messages]
        except ValueError:  # (pydantic's ValidationError is one)
            raise FournilError(f"give a message as text, or the conversation as a list of {{'role': system|user|"
                               f"assistant, 'content': text (or parts of type 'text')}} (got {str(messages)[:60]})") \
                from None
        self.check_writes()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed)
        try:
            return "".join(Local(self).chat(messages, params))
        except NotAChatModel as e:
            raise FournilError(f"{self.path}: {e}; Run.sample(prompt=...) continues a text") from None

    def info(self) -> dict:
        """What `fournil info` shows."""
        c = self.model.config
        files = [self.path] if self.path.is_file() else [  # the model's: not its training state, logs and pictures
            p for p in self.path.iterdir() if p.is_file() and p.name != STATE and p.suffix in (".safetensors", ".json")]
        size = sum(p.stat().st_size for p in files)
        adapter = bool(self.config.finetune and self.config.finetune.lora)  # (the base's dtype, the adapter's files)
        # each family's own; a llama's heads need not be n_embd / n_head wide (Qwen3-0.6B's are 128, not 1024 / 16)
        shape = {k: getattr(c, k) for k in ("n", "context", "cell", "n_layer", "n_head", "n_kv_head", "n_embd",
                                            "head_dim", "intermediate_size", "n_hidden") if hasattr(c, k)}
        named = self.source["architecture"] not in (self.model.family, "gpt2")  # (not "llama (llama, ...)")
        return {
            "model": f"{self.model.family} ({self.source['architecture'] + ', ' if named else ''}from a "
                     f"{self.source['format']})"
                     + ("; a reward model: a score head on it rates answers" if self.config.scores_answers else ""),
            "parameters": f"{self.model.num_params():,}",
            "shape": ", ".join(f"{k} {v}" for k, v in shape.items()),
            "vocabulary": f"{self.tokenizer.vocab_size:,} tokens",
            "context": f"{self.model.reads:,} token{'s' * (self.model.reads != 1)}",
            "stored dtype": self.source["dtype"] + (" (the base; the adapter: float32)" if adapter else ""),
            "size on disk": on_disk(size) + (f" (the adapter; the base: {self.config.finetune.base})" if adapter
                                             else ""),
            "chat template": "yes" if getattr(self.tokenizer, "chat_template", None) else "no",
        }

    def explain(self, text: str, top: int = 5, question: str | None = None) -> dict:
        """Each token's probability given the ones before, and the ``top`` the model expected there (with ``question``,
        of ``text`` as a chat model's answer to it); for a seq2seq model, of what it writes for the source ``text``."""
        self.check_writes()
        if self.model.family == "seq2seq":
            if question is not None:
                raise FournilError(f"{self.path} is a seq2seq model: it is explained on what it writes for a source, "
                                   f"not on an answer to a question: leave --question out")
            return explain_output(self.model, self.tokenizer, text, self.measure_dtype, top)
        return explain_text(self.model, self.tokenizer, text, self.measure_dtype, top, question)


def on_disk(size: float) -> str:
    """A size in bytes as people read it: a count table's 3.0 KiB, not 0.0 MiB."""
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def load(spec: str | Path, device: str = "auto", dtype: str = "auto") -> Run:
    """Load a model: a run (a path, or a name under ``runs/``), a GGUF file, a Hugging Face folder or a known name."""
    return Run.load(spec, device, dtype)
