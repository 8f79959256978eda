"""Import and export against transformers itself: tiny random models built with its own config classes."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fournil.checkpoint import save_weights  # noqa: E402
from fournil.errors import FournilError  # noqa: E402
from fournil.formats import export  # noqa: E402
from fournil.runs import Run  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=12, attention_bias=True),  # (heads wider than 32 / 4)
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=V - 1, eos_token_id=V - 1),
}


def save_tokenizer(folder):
    """A byte-level BPE tokenizer trained on a few sentences, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:V - 20])
    tok.train_from_iterator(["the cat sat on the mat", "hello world", "the end"] * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Each architecture saved by transformers, with the logits it gives on fixed ids."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 20))
    out = {}
    for name, config in CONFIGS.items():
        model = transformers.AutoModelForCausalLM.from_config(config()).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)  # biases and norms too, so a misplaced one shows
            logits = model(ids).logits
        model.save_pretrained(root / name, max_shard_size="20KB" if name == "llama" else "1GB")  # llama: sharded
        save_tokenizer(root / name)
        out[name] = (root / name, logits)
    return ids, out


def transformers_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_import_matches_transformers_and_export_goes_back(arch, hf_models, tmp_path):
    ids, models = hf_models
    folder, expected = models[arch]
    if arch == "llama":
        assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    run = Run.load(folder, "cpu")
    with torch.no_grad():
        ours = run.model(ids)
    assert (ours - expected).abs().max() < 1e-4
    export(run, tmp_path / "out", "hf")
    assert (transformers_logits(tmp_path / "out", ids) - expected).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("the cat sat")["input_ids"] == run.tokenizer.encode("the cat sat")


@pytest.mark.parametrize("arch,qtype,tol", [("llama", "f32", 1e-5), ("qwen2", "f16", 0.05), ("gpt2", "f32", 1e-5),
                                            ("mistral", "q8_0", 0.15), ("qwen3", "f32", 1e-5)])
def test_gguf_export_reads_back(arch, qtype, tol, hf_models, tmp_path):
    ids, models = hf_models
    folder, expected = models[arch]
    if arch == "llama":  # GGUF keeps no rope scaling from fournil yet: use the plain rotary version
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_scaling", None), config.pop("rope_parameters", None)
        folder = shutil.copytree(folder, tmp_path / "plain")
        (folder / "config.json").write_text(json.dumps(config))
        expected = transformers_logits(folder, ids)
    export(Run.load(folder, "cpu"), tmp_path / "m.gguf", "gguf", qtype)
    back = Run.load(tmp_path / "m.gguf", "cpu")
    with torch.no_grad():
        assert (back.model(ids) - expected).abs().max() < tol
    assert back.tokenizer.encode("hello world") == Run.load(folder, "cpu").tokenizer.encode("hello world")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_trained_char_model_goes_to_transformers_and_gguf(family, trained, tmp_path):
    """fournil's own models (character tokenizer; gpt with exact GELU) exported: transformers and the GGUF reader
    agree with them."""
    run = Run.load(trained[family], "cpu")
    ids = torch.tensor([run.tokenizer.prompt_ids("emma")])
    with torch.no_grad():
        ours = run.model(ids)
    export(run, tmp_path / "hf", "hf")
    assert (transformers_logits(tmp_path / "hf", ids) - ours).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("emma", add_special_tokens=False)["input_ids"] == run.tokenizer.encode("emma")
    assert hf_tok.decode(ids[0], skip_special_tokens=True) == "emma"
    export(run, tmp_path / "m.gguf", "gguf")
    back = Run.load(tmp_path / "m.gguf", "cpu")
    with torch.no_grad():
        assert (back.model(ids) - ours).abs().max() < 1e-5
    assert back.tokenizer.prompt_ids("emma") == run.tokenizer.prompt_ids("emma")


