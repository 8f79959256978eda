"""Distillation: a smaller student trained to imitate a teacher, and a report of what the trade costs and buys.

Logit distillation (Hinton et al. 2015) matches the teacher's softened next-token distributions at every position;
sequence-level distillation (Kim and Rush 2016) has the teacher answer prompts through the generation engine and the
student learn those answers. The student is the teacher's embeddings with a subset of its layers (``layers:N``), a
model config trained from scratch, or a run of yours; it must share the teacher's tokenizer. The same student is
trained for the same steps without the teacher, so that the report shows what the teacher added.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from fournil.checkpoint import read_state_info
from fournil.config import DataConfig, DistillConfig, RunConfig, TrainConfig, section
from fournil.data import load_splits, make_data
from fournil.data.instructions import InstructionData, is_instructions, load_instructions, pad_id, render_example
from fournil.device import dtype_name, generation_weights
from fournil.errors import FournilError
from fournil.evaluate import evaluate_nll
from fournil.formats import source_kind
from fournil.generate import SamplingParams, complete
from fournil.generate.answerers import Remote, is_remote
from fournil.models import build_model
from fournil.models.base import decoder_only
from fournil.runs import CONFIG, STATE, Run, anchored, find_run, read_config
from fournil.train.distributed import join, leave
from fournil.train.objectives import Distillation, packing
from fournil.train.trainer import (Trainer, budget_left, check_fits, eval_every, eval_tokens, new_run_dir, resumed,
                                   validating)

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_CONTEXT, MAX_ANSWER = 100, 8, 1e-3, 256, 256
REPORT, BASELINE, ANSWERS = "report.md", "baseline", "teacher_answers.jsonl"


def teacher_layers(teacher, n: int) -> tuple[dict, dict]:
    """A student of ``n`` of the teacher's layers, evenly spaced from the first to the last, with its embeddings and
    final norm: its settings and its weights."""
    if teacher.family not in ("gpt", "llama"):  # an RNN's layers read what the layer below gives: none can go
        raise FournilError(f"layers:{n} keeps some of a transformer's layers (gpt, llama), and the teacher is "
                           f"{teacher.family}: give the student as a model config .json, or a run")
    settings = {**teacher.config.__dict__, "family": teacher.family}
    total = settings["n_layer"]
    if not 1 <= n < total:
        if total == 1:
            raise FournilError(f"layers:{n}: the teacher has one layer, none to leave out: give --student a model "
                               f"config .json (fewer heads, a narrower width)")
        keeps = "1" if total == 2 else f"from 1 to {total - 1}"
        raise FournilError(f"layers:{n}: a student keeps {keeps} of the teacher's {total} layers: give --student "
                           f"layers:{total // 2}, say")
    keep = [round(i * (total - 1) / (n - 1)) for i in range(n)] if n > 1 else [total - 1]
    renumber = {old: new for new, old in enumerate(keep)}
    weights = {}
    for name, value in teacher.state_dict().items():
        found = re.search(r"\.(layers|h)\.(\d+)\.", name)
        if not found:
            weights[name] = value.clone()
        elif int(found.group(2)) in renumber:
            weights[name[: found.start(2)] + str(renumber[int(found.group(2))]) + name[found.end(2) :]] = value.clone()
    return {**settings, "n_layer": n}, weights


def default_student(teacher) -> str:
    """layers:4 (SmolLM2's 30 layers: a student of 42 M of its 135 M parameters), or half the layers of a teacher of
    fewer than 8, such as a run of the ladder; a teacher of one layer, or of no layers, is refused by name."""
    layers = getattr(teacher.config, "n_layer", 0)
    return f"layers:{max(1, min(4, layers // 2))}"


def build_student(spec: str, teacher_run: Run):
    """The student model ``spec`` names (``layers:N``, a JSON model config, or a run), and its settings."""
    teacher, vocab = teacher_run.model, teacher_run.tokenizer.vocab_size
    if spec.startswith("layers:"):
        if not (found := re.fullmatch(r"layers:(\d+)", spec)):
            raise FournilError(f"--student {spec}: layers:N takes a whole number of the teacher's layers, e.g. layers:4")
        settings, weights = teacher_layers(teacher, int(found.group(1)))
        return build_model(settings, weights, spec), settings
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise FournilError(f"--student {spec}: no such file")
        try:
            settings = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FournilError(f"--student {spec} is not JSON ({e}): write the model's settings as an object, such as "
                               f'{{"family": "llama", "n_layer": 2, "n_embd": 64}}') from None
        if not isinstance(settings, dict):
            raise FournilError(f"--student {spec} holds a {type(settings).__name__}: write the model's settings as an "
                               f'object, such as {{"family": "llama", "n_layer": 2, "n_embd": 64}}')
        if settings.get("vocab_size", vocab) != vocab:
            raise FournilError(f"--student {spec} has a vocabulary of {settings['vocab_size']:,} tokens and the teacher "
                               f"{vocab:,}: a student must share the teacher's tokenizer")
        settings = {"block_size": teacher.config.block_size, **settings, "vocab_size": vocab}
        settings.setdefault("family", teacher.family)
        check_fits(settings, torch.device("cpu"))  # (where its weights are drawn)
        return build_model(settings), settings
    student_run = Run.load(spec, "cpu")
    student_run.check_writes()
    if not same_tokenizer(student_run.tokenizer, teacher_run.tokenizer):
        raise FournilError(f"--student {spec} has another tokenizer than the teacher ({student_run.tokenizer.vocab_size:,} "
                           f"and {vocab:,} tokens): the distributions must be over the same tokens; build the student "
                           f"with layers:N or a model config instead")
    return student_run.model, student_run.config.model


def same_tokenizer(a, b) -> bool:
    return a.vocab_size == b.vocab_size and all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size))


def distill_data(config: RunConfig, tokenizer, announce=print) -> dict:
    """Running text cut into rows of ``context`` tokens, or instruction examples (the loss on their answers)."""
    d, taught = config.data, config.distill
    if is_instructions(d.data):
        from fournil.train.finetune import chat_tokenizer

        return load_instructions(d.data, chat_tokenizer(tokenizer), taught.context, d.split, d.seed, announce,
                                 flag="--context")
    return make_data(load_splits(d)[0], tokenizer, taught.context, flag="--context")


def teacher_answers(teacher, tokenizer, data: dict, n: int, run_dir: Path, announce=print) -> InstructionData:
    """Sequence-level distillation's training set: the teacher's greedy answers to ``n`` training prompts, in the
    student's tokens (also written to ``RUN/teacher_answers.jsonl``, to read, and to resume from). A teacher loaded
    here answers through the engine, all prompts batched; a remote one (``openai:...``) in its own chat template."""
    params = SamplingParams(MAX_ANSWER, temperature=0)
    if isinstance(teacher, Run):
        prompts = data["train"].prompts(n)
        announce(f"the teacher answers {len(prompts):,} training prompts")
        done = complete(teacher.model, tokenizer, prompts, params, teacher.dtype)
        pairs = [(tokenizer.decode(p), p, c.tokens + ([c.stop_token] if c.stop_token is not None else []), c.text)
                 for p, c in zip(prompts, done)]
    else:
        pairs = []
        conversations = data["train"].prompt_messages(n)
        announce(f"{teacher} answers {len(conversations):,} training prompts")
        for messages in conversations:
            text = "".join(teacher.chat(messages, params))
            ids, learned = render_example(tokenizer, [*messages, {"role": "assistant", "content": text}])
            cut = learned.index(True)
            pairs.append((tokenizer.decode(ids[:cut]), ids[:cut], ids[cut:], text))
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ANSWERS).open("w", encoding="utf-8") as f:
        for prompt, _, _, text in pairs:
            f.write(json.dumps({"prompt": prompt, "answer": text}, ensure_ascii=False) + "\n")
    return InstructionData([(p + a, [False] * len(p) + [True] * len(a)) for _, p, a, _ in pairs], pad_id(tokenizer),
                           "train")


def distill(teacher: str = "smollm2", student: str | None = None, data: str | DataConfig | None = None,
            settings: DistillConfig | None = None, train: TrainConfig | None = None, out: str | None = None,
            resume: str | None = None, budget: dict | None = None, baseline: bool = True, progress: bool = True,
            announce=print, api_key_env: str = "OPENAI_API_KEY") -> Run:
    """Distil ``teacher`` into ``student`` on ``data`` (running text, lines or an instruction set; by default what the
    teacher run was trained on, or Shakespeare); with ``baseline``, also train the same student without the teacher
    (in ``RUN/baseline``). ``teacher``, ``student`` and ``baseline`` are ``settings``'s where it is given, and a
    resumed run's own. Returns the run; its report, printed, is ``RUN/report.md``. A remote teacher
    (``openai:NAME@URL``, its key in ``api_key_env``) answers prompts for sequence-level distillation; its tokenizer is
    then the student's."""
    world = join()
    try:
        if resume:
            run_dir, config = resumed(resume, budget, "distill")
        else:
            settings = section(settings, DistillConfig, "settings", "fournil.distill") or \
                DistillConfig(teacher=teacher, student=student, baseline=baseline)
            settings = dataclasses.replace(settings, teacher=anchored(settings.teacher),  # (a Path from Python too)
                                           student=settings.student and anchored(settings.student))
            settings.check()
            t = section(train, TrainConfig, "train", "fournil.distill") or TrainConfig()
            t.check()
            steps = t.steps if (t.steps or t.time) else DEFAULT_STEPS
            t = dataclasses.replace(t, steps=steps, batch_size=t.batch_size or DEFAULT_BATCH, lr=t.lr or DEFAULT_LR)
            t = dataclasses.replace(t, eval_every=eval_every(t, adapting=True))
            data = section(student_data(data, settings.teacher), DataConfig, "data", "fournil.distill")
            config = RunConfig(model={"family": "student"}, data=data, train=t, distill=settings)
            run_dir = new_run_dir(config, out)
        taught = config.distill
        remote = is_remote(taught.teacher)
        if remote:  # the student's own run gives the tokenizer and the context; the remote gives answers
            teacher = remote_teacher(taught, api_key_env, bool(resume))
            teacher_run = Run.load(taught.student, config.train.device)
        else:
            teacher = teacher_run = Run.load(taught.teacher, config.train.device)
            teacher_run.check_writes()  # a reward model's next-token distributions mean nothing to imitate
            if taught.student is None:
                config.distill = taught = dataclasses.replace(taught, student=default_student(teacher_run.model))
        run, splits = train_student(config, teacher_run, run_dir, bool(resume), world, progress, announce, teacher)
        if not world.main:
            return None
        if remote:
            runs = {"student before": Run.load(taught.student, config.train.device), "distilled student": run}
        else:
            if any(p.dtype != torch.float32 for p in teacher_run.model.parameters()):  # rounded for training: reload
                teacher_run = Run.load(taught.teacher, config.train.device)
            runs = {"teacher": teacher_run, "distilled student": run}
        measured = {"distilled student": best_val(run_dir)}
        if taught.baseline:
            # the steps the distilled student took: under a time budget, one that needs no teacher would take more
            steps = read_state_info(run_dir / STATE)["step"]
            announce(f"the same student, the same {steps} steps, without the teacher:")
            alone = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps, time=None),
                                        distill=dataclasses.replace(taught, alpha=0.0, sequences=0, baseline=False))
            base_dir = run_dir / BASELINE
            runs["student without teacher"] = train_student(alone, teacher_run, base_dir, resume and (base_dir / CONFIG).exists(),
                                                            world, progress, announce, teacher, splits)[0]
            measured["student without teacher"] = best_val(base_dir)
        text = report(runs, splits["val"], config.train.eval_tokens, measured)
        (run_dir / REPORT).write_text(text, encoding="utf-8")
        announce(text)
        return run
    finally:
        leave(world)


