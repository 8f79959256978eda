"""Hugging Face folders: ``config.json``, one or sharded ``*.safetensors``, ``tokenizer.json`` and its config.

fournil's weight names are Hugging Face's, so reading and writing is a translation of the config and, for
GPT-2, a transpose of the matrices its ``Conv1D`` layers store as (in, out). Pickled ``*.bin`` files are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fournil.checkpoint import save_tensors, unique_state, write_json
from fournil.errors import FournilError
from fournil.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer
from fournil.tokenizers.char import UNKNOWN

LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = ", ".join([*LLAMA_TYPES, "gpt2", "blenderbot"])
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_hf_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FournilError(f"{folder} has no config.json: a Hugging Face model folder needs config.json, "
                           f"*.safetensors and tokenizer.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FournilError(f"{file} is not valid JSON ({e})") from None


def model_config(hf: dict) -> dict:
    """fournil's model settings from a Hugging Face config."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        from fournil.models.gpt import ACTIVATIONS

        n_embd = hf.get("n_embd", 768)
        if hf.get("n_inner") not in (None, 4 * n_embd):
            raise FournilError(f"GPT-2 with n_inner={hf['n_inner']} is not supported (fournil's MLP is 4 x n_embd)")
        if hf.get("activation_function", "gelu_new") not in ACTIVATIONS:
            raise FournilError(f"GPT-2 activation {hf['activation_function']!r} is not supported: {', '.join(ACTIVATIONS)}")
        return {"family": "gpt", "vocab_size": hf.get("vocab_size", 50257), "block_size": hf.get("n_positions", 1024),
                "n_layer": hf.get("n_layer", 12), "n_head": hf.get("n_head", 12), "n_embd": n_embd, "bias": True,
                "tie_embeddings": hf.get("tie_word_embeddings", True),
                "activation": hf.get("activation_function", "gelu_new")}
    if kind == "blenderbot":
        return seq2seq_settings(hf)
    if kind not in LLAMA_TYPES:
        raise FournilError(f"architecture {kind!r} is not supported; fournil reads {SUPPORTED}")
    if hf.get("hidden_act", "silu") != "silu":
        raise FournilError(f"hidden_act {hf['hidden_act']!r} is not supported (Llama-family models use silu)")
    if hf.get("use_sliding_window"):
        raise FournilError(f"{(hf.get('architectures') or [kind])[0]} with use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling together
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    n_head = hf["num_attention_heads"]
    bias = hf.get("attention_bias", False)
    return {
        "family": "llama", "vocab_size": hf["vocab_size"], "block_size": hf.get("max_position_embeddings", 2048),
        "n_layer": hf["num_hidden_layers"], "n_head": n_head, "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "n_embd": hf["hidden_size"], "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_head,
        "intermediate_size": hf["intermediate_size"], "rope_theta": float(theta), "rope_scaling": scaling or None,
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": hf.get("tie_word_embeddings", False),
        "qkv_bias": kind == "qwen2" or bias, "o_bias": bias, "mlp_bias": hf.get("mlp_bias", False),
        "sliding_window": hf.get("sliding_window") if kind == "mistral" else None, "qk_norm": kind == "qwen3",
    }


def seq2seq_settings(hf: dict) -> dict:
    """fournil's seq2seq settings from a Blenderbot config (such as :func:`seq2seq_config` writes), or what keeps
    fournil's model from holding it. (The defaults are transformers'.)"""
    d_model, layers, heads = hf.get("d_model", 2560), hf.get("encoder_layers", 2), hf.get("encoder_attention_heads", 32)
    eos = hf.get("eos_token_id", 2)
    needs = {"as many decoder_layers as encoder_layers": hf.get("decoder_layers", 24) == layers,
             "as many decoder_attention_heads as encoder_attention_heads":
                 hf.get("decoder_attention_heads", 32) == heads,
             "encoder_ffn_dim and decoder_ffn_dim of 4 x d_model":
                 hf.get("encoder_ffn_dim", 10240) == hf.get("decoder_ffn_dim", 10240) == 4 * d_model,
             "activation_function gelu": hf.get("activation_function", "gelu") == "gelu",
             "scale_embedding false": not hf.get("scale_embedding", False),
             "tie_word_embeddings true": hf.get("tie_word_embeddings", True),
             "one eos_token_id, the pad_token_id too (sources are padded with it)":
                 isinstance(eos, int) and hf.get("pad_token_id", 0) == eos}
    if missing := [need for need, met in needs.items() if not met]:
        raise FournilError(f"this Blenderbot is not one fournil's seq2seq model holds: it needs {'; '.join(missing)}")
    return {"family": "seq2seq", "vocab_size": hf.get("vocab_size", 8008),
            "block_size": hf.get("max_position_embeddings", 128), "n_layer": layers, "n_head": heads,
            "n_embd": d_model, "bos_id": hf.get("decoder_start_token_id", 1), "eos_id": eos}


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise FournilError(f"{index} is damaged ({e})") from None
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" (it has {', '.join(pickled)}: pickle files are never loaded, they can run code)" if pickled else ""
        raise FournilError(f"{folder} has no *.safetensors weights{hint}; convert them to safetensors first")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FournilError(f"{file} is missing (named in the index)")
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise FournilError(f"{file} is not a valid safetensors file (truncated or corrupted?): {e}") from None
    return tensors


def to_fournil_names(family: str, tensors: dict) -> dict:
    if family == "seq2seq" and "final_logits_bias" in tensors:  # (Blenderbot's, zero unless fine-tuned so)
        if tensors["final_logits_bias"].any():
            raise FournilError("this Blenderbot adds a bias to its logits (final_logits_bias), which fournil's "
                               "seq2seq model has not")
        tensors = {k: v for k, v in tensors.items() if k != "final_logits_bias"}
    if family != "gpt":
        return tensors
    out = {}
    for k, v in tensors.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old GPT-2 files
            continue
        name = k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"
        out[name] = v.t().contiguous() if name.endswith(GPT2_CONV1D) else v
    return out


def read_folder(folder: Path):
    """(model settings, tensors with fournil's names, tokenizer, source description) of a Hugging Face folder."""
    hf = read_config(folder)
    settings = model_config(hf)
    tensors = to_fournil_names(settings["family"], read_tensors(weight_files(folder)))
    if not (folder / "tokenizer.json").is_file():
        raise FournilError(f"{folder} has no tokenizer.json (fournil reads Hugging Face fast tokenizers only)")
    tokenizer = load_tokenizer(folder)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    architecture = (hf.get("architectures") or [hf["model_type"]])[0]
    return settings, tensors, tokenizer, {"format": "Hugging Face folder", "architecture": architecture, "dtype": ", ".join(dtypes)}


def hf_config(config, tokenizer: HFTokenizer) -> dict:
    """The Hugging Face config.json of a fournil model."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    c = config
    if type(config).__name__ == "Seq2SeqConfig":
        return seq2seq_config(c)
    if type(config).__name__ == "GPTConfig":
        if not c.bias:
            raise FournilError("GPT-2 has biases everywhere: a gpt model trained with --bias false cannot be exported")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "activation_function": c.activation, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": c.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": "float32", **ids}
    kind = "qwen3" if c.qk_norm else "mistral" if c.sliding_window else "qwen2" if c.qkv_bias and not c.o_bias \
        else "llama"
    if kind == "qwen3" and c.sliding_window:
        raise FournilError("norms on queries and keys (Qwen3) with a sliding window: fournil writes Qwen3 without one")
    if c.qkv_bias != c.o_bias and kind != "qwen2":
        raise FournilError("biases on q, k, v but not on the output projection exist only in Qwen2 (which has no sliding window)")
    out = {"architectures": [LLAMA_TYPES[kind]], "model_type": kind, "vocab_size": c.vocab_size,
           "max_position_embeddings": c.block_size, "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
           "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
           "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_embeddings, "dtype": "float32", **ids}
    if kind == "llama":
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif c.mlp_bias:
        raise FournilError(f"{kind} has no MLP biases; only a llama-type model can export mlp_bias")
    if kind == "qwen3":
        out["attention_bias"] = c.qkv_bias
    if kind == "mistral":
        out["sliding_window"] = c.sliding_window
    return out


def seq2seq_config(c) -> dict:
    """Blenderbot's config for a seq2seq model: its architecture is fournil's (pre-norm layers, a final norm on each
    side, learned positions from 0, exact GELU, one embedding table; BART adds a norm after the embeddings, and
    places positions 2 rows further on)."""
    if not (c.shared_embeddings and c.tie_embeddings):
        raise FournilError("Blenderbot has one embedding table for the encoder, the decoder and the output layer: a "
                           "seq2seq model trained with --shared-embeddings false cannot be exported")
    ids = {"bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "pad_token_id": c.eos_id,  # (sources are padded so)
           "decoder_start_token_id": c.bos_id}
    return {"architectures": ["BlenderbotForConditionalGeneration"], "model_type": "blenderbot",
            "vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "d_model": c.n_embd,
            "encoder_layers": c.n_layer, "decoder_layers": c.n_layer, "encoder_attention_heads": c.n_head,
            "decoder_attention_heads": c.n_head, "encoder_ffn_dim": 4 * c.n_embd, "decoder_ffn_dim": 4 * c.n_embd,
            "activation_function": "gelu", "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, "is_encoder_decoder": True, "tie_word_embeddings": True,
            "encoder_no_repeat_ngram_size": 0, "forced_eos_token_id": None, "dtype": "float32", **ids}


def char_to_hf(tok: CharTokenizer) -> HFTokenizer:
    """The same vocabulary and ids as a Hugging Face tokenizer: a BPE with no merges is one token per character."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    unk = UNKNOWN if UNKNOWN in tok.specials else None
    t = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tok.itos)}, merges=[], unk_token=unk))
    t.add_special_tokens([AddedToken(s, special=True) for s in tok.specials])
    t.decoder = decoders.Fuse()
    boundary = tok.itos[tok.boundary_id] if tok.boundary_id is not None else None
    return HFTokenizer(t, bos=boundary, eos=boundary, add_bos=boundary is not None)


