"""Supervised fine-tuning: the pretraining loop on instruction data, whose prompts carry no loss; every weight or a
LoRA adapter trains.

A fine-tuned run directory holds the tokenizer with the chat template it was tuned with (so generation renders
prompts as training did), and either ``model.safetensors`` (every weight) or a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) to put on its base model, named in ``config.json``.
"""
from __future__ import annotations

import dataclasses

import torch

from fournil.config import (
    AlignConfig,
    DataConfig,
    FinetuneConfig,
    LoraConfig,
    RunConfig,
    TrainConfig,
    section,
)
from fournil.data.instructions import DEFAULT_TEMPLATE, load_instructions
from fournil.errors import FournilError
from fournil.formats.peft import save_adapter
from fournil.models.base import decoder_only
from fournil.models.lora import add_lora
from fournil.runs import TOKENIZER, Run, anchored
from fournil.tokenizers import load_tokenizer
from fournil.train.align import DEFAULT_LR as ALIGN_LR
from fournil.train.align import alignment, load_alignment_data, reference
from fournil.train.distributed import join, leave
from fournil.train.rewards import recorded
from fournil.train.trainer import Trainer, budget_left, eval_every, eval_tokens, new_run_dir, resumed, validating

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_MAX_LENGTH = 200, 8, 512
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


def chat_tokenizer(tokenizer):
    """The tokenizer with a chat template to tune with: its own, or a simple default for models that have none."""
    if not hasattr(tokenizer, "chat_text"):
        raise FournilError("instructions and preferences are read as conversations, and a character tokenizer knows "
                           "only the characters of its data (no letters of an instruction it never saw, no way to end "
                           "a turn): pretrain the base with --tokenizer bpe:N, or tune an imported model (smollm2)")
    if tokenizer.chat_template is None:
        if tokenizer.eos_id is None:
            raise FournilError("the base model's tokenizer has no chat template and no end-of-text token to end answers with")
        tokenizer.chat_template = DEFAULT_TEMPLATE
    return tokenizer