def student_data(data: str | DataConfig | None, teacher: str) -> DataConfig:
    """``data`` read as ``fournil train`` reads it (lines or running text), in the teacher's tokens; by default the
    teacher run's own data, in its mode and split (a names model distils on names), or Shakespeare."""
    if isinstance(data, DataConfig):  # a recipe's, with its mode and split
        return dataclasses.replace(data, tokenizer="teacher")
    if data is None and not is_remote(teacher) and source_kind(teacher)[0] == "run":
        own = read_config(find_run(teacher)).data
        if own:
            return dataclasses.replace(own, tokenizer="teacher")
    return DataConfig(data=data or "shakespeare", mode="auto", tokenizer="teacher")


def remote_teacher(taught: DistillConfig, api_key_env: str, resume: bool):
    """The remote teacher, after checking what it can teach: answers (not distributions), to a student of its own."""
    if not taught.sequences or taught.alpha:
        raise FournilError(f"{taught.teacher} gives answers, not next-token distributions: distil it with "
                           f"--sequences N --kd-weight 0")
    if taught.student is None:
        raise FournilError(f"{taught.teacher} shares neither its weights nor its tokenizer: give --student, the model "
                           f"to train (a run, .gguf file, Hugging Face folder or smollm2)")
    if taught.student.startswith("layers:") or taught.student.endswith(".json"):
        raise FournilError(f"--student {taught.student} is built from a teacher's weights or tokenizer, which "
                           f"{taught.teacher} does not share: give a model to train (a run, .gguf file, Hugging Face "
                           f"folder or smollm2)")
    return None if resume else Remote(taught.teacher, api_key_env)  # resumed: its answers are on disk