def test_a_character_model_read_back_from_its_export_reads_text_as_the_run_does(trained, tmp_path):
    """A names model written to GGUF or a Hugging Face folder, read back, has the run's characters again: each name
    framed by the boundary, the same tokens and NLL as the run on the same names, and a character it never saw is an
    error. Read as the BPE it was written as, it dropped the line ends (and any unknown character) without a word:
    on prenoms' test split, 12,228 of 13,842 tokens, the names run together, 3.83 nats instead of 2.40."""
    from fournil.tokenizers import CharTokenizer

    run = Run.load(trained["llama"], "cpu")
    export(run, tmp_path / "m.gguf", "gguf")
    export(run, tmp_path / "hf", "hf")
    export(Run.load(tmp_path / "m.gguf", "cpu"), tmp_path / "from-gguf", "hf")  # (spaces spelled as GGUF spells them)
    (tmp_path / "odd.txt").write_text("emma\nzoë!\n", encoding="utf-8")
    _, expected = run.score_text("names")
    for path in ("m.gguf", "hf", "from-gguf"):
        back = Run.load(tmp_path / path, "cpu")
        assert isinstance(back.tokenizer, CharTokenizer) and back.tokenizer.itos == run.tokenizer.itos, path
        _, scores = back.score_text("names")
        assert scores["tokens"] == expected["tokens"] and abs(scores["nll"] - expected["nll"]) < 1e-5, path
        with pytest.raises(FournilError, match="'!', 'ë' are not in the model's vocabulary"):
            back.score_text(str(tmp_path / "odd.txt"))


def test_a_4_bit_gguf_file_is_an_eighth_of_f32_and_scores_close_to_it(cli, trained, bpe_llama, tmp_path):
    """q4_0 and q4_1 files: their matrices in 4-bit blocks, the embedding (the output layer too, tied) in Q8_0, as
    SmolLM2's own Q4_1 file keeps it; the gguf package reads back the weights, each within a step of its block's 16
    levels, and the model scores within 2 % of the f32 file's NLL."""
    import gguf

    weights = Run.load(trained["llama"], "cpu").model.state_dict()
    nll, said = {}, {}
    for kind in ("f32", "q8_0", "q4_0", "q4_1"):
        said[kind] = cli("convert", trained["llama"], tmp_path / f"{kind}.gguf", "--type", kind)
        assert "F16" not in said[kind].stderr and said[kind].stdout.startswith(f"wrote {tmp_path / kind}.gguf (gguf: ")
        line = cli("eval", tmp_path / f"{kind}.gguf", "--data", "names").stdout.splitlines()
        nll[kind] = float(line[-1].split()[4])
    size = {kind: (tmp_path / f"{kind}.gguf").stat().st_size for kind in nll}
    for kind in ("q4_0", "q4_1"):
        reader = gguf.GGUFReader(str(tmp_path / f"{kind}.gguf"))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == kind.upper(), types
        assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
        assert size[kind] < size["q8_0"] * 0.75 and size[kind] < size["f32"] / 3, size
        assert abs(nll[kind] - nll["f32"]) < 0.02 * nll["f32"], nll
        up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        read = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type).copy()).view(-1, 32)
        blocks = weights["model.layers.0.mlp.up_proj.weight"].reshape(-1, 32)
        step = blocks.abs().amax(1, keepdim=True) / (8 if kind == "q4_0" else 7.5)  # (q4_1: (max - min) / 15)
        assert ((read - blocks).abs() <= step + 1e-6).all(), kind
        assert f"{kind.upper()} x{list(types.values()).count(kind.upper())}, F32 x" in said[kind].stdout
        assert said[kind].stdout.rstrip().endswith("Q8_0 x1)")
    narrow = cli("convert", bpe_llama, tmp_path / "narrow.gguf", "--type", "q4_0")  # 48 wide
    assert "F16 x" in narrow.stdout and narrow.stderr.startswith("fournil: ") and "rows, of 48 values" in narrow.stderr


def test_a_gguf_file_of_the_types_fournil_unpacks_loads_without_the_gguf_package(trained, tmp_path):
    """Importing the gguf package took 0.09 s of every launch of `fournil chat smollm2` (F32, Q4_1, Q8_0): the
    reader knows the types fournil unpacks itself, as the package lists them, and asks it only for the others."""
    import gguf

    from fournil.formats.gguf import UNPACK
    from fournil.formats.gguf_reader import TYPES

    for number, (name, block, size) in TYPES.items():
        kind = gguf.GGMLQuantizationType(number)
        assert kind.name == name and gguf.GGML_QUANT_SIZES[kind] == (block, size)
    assert set(UNPACK) == {name for name, _, _ in TYPES.values()}
    export(Run.load(trained["llama"], "cpu"), tmp_path / "m.gguf", "gguf", "q8_0")
    code = f"import sys; from fournil.runs import Run; run = Run.load({str(tmp_path / 'm.gguf')!r}, 'cpu'); " \
           "print(run.source['dtype'], 'gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False" and "Q8_0" in out.stdout and "F32" in out.stdout


