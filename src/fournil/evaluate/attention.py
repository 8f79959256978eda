"""Attention weights of a real forward pass: which earlier tokens each token reads, in every layer and head."""
from __future__ import annotations

import contextlib

import torch

from fournil.errors import FournilError
from fournil.generate.seq2seq import encoded_source, written
from fournil.models.base import decoder_only
from fournil.tokenizers.compression import piece


@contextlib.contextmanager
def recording_attention(model, layers: list | None = None):
    """While inside, every attention layer of ``model`` (or those of ``layers``) computes its weights explicitly and
    keeps them (see :func:`fournil.models.base.attend`); yields the layers, in order."""
    layers = layers or [m for m in model.modules() if hasattr(m, "recorded")]
    if not layers:
        raise FournilError(f"the {model.family} model has no attention to show: use a gpt or llama model")
    for m in layers:
        m.recorded = []
    try:
        yield layers
    finally:
        for m in layers:
            m.recorded = None


MOST = 512  # tokens an attention map shows: each layer keeps heads x tokens² weights (SmolLM2's 30 layers of 9 heads
# at its context of 8,192 tokens: over 70 GB; at 2,800 tokens, 8.5 GB for a picture no one could read)


@torch.no_grad()
def attention_maps(model, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """The tokens of ``text`` and the attention weights of one forward pass over them: (layers, heads, T, T), each
    row a distribution over the tokens up to its own."""
    decoder_only(model, "an attention map of a text")
    was_training = model.training
    model.eval()
    try:
        with recording_attention(model) as layers:  # (first: a model without attention says so before the text)
            ids = tokenizer.encode(text)
            if not ids:
                raise FournilError("give a text with at least one token")
            if len(ids) > model.config.block_size:
                raise FournilError(f"the text has {len(ids)} tokens; the model's context is {model.config.block_size}: "
                                   "give a shorter text")
            if len(ids) > MOST:
                raise FournilError(f"the text has {len(ids)} tokens; an attention map shows {MOST} at most (every layer "
                                   f"keeps heads x tokens² weights): give a shorter text")
            model(torch.tensor([ids], device=model.device))
            weights = torch.stack([m.recorded[0][0].float().cpu() for m in layers])
    finally:
        model.train(was_training)
    return [piece(tokenizer, i) for i in ids], weights


@torch.no_grad()
def cross_attention_maps(model, tokenizer, source: str) -> tuple[list[str], list[str], torch.Tensor]:
    """What an encoder-decoder reads of its source as it writes: the source's tokens, the tokens it writes for it
    (greedy, then its end), and the decoder's cross-attention weights over them: (layers, heads, written, source),
    each row the distribution over the source that the written token was chosen from."""
    ids = encoded_source(model, tokenizer, source)
    was_training = model.training
    model.eval()
    try:
        target = written(model, ids)
        crossing = [layer.encoder_attn for layer in model.model.decoder.layers]
        with recording_attention(model, crossing):
            model(torch.tensor([ids], device=model.device), torch.tensor([target[:-1]], device=model.device))
            weights = torch.stack([m.recorded[0][0].float().cpu() for m in crossing])
    finally:
        model.train(was_training)
    end = model.config.eos_id  # (each row as the token chosen from it; the written tokens never hold the end)
    return ([piece(tokenizer, i) for i in ids], ["<end>" if i == end else piece(tokenizer, i) for i in target[1:]],
            weights)