def train_student(config: RunConfig, teacher_run: Run, run_dir: Path, resume: bool, world, progress: bool, announce,
                  teacher=None, data: dict | None = None):
    """Train the student ``config`` describes (or continue it): the trained run and the data. ``teacher_run`` gives
    the tokenizer and the context; the answers of sequence-level distillation come from ``teacher`` (``teacher_run``
    unless the teacher is remote). ``data``: the splits, when another student of the same run has read them (the
    baseline: reading Les Misérables again in a BPE's tokens took 3.5 s of a 17 s course step)."""
    decoder_only(teacher_run.model, "distillation")  # (of next-token distributions over a text, or of answers)
    tokenizer, context = teacher_run.tokenizer, teacher_run.model.config.block_size
    if config.distill.context is None:  # written so, to be resumed and read the same
        config.distill = dataclasses.replace(config.distill, context=min(DEFAULT_CONTEXT, context))
    taught = config.distill
    if taught.context > context:
        raise FournilError(f"--context {taught.context} is longer than the teacher's context of {context}")
    data = data or distill_data(config, tokenizer, announce)
    splits = dict(data)
    if taught.sequences:
        if not is_instructions(config.data.data):
            raise FournilError("--sequences needs an instruction set to take prompts from (rasbt_instructions, ...)")
        splits["train"] = load_answers(run_dir / ANSWERS, tokenizer) if resume else \
            teacher_answers(teacher or teacher_run, tokenizer, data, taught.sequences, run_dir, announce)
    examples = splits["train"] if isinstance(splits["train"], InstructionData) else None
    if config.train.eval_tokens is None:  # (then written, to be resumed and read the same)
        config.train = dataclasses.replace(config.train, eval_tokens=eval_tokens(config.train, examples))
    torch.manual_seed(config.train.seed)
    model, config.model = build_student(taught.student, teacher_run)
    decoder_only(model, "a distilled student")
    if model.counts_only:  # (it said it had no counts yet)
        raise FournilError("an ngram student is counted, not taught: a student learns a teacher's distributions by "
                           "gradients; give it as a gpt, llama, mlp or rnn model config")
    objective = Distillation(teacher_run.model, taught.temperature, taught.alpha, taught.reverse,
                             **packing(splits["train"], model, teacher_run.model)) if taught.alpha else None
    trainer = Trainer(run_dir, config, None, tokenizer, progress, world, model=model, data=splits, objective=objective)
    if taught.alpha and trainer.dtype != torch.float32:  # the teacher only reads: its weights in the fast precision
        teacher_run.model.to(trainer.dtype)
    t = config.train
    how = f"temperature {taught.temperature:g}, alpha {taught.alpha:g}{', reverse KL' if taught.reverse else ''}" \
        if taught.alpha else "no teacher"
    about = f"{taught.student}, taught by {taught.teacher}" if is_remote(taught.teacher) else \
        f"{taught.student} of {taught.teacher}, {teacher_run.model.num_params():,}"
    announce(f"a student of {model.num_params():,} parameters ({about}) on {config.data.data}{' answered by the teacher' if taught.sequences else ''}"
             f", {how}; {budget_left(t, run_dir, resume)}, batch {t.batch_size}, lr {t.lr:g}"
             f"{validating(splits['val'], t.eval_tokens, 'examples') if examples is not None else ''}; "
             f"{trainer.precision} -> {run_dir}")
    trainer.fit(resume=resume)
    return (trainer.finish() if world.main else None), data