def hf_tokenizer(tokenizer) -> HFTokenizer:
    return char_to_hf(tokenizer) if isinstance(tokenizer, CharTokenizer) else tokenizer


def write_folder(model, tokenizer, folder: Path) -> None:
    """A folder that ``AutoModelForCausalLM.from_pretrained`` (``AutoModelForSeq2SeqLM``: a seq2seq model) and
    ``AutoTokenizer.from_pretrained`` load."""
    tokenizer = hf_tokenizer(tokenizer)
    config = hf_config(model.config, tokenizer)  # (what cannot be exported is refused before the folder is made)
    folder.mkdir(parents=True, exist_ok=True)
    state = unique_state(model)
    if model.family == "gpt":
        state = {k: v.t() if k.endswith(GPT2_CONV1D) else v for k, v in state.items()}
    if model.family == "seq2seq":  # a source is read as it is, and padded with the end token, as fournil pads them
        from tokenizers import Tokenizer

        tokenizer = HFTokenizer(Tokenizer.from_str(tokenizer.tok.to_str()), tokenizer.bos, tokenizer.eos,
                                pad=tokenizer.eos)
        tokenizer.tok.post_processor = None  # (a BPE's adds BOS to a text, as a decoder-only model reads it)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
        generation["max_length"] = model.config.block_size  # (the start token, then the target)
    else:  # transformers' generate stops on any of the stop tokens
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids) or None}
    write_json(folder / "config.json", config)
    save_tensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(folder / "tokenizer.json")
    write_json(folder / "generation_config.json", generation)

