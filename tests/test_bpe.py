"""Byte-level BPE: trained on a corpus, loaded by transformers as it is, used to train and score a model."""
import json
import math
import re

import pytest

from fournil.errors import FournilError
from fournil.runs import Run

FRENCH = "Élise et Zoé mangent des crêpes à Noël 🙂, 1234567 fois !"


def test_tokenizer_train_reports_compression_and_transformers_agrees(cli, tmp_path):
    out = cli("tokenizer", "train", "--data", "prenoms", "--vocab-size", "400", "--out", "tok").stdout
    assert "400 tokens -> tok/tokenizer.json" in out
    bytes_per_token = float(out.split("tokens: ")[1].split(" bytes per token")[0])
    assert 1.5 < bytes_per_token < 8  # merges made tokens longer than one byte
    taken = cli("info", "tok", check=False)  # for a model: "tok has no config.json: fournil reads run directories..."
    assert taken.returncode == 2 and "tok holds a tokenizer, not a model: see where it cuts a text with `fournil " \
                                     "tokenize TEXT --tokenizer tok`" in taken.stderr

    from fournil.tokenizers import load_tokenizer
    ours = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert ours.decode(ours.encode(FRENCH)) == FRENCH  # every byte is in the vocabulary: no unknown token
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert theirs(FRENCH)["input_ids"] == ours.prompt_ids(FRENCH)  # <|endoftext|> first, then the same tokens
    assert theirs.decode(ours.encode(FRENCH)) == FRENCH
    for broken in ("x\ud83d", "\udcff"):  # half a surrogate pair: a JSON escape, or a byte that was not UTF-8
        with pytest.raises(FournilError, match="half of a UTF-16 surrogate pair"):
            ours.encode(broken)
        with pytest.raises(FournilError, match="half of a UTF-16 surrogate pair"):
            ours.encode_many([FRENCH, broken])
    chat = [{"role": "user", "content": "Bonjour"}]
    rendered = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert theirs(rendered, add_special_tokens=False)["input_ids"] == ours.chat_ids(chat)


def test_tokenize_shows_the_cuts_and_counts(cli, tmp_path):
    cli("tokenizer", "train", "--data", "shakespeare", "--vocab-size", "300", "--out", "tok")
    out = cli("tokenize", "the king🙂", "--tokenizer", "tok").stdout.splitlines()
    cuts = out[0].split("|")
    assert "".join(cuts).replace("<F0><9F><99><82>", "🙂") == "the king🙂"
    assert any(c.startswith("<") for c in cuts)  # the emoji is cut into bytes no merge covers
    ids = out[1].removeprefix("ids: ").split()
    assert len(ids) == len(cuts)
    assert out[2] == f"9 characters, 12 bytes, {len(ids)} tokens: {12 / len(ids):.2f} bytes per token"
    # --chat: the text as a user's message in the tokenizer's chat template, as a chat model reads it
    from fournil.tokenizers import load_tokenizer
    from fournil.tokenizers.compression import piece

    ours, chat = load_tokenizer(tmp_path / "tok" / "tokenizer.json"), [{"role": "user", "content": "the king"}]
    out = cli("tokenize", "the king", "--tokenizer", "tok", "--chat").stdout
    laid, ids = out.rsplit("\nids: ", 1)
    assert [int(i) for i in ids.splitlines()[0].split()] == ours.chat_ids(chat)
    cut = [piece(ours, i) for i in ours.chat_ids(chat)]
    assert laid == "|".join(cut) and "".join(cut) == ours.chat_text(chat) and laid.startswith("<|im_start|>|")
    assert f"; the chat template's layout around them: {len(cut) - len(ours.encode('the king'))} more" in out
    refused = cli("tokenize", "the king", "--tokenizer", "char", "--chat", check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("fournil: error: characters: it has no chat template")


def test_tokenizer_with_no_action_trains_one_on_its_defaults(cli, tmp_path):
    """``fournil tokenizer`` alone trains, as ``tokenizer train`` would: 1,024 tokens of shakespeare; flags alone go
    to ``train`` too, and ``--help`` stays the command's own."""
    assert "1,024 tokens -> tokenizers/shakespeare-bpe1024/tokenizer.json" in cli("tokenizer").stdout
    vocabulary = json.loads((tmp_path / "tokenizers/shakespeare-bpe1024/tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocabulary) == 1024 and "<|endoftext|>" in vocabulary
    assert "300 tokens -> tok/tokenizer.json" in cli("tokenizer", "--vocab-size", "300", "--out", "tok").stdout
    assert "{train}" in cli("tokenizer", "--help").stdout


def test_bad_vocabulary_sizes_are_explained(cli):
    # each command is told the size it can have in its own flag (prepare and train have no --vocab-size)
    for command, asked in ((("tokenizer", "train", "--vocab-size", "100000"), "--vocab-size "),
                           (("prepare", "--tokenizer", "bpe:100000"), "--tokenizer bpe:"),
                           (("train", "--tokenizer", "bpe:100000"), "--tokenizer bpe:")):
        too_big = cli(*command, "--data", "names", check=False)
        assert too_big.returncode == 2 and "Traceback" not in too_big.stderr, too_big.stderr
        most = re.search(r"this corpus supports at most (\d+) tokens", too_big.stderr)[1]
        assert f"ask for {asked}{most} or less, or give more text" in too_big.stderr
    too_small = cli("tokenizer", "train", "--data", "names", "--vocab-size", "100", check=False)
    assert too_small.returncode == 2 and "at least 259" in too_small.stderr


def test_a_model_trained_on_bpe_tokens_scores_the_same_bytes(cli, tmp_path):
    common = ["train", "--data", "prenoms", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--steps", "20",
              "--eval-every", "10", "--quiet"]
    cli(*common, "--out", "chars")
    shown = cli(*common[:-1], "--tokenizer", "bpe:300", "--out", "bpe").stdout  # with its progress, off a terminal
    assert shown.startswith("gpt; lines data prenoms; vocabulary 300")  # (the BPE trainer wrote empty lines first)
    config = json.loads((tmp_path / "bpe" / "config.json").read_text())
    assert config["data"]["mode"] == "lines" and config["model"]["vocab_size"] == 300
    chars, bpe = Run.load(tmp_path / "chars"), Run.load(tmp_path / "bpe")
    assert bpe.mode == "lines"
    a, b = chars.evaluate(["val"])["val"], bpe.evaluate(["val"])["val"]
    assert b["tokens"] < a["tokens"]  # fewer, longer tokens
    scored_bytes = lambda r: r["nll"] * r["tokens"] / math.log(2) / r["bpb"]  # noqa: E731
    assert scored_bytes(a) == pytest.approx(scored_bytes(b), rel=1e-9)  # the same text, counted in bytes alike
    names = bpe.sample(5, seed=1)
    assert len(names) == 5 and all("<|endoftext|>" not in n for n in names)  # stops at the end of a document
    cli("eval", "bpe")
    both = cli("eval", "chars", "bpe")  # in one table: per token they do not compare, per byte they do
    assert both.stderr == ("these runs cut text into different tokens: nll and ppl are per token and do not compare; "
                           "bits per character and per byte do\n")