def load_answers(path: Path, tokenizer) -> InstructionData:
    """The teacher's answers written by a run that is being resumed."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        p, a = tokenizer.encode(row["prompt"]), tokenizer.encode(row["answer"])
        examples.append((p + a, [False] * len(p) + [True] * len(a)))
    return InstructionData(examples, pad_id(tokenizer), "train")


def decode_speed(run: Run, weights: str | None, new_tokens: int = 64) -> float:
    """Greedy decoding tokens per second of one sequence from nothing (after a short warm-up), with the run's weights
    loaded again in ``weights`` (int8, int4) if given: any model has the tokens of that prompt."""
    if weights:
        run = Run.load(run.path, str(run.model.device), weights=weights)
    prompt = run.tokenizer.prompt_ids("")
    complete(run.model, run.tokenizer, [prompt], SamplingParams(4, temperature=0, ignore_eos=True), run.dtype)
    start = time.perf_counter()
    complete(run.model, run.tokenizer, [prompt], SamplingParams(new_tokens, temperature=0, ignore_eos=True), run.dtype)
    return new_tokens / (time.perf_counter() - start)


def best_val(run_dir: Path) -> float:
    """The val NLL of the weights a student's training kept, as that training measured it: on the report's tokens, in
    the report's precision (measuring it again took a third of the report's time on SmolLM2's students)."""
    return read_state_info(run_dir / STATE)["best_val"]


