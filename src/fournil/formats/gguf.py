"""GGUF files (llama.cpp's format), read by ``gguf_reader`` and written with the ``gguf`` package's writer.

Reading: hyper-parameters from the metadata, tensors dequantized to float32, the tokenizer rebuilt from its
vocabulary (byte-level BPE with merges, or SentencePiece-style pieces and scores) as a Hugging Face ``tokenizers``
object, and the chat template. llama.cpp stores the q and k rows of Llama models in Meta's interleaved rotary
order; they are put back in Hugging Face's order here, and the other way on writing.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fournil.checkpoint import unique_state
from fournil.errors import FournilError
from fournil.formats.gguf_reader import TYPES, GGUFTensor, read_gguf_file
from fournil.tokenizers import CharTokenizer, HFTokenizer
from fournil.tokenizers.char import SPACE, UNKNOWN, as_characters

LLAMA_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp's converter interleaves q/k rows for these, not for qwen2 and 3
LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
GPT2_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
# How text is split before BPE merges, by llama.cpp's pre-tokenizer name (GPT-2's own regex otherwise).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
          "dbrx": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
QTYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# what a 4-bit file keeps at 8 bits: the tables each token is read from and the output layer, which its errors hurt
# most (SmolLM2's own Q4_1 file keeps its embedding, tied to the output, in Q8_0)
EIGHT_BITS = ("token_embd", "position_embd", "output")


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary rows back to Hugging Face's halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def model_settings(meta: dict, names: set[str]) -> dict:
    arch = meta.get("general.architecture")
    if arch != "gpt2" and arch not in LLAMA_ARCHS:
        raise FournilError(f"GGUF architecture {arch!r} is not supported; fournil reads {', '.join(LLAMA_ARCHS)}, gpt2")

    def get(key, default=None, required=True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise FournilError(f"the GGUF metadata lacks {arch}.{key}: the file is not a complete model")
        return value

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    common = {"vocab_size": get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or [])),
              "block_size": get("context_length"), "n_layer": get("block_count"), "n_head": n_head, "n_embd": n_embd,
              "tie_embeddings": "output.weight" not in names}
    if arch == "gpt2":
        return {"family": "gpt", **common, "bias": True, "activation": meta.get("fournil.activation", "gelu_new")}
    if "rope_freqs.weight" in names or get("rope.scaling.type", "none") != "none":
        raise FournilError("this GGUF uses rope scaling (rope_freqs or rope.scaling.type), which fournil does not read "
                           "from GGUF yet; load the model's Hugging Face folder instead")
    return {
        "family": "llama", **common, "n_kv_head": get("attention.head_count_kv", n_head),
        "head_dim": get("attention.key_length", n_embd // n_head), "intermediate_size": get("feed_forward_length"),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "qkv_bias": "blk.0.attn_q.bias" in names, "o_bias": "blk.0.attn_output.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names, "sliding_window": get("attention.sliding_window", required=False),
        "qk_norm": "blk.0.attn_q_norm.weight" in names,
    }


def fournil_name(name: str, table: dict) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    base, rest = (match.group(2), match.group(3)) if match else name.rsplit(".", 1)
    if base not in table:
        raise FournilError(f"unexpected tensor {name!r} in the GGUF file; fournil does not know where it belongs")
    if not match:
        return f"{table[base]}.{rest}"
    prefix = "model.layers" if table is LLAMA_NAMES else "transformer.h"
    return f"{prefix}.{match.group(1)}.{table[base]}.{rest}"


def nibbles(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """The low 4 bits of bytes ``codes``, then their high 4 bits, along ``dim``: taken 4 bytes at a time where rows
    start at multiples of 4 bytes, as Q4_1's and Q4_K's do (SmolLM2's Q4_1 codes in 45 ms instead of 110)."""
    if codes.storage_offset() % 4 or any(stride % 4 for stride in codes.stride()[:-1]):
        return torch.cat([codes & 0xF, codes >> 4], dim)
    words = codes.view(torch.int32)
    return torch.cat([words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F], dim).view(torch.uint8)


def unpack_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of a scale (fp16) and 32 signed bytes."""
    return blocks[:, 2:].view(torch.int8).float().mul_(blocks[:, :2].view(torch.float16).float())


def unpack_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of a scale (fp16) and 16 bytes of two 4-bit codes, less 8 (the low halves are the first 16 values)."""
    codes = nibbles(blocks[:, 2:], 1).to(torch.int8) - 8
    return codes.float().mul_(blocks[:, :2].view(torch.float16).float())


def unpack_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of a scale and a minimum (fp16) and 16 bytes of two 4-bit codes."""
    codes = nibbles(blocks[:, 4:], 1).float()
    return codes.mul_(blocks[:, :2].view(torch.float16).float()).add_(blocks[:, 2:4].view(torch.float16).float())


def k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 sub-blocks' scales and minimums of a Q4_K or Q5_K block (256 values), each multiplied by the block's:
    6 bits each, packed in 12 bytes after the block's two fp16 factors."""
    n = blocks.shape[0]
    d, dmin = blocks[:, :2].view(torch.float16).float(), blocks[:, 2:4].view(torch.float16).float()
    low, mid, high = blocks[:, 4:16].reshape(n, 3, 4).unbind(1)
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], 1).float()
    minimums = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], 1).float()
    return (d * scales)[:, :, None], (dmin * minimums)[:, :, None]


