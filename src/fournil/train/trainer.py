"""The training loop: one loop for every model, with the objective plugged in.

AdamW (or Muon for the hidden matrices) with weight decay on matrices only, linear warmup then cosine decay over
the budget (steps or seconds), gradient clipping, periodic validation that keeps the best weights, and an atomic
training state for ``--resume``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fournil.checkpoint import (LOCK, held, load_state, read_state_info, save_state, save_tensors, save_weights,
                                write_json)
from fournil.config import DataConfig, RunConfig, TrainConfig, command_of, section, to_dict
from fournil.cores import computing
from fournil.data import load_splits, make_data
from fournil.data.batches import frame_ids
from fournil.data.shards import Shards, made_with
from fournil.data.sources import BUNDLED
from fournil.device import (activation_budget, autocast, matmul_rate, memory_size, model_width, pick_device,
                            pick_dtype, precision_text, prepare_compile)
from fournil.errors import FournilError, named, typed
from fournil.models import (DEFAULTS, FAMILIES, TEXT_BLOCK_SIZE, build_model, check_settings, config_class,
                            parameter_count)
from fournil.plots import plot_loss
from fournil.runs import CONFIG, METRICS, RUNS, STATE, TOKENIZER, WEIGHTS, Run, find_run, read_config
from fournil.tokenizers import CharTokenizer, load_tokenizer
from fournil.tokenizers.bpe import bpe_size, train_bpe
from fournil.tokenizers.hf import CONFIG_NAME as HF_TOKENIZER_CONFIG
from fournil.train import sizing
from fournil.train.distributed import World, full_state, join, leave, load_full_state, shard
from fournil.train.metrics import MetricsLog
from fournil.train.muon import Muon, hidden_matrices
from fournil.train.objectives import NextTokenPrediction, packing, weight
from fournil.train.progress import Progress

LOG_EVERY = 10
PRETRAIN_EVAL_EVERY = 250
PRETRAIN_EVAL_TOKENS = 250_000
ADAPTING_EVAL_SHARE, ADAPTING_EVAL_FLOOR = 1 / 8, 4096
PASS_TOKENS = 1024  # tokens per forward pass when saving memory: smaller transient tensors, a smaller heap


def activation_bytes(config, tokens: int, dtype: torch.dtype) -> float:
    """About what a Transformer keeps for the backward pass of ``tokens`` tokens: 34 bytes per token, layer and unit
    of width in 16-bit precision (Korthikanti et al. 2022, with fused attention), twice that in fp32."""
    return 34 * tokens * config.n_layer * config.n_embd * (2 if dtype == torch.float32 else 1)


def batch_passes(batch_size: int, rows: int, width: int, save_above: float) -> tuple[bool, int]:
    """Whether a batch of ``batch_size`` examples (of ``rows`` rows of ``width`` tokens each) saves memory, and how many
    examples one forward pass reads. A batch of more than ``save_above`` tokens is read in passes of at most
    PASS_TOKENS tokens (8 examples of 512 tokens: 2 at a time, their losses weighted so that the step's gradient is
    the whole batch's), its layers recomputed in the backward pass; a smaller one is read whole."""
    if batch_size * rows * width <= save_above:
        return False, batch_size
    return True, max(1, min(batch_size, PASS_TOKENS // (rows * width)))


def new_run_dir(config: RunConfig, out: str | None) -> Path:
    """``out``, or ``runs/DATA-MODEL``; never a folder that holds a run already (a run is never silently renamed
    nor overwritten)."""
    if out:
        path = Path(out)
    else:
        data = config.data.data if config.data.data in BUNDLED else named(config.data.data)
        path = RUNS / f"{data}-{config.model['family']}"
    if (path / CONFIG).exists():
        raise taken(path)
    return path


def taken(path: Path) -> FournilError:
    return FournilError(f"{path} already holds a run: continue it with --resume {typed(path)}, or start another "
                        f"with --out {another(path)} (or delete {path})")


def another(path: Path) -> str:
    return typed(path.parent / (path.name + "-2"))


def complete_config(config: RunConfig, splits, tokenizer, world: World) -> RunConfig:
    """Fill what the user left open: sizes for this model and data, vocabulary, context length, budget, and the
    gradient accumulation that makes ``batch_tokens`` tokens per optimizer step over all processes."""
    family = config.model["family"]
    if (family == "seq2seq") != (splits.mode == "pairs"):
        raise FournilError(f"{config.data.data} holds (source, target) pairs: train a seq2seq model on it (--model seq2seq)"
                           if splits.mode == "pairs" else f"a seq2seq model learns from (source, target) pairs: give "
                           f"--data nombres, or a .jsonl/.tsv file of pairs ({config.data.data} is {splits.mode} data)")
    model_defaults, train_defaults = DEFAULTS[(family, splits.mode)]
    settings = {**model_defaults, **config.model, "vocab_size": tokenizer.vocab_size}
    fields = {f.name for f in dataclasses.fields(config_class(family))}
    if "boundary_id" in fields:
        settings["boundary_id"] = tokenizer.boundary_id
    if family == "seq2seq":
        settings["bos_id"], settings["eos_id"] = frame_ids(tokenizer)
    if settings.get("block_size") is None:
        if splits.mode == "lines":  # room for the longest document of any split
            settings["block_size"] = max(len(d) for _, part in splits.items() for d in part) + 1
        elif splits.mode == "pairs":  # the longest source, or target after its start token
            settings["block_size"] = max(max(len(s), len(t) + 1) for _, part in splits.items() for s, t in part)
        else:
            settings["block_size"] = TEXT_BLOCK_SIZE
    t = config.train
    if t.optimizer not in (None, "adamw", "muon"):
        raise FournilError(f"optimizer {t.optimizer!r} is not one fournil has: choose adamw or muon")
    if t.optimizer == "muon" and t.fsdp:
        raise FournilError("Muon orthogonalizes whole matrices, which FSDP splits across processes: "
                           "train with --optimizer adamw under --fsdp")
    default_optimizer = train_defaults.get("optimizer", "adamw")
    optimizer = t.optimizer or ("adamw" if t.fsdp else default_optimizer)
    tuned = train_defaults if optimizer == default_optimizer else {}  # a default weight decay goes with its optimizer
    batch_size = t.batch_size or train_defaults["batch_size"]
    grad_accum = t.grad_accum
    if t.batch_tokens:
        train_docs = splits.train if splits.mode == "lines" else None
        per_sequence = sum(map(len, train_docs)) / len(train_docs) + 1 if train_docs else settings["block_size"]
        grad_accum = max(1, round(t.batch_tokens / (batch_size * per_sequence * world.size)))
    train = dataclasses.replace(
        t,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=t.lr or train_defaults["lr"],
        steps=t.steps if (t.steps or t.time) else train_defaults["steps"],
        optimizer=optimizer,
        weight_decay=t.decay if t.weight_decay is not None else tuned.get("weight_decay", t.decay),
        eval_every=eval_every(t, adapting=False),
        eval_tokens=eval_tokens(t),
    )
    data = dataclasses.replace(config.data, mode=splits.mode)
    return dataclasses.replace(config, model=settings, data=data, train=train)


def eval_every(t: TrainConfig, adapting: bool) -> int:
    """Validate every ``t.eval_every`` steps as told; else every 250 steps when training from scratch, and every
    quarter of the budget (from 10 to 250 steps) when adapting a model, whose short runs would otherwise
    validate only at the end."""
    if t.eval_every:
        return t.eval_every
    return max(10, min(PRETRAIN_EVAL_EVERY, (t.steps or 1000) // 4)) if adapting else PRETRAIN_EVAL_EVERY


def eval_tokens(t: TrainConfig, examples=None) -> int:
    """Validate on about ``t.eval_tokens`` scored tokens as told; else, adapting a model on ``examples`` (instructions
    or preference pairs, ``t.eval_every`` filled), on an eighth of the answer tokens trained between two validations,
    at least 4,096, so that validation takes a few percent of the time: SmolLM2 tuned with LoRA on gsm8k_train
    validated on all 373 val examples (46,108 answer tokens in fp32, 147 s) every 50 steps (590 s), 25 % more time;
    now 54 of them (25 s). Else (running text, lines, pairs, prompts) 250,000, so that validating a large corpus
    does not outlast training."""
    if t.eval_tokens:
        return t.eval_tokens
    if examples is None:
        return PRETRAIN_EVAL_TOKENS
    trained = t.eval_every * t.batch_size * t.grad_accum * examples.num_targets / len(examples)
    return max(ADAPTING_EVAL_FLOOR, round(ADAPTING_EVAL_SHARE * trained))


def validating(val, max_tokens: int, unit: str) -> str:
    """What a run's announcement says of a validation that reads only some of the ``val`` examples (or pairs)."""
    read = sum(len(batch[0]) for batch in val.batches(16, max_tokens))
    return f", validating on {read:,} of the {len(val):,} val {unit}" if read < len(val) else ""


def steps_per_second(config: RunConfig, splits, tokenizer, world: World) -> float:
    """How fast this machine trains ``config``: the run's own loop timed in a scratch folder for a few dozen steps,
    after the first ones (which allocate, and prepare kernels for each new shape), with its share of a validation
    (one every ``eval_every`` steps; on names it costs a tenth of the time, enough to move a budget across a row of
    the rule)."""
    probe = dataclasses.replace(config, train=dataclasses.replace(
        config.train, steps=sizing.PROBE_STEPS, time=sizing.PROBE_SECONDS, eval_every=10**9))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(Path(scratch), probe, splits, tokenizer, progress=False, world=world)
        trainer.fit(resume=False)
        records = trainer.metrics.read()
        start = time.perf_counter()
        trainer.validate()
        validation = time.perf_counter() - start
    first, last = records[min(1, len(records) - 1)], records[-1]
    if last["step"] == first["step"]:  # a machine too slow to pass the first steps in time
        first = {"step": 0, "time": 0.0}
    step = (last["time"] - first["time"]) / (last["step"] - first["step"])
    return 1 / (step + validation / config.train.eval_every)


def spent(t: TrainConfig, step: int, elapsed: float) -> float:
    """The share of the budget that ``step`` steps in ``elapsed`` seconds have spent (1 or more: the run is done)."""
    return max(step / t.steps if t.steps else 0.0, elapsed / t.time if t.time else 0.0)


def lr_at(step: int, progress: float, t) -> float:
    """Linear warmup over ``t.warmup`` steps or the budget's first tenth (200 steps are all of a short run), whichever
    ends first; then cosine decay."""
    tenth = (step + 1) / max(1, t.steps // 10) if t.steps else progress / 0.1
    warm = min(1.0, max((step + 1) / t.warmup, tenth)) if t.warmup else 1.0
    decay = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * warm * decay


def make_optimizer(model, t, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """AdamW, or Muon for the hidden matrices; matrices decay, vectors (biases, norms) do not. AdamW runs as one
    fused kernel on GPUs; on CPUs the multi-tensor (foreach) version measured faster than the fused one. Muon
    orthogonalizes in bf16 where the run's products (``dtype``) are bf16, else in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if t.optimizer == "muon":
        hidden = hidden_matrices(model)
        groups = [{"params": [p for p in params if id(p) in hidden], "weight_decay": t.decay, "muon": True},
                  *({**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups)]
        precision = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        return Muon([g for g in groups if g["params"]], lr=t.lr, betas=(0.9, t.beta2), precision=precision)
    speed = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.beta2), **speed)


def resumed(resume: str, budget: dict | None, command: str = "train") -> tuple[Path, RunConfig]:
    """The directory and configuration of a run to continue, with the new ``budget`` (steps or seconds) if given.
    A run continues with the ``command`` that made it (``finetune`` continues alignment too: the same code)."""
    TrainConfig(**(budget or {})).check()
    try:
        run_dir = find_run(resume)
    except FournilError:  # (its message offers models, which cannot be resumed)
        no_run = f"--resume {resume}: no such run; give the folder of the run to continue (see `ls runs/`)"
        raise FournilError(no_run) from None
    if (run_dir / WEIGHTS).exists() and not (run_dir / STATE).exists():  # else it would start again, over them
        raise FournilError(f"{run_dir} has weights but no training state ({STATE}) to go on from (an n-gram model "
                           f"is counted in one pass, a converted or downloaded model has none, a run whose state was "
                           f"deleted has lost it); start a new run instead, with --out")
    config = read_config(run_dir)
    made_by = command_of(config)
    if made_by != command and not (command == "finetune" and made_by in ("align", "reward train")):
        raise FournilError(f"{run_dir} is a run of fournil {made_by}: continue it with `fournil {made_by} --resume "
                           f"{run_dir}`")
    if budget:  # a new budget, not a change to the old: --steps alone lifts a time limit, and --time a step count
        config.train = dataclasses.replace(config.train, steps=budget.get("steps"), time=budget.get("time"))
    if (run_dir / STATE).exists():
        done = read_state_info(run_dir / STATE)
        if spent(config.train, done["step"], done["elapsed"]) >= 1:
            seconds = f"{done['elapsed']:.1f}" if done["elapsed"] < 10 else f"{done['elapsed']:.0f}"  # not "0 s"
            at = f"{run_dir} stopped at step {done['step']:,}, after {seconds} s of training"
            if budget:
                raise FournilError(f"{at}, past the budget given ({config.train.budget}): to train on, give more "
                                   f"--steps or --time")
            print(f"{at}, at the end of its budget ({config.train.budget}): nothing to train; to train on, give more "
                  f"--steps or --time", file=sys.stderr)
    return run_dir, config


def budget_left(t, run_dir: Path, resume) -> str:
    """The budget, as a run's first line says it, and where a resumed run takes it up."""
    done = read_state_info(run_dir / STATE)["step"] if resume and (run_dir / STATE).exists() else 0
    return f"{t.budget} (from step {done:,})" if done else t.budget


class Diverged(FournilError):
    pass


TRAINING_BYTES = 12  # a parameter's at least, in fp32: its weight, gradient and momentum (AdamW's two moments: 16)


def check_fits(config: dict, device: torch.device, shards: int = 1) -> None:
    """Refuse a model whose training cannot fit in the memory of ``device`` (its weights in ``shards`` parts), before
    its weights are drawn: drawing them failed in PyTorch's allocator, or got the process killed later."""
    have, count = memory_size(device), parameter_count(config)
    need = count * TRAINING_BYTES / shards
    if have and need > have:
        raise FournilError(f"a {config['family']} model of {count:,} parameters needs at least {need / 2**30:,.1f} GiB "
                           f"to train ({TRAINING_BYTES} bytes a parameter: its weight, gradient and momentum in fp32"
                           f"{f', over {shards} processes' if shards > 1 else ''}), more than the "
                           f"{have / 2**30:,.1f} GiB of this {device.type}: make it smaller (--n-layer, --n-embd)")


class Trainer:
    """Trains ``config.model`` from scratch on ``splits``; or, for fine-tuning and alignment, a ``model`` given with its
    ``data`` and ``objective`` (the weights that do not train are neither checkpointed nor given to the optimizer, and
    ``keep_best`` writes the best weights in the form the run keeps them)."""

    def __init__(self, run_dir: Path, config: RunConfig, splits, tokenizer, progress: bool, world: World,
                 model=None, data: dict | None = None, keep_best=None, objective=None):
        self.dir, self.config, self.tokenizer, self.world = run_dir, config, tokenizer, world
        t = config.train
        self.device = world.device(pick_device(t.device))
        self.data = data if data is not None else make_data(splits, tokenizer, config.model["block_size"])
        torch.manual_seed(t.seed)
        if model is None:
            check_fits(config.model, self.device, world.size if t.fsdp else 1)
        self.model = (model if model is not None else build_model(config.model)).to(self.device)
        self.dtype = pick_dtype(self.device, t.dtype, width=model_width(self.model))  # training steps
        self.measure_dtype = pick_dtype(self.device, t.dtype, measure=True)  # validation: the figure `eval` gives
        self.objective = objective or NextTokenPrediction(**packing(self.data["train"], self.model))
        self.keep_best = keep_best or (lambda weights: save_tensors(weights, self.dir / WEIGHTS))
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        self.saved = None if not frozen else {n for n, p in self.model.named_parameters() if p.requires_grad}
        tuned, taught = config.finetune, config.distill
        self.context = tuned.max_length if tuned else taught.context if taught else config.model["block_size"]
        self.layered = [m for m in self.model.modules() if getattr(m, "checkpointing", None) is not None]
        # batches of more tokens than this save memory; auto decides for each batch from its padded width, since
        # answers and pairs are mostly far shorter than --max-length (rasbt_preferences: 8 pairs of 79 tokens)
        if t.low_memory is None:
            per_token = max((activation_bytes(lm.config, 1, self.dtype) for lm in self.layered), default=0)
            self.save_above = activation_budget(self.device) / per_token if per_token else math.inf
        else:
            self.save_above = 0 if t.low_memory else math.inf
        self.show_progress = progress and world.main
        self.sharded = world.distributed and t.fsdp
        self.metrics = MetricsLog(run_dir, t.tensorboard and world.main)

    @property
    def precision(self) -> str:
        """What the announcement says of how the run computes: ``cpu bfloat16, scores float32, ...``."""
        rows = getattr(self.objective, "rows_per_example", 1)
        how = f"layers recomputed, passes of at most {PASS_TOKENS:,} tokens"
        saving = "" if not batch_passes(self.config.train.batch_size, rows, self.context, self.save_above)[0] else \
            f", low memory ({how})" if self.save_above == 0 else \
            f", low memory for batches over {int(self.save_above):,} tokens ({how})"
        return precision_text(self.device, self.dtype, self.measure_dtype) + saving

    def pass_rows(self, batch: tuple) -> int:
        """Rows of ``batch`` read in one forward pass, its layers recomputed in the backward pass or not."""
        rows = getattr(self.objective, "rows_per_example", 1)
        low, at_once = batch_passes(self.config.train.batch_size, rows, batch[0].shape[-1], self.save_above)
        for lm in self.layered:
            lm.checkpointing = low
        return at_once

    def validate(self) -> dict:
        """Rank 0 scores the val split; every rank gets the loss, so all take the same decisions. (A sharded model
        computes with all processes together: each scores the split.)"""
        t = self.config.train
        scores = {"loss": float("nan")}
        if self.world.main or self.sharded:
            scores = self.objective.validate(self.model, self.data["val"], self.tokenizer, self.measure_dtype,
                                             t.eval_tokens)
        return {**scores, "loss": self.world.broadcast(scores["loss"])}

    @contextlib.contextmanager
    def holding(self, resume: bool):
        """The run's folder :func:`held` by rank 0 while it trains; a new run's made then, with its config and
        tokenizer (a run refused before leaves no folder behind)."""
        if not self.world.main:
            yield
            return
        with held(self.dir, "trained", "" if resume else f"; or start another run with --out {another(self.dir)}"):
            if not resume:
                if (self.dir / CONFIG).exists():  # (made by another process since this one looked)
                    raise taken(self.dir)
                write_json(self.dir / CONFIG, to_dict(self.config))
                self.tokenizer.save(self.dir / TOKENIZER)
            yield

    def count(self) -> None:
        """Count-based models learn in one pass over the training split."""
        with self.holding(resume=False):
            self.model.fit(self.data["train"].batches(256))
            val = self.validate()["loss"]
            if self.world.main:
                save_weights(self.model, self.dir / WEIGHTS)
                self.metrics.log({"step": 0, "val_loss": val})

    def fit(self, resume: bool) -> None:
        """Train to the end of the budget, validating and checkpointing on the way. A new run that fails before its
        first checkpoint (a reward function's error, a divergence, no memory) takes its folder away: there is nothing
        in it to resume, and the same command, mended, can run again."""
        with self.holding(resume):
            try:
                self._fit(resume)
            except Exception:
                if not resume and self.world.main:
                    forget(self.dir)
                raise

    def _fit(self, resume: bool) -> None:
        t, world = self.config.train, self.world
        model, device = self.model, self.device
        sharded = self.sharded
        if sharded:
            shard(model)
        optimizer = make_optimizer(model, t, device, self.dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)  # fp16 needs loss scaling
        data_rng = torch.Generator().manual_seed(t.seed)
        step, elapsed, best = 0, 0.0, float("inf")
        if resume and (self.dir / STATE).exists():
            weights, optim, info = load_state(self.dir / STATE, data_rng)
            load_full_state(model, optimizer, weights, optim, sharded)
            step, elapsed, best = info["step"], info["elapsed"], info["best_val"]
            if info.get("best_step") == step and world.main:  # a kill after the state, before the best weights
                self.keep_best(weights)
            scaler.load_state_dict(info.get("scaler", {}))
        if world.main:
            self.metrics.truncate(step)
            if resume:  # with the budget it goes on to: a later --resume keeps it
                write_json(self.dir / CONFIG, to_dict(self.config))
        net = model
        if world.distributed and not sharded:
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if t.compile:
            prepare_compile(device)
            net = torch.compile(net)
        per_step = t.batch_size * t.grad_accum * world.size  # sequences in one optimizer step, all processes together
        # a token's FLOPs: the weights' share, and attention's, which grows with the width of the rows read (short
        # documents packed into narrow rows, not the whole context: a context of 9,133 characters made it 58 %)
        flops, per_width = model.flops_per_token(0), model.flops_per_token(1) - model.flops_per_token(0)
        peak = matmul_rate(device, self.dtype, 4096 if device.type == "cuda" else 512) * world.size
        # a loss above three times a uniform guess's has diverged; so has one above twice the loss the run started
        # from, where that is higher (a pretrained model cut down to a student starts far above a uniform guess)
        explode = None

        def checkpoint(improved: bool = False):
            weights, optim = full_state(model, optimizer, sharded)  # under FSDP every process takes part
            if self.saved is not None:
                weights = {k: v for k, v in weights.items() if k in self.saved}
            if world.main:  # the state first: without it the run cannot resume, and it can restore the best weights
                save_state(self.dir / STATE, weights, optim, data_rng,
                           {"step": step, "elapsed": elapsed, "best_val": best, "scaler": scaler.state_dict(),
                            **({"best_step": step} if improved else {})})
                if improved:
                    self.keep_best(weights)

        def diverged(what: str, value: float):
            kept = f"the last good checkpoint is kept (step {self._saved_step()})" if (self.dir / STATE).exists() \
                else "no checkpoint had been written yet"
            raise Diverged(f"training diverged at step {step}: {what} is {value:.4g}; {kept}. Train again with a lower "
                           f"--lr (this run used {t.lr:g}){', or --dtype float32' if self.dtype != torch.float32 else ''}")

        bar = Progress(self.show_progress, spent(t, step, elapsed))
        if step == 0 and command_of(self.config) == "finetune":
            # where tuning starts: the base model's NLL on the held-out answers, which tuning should bring down
            base = self.validate()["loss"]
            if world.main:
                self.metrics.log({"step": 0, "val_loss": base})
            bar.update(0.0, True, step=0, val=f"{base:.4f}")
        start, start_elapsed = time.perf_counter(), elapsed
        window_loss, window_tokens, window_flops, window_steps, window_start = 0.0, 0, 0.0, 0, start
        curves, shown = self.objective.curves, "-"  # (shown: the last validation's figure, on every progress line)
        window_metrics = {}
        model.train()
        try:
            while spent(t, step, elapsed) < 1.0:
                if not world.distributed:  # (torchrun's processes on this machine have their share already)
                    computing(device)
                lr = lr_at(step, spent(t, step, elapsed), t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # every process draws the same batch and takes its share: the result does not depend on the
                # number of processes, and the data position is one generator's state
                batch = self.data["train"].sample(per_step, data_rng)
                # this process's share: a micro-batch of batch_size rows per accumulation, each read in passes of
                # pass_rows(batch) rows, whose losses are weighted by their share of the step's targets (or rows)
                total, at_once = max(1, weight(self.objective, batch)), self.pass_rows(batch)
                starts = [(micro * world.size + world.rank) * t.batch_size for micro in range(t.grad_accum)]
                spans = [(lo, min(lo + at_once, start + t.batch_size))
                         for start in starts for lo in range(start, start + t.batch_size, at_once)]
                for n, (lo, hi) in enumerate(spans):
                    share = weight(self.objective, tuple(b[lo:hi] for b in batch)) * world.size / total
                    part = tuple(b[lo:hi].to(device, non_blocking=True) for b in batch)
                    last = n == len(spans) - 1
                    if sharded:
                        model.set_requires_gradient_sync(last)
                    with net.no_sync() if world.distributed and not last and not sharded else contextlib.nullcontext():
                        with autocast(device, self.dtype):
                            loss, metrics = self.objective.loss(net, part)
                        scaler.scale(loss * share).backward()
                    # summed on the device: reading the loss every step would wait for the GPU each time
                    window_loss = window_loss + loss.detach() * share
                    tokens = metrics.pop("tokens") * world.size
                    window_tokens += tokens
                    window_flops += tokens * (flops + per_width * part[0].shape[-1])
                    for k, v in metrics.items():
                        window_metrics[k] = window_metrics.get(k, 0.0) + v * share
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                if explode is None:  # (the loss of the first step, read before any update)
                    explode = max(3 * math.log(self.tokenizer.vocab_size), 2 * world.mean(window_loss).item())
                now = time.perf_counter()
                elapsed = start_elapsed + now - start
                if t.time and world.distributed:
                    elapsed = world.broadcast(elapsed)  # one clock, or the processes would disagree on when to stop
                finishing = spent(t, step, elapsed) >= 1.0
                evaluated = step % t.eval_every == 0 or finishing
                if step % LOG_EVERY and not evaluated:  # (an evaluation between records is one too)
                    continue
                train_loss = world.mean(window_loss).item() / window_steps
                if not math.isfinite(train_loss) or train_loss > explode:
                    diverged("the training loss", train_loss)
                speed = window_tokens / (now - window_start)
                record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": speed,
                          "mfu": window_flops / (now - window_start) / peak, "time": round(elapsed, 2),
                          **{f"train_{k}": world.mean(v).item() / window_steps for k, v in window_metrics.items()}}
                if evaluated:
                    scores = self.validate()
                    val = record["val_loss"] = scores.pop("loss")
                    record.update({f"val_{k}": v for k, v in scores.items()})
                    if not math.isfinite(val):
                        diverged("the validation loss", val)
                    improved = val < best
                    best = min(best, val)
                if world.main:  # the record before the checkpoint: a kill between them runs the step again, where the
                    self.metrics.log(record)  # other order lost its record (the resumed run starts after it)
                if evaluated:
                    checkpoint(improved)
                    shown = f"{record[curves.val]:.4f}"
                bar.update(spent(t, step, elapsed), evaluated, step=step,
                           **{curves.name: f"{record[curves.train]:.4f}", "val": shown, "tok/s": f"{speed:,.0f}"},
                           mfu=f"{100 * record['mfu']:.0f}%")
                window_loss, window_tokens, window_flops, window_steps = 0.0, 0, 0.0, 0
                window_start = time.perf_counter()
                window_metrics = {}
        except KeyboardInterrupt:
            checkpoint()  # keep every finished step
            if world.main:
                print(f"\ninterrupted at step {step}; continue with: fournil {command_of(self.config)} --resume "
                      f"{typed(self.dir)}", file=sys.stderr)
            raise
        finally:
            bar.close()
            self.metrics.close()

    def _saved_step(self) -> int:
        return read_state_info(self.dir / STATE)["step"]

    def finish(self) -> Run:
        metrics = self.metrics.read()
        family, align = self.config.model["family"], self.config.align
        stage = {"finetune": f"fine-tuned {family}", "reward train": f"a reward model from {family}",
                 "distill": f"a {family} student, distilled", "align": f"{family} aligned by "
                 f"{align and align.method.upper()}"}.get(command_of(self.config), family)
        name = f"{stage} on {self.config.data.data}"
        plot_loss(metrics, self.dir / "loss.png", name, *self.objective.curves[:3])
        run = Run.load(self.dir, self.config.train.device, self.config.train.dtype)
        n = self.config.train.samples
        if self.config.scores_answers:
            samples = []  # a reward model does not write
        elif self.config.finetune:  # answers to a few held-out prompts
            samples = [f"{q!r} -> {a!r}" for q, a in run.answer_val_prompts(min(n, 5))] if n else []
        elif run.mode == "pairs":  # outputs for the first held-out sources
            sources = [source for source, _ in run.splits().val[:n]]
            samples = [f"{s} -> {o}" for s, o in zip(sources, run.translate(sources))]
        else:
            n = n if run.mode == "lines" else min(1, n)  # text: a passage
            samples = run.sample(n, seed=self.config.train.seed) if n else []
        (self.dir / "samples.txt").write_text("".join(s + "\n" for s in samples), encoding="utf-8")
        return run


def forget(run_dir: Path) -> None:
    """Remove a run that has no checkpoint: its folder, when it holds only what a run writes before its first one."""
    before = {CONFIG, TOKENIZER, HF_TOKENIZER_CONFIG, METRICS, LOCK}
    if run_dir.is_dir() and all(p.is_file() and p.name in before for p in run_dir.iterdir()):
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()


def split_asked(data: DataConfig) -> str | None:
    """The flag that asked for another split than the default, if one did."""
    return "--split" if data.split != DataConfig.split else "--split-seed" if data.seed != DataConfig.seed else None


def named_data(data: DataConfig) -> DataConfig:
    """Data given as three files (--train, --val, --test) is named by the training file, in the run's name and
    config; a --data, --split or --split-seed beside them is refused, not ignored."""
    if not data.train:
        return data
    if data.data not in (DataConfig.data, data.train):
        raise FournilError(f"--data {data.data} and --train/--val/--test name the data twice: give --data (fournil "
                           f"splits it) or the three files")
    if flag := split_asked(data):
        raise FournilError(f"{flag}: the data is split already, into --train, --val and --test; leave it out")
    return dataclasses.replace(data, data=data.train)


def check_reading(data: DataConfig, splits) -> None:
    """Refuse the data settings that the data's form leaves unused (they would be recorded as if they had counted)."""
    if isinstance(splits.train, Shards):
        check_shards(data, splits.train.folder)
    elif splits.mode == "pairs" and data.mode in ("lines", "text"):
        raise FournilError(f"--mode {data.mode}: {data.data} holds (source, target) pairs, read as pairs; leave out "
                           f"--mode")
    elif splits.mode == "text" and data.seed != DataConfig.seed:
        raise FournilError("--split-seed: running text is cut in order (train, then val, then test), not shuffled; "
                           "leave it out")


def check_shards(data: DataConfig, folder: Path, char_asked: bool = False) -> None:
    """Refuse what ``fournil prepare`` settled for its shards, asked otherwise: running text, split and tokenized
    (``char_asked``: characters were asked for, not left as the default, which takes the shards' tokenizer)."""
    if data.mode == "lines":
        raise FournilError(f"--mode lines: the shards in {folder} are running text, as fournil prepare makes them; "
                           f"leave out --mode")
    if flag := split_asked(data):
        raise FournilError(f"{flag}: the shards in {folder} are split into train, val and test already, by fournil "
                           f"prepare; leave it out")
    if (data.tokenizer != "char" or char_asked) and not made_with(folder, data.tokenizer):
        raise FournilError(f"the shards in {folder} were made with another tokenizer than {data.tokenizer}: "
                           f"leave out --tokenizer to use theirs, or prepare the corpus again with this one")


def build_tokenizer(splits, spec: str = "char", progress: bool = True):
    """The run's tokenizer: characters of the training split (with an unknown token if val or test hold characters
    it lacks), a byte-level BPE trained on the training split (``bpe:N``), or a saved one (a path)."""
    def as_texts(part) -> list[str]:
        if splits.mode == "pairs":
            return [text for pair in part for text in pair]
        return [part] if splits.mode == "text" else part
    if isinstance(splits.train, Shards):  # prepared shards carry the tokenizer that made them
        return load_tokenizer(splits.train.folder / TOKENIZER)
    if spec == "char":
        seen = set().union(*map(set, as_texts(splits.train)))
        unseen = any(set(t) - seen for part in (splits.val, splits.test) for t in as_texts(part))
        return CharTokenizer.train(as_texts(splits.train), boundary=splits.mode != "text", unknown=unseen)
    if size := bpe_size(spec):
        return train_bpe(as_texts(splits.train), size, progress, asked="--tokenizer bpe:{}")
    if not Path(spec).exists():
        raise FournilError(f"--tokenizer {spec}: no such file; give char, bpe:N or a tokenizer.json (or its folder)")
    return load_tokenizer(spec)


def train(config: RunConfig | None = None, out: str | None = None, resume: str | None = None,
          budget: dict | None = None, progress: bool = True, announce=print) -> Run | None:
    """Train a model as ``config`` says (or continue the run ``resume``) and return the trained :class:`Run`.

    ``budget`` (``{"steps": N}`` or ``{"time": seconds}``) overrides a resumed run's stopping point. Under torchrun
    every process calls this; rank 0 returns the run, the others ``None``.
    """
    example = "e.g. RunConfig(model='gpt', data=DataConfig('names'), train=TrainConfig(steps=500))"
    if config is not None and not isinstance(config, RunConfig):
        raise FournilError(f"train takes a RunConfig, not a {type(config).__name__}: {example}")
    for name, cls in (("data", DataConfig), ("train", TrainConfig)) if config is not None else ():
        section(getattr(config, name), cls, name, "a RunConfig to train", f": {example}", required=True)
    world = join()
    try:
        run = _train(world, config, out, resume, budget, progress, announce if world.main else lambda *_: None)
        world.barrier()  # the others wait for rank 0's report: a group torn down early can abort a process (gloo)
        return run
    finally:
        leave(world)


def loop_settings(t: TrainConfig) -> list[str]:
    """The training loop's settings that ``t`` sets, as flags: what a model counted in one pass leaves unread."""
    loop = ("steps", "time", "batch_size", "batch_tokens", "lr", "optimizer", "warmup", "weight_decay", "eval_every",
            "compile", "low_memory", "fsdp")
    default = TrainConfig()
    return [f"--{name.replace('_', '-')}" for name in loop if getattr(t, name) != getattr(default, name)]


def _train(world: World, config, out, resume, budget, progress, announce) -> Run | None:
    if resume:
        run_dir, config = resumed(resume, budget)
        splits, fingerprints = load_splits(config.data)
        if config.fingerprints and fingerprints != config.fingerprints:
            raise FournilError(f"the data of {run_dir} changed since it started; start a new run instead")
        tokenizer = load_tokenizer(run_dir / TOKENIZER)
    else:
        config = config or RunConfig()
        config.train.check()
        check_settings(config.model)  # before the data is read, and the budget sized
        config.data = named_data(config.data)
        run_dir = new_run_dir(config, out)  # (and a folder that holds a run refused: before measuring any speed)
        pick_device(config.train.device)  # (a device this machine lacks, too)
        if FAMILIES[config.model["family"]][0].counts_only and (unused := loop_settings(config.train)):
            announce(f"(an n-gram is counted in one pass over the training split, not trained step by step: "
                     f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply)")
        if config.train.fsdp and not world.distributed:  # (kept, so that the same command runs under torchrun)
            announce("(--fsdp shards the model across processes, and this run has one: start it with torchrun "
                     "--nproc_per_node=N -m fournil train ... to shard it)")
        splits, fingerprints = load_splits(config.data)
        check_reading(config.data, splits)
        tokenizer = build_tokenizer(splits, config.data.tokenizer, progress)
        open_to_sizing = sizing.sizable(config, splits.mode, world.size)
        config = complete_config(config, splits, tokenizer, world)
        if open_to_sizing:
            config = sizing.size_to_budget(config, len(splits.train),
                                                lambda: steps_per_second(config, splits, tokenizer, world))
            announce(sizing.describe(config.budget))
        config.fingerprints = fingerprints
        world.barrier()  # every process has its name for the run before rank 0 creates it
    trainer = Trainer(run_dir, config, splits, tokenizer, progress, world)
    model, t = trainer.model, config.train
    what = f"{model.family}; {splits.mode} data {config.data.data}; vocabulary {tokenizer.vocab_size}, " \
           f"context {model.reads}; {trainer.precision}"
    if world.distributed:
        what += f" in {world.size} processes"
    if model.counts_only:
        trainer.count()
        announce(f"{what}; counted {model.num_params():,} parameters -> {run_dir}")
    else:
        batch = f"batch {t.batch_size}" + (f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else "") + \
            (f" x {world.size} processes" if world.distributed else "")
        announce(f"{what}; {model.num_params():,} parameters; {budget_left(t, run_dir, resume)}, {batch}, "
                 f"{t.optimizer or 'adamw'} lr {t.lr:g} -> {run_dir}")
        trainer.fit(resume=bool(resume))
    return trainer.finish() if world.main else None