def report(runs: dict[str, Run], val, max_tokens: int, measured: dict[str, float]) -> str:
    """Parameters, size on disk, decode speed and val NLL of each model, as a Markdown table (the NLLs ``measured``
    already, by name, are not measured again). Every model decodes with its weights in the precision generation gives
    the first one (on a CPU, SmolLM2's Q4_1 file in int4): like with like, at the first one's speed for a user. In
    fp32 as stored, SmolLM2's layers:4 students showed 3.3 times its speed in fp32, yet at 60 tokens/s decoded slower
    than it does in int4 (78); in int4 they decode 4.9 times as fast as it."""
    first = next(iter(runs.values()))
    weights = generation_weights(first.model.device, first.source.get("bits"))
    rows = []
    for name, run in runs.items():
        files = [run.path] if run.path.is_file() else [p for p in run.path.glob("*.safetensors") if p.name != "train_state.safetensors"] + list(run.path.glob("*.gguf"))
        size = sum(p.stat().st_size for p in files) / 2**20
        nll = measured[name] if name in measured else \
            evaluate_nll(run.model, val, run.tokenizer, run.measure_dtype, max_tokens=max_tokens)["nll"]
        rows.append((name, run.model.num_params(), size, run.source["dtype"], decode_speed(run, weights), nll))
    teacher = rows[0]
    decoding = weights or dtype_name(first.dtype)
    lines = [f"| model | parameters | size on disk | decode tokens/s ({decoding}) | val NLL |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, params, size, dtype, speed, nll in rows:
        lines.append(f"| {name} | {params:,} ({params / teacher[1]:.2f}x) | {size:.1f} MiB ({dtype}) | {speed:.1f} "
                     f"({speed / teacher[4]:.2f}x) | {nll:.4f} |")
    return "\n".join(lines) + "\n"
