"""Run directories (``runs/NAME/``) and the trained model they hold, as one object to sample, score, explain."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fournil.config import DataConfig, RunConfig, TrainConfig, from_dict
from fournil.data import load_splits, make_data
from fournil.device import pick_device, pick_dtype
from fournil.errors import FournilError
from fournil.evaluate import evaluate_nll, explain_text
from fournil.generate import sample_ids
from fournil.models import build_model
from fournil.tokenizers import load_tokenizer
from fournil.checkpoint import load_weights

RUNS = Path("runs")
CONFIG, WEIGHTS, TOKENIZER, METRICS, STATE = "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "train_state.safetensors"


def find_run(spec: str | Path) -> Path:
    """A run directory from a path or a name under ``runs/``."""
    path = Path(spec)
    if not path.exists() and (RUNS / path).exists():
        path = RUNS / path
    if not path.is_dir():
        raise FournilError(f"no run directory {str(spec)!r}: give a path like runs/prenoms-gpt (see `ls runs/`)")
    return path


def read_config(path: Path) -> RunConfig:
    file = path / CONFIG
    if not file.exists():
        raise FournilError(f"{path} is not a fournil run: it has no {CONFIG}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        return RunConfig(model=raw["model"], data=from_dict(DataConfig, raw["data"], "data"),
                         train=from_dict(TrainConfig, raw["train"], "train"), fingerprints=raw.get("fingerprints", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FournilError(f"{file} is damaged ({e}); train the run again") from None


class Run:
    """A trained model with its tokenizer and the data it was trained on."""

    def __init__(self, path: Path, config: RunConfig, model, tokenizer, dtype: torch.dtype):
        self.path, self.config, self.model, self.tokenizer, self.dtype = path, config, model, tokenizer, dtype

    @classmethod
    def load(cls, spec: str | Path, device: str = "auto", dtype: str = "auto") -> "Run":
        path = find_run(spec)
        config = read_config(path)
        for name in (TOKENIZER, WEIGHTS):
            if not (path / name).exists():
                raise FournilError(
                    f"{path} is incomplete: it has no {name} (training stopped before its first checkpoint); "
                    f"continue it with `fournil train --resume {path}`"
                )
        dev = pick_device(device)
        model = build_model(config.model)
        load_weights(model, path / WEIGHTS)
        return cls(path, config, model.to(dev), load_tokenizer(path / TOKENIZER), pick_dtype(dev, dtype))

    @property
    def mode(self) -> str:
        return "lines" if self.tokenizer.boundary_id is not None else "text"

    def splits(self):
        """The run's train/val/test splits, rebuilt from its data (which must not have changed since)."""
        splits, fingerprints = load_splits(self.config.data)
        if self.config.fingerprints and self.config.fingerprints != fingerprints:
            raise FournilError(f"the data of {self.path} changed since training ({self.config.data.data}); scores would not be comparable")
        return splits

    def evaluate(self, names=("val", "test"), max_tokens: int | None = None) -> dict:
        """Average NLL per token (nats), perplexity, bits per character and per byte, for each split named."""
        splits = self.splits()
        data = make_data(splits, self.tokenizer, self.model.config.block_size)
        return {n: evaluate_nll(self.model, data[n], self.tokenizer, self.dtype, max_tokens=max_tokens) for n in names}

    def sample(self, n: int = 20, prompt: str = "", temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """``n`` samples: whole documents (``lines`` data) or passages of running text, starting with ``prompt``."""
        if n < 1:
            raise FournilError(f"-n must be at least 1 (got {n})")
        tok = self.tokenizer
        ids = tok.encode(prompt)
        if self.mode == "lines":
            ids = [tok.boundary_id, *ids]
            limit = max_new_tokens or 2 * self.model.config.block_size
        else:
            ids = ids or tok.encode("\n" if "\n" in tok.stoi else tok.chars[0])
            limit = max_new_tokens or 500
        new = sample_ids(self.model, ids, n, limit, temperature, top_k, top_p, stop_id=tok.boundary_id, seed=seed)
        return [prompt + tok.decode(row) for row in new]

    def explain(self, text: str) -> dict:
        return explain_text(self.model, self.tokenizer, text)


def load(spec: str | Path, device: str = "auto") -> Run:
    """Load a trained run (a path, or a name under ``runs/``)."""
    return Run.load(spec, device)
