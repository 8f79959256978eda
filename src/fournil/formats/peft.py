"""LoRA adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

PEFT names a tensor ``base_model.model.`` + the module's name in the transformers model + ``.lora_A.weight``; fournil's
module names are transformers' own, so the two differ by that prefix.
"""
from __future__ import annotations

import json
from pathlib import Path

from fournil.checkpoint import read_safetensors, save_tensors, write_json
from fournil.config import LoraConfig
from fournil.errors import FournilError
from fournil.models.lora import add_lora, lora_state

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model, config: LoraConfig, folder: Path, base: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors({PREFIX + k: v for k, v in lora_state(model).items()}, folder / ADAPTER_WEIGHTS)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_state(model)})
    write_json(folder / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": config.rank,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets, "bias": "none",
        "use_rslora": config.rslora, "use_dora": False, "fan_in_fan_out": model.family == "gpt",
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
    })


def read_adapter_config(folder: Path) -> LoraConfig:
    file = Path(folder) / ADAPTER_CONFIG
    if not file.is_file():
        what = "holds no " + ADAPTER_CONFIG if Path(folder).is_dir() else "is not a folder" if Path(folder).exists() \
            else "does not exist"
        raise FournilError(f"{folder} {what}: give a folder with a PEFT LoRA adapter (a run of "
                           f"fournil finetune --lora, or PEFT's save_pretrained)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FournilError(f"{file} is not valid JSON ({e.msg})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise FournilError(f"{folder} is a {raw['peft_type']} adapter; fournil reads LoRA adapters")
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if raw.get(k)]
    if unsupported:
        raise FournilError(f"{folder} uses PEFT options fournil does not read: {', '.join(unsupported)}")
    targets = raw.get("target_modules") or ()
    if isinstance(targets, str):
        raise FournilError(f"{folder} names its target modules by a pattern ({targets!r}); fournil needs a list")
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                      dropout=float(raw.get("lora_dropout", 0.0)), targets=tuple(targets), rslora=bool(raw.get("use_rslora")))


def load_adapter(model, folder: Path) -> LoraConfig:
    """Put the adapter in ``folder`` on ``model`` (in place); a clear error if it was made for another model."""
    config = read_adapter_config(folder)
    if not (Path(folder) / ADAPTER_WEIGHTS).exists():
        raise FournilError(f"{folder} holds no {ADAPTER_WEIGHTS} (PEFT's pickled adapter_model.bin is not read: "
                           f"save the adapter with safe_serialization)")
    tensors, _ = read_safetensors(Path(folder) / ADAPTER_WEIGHTS)
    tensors = {k.removeprefix(PREFIX).replace(".default.", "."): v for k, v in tensors.items()}
    try:
        add_lora(model, config)
    except FournilError as e:
        raise FournilError(f"the adapter in {folder} was made for another model: {e}") from None
    expected = lora_state(model)
    wrong = sorted(set(expected) ^ set(tensors)) or [k for k in expected if expected[k].shape != tensors[k].shape]
    if wrong:
        raise FournilError(f"the adapter in {folder} was made for another model (its tensors do not match this "
                           f"{model.family} model's layers, e.g. {wrong[0]}); give the base model it was trained on")
    model.load_state_dict(tensors, strict=False)
    return config
