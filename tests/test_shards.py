"""Corpora larger than memory: tokenized once into shards, continued after a kill, streamed into training."""
import json
import signal
import time

from pathlib import Path

import numpy as np
from conftest import CLI, held_elsewhere, write_jsonl

from fournil.data import read_text


def write_corpus(folder, copies: int) -> str:
    text = read_text("shakespeare")
    folder.mkdir()
    for i in range(copies):
        (folder / f"part{i}.txt").write_text(text)
    return text


def test_prepare_char_shards_hold_every_character_once(cli, tmp_path):
    text = write_corpus(tmp_path / "corpus", 2)
    out = CLI(tmp_path / "corpus")("prepare", "--data", ".", "--tokenizer", "char").stdout  # (named "shards/-char")
    assert "next: fournil train --data shards/corpus-char" in out
    shards = tmp_path / "corpus" / "shards" / "corpus-char"
    meta = json.loads((shards / "meta.json").read_text())
    counts = {split: sum(s["tokens"] for s in shards) for split, shards in meta["shards"].items()}
    assert meta["done"] and meta["dtype"] == "uint16"
    assert sum(counts.values()) == 2 * len(text) + 2  # every character, and a boundary after each file
    assert 0.04 < counts["val"] / sum(counts.values()) < 0.06 and 0.04 < counts["test"] / sum(counts.values()) < 0.06
    ids = np.fromfile(shards / meta["shards"]["train"][0]["file"], dtype=np.uint16)
    assert len(ids) == meta["shards"]["train"][0]["tokens"]
    taken = cli("sample", shards, check=False)  # for a model: "has no config.json: fournil reads run directories..."
    assert taken.returncode == 2 and f"{shards} holds token shards (of fournil prepare), not a model: train one on " \
                                     f"them with `fournil train --data {shards}`" in taken.stderr
    (tmp_path / "small.txt").write_text(text[:20_000])
    small = cli("prepare", "--data", "small.txt", "--tokenizer", "char", check=False)
    assert small.returncode == 2 and "small.txt is too small to shard: val and test each take one chunk in 20; " \
                                     "train on it directly with --data FILE" in small.stderr
    assert not (tmp_path / "shards").exists()  # (shards/small-char held a train shard: "only partly prepared"; then
    # shards/ was left, empty)
    missing = cli("prepare", "--data", "corpuss", check=False)  # said at once, not after "learning a BPE from corpuss"
    assert missing.returncode == 2 and missing.stderr.startswith("fournil: error: no file or folder corpuss")


def test_prepare_reads_the_documents_of_jsonl_corpora_whole(cli, tmp_path):
    """A folder of .jsonl corpora (Hugging Face datasets' form) beside text files: every document is tokenized, one
    longer than a chunk too; a .jsonl of other records is left out (tokenized, it would be JSON syntax), and Parquet."""
    speeches = [s for s in read_text("shakespeare").split("\n\n")[:1500]] + ["word " * 3000]  # (15,000 bytes)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "speeches.jsonl", [{"text": s} for s in speeches])
    write_jsonl(corpus / "instructions.jsonl", [{"instruction": "Say hi", "output": "hi"}] * 50)
    (corpus / "notes.txt").write_text("To be, or not to be.\n" * 500, encoding="utf-8")
    (corpus / "data.parquet").write_bytes(b"PAR1")  # (read as bytes, it would not be text: left out)
    cli("prepare", "--data", "corpus", "--tokenizer", "char", "--out", "shards")
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert [Path(p).name for p in meta["sources"]] == ["notes.txt", "speeches.jsonl"]
    documents = read_text(str(corpus / "speeches.jsonl"))
    assert documents.startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n")
    ids = np.concatenate([np.fromfile(tmp_path / "shards" / s["file"], dtype=np.uint16)
                          for split in ("train", "val", "test") for s in meta["shards"][split]])
    assert len(ids) == len(documents) + len("To be, or not to be.\n" * 500) + 2  # and a boundary after each file
    refused = cli("prepare", "--data", str(corpus / "data.parquet"), check=False)
    assert refused.returncode == 2 and "data.parquet is a Parquet file: prepare reads text files and .jsonl " \
                                       "corpora" in refused.stderr
    (tmp_path / "names.json").write_text('[{"text": "anna"}]', encoding="utf-8")
    refused = cli("prepare", "--data", "names.json", check=False)  # (an array is not read in chunks of lines)
    assert refused.returncode == 2 and "names.json is a JSON file: prepare reads text files and .jsonl corpora; " \
                                       "train on it directly (fournil train --data names.json)" in refused.stderr
    refused = cli("prepare", "--data", str(corpus / "instructions.jsonl"), check=False)
    assert refused.returncode == 2 and "instructions.jsonl is not a .jsonl corpus (one {\"text\": ...} object per " \
                                       "line): prepare such a file, or a text file" in refused.stderr