def unpack_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of 256 values: the factors, then 128 bytes of two 4-bit codes (by 32 values, the low halves first)."""
    n = blocks.shape[0]
    scale, minimum = k_scales(blocks)
    codes = blocks[:, 16:].reshape(n, 4, 1, 32)
    return nibbles(codes, 2).reshape(n, 8, 32).float().mul_(scale).sub_(minimum).reshape(n, 256)


def unpack_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K's blocks with a fifth bit for each value: 32 bytes, bit i for the i-th 32 values, before the codes."""
    n = blocks.shape[0]
    scale, minimum = k_scales(blocks)
    codes, fifth = blocks[:, 48:].reshape(n, 4, 1, 32), blocks[:, 16:48]
    low = nibbles(codes, 2).reshape(n, 8, 32)
    high = torch.stack([(fifth >> i) & 1 for i in range(8)], 1)
    return (low | (high << 4)).float().mul_(scale).sub_(minimum).reshape(n, 256)


def unpack_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of 256 values: 128 bytes of their low 4 bits, 64 of their high 2, 16 signed scales of 16 values each,
    and the block's scale (fp16); the codes less 32."""
    n = blocks.shape[0]
    low, high = blocks[:, :128].reshape(n, 2, 1, 64), blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = torch.cat([low & 0xF, low >> 4], 2).reshape(n, 8, 32)
    high = torch.cat([(high >> i) & 3 for i in (0, 2, 4, 6)], 2).reshape(n, 8, 32)
    codes = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scales = blocks[:, 208:].view(torch.float16).float() * blocks[:, 192:208].view(torch.int8).float()
    return codes.mul_(scales[:, :, None]).reshape(n, 256)


def unpack_floats(dtype: torch.dtype):
    """Blocks of one value in ``dtype``."""
    return lambda blocks: blocks.view(dtype).float()


UNPACK = {"F32": unpack_floats(torch.float32), "F16": unpack_floats(torch.float16),
          "BF16": unpack_floats(torch.bfloat16), "Q8_0": unpack_q8_0, "Q4_0": unpack_q4_0, "Q4_1": unpack_q4_1,
          "Q4_K": unpack_q4_k, "Q5_K": unpack_q5_k, "Q6_K": unpack_q6_k}
BLOCK_BYTES = {name: size for name, _, size in TYPES.values()}  # (the reader's table of the types unpacked here)