def finetune(base: str = "smollm2", data: str | DataConfig = "rasbt_instructions", lora: LoraConfig | None = None,
             train: TrainConfig | None = None, max_length: int | None = None, pack: bool = False, out: str | None = None,
             resume: str | None = None, budget: dict | None = None, progress: bool = True, announce=print,
             align: AlignConfig | None = None) -> Run:
    """Tune ``base`` (a run, a .gguf file, a Hugging Face folder or ``smollm2``) on the instruction set ``data`` (a
    name, or a :class:`DataConfig` that also gives its split and seed), or, with ``align``, learn from the preference
    set ``data`` (DPO, a reward model, GRPO); or continue the run ``resume``. Returns the tuned :class:`Run`."""
    world = join()
    try:
        if resume:
            run_dir, config = resumed(resume, budget, "finetune")
            ft = config.finetune
            tokenizer = load_tokenizer(run_dir / TOKENIZER)
            base_run = Run.load(ft.base, config.train.device)
        else:
            lora = section(lora, LoraConfig, "lora", "fournil.finetune", " (LoraConfig(): rank 8; None: every weight)")
            train = section(train, TrainConfig, "train", "fournil.finetune") or TrainConfig()
            align = section(align, AlignConfig, "align", "fournil.finetune", " (AlignConfig('dpo'), or 'grpo')")
            given = section(data if isinstance(data, DataConfig) else DataConfig(data), DataConfig, "data",
                            "fournil.finetune")
            ft = FinetuneConfig(base=anchored(base), lora=lora, max_length=max_length, pack=pack)
            ft.check()
            train.check()
            if align:
                align.check()
                if align.reward:
                    align = dataclasses.replace(align, reward=recorded(align.reward))
            base_run = Run.load(ft.base, train.device)
            base_run.check_writes()  # a reward model's language head no longer fits its body
            what = "learning from preferences" if align else "tuning on instructions"
            decoder_only(base_run.model, what)
            if base_run.model.counts_only:  # (no gradient: a traceback)
                raise FournilError(f"{what} follows gradients, and an ngram model is a table of counts: count one on "
                                   f"the text you want (fournil train --model ngram --data FILE)")
            tokenizer = chat_tokenizer(base_run.tokenizer)
            config = RunConfig(model=base_run.config.model,
                               data=DataConfig(data=given.data, mode="preferences" if align else "instructions",
                                               split=given.split, seed=given.seed, tokenizer="base"),
                               train=fill_train(train, lora is not None, align), finetune=ft,
                               align=align)
            run_dir = new_run_dir(config, out)
        block = base_run.model.config.block_size
        if ft.max_length is None:
            ft.max_length = min(DEFAULT_MAX_LENGTH, block)
        elif ft.max_length > block:
            raise FournilError(f"--max-length {ft.max_length} is longer than the model's context of {block}")
        d = config.data
        splits = load_alignment_data(config, tokenizer, announce) if config.align else \
            load_instructions(d.data, tokenizer, ft.max_length, d.split, d.seed, announce, ft.pack)
        grpo = config.align and config.align.method == "grpo"  # (its validation answers at most VAL_PROMPTS prompts)
        if config.train.eval_tokens is None:
            config.train = dataclasses.replace(config.train,
                                               eval_tokens=eval_tokens(config.train, None if grpo else splits["train"]))
        model = base_run.model
        torch.manual_seed(config.train.seed)
        total = model.num_params()
        ref = config.align and config.align.method != "reward" and \
            reference(model, copy_model=not ft.lora and config.align.reference == "model")
        trainable = add_lora(model, ft.lora) if ft.lora else total
        if config.align:
            model, objective, splits, keep = alignment(config, model, tokenizer, splits, run_dir, ref, announce)
        else:  # the trainer's next-token objective: a batch's examples packed, their system prompt read once per row
            objective = None
            keep = (lambda _: save_adapter(model, ft.lora, run_dir, ft.base)) if ft.lora else None
        trainer = Trainer(run_dir, config, None, tokenizer, progress, world, model=model, data=splits, keep_best=keep,
                          objective=objective)
        t = config.train
        how = f"LoRA rank {ft.lora.rank}" if ft.lora else "every weight"
        what = {None: "fine-tuning", "dpo": "DPO on", "reward": "a reward model from", "grpo": "GRPO on"}[
            config.align and config.align.method]
        unit = UNITS[config.align and config.align.method]
        announce(f"{what} {ft.base} ({how}: {trainable:,} of {total:,} parameters train, "
                 f"{100 * trainable / total:.2f} %) on {config.data.data}: {len(splits['train']):,} "
                 f"{'rows of packed examples' if ft.pack else unit}; {budget_left(t, run_dir, resume)}, "
                 f"batch {t.batch_size}, lr {t.lr:g}"
                 f"{'' if grpo else validating(splits['val'], t.eval_tokens, unit)}; {trainer.precision} -> {run_dir}")
        trainer.fit(resume=bool(resume))
        return trainer.finish() if world.main else None
    finally:
        leave(world)


UNITS = {None: "examples", "dpo": "pairs", "reward": "pairs", "grpo": "prompts"}


def fill_train(t: TrainConfig, lora: bool, align: AlignConfig | None = None) -> TrainConfig:
    steps = t.steps if (t.steps or t.time) else DEFAULT_STEPS
    lr = DEFAULT_LR["lora" if lora else "full"] if align is None else ALIGN_LR[align.method][0 if lora else 1]
    batch = DEFAULT_BATCH if align is None or align.method != "grpo" else 2 * align.group
    t = dataclasses.replace(t, steps=steps, batch_size=t.batch_size or batch, lr=t.lr or lr)
    return dataclasses.replace(t, eval_every=eval_every(t, adapting=True))