def test_prepare_without_data_shards_bundled_shakespeare(cli, tmp_path):
    """``fournil prepare`` needs no arguments: the bundled Shakespeare, into shards/shakespeare-TOKENIZER."""
    from fournil.data import read_text

    out = cli("prepare", "--tokenizer", "char").stdout
    assert "next: fournil train --data shards/shakespeare-char" in out
    meta = json.loads((tmp_path / "shards" / "shakespeare-char" / "meta.json").read_text())
    assert meta["done"] and sum(s["tokens"] for shards in meta["shards"].values() for s in shards) == \
        len(read_text("shakespeare")) + 1  # every character, and the boundary after the file


def test_prepare_goes_on_only_with_the_corpus_and_tokenizer_of_its_folder(cli, tmp_path):
    """A second prepare into the same --out: another corpus or tokenizer is refused (the first corpus's shards were
    reported as the second's, and an interrupted one went on with the other corpus); the same is nothing to do."""
    write_corpus(tmp_path / "corpus", 1)
    cli("prepare", "--data", "corpus", "--tokenizer", "char", "--out", "shards")
    before = (tmp_path / "shards" / "meta.json").read_text()
    other = cli("prepare", "--data", "names", "--tokenizer", "char", "--out", "shards", check=False)
    assert other.returncode == 2 and "shards holds the shards of" in other.stderr and "part0.txt" in other.stderr
    bpe = cli("prepare", "--data", "corpus", "--out", "shards", check=False)  # (bpe:4096, the default)
    assert bpe.returncode == 2 and "made with characters, not bpe:4096" in bpe.stderr
    again = cli("prepare", "--data", "corpus", "--tokenizer", "shards", "--out", "shards")
    assert "next: fournil train --data shards" in again.stdout
    assert (tmp_path / "shards" / "meta.json").read_text() == before
    with held_elsewhere(tmp_path / "other"):  # another prepare writes there meanwhile (both wrote the same shards)
        busy = cli("prepare", "--data", "corpus", "--tokenizer", "char", "--out", "other", check=False)
    assert busy.returncode == 2 and busy.stderr == (
        "fournil: error: other is being prepared by another process now: wait for it to end, or stop it first; or "
        "prepare into another --out\n")


def test_a_killed_prepare_continues_to_the_same_shards(cli, tmp_path):
    write_corpus(tmp_path / "corpus", 8)
    cli("tokenizer", "train", "--data", "shakespeare", "--vocab-size", "300", "--out", "tok")
    cli("prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "whole")

    proc = cli.popen("prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "killed")
    meta_path = tmp_path / "killed" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta_path.exists() and json.loads(meta_path.read_text())["chunks_done"] > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = json.loads(meta_path.read_text())
    assert not meta["done"] and meta["chunks_done"] > 0, "the prepare should be killed mid-way"
    cli("prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "killed")
    whole, killed = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("whole", "killed"))
    assert whole["shards"] == killed["shards"]
    for shards in whole["shards"].values():
        for s in shards:
            assert (tmp_path / "whole" / s["file"]).read_bytes() == (tmp_path / "killed" / s["file"]).read_bytes()


def test_training_streams_shards_and_checks_their_tokenizer(cli, tmp_path):
    write_corpus(tmp_path / "corpus", 1)
    cli("tokenizer", "train", "--data", "shakespeare", "--vocab-size", "300", "--out", "tok")
    cli("tokenizer", "train", "--data", "names", "--vocab-size", "300", "--out", "other")
    cli("prepare", "--data", "corpus", "--tokenizer", "tok", "--out", "shards")
    common = ["train", "--data", "shards", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--block-size", "32",
              "--steps", "20", "--eval-every", "10", "--quiet"]
    cli(*common, "--out", "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"] and "val_loss" in records[-1]
    assert "val" in cli("eval", "run").stdout
    assert cli("sample", "run", "-n", "1", "--max-new-tokens", "20", "--seed", "1").stdout.strip()

    wrong = cli(*common, "--tokenizer", "other", "--out", "run2", check=False)
    assert wrong.returncode == 2 and "made with another tokenizer" in wrong.stderr
    for asked, said in ((["--tokenizer", "char"], "the shards in shards were made with another tokenizer than char"),
                        (["--mode", "lines"], "--mode lines: the shards in shards are running text"),
                        (["--split", "0.8,0.1,0.1"], "--split: the shards in shards are split into train, val and test "
                                                     "already, by fournil prepare; leave it out"),
                        (["--split-seed", "7"], "--split-seed: the shards in shards are split")):  # (each was ignored)
        refused = cli(*common, *asked, "--out", "run2", check=False)
        assert refused.returncode == 2 and said in refused.stderr and not (tmp_path / "run2").exists(), refused.stderr
    cli("train", "--config", "run/config.json", "--steps", "1", "--quiet", "--out", "again")  # (its data: char, unsaid)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    (tmp_path / "shards" / "meta.json").write_text(json.dumps({**meta, "done": False}))
    partial = cli(*common, "--out", "run3", check=False)
    assert partial.returncode == 2 and "only partly prepared" in partial.stderr