def dequantize(t) -> torch.Tensor:
    """A stored tensor in float32. The plain types, those of SmolLM2's file and of llama.cpp's usual K-quant files
    (Q4_K_M, Q5_K_M, Q6_K) are unpacked by torch, in the same arithmetic as the gguf package (1.3 s less to load
    SmolLM2); the others by the gguf package, imported for them only (0.09 s)."""
    if t.kind in UNPACK:
        blocks = torch.from_numpy(np.array(t.data)).view(-1, BLOCK_BYTES[t.kind])  # a copy: the file is read-only
        return UNPACK[t.kind](blocks).reshape(t.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as dq

    try:
        values = dq(t.data, GGMLQuantizationType[t.kind])
    except NotImplementedError:
        raise FournilError(f"tensor {t.name} is stored as {t.kind}, which the gguf package cannot dequantize; "
                           f"fournil reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants") from None
    return torch.from_numpy(np.array(values.reshape(t.shape), dtype=np.float32))  # a copy: the file is mapped read-only


class Dequantized(Mapping):
    """A GGUF file's tensors by fournil's names, each dequantized to fp32 when it is read, and not kept: a model that
    is quantized again as it loads (:meth:`fournil.runs.Run.load`) never holds all its weights in fp32 at once."""

    def __init__(self, stored: dict):
        self.stored = stored  # name: (the stored tensor, its heads if llama.cpp interleaved its rotary rows)

    def __getitem__(self, name: str) -> torch.Tensor:
        t, heads = self.stored[name]
        return dequantize(t) if heads is None else unpermute(dequantize(t), heads)

    def __contains__(self, name) -> bool:  # (Mapping's would dequantize the tensor to answer)
        return name in self.stored

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


def read_gguf(path: Path):
    """(model settings, tensors with fournil's names, tokenizer, description) of a GGUF file."""
    meta, stored = read_gguf_file(path)
    names = {t.name for t in stored}
    settings = model_settings(meta, names)
    tokenizer = gguf_tokenizer(meta)
    table = GPT2_NAMES if settings["family"] == "gpt" else LLAMA_NAMES
    permuted = meta["general.architecture"] in PERMUTED_ARCHS
    stored_as, kinds, elements = {}, {}, {}
    for t in stored:
        if t.kind not in UNPACK:  # a type no one here reads fails now, not halfway through loading
            dequantize(GGUFTensor(t.name, t.dims[:1], t.kind, t.data[:1]))
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        elements[t.kind] = elements.get(t.kind, 0) + math.prod(t.dims)
        heads = None
        if permuted and re.search(r"\.(attn_q|attn_k)\.", t.name):
            heads = settings["n_head"] if ".attn_q." in t.name else settings["n_kv_head"]
        stored_as[fournil_name(t.name, table)] = t, heads
    dtype = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    source = {"format": "GGUF file", "architecture": meta["general.architecture"], "dtype": dtype,
              "bits": quantized_bits(max(elements, key=elements.get))}
    return settings, Dequantized(stored_as), tokenizer, source


def quantized_bits(kind: str) -> int | None:
    """The bits per weight of a quantized GGUF type (Q4_1: 4, Q6_K: 6, IQ4_XS: 4), None for F32, F16 and BF16."""
    found = re.match(r"I?Q(\d)", kind)
    return int(found.group(1)) if found else None


def gguf_tokenizer(meta: dict) -> HFTokenizer | CharTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise FournilError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); fournil needs one to run the model")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", kind == "llama"))
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece pieces with scores: merges follow the score of the merged piece
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = next((t for t, k in zip(tokens, types) if k == 2), None)
        byte_fallback = 6 in types
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, vocab), unk_token=unk,
                                   fuse_unk=True, byte_fallback=byte_fallback))
        steps = [normalizers.Prepend("\u2581")] * space_prefix + [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), *[decoders.ByteFallback()] * byte_fallback,
                                         decoders.Fuse(), *[decoders.Strip(" ", 1, 0)] * space_prefix])
    else:
        raise FournilError(f"GGUF tokenizer model {kind!r} is not supported; "
                           f"fournil reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (2, 3)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    token = lambda key: tokens[meta[key]] if meta.get(key) is not None and meta[key] < len(tokens) else None  # noqa: E731
    return as_characters(HFTokenizer(tok, bos=token("tokenizer.ggml.bos_token_id"),
                                     eos=token("tokenizer.ggml.eos_token_id"),
                                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                                     chat_template=meta.get("tokenizer.chat_template")))


def spm_merges(tokens: list[str], scores: list[float], vocab: dict) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two known pieces, best score first."""
    found = []
    for piece, score in zip(tokens, scores):
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def write_gguf(model, tokenizer, path: Path, qtype: str = "f32") -> None:
    """A GGUF file of ``model`` with weights in F32, F16, Q8_0, Q4_0 or Q4_1 (vectors stay F32, as llama.cpp keeps
    them; a 4-bit file keeps the embeddings and the output layer in Q8_0)."""
    import gguf

    if qtype not in QTYPES:
        raise FournilError(f"GGUF type {qtype!r} is not one fournil writes; choose {', '.join(QTYPES)}")
    c = model.config
    if model.family == "llama" and c.rope_scaling:
        raise FournilError("fournil does not write rope scaling to GGUF yet; export this model as a Hugging Face folder")
    path = Path(path)
    if model.family == "gpt":
        arch, table = "gpt2", GPT2_NAMES
    else:
        arch, table = ("qwen3" if c.qk_norm else "qwen2" if c.qkv_bias and not c.o_bias else "llama"), LLAMA_NAMES
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(path.stem)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_head_count(c.n_head)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType[f"MOSTLY_{QTYPES[qtype]}"])
    if model.family == "gpt":
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_layer_norm_eps(1e-5)
        w.add_string("fournil.activation", c.activation)
    else:
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count_kv(c.n_kv_head)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if c.sliding_window:
            w.add_sliding_window(c.sliding_window)
    add_tokenizer(w, tokenizer)
    reverse = {v: k for k, v in table.items()}
    for name, value in unique_state(model).items():
        match = re.fullmatch(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)", name)
        if match:
            gname = f"blk.{match.group(1)}.{reverse[match.group(2)]}.{match.group(3)}"
        else:
            base, rest = name.rsplit(".", 1)
            gname = f"{reverse[base]}.{rest}"
        value = value.detach().float().cpu()
        if arch in PERMUTED_ARCHS and re.search(r"\.(attn_q|attn_k)\.", gname):
            value = permute(value, c.n_head if ".attn_q." in gname else c.n_kv_head)
        array = value.numpy()
        kind = QTYPES[qtype] if array.ndim == 2 else "F32"
        if kind.startswith("Q4") and gname.split(".")[0] in EIGHT_BITS:
            kind = "Q8_0"
        if kind.startswith("Q") and array.shape[-1] % 32:
            kind = "F16"  # these types pack rows in blocks of 32
        if kind == "F32":
            w.add_tensor(gname, array)
        elif kind == "F16":
            w.add_tensor(gname, array.astype(np.float16))
        else:
            stored = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gname, gguf.quants.quantize(array, stored), raw_dtype=stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)  # written beside its name, then renamed: never half a file under the real name


def add_tokenizer(w, tokenizer) -> None:
    """The vocabulary as llama.cpp reads it: byte-level BPE (``gpt2``) or SentencePiece-style pieces (``llama``)."""
    import json

    if isinstance(tokenizer, CharTokenizer):  # one piece per character, spaces spelled as SentencePiece spells them
        tokens = [t.replace(" ", SPACE) for t in tokenizer.itos]
        types = [3 if t in tokenizer.specials else 1 for t in tokenizer.itos]
        types = [2 if t == UNKNOWN else k for t, k in zip(tokenizer.itos, types)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types(types)
        w.add_add_space_prefix(False)
        if tokenizer.boundary_id is not None:
            w.add_bos_token_id(tokenizer.boundary_id)
            w.add_eos_token_id(tokenizer.boundary_id)
        w.add_add_bos_token(tokenizer.boundary_id is not None)
        return
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise FournilError(f"a {model.get('type')} tokenizer cannot be written to GGUF; fournil writes BPE tokenizers")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    types = [3 if t in added and added[t]["special"] else 4 if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # SentencePiece-style: merge order becomes the score order
        rank = {("".join(m.split(" ", 1))): -i for i, m in enumerate(merges)}
        types = [6 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else k for t, k in zip(tokens, types)]
        w.add_tokenizer_model("llama")
        w.add_token_scores([float(rank.get(t, -len(merges) - 1)) for t in tokens])
        w.add_add_space_prefix(any(n.get("type") == "Prepend" for n in (spec.get("normalizer") or {}).get("normalizers", [])))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe" if "Split" in json.dumps(spec.get("pre_tokenizer")) else "gpt-2")
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for add, token_id in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id)):
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(tokenizer.add_bos)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