def test_a_character_vocabulary_with_spaces_survives_gguf(tmp_path):
    """Characters travel as SentencePiece pieces (a space is spelled \u2581): same ids, same text back."""
    from fournil.config import RunConfig
    from fournil.models import build_model
    from fournil.tokenizers import CharTokenizer

    tok = CharTokenizer.train(["le moustoir", "hémonstoir\n"], boundary=True, unknown=True)
    model = build_model({"family": "llama", "vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 1})
    run = Run(tmp_path, RunConfig(model={}), model, tok, {}, "float32")
    export(run, tmp_path / "c.gguf", "gguf")
    back = Run.load(tmp_path / "c.gguf", "cpu").tokenizer
    text = "le hémonstoir\nmoustoir"
    assert back.prompt_ids(text) == tok.prompt_ids(text)
    assert back.decode(tok.encode(text)) == text


@pytest.mark.parametrize("settings, message", [
    ({"qk_norm": True, "sliding_window": 4}, r"norms on queries and keys \(Qwen3\) with a sliding window"),
    ({"qkv_bias": True, "sliding_window": 4}, "biases on q, k, v but not on the output projection exist only in Qwen2"),
    ({"qk_norm": True, "mlp_bias": True}, "qwen3 has no MLP biases"),
    ({"family": "seq2seq", "shared_embeddings": False}, "Blenderbot has one embedding table for the encoder, the "
                                                         "decoder and the output layer"),
])
def test_a_model_that_no_hugging_face_architecture_holds_is_refused(settings, message, tmp_path):
    from fournil.config import RunConfig
    from fournil.models import build_model
    from fournil.tokenizers import CharTokenizer

    tok = CharTokenizer.train(["abc"], boundary=True)
    model = build_model({"family": "llama", "vocab_size": tok.vocab_size, "block_size": 8, "n_layer": 1, **settings})
    with pytest.raises(FournilError, match=message):
        export(Run(tmp_path, RunConfig(model={}), model, tok, {}, "float32"), tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()  # (an empty folder was left)


def test_a_seq2seq_model_with_a_bpe_goes_to_transformers_reading_sources_as_fournil_does(tmp_path):
    """A BPE of fournil's adds BOS to a text, as a decoder-only model reads it; a seq2seq model's source has none:
    exported, transformers reads sources as fournil does, and writes the same targets (an untrained model's). It
    read them after a BOS."""
    from fournil.config import RunConfig
    from fournil.models import build_model
    from fournil.tokenizers.bpe import train_bpe

    tok = train_bpe(["un deux trois quatre cinq six sept huit neuf dix onze douze"] * 20, 280, progress=False)
    torch.manual_seed(0)
    model = build_model({"family": "seq2seq", "vocab_size": tok.vocab_size, "block_size": 16, "n_layer": 1,
                         "n_head": 2, "n_embd": 32, "bos_id": tok.bos_id, "eos_id": tok.eos_id}).eval()
    run = Run(tmp_path, RunConfig(model={}), model, tok, {}, "float32")
    export(run, tmp_path / "hf", "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sources = ["un deux", "neuf dix sept onze"]
    assert hf_tok(sources)["input_ids"] == [tok.encode(s) for s in sources]
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    written = hf.generate(**hf_tok(sources, return_tensors="pt", padding=True), do_sample=False)
    assert hf_tok.batch_decode(written, skip_special_tokens=True) == run.translate(sources)


def test_a_blenderbot_unlike_fournils_seq2seq_model_is_refused_with_what_differs():
    from fournil.formats.hf import model_config

    distilled = {"model_type": "blenderbot", "vocab_size": 8008, "d_model": 1280, "encoder_layers": 2,
                 "decoder_layers": 12, "encoder_attention_heads": 32, "decoder_attention_heads": 32,
                 "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "scale_embedding": True, "pad_token_id": 0,
                 "eos_token_id": 2}  # facebook/blenderbot-400M-distill's
    with pytest.raises(FournilError, match=r"^this Blenderbot is not one fournil's seq2seq model holds: it needs as "
                                           r"many decoder_layers as encoder_layers; scale_embedding false; one "
                                           r"eos_token_id, the pad_token_id too \(sources are padded with it\)$"):
        model_config(distilled)


def test_chat_template_renders_as_transformers_does(hf_models):
    folder, _ = hf_models[1]["llama"]
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    from fournil.tokenizers.chat import render_chat

    expected = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, messages, eos_token=tok.eos_token) == expected


def test_bad_files_give_clear_errors(hf_models, tmp_path):
    folder, _ = hf_models[1]["qwen2"]
    broken = shutil.copytree(folder, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FournilError, match="not a valid safetensors file"):
        Run.load(broken)

    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FournilError, match="pickle files are never loaded"):
        Run.load(pickled)

    other = shutil.copytree(folder, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(FournilError, match="'falcon' is not supported; fournil reads llama, mistral, qwen2, qwen3, "):
        Run.load(other)

    export(Run.load(folder), tmp_path / "m.gguf", "gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FournilError, match="not a valid GGUF file"):
        Run.load(tmp_path / "cut.gguf")
    (tmp_path / "cut.gguf").write_bytes(data[: data.index(b"tokenizer.ggml.tokens") + 100])  # in the vocabulary
    with pytest.raises(FournilError, match=r"not a valid GGUF file \(truncated or corrupted\?\)"):
        Run.load(tmp_path / "cut.gguf")
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")  # its tensor info: dims, then its type
    at += 4 + 8 * int.from_bytes(data[at:at + 4], "little")
    (tmp_path / "new.gguf").write_bytes(data[:at] + (999).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(FournilError, match="stored in type 999, which neither fournil nor the installed gguf package"):
        Run.load(tmp_path / "new.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(FournilError, match="not a valid GGUF file"):
        Run.load(tmp_path / "junk.gguf")


def sentencepiece_style_tokenizer():
    """A Llama-2 style tokenizer: pieces with \u2581 for spaces, merges, and <0xXX> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from fournil.tokenizers import HFTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # pieces never span a space
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    texts = ["the quick brown fox jumps over the lazy dog", "le renard brun saute par-dessus le chien"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=V + 300, special_tokens=specials))
    return HFTokenizer(tok, bos="<s>", eos="</s>", add_bos=True)


def test_a_sentencepiece_vocabulary_survives_gguf(tmp_path):
    from fournil.config import RunConfig
    from fournil.models import build_model

    tok = sentencepiece_style_tokenizer()
    model = build_model({"family": "llama", "vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 1})
    export(Run(tmp_path, RunConfig(model={}), model, tok, {}, "float32"), tmp_path / "spm.gguf", "gguf", "q8_0")
    back = Run.load(tmp_path / "spm.gguf", "cpu").tokenizer
    for text in ["the lazy fox", "le chien saute", "  two spaces, unseen € bytes"]:
        assert back.prompt_ids(text) == tok.prompt_ids(text), text
        assert back.decode(back.encode(text)) == text  # unseen characters come back through their bytes


def write(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_an_unsupported_quantization_is_named(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for add, value in [(w.add_embedding_length, 32), (w.add_head_count, 4), (w.add_block_count, 1),
                       (w.add_context_length, 64), (w.add_feed_forward_length, 64)]:
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8),  # one 40-byte block of 32 values per row
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    write(w)
    with pytest.raises(FournilError, match="stored as Q8_1, which the gguf package cannot dequantize; fournil reads F32"):
        Run.load(tmp_path / "q.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_embedding_length(32)
    write(w)
    with pytest.raises(FournilError, match="lacks llama.attention.head_count: the file is not a complete model"):
        Run.load(tmp_path / "bare.gguf")


def test_convert_and_info_on_the_command_line(cli, hf_models, tmp_path):
    """Hugging Face folder -> run directory -> GGUF, each readable by `fournil info` and `fournil generate`."""
    folder, _ = hf_models[1]["qwen2"]
    cli("convert", folder, tmp_path / "as-run", "--to", "run")
    assert (tmp_path / "as-run" / "config.json").exists() and (tmp_path / "as-run" / "tokenizer_config.json").exists()
    cli("convert", tmp_path / "as-run", tmp_path / "back.gguf", "--type", "f16")
    for model, origin in [(tmp_path / "as-run", "fournil run directory"), (tmp_path / "back.gguf", "GGUF file")]:
        info = cli("info", model).stdout
        assert "parameters:     18,720" in info and "context:        64 tokens" in info and origin in info
        out = cli("generate", model, "the cat", "--max-new-tokens", "5", "--temperature", "0").stdout
        assert out.startswith("the cat")
    result = cli("chat", tmp_path / "back.gguf", check=False, input="hi\n")
    assert result.returncode == 2 and "has no chat template" in result.stderr
    result = cli("info", tmp_path / "nothing", check=False)
    assert result.returncode == 2 and "no run directory" in result.stderr
    for args, message in [(["model.safetensors"], "--to hf writes a folder (config.json, model.safetensors, "
                                                  "the tokenizer), not one .safetensors file: give a folder's name"),
                          (["model.bin", "--to", "gguf"], "model.bin: name a GGUF file OUT.gguf"),
                          (["folder", "--type", "q8_0"], "--type q8_0 is a GGUF weight type: give OUT.gguf")]:
        result = cli("convert", tmp_path / "as-run", tmp_path / args[0], *args[1:], check=False)
        assert result.returncode == 2 and message in result.stderr and not (tmp_path / args[0]).exists()
    result = cli("eval", folder, check=False)  # imported: no splits of its own, and what to do instead
    assert result.returncode == 2 and "was imported, not trained here" in result.stderr
    assert "score it on a text with `fournil eval MODEL --data FILE`" in result.stderr
    scored = cli("eval", folder, "--data", "shakespeare", "--tokens", "200").stdout.splitlines()
    assert scored[1].split()[:2] == ["text", "tokens"] and scored[2].split()[:4] == ["shakespeare", "(test", "split)",
                                                                                     "200"]


def test_generation_keeps_the_bits_of_a_quantized_file_on_a_cpu_and_of_nothing_else(cli, tmp_path):
    """Without --dtype, a CPU generates with a Q8_0 file's weights in int8 (SmolLM2's Q4_1 in int4: test_smollm2);
    a float file, a run trained here and a LoRA adapter on the Q8_0 file (its updates are not on the file's grid)
    keep fp32, and scores are measured in fp32 whatever the file. The file's blocks are quantized as they load, each
    as soon as its last weight is read, to the same weights as a model quantized once loaded."""
    from fournil.formats.gguf import Dequantized, read_gguf
    from fournil.generate.answerers import load_local
    from fournil.models import build_model

    run = tmp_path / "run"  # (64 wide: Q8_0 stores rows of whole blocks of 32, others in F16)
    cli("train", "--data", "shakespeare", "--model", "llama", "--tokenizer", "bpe:300", "--n-embd", "64", "--n-layer",
        "2", "--block-size", "64", "--batch-size", "2", "--steps", "2", "--quiet", "--out", run)
    for kind in ("q8_0", "f16"):
        cli("convert", run, tmp_path / f"{kind}.gguf", "--type", kind)
    cli("finetune", tmp_path / "q8_0.gguf", "--lora", "--steps", "2", "--batch-size", "2", "--quiet", "--out",
        tmp_path / "lora")
    loaded = {name: load_local(str(path), "cpu")[0] for name, path in [
        ("q8_0", tmp_path / "q8_0.gguf"), ("f16", tmp_path / "f16.gguf"), ("run", run), ("lora", tmp_path / "lora")]}
    assert loaded["q8_0"].quantized == "int8" and loaded["q8_0"].precision.endswith("int8 weights")
    for name in ("f16", "run", "lora"):
        assert loaded[name].quantized is None and loaded[name].dtype == torch.float32, name
    assert load_local(str(tmp_path / "q8_0.gguf"), "cpu", "float32")[0].quantized is None  # --dtype says otherwise
    assert Run.load(tmp_path / "q8_0.gguf", "cpu").measure_dtype == torch.float32
    served = cli("generate", tmp_path / "q8_0.gguf", "the king", "--max-new-tokens", "6", "--temperature", "0").stdout
    assert served == cli("generate", tmp_path / "q8_0.gguf", "the king", "--max-new-tokens", "6", "--temperature", "0",
                         "--dtype", "int8").stdout

    after = Run.load(tmp_path / "q8_0.gguf", "cpu").quantize("int8").model.state_dict()
    streamed = loaded["q8_0"].model.state_dict()
    assert streamed.keys() == after.keys() and all(torch.equal(streamed[k], after[k]) for k in after)
    reads, given = [], []

    class Read(Dequantized):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)

    settings, tensors, _, _ = read_gguf(tmp_path / "q8_0.gguf")
    model = build_model(settings, Read(tensors.stored), "q8_0.gguf", lambda block: given.append((len(reads), block)))
    assert [block for _, block in given] == list(model.model.layers) and len(set(reads)) == len(reads)
    for i, (at, _) in enumerate(given):  # right after its own last weight
        assert at == 1 + max(j for j, name in enumerate(reads) if name.startswith(f"model.layers.{i}."))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_exported_files_are_as_readable_as_any_new_file(hf_models, tmp_path):
    """safetensors 0.8 writes files only their owner can read; a server running as another user (a vLLM container)
    must read an exported folder, and a checkpoint written again keeps the permissions given to it."""
    folder, _ = hf_models[1]["qwen2"]
    run = Run.load(folder, "cpu")
    umask = os.umask(0o022)
    try:
        export(run, tmp_path / "hf", "hf")
        export(run, tmp_path / "run", "run")
    finally:
        os.umask(umask)
    files = [*(tmp_path / "hf").iterdir(), *(tmp_path / "run").iterdir()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "tokenizer.json"}
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == dict.fromkeys(modes, 0o644)
    weights = tmp_path / "run" / "model.safetensors"
    weights.chmod(0o640)
    save_weights(run.model, weights)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640


def test_the_gguf_reader_reads_what_the_gguf_package_reads(tmp_path):
    """Every kind of metadata value (numbers of each width, bools, strings, arrays of strings and of numbers) and the
    tensor table, against the gguf package's own reader."""
    import gguf
    import numpy as np

    from fournil.formats.gguf_reader import read_gguf_file

    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "Déjà vu ▁<0x0A>")
    w.add_array("t.strings", ["a", "", "élan", "<|im_end|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.ones((2, 5), dtype=np.float16))
    write(w)
    meta, tensors = read_gguf_file(tmp_path / "meta.gguf")
    reference = gguf.GGUFReader(str(tmp_path / "meta.gguf"))
    assert meta == {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert meta["t.strings"] == ["a", "", "élan", "<|im_end|>"] and meta["t.i64"] == -(2**40)
    for ours, theirs in zip(tensors, reference.tensors):
        assert ours.name == theirs.name and ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert bytes(ours.data) == bytes(theirs.data)


def test_gguf_tensor_types_dequantize_to_the_right_shape(tmp_path):
    """Every listed storage type comes back as float32 (out, in) matrices: close to the original for the types
    the gguf package can write (the K-quants are built block by block here), and equal to its own dequantizer (which
    fournil's torch unpacking of Q8_0, Q4_0, Q4_1 and Q4_K to Q6_K replaces)."""
    import gguf
    import numpy as np

    from fournil.formats.gguf import dequantize, read_gguf_file

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q5_0": 0.2, "Q4_0": 0.4, "Q4_1": 0.3}
    w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for name in tolerance:
        data = x if name == "F32" else gguf.quants.quantize(x, Q[name])
        w.add_tensor(name, data, raw_dtype=None if name == "F32" else Q[name])
    k_blocks = {}
    for name, size, scale_at in [("Q4_K", 144, (0, 2)), ("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,))]:
        block = rng.integers(0, 256, (3, size), dtype=np.uint8)
        for at in scale_at:  # the per-block scales (fp16) must be finite numbers
            block[:, at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        k_blocks[name] = block
        w.add_tensor(name, block, raw_dtype=Q[name])
    write(w)
    for t in read_gguf_file(tmp_path / "types.gguf")[1]:
        value = dequantize(t)
        assert value.dtype == torch.float32 and value.shape == (3, 256), t.name
        if t.name in tolerance:
            assert (value - torch.from_numpy(x)).abs().max() <= tolerance[t.name], t.name
        stored = k_blocks[t.name] if t.name in k_blocks else np.array(t.data)
        expected = gguf.quants.dequantize(stored, Q[t.name]).reshape(3, 256).astype(np.float32)
        assert torch.equal(value, torch.from_numpy(expected)), t.name
