"""The model zoo, from counts to Transformers, behind one interface and one registry."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch.overrides import TorchFunctionMode

from fournil.checkpoint import load_tensors
from fournil.config import check_types
from fournil.errors import FournilError
from fournil.models.base import LanguageModel
from fournil.models.gpt import GPT, GPTConfig
from fournil.models.llama import Llama, LlamaConfig
from fournil.models.mlp import MLP, MLPConfig
from fournil.models.ngram import NGram, NGramConfig
from fournil.models.rnn import RNN, RNNConfig
from fournil.models.seq2seq import Seq2Seq, Seq2SeqConfig

FAMILIES = {"ngram": (NGram, NGramConfig), "mlp": (MLP, MLPConfig), "rnn": (RNN, RNNConfig), "gpt": (GPT, GPTConfig),
            "llama": (Llama, LlamaConfig), "seq2seq": (Seq2Seq, Seq2SeqConfig)}

# What trains well in minutes on a laptop CPU, per data mode: (model settings, training settings). Training
# settings the user leaves open come from here; the rest from TrainConfig (AdamW, weight decay 0.1). A weight decay
# here goes with the optimizer named beside it: another optimizer chosen gets TrainConfig's.
DEFAULTS = {
    ("ngram", "lines"): ({}, {"batch_size": 0, "lr": 0.0, "steps": 0}),
    ("ngram", "text"): ({}, {"batch_size": 0, "lr": 0.0, "steps": 0}),
    ("mlp", "lines"): ({"context": 5, "n_embd": 24, "n_hidden": 512}, {"batch_size": 64, "lr": 3e-3, "steps": 6000}),
    ("mlp", "text"): ({"context": 8, "n_embd": 24, "n_hidden": 512}, {"batch_size": 32, "lr": 3e-3, "steps": 6000}),
    ("rnn", "lines"): ({"n_embd": 64, "n_hidden": 256, "n_layer": 2}, {"batch_size": 64, "lr": 3e-3, "steps": 3000}),
    ("rnn", "text"): ({"n_embd": 64, "n_hidden": 256, "n_layer": 2}, {"batch_size": 32, "lr": 3e-3, "steps": 2000}),
    ("gpt", "lines"): ({"n_layer": 4, "n_head": 4, "n_embd": 64},  # Muon learns names faster, and needs more decay
                       {"batch_size": 64, "lr": 8e-3, "steps": 3000, "optimizer": "muon", "weight_decay": 0.3}),
    ("gpt", "text"): ({"n_layer": 4, "n_head": 4, "n_embd": 128}, {"batch_size": 32, "lr": 1e-3, "steps": 2000}),
    ("llama", "lines"): ({"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64},
                         {"batch_size": 64, "lr": 8e-3, "steps": 3000}),
    ("llama", "text"): ({"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128},
                        {"batch_size": 32, "lr": 1e-3, "steps": 2000}),
    ("seq2seq", "pairs"): ({"n_layer": 3, "n_head": 4, "n_embd": 128}, {"batch_size": 64, "lr": 2e-3, "steps": 500}),
}
ORDERS = {"unigram": 1, "bigram": 2, "trigram": 3}  # n-grams by the names a course gives them
TEXT_BLOCK_SIZE = 128  # default context for running text; in lines mode it is the longest document


def check_family(family: str | None) -> None:
    if family is None:
        raise FournilError(f"the model's settings name no family: add \"family\", one of {', '.join(FAMILIES)}")
    if family in ORDERS:
        raise FournilError(f"a {family} is fournil's n-gram model of order {ORDERS[family]}: "
                           f"--model ngram --n {ORDERS[family]}")
    if family not in FAMILIES:
        raise FournilError(f"unknown model {family!r}: choose one of {', '.join(FAMILIES)}")


def config_class(family: str):
    check_family(family)
    return FAMILIES[family][1]


class Undrawn(TorchFunctionMode):
    """``torch.nn.init`` leaves tensors as they are: on the meta device, a model about to be given its weights (a
    normal draw there would import torch's compiler, 0.9 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def check_settings(config: dict) -> None:
    """A model's settings (``{"family": ..., settings...}``) name a family, and only settings it has, of their types
    (and a dropout below 1)."""
    settings = dict(config)
    family = settings.pop("family", None)
    check_family(family)
    cfg_cls = FAMILIES[family][1]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise FournilError(f"model {family} has no setting(s) {', '.join(unknown)}; it has {', '.join(sorted(names))}")
    check_types(cfg_cls, settings, f"model {family}")
    if not 0 <= settings.get("dropout", 0.0) < 1:
        raise FournilError(f"--dropout must be in [0, 1), the share of activations zeroed while training "
                           f"(got {settings['dropout']})")


def build_model(config: dict, weights: Mapping | None = None, source: str = "the weights",
                loaded: Callable | None = None) -> LanguageModel:
    """A model from its saved config dict (``{"family": ..., settings...}``), holding ``weights`` if given (read from
    ``source``) without drawing initial ones first (for SmolLM2 that drawing took half the time of loading); each of
    its blocks is given to ``loaded`` once its weights are in (:func:`fournil.checkpoint.load_tensors`)."""
    check_settings(config)
    settings = dict(config)
    model_cls, cfg_cls = FAMILIES[settings.pop("family")]
    if weights is None:
        return model_cls(cfg_cls(**settings))
    with torch.device("meta"), Undrawn():
        model = model_cls(cfg_cls(**settings))
    load_tensors(model, weights, source, loaded)
    return model


def parameter_count(config: dict) -> int:
    """The parameters of the model ``config`` describes, counted without making them (on the meta device)."""
    check_settings(config)
    settings = dict(config)
    model_cls, cfg_cls = FAMILIES[settings.pop("family")]
    with torch.device("meta"), Undrawn():
        return sum(p.numel() for p in model_cls(cfg_cls(**settings)).parameters())


__all__ = ["DEFAULTS", "FAMILIES", "LanguageModel", "TEXT_BLOCK_SIZE", "build_model", "check_family", "check_settings",
           "config_class", "parameter_count"]
