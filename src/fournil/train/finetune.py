"""Supervised fine-tuning: the pretraining loop on instruction data, whose prompts carry no loss; every weight or a
LoRA adapter trains.

A fine-tuned run directory holds the tokenizer with the chat template it was tuned with (so generation renders
prompts as training did), and either ``model.safetensors`` (every weight) or a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) to put on its base model, named in ``config.json``.
"""
from __future__ import annotations

import dataclasses

import torch

from fournil.checkpoint import write_json
from fournil.config import (
    DataConfig,
    FinetuneConfig,
    LoraConfig,
    RunConfig,
    TrainConfig,
    to_dict,
)
from fournil.data.instructions import DEFAULT_TEMPLATE, load_instructions
from fournil.errors import FournilError
from fournil.formats.peft import save_adapter
from fournil.models.lora import add_lora
from fournil.runs import CONFIG, TOKENIZER, Run, find_run, read_config
from fournil.tokenizers import load_tokenizer
from fournil.train.distributed import join, leave
from fournil.train.trainer import Trainer, new_run_dir

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_MAX_LENGTH = 200, 8, 512
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


def chat_tokenizer(tokenizer):
    """The tokenizer with a chat template to tune with: its own, or a simple default for models that have none."""
    if not hasattr(tokenizer, "chat_text"):
        raise FournilError("fine-tuning needs a tokenizer with an end-of-text token, and this character tokenizer has "
                           "none: pretrain the base with --tokenizer bpe:N, or tune an imported model (smollm2)")
    if tokenizer.chat_template is None:
        if tokenizer.eos_id is None:
            raise FournilError("the base model's tokenizer has no chat template and no end-of-text token to end answers with")
        tokenizer.chat_template = DEFAULT_TEMPLATE
    return tokenizer


def finetune(base: str = "smollm2", data: str = "rasbt_instructions", lora: LoraConfig | None = None,
             train: TrainConfig | None = None, max_length: int | None = None, pack: bool = False, out: str | None = None,
             resume: str | None = None, budget: dict | None = None, progress: bool = True, announce=print) -> Run:
    """Tune ``base`` (a run, a .gguf file, a Hugging Face folder or ``smollm2``) on the instruction set ``data``, or
    continue the fine-tuning run ``resume``; returns the tuned :class:`Run`."""
    world = join()
    try:
        if resume:
            run_dir = find_run(resume)
            config = read_config(run_dir)
            if config.finetune is None:
                raise FournilError(f"{run_dir} is not a fine-tuning run: continue it with `fournil train --resume`")
            if budget:
                config.train = dataclasses.replace(config.train, **budget)
            ft = config.finetune
            tokenizer = load_tokenizer(run_dir / TOKENIZER)
            base_run = Run.load(ft.base, config.train.device)
        else:
            ft = FinetuneConfig(base=str(base), lora=lora, max_length=max_length, pack=pack)
            base_run = Run.load(ft.base, (train or TrainConfig()).device)
            tokenizer = chat_tokenizer(base_run.tokenizer)
            config = RunConfig(model=base_run.config.model, data=DataConfig(data=data, mode="instructions", tokenizer="base"),
                               train=fill_train(train or TrainConfig(), lora is not None), finetune=ft)
            run_dir = new_run_dir(config, out)
        block = base_run.model.config.block_size
        if ft.max_length is None:
            ft.max_length = min(DEFAULT_MAX_LENGTH, block)
        elif ft.max_length > block:
            raise FournilError(f"--max-length {ft.max_length} is longer than the model's context of {block}")
        splits = load_instructions(config.data.data, tokenizer, ft.max_length, config.data.split, config.data.seed,
                                   announce, ft.pack)
        model = base_run.model
        torch.manual_seed(config.train.seed)
        total = model.num_params()
        trainable = add_lora(model, ft.lora) if ft.lora else total
        if not resume and world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / CONFIG, to_dict(config))
            tokenizer.save(run_dir / TOKENIZER)
        keep = (lambda _: save_adapter(model, ft.lora, run_dir, ft.base)) if ft.lora else None
        trainer = Trainer(run_dir, config, None, tokenizer, progress, world, model=model, data=splits, keep_best=keep)
        t = config.train
        how = f"LoRA rank {ft.lora.rank}" if ft.lora else "every weight"
        announce(f"fine-tuning {ft.base} ({how}: {trainable:,} of {total:,} parameters train, "
                 f"{100 * trainable / total:.2f} %) on {config.data.data}: {len(splits['train'].seqs):,} "
                 f"{'rows of packed examples' if ft.pack else 'examples'}; "
                 f"{t.steps and f'{t.steps:,} steps' or f'{t.time:g} s'}, batch {t.batch_size}, lr {t.lr:g} -> {run_dir}")
        trainer.fit(resume=bool(resume))
        return trainer.finish() if world.main else None
    finally:
        leave(world)


def fill_train(t: TrainConfig, lora: bool) -> TrainConfig:
    steps = t.steps if (t.steps or t.time) else DEFAULT_STEPS
    return dataclasses.replace(t, steps=steps, batch_size=t.batch_size or DEFAULT_BATCH,
                               lr=t.lr or DEFAULT_LR["lora" if lora else "full"],
                               warmup=min(t.warmup, max(1, (steps or 1000) // 10)),
                               eval_every=min(t.eval_every, max(10, (steps or 1000) // 4)))
