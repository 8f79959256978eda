import json
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from fournil.config import DataConfig
from fournil.data import infer_mode, load_splits, read_text
from fournil.errors import FournilError


def test_bundled_datasets_and_modes():
    assert infer_mode(read_text("names")) == "lines"
    assert infer_mode(read_text("prenoms")) == "lines"
    assert infer_mode(read_text("villes")) == "lines"
    assert infer_mode(read_text("shakespeare")) == "text"
    assert "andré" in read_text("prenoms").split("\n")  # accents kept


def test_lines_split_is_deterministic_disjoint_and_90_5_5():
    splits, fp = load_splits(DataConfig("names"))
    again, fp2 = load_splits(DataConfig("names"))
    assert splits.train == again.train and fp == fp2
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert n == 32033
    assert len(splits.train) == int(0.9 * n) and len(splits.val) == int(0.05 * n)
    other, _ = load_splits(DataConfig("names", seed=7))
    assert other.train != splits.train  # the seed changes the shuffle


def test_text_split_is_contiguous():
    text = read_text("shakespeare")
    splits, _ = load_splits(DataConfig("shakespeare"))
    assert splits.mode == "text"
    assert splits.train + splits.val + splits.test == text
    assert len(splits.train) == int(0.9 * len(text))


def test_forced_mode_and_explicit_files(tmp_path: Path):
    for name, words in {"a": "anna\nbob\ncarl\n", "b": "dora\n", "c": "emil\n"}.items():
        (tmp_path / f"{name}.txt").write_text(words)
    splits, _ = load_splits(DataConfig(train=str(tmp_path / "a.txt"), val=str(tmp_path / "b.txt"), test=str(tmp_path / "c.txt")))
    assert (splits.mode, splits.train, splits.val, splits.test) == ("lines", ["anna", "bob", "carl"], ["dora"], ["emil"])
    text, _ = load_splits(DataConfig(str(tmp_path / "a.txt"), mode="text", split=(0.5, 0.25, 0.25)))
    assert text.mode == "text" and text.train == "anna\nbo"


@pytest.mark.parametrize("content, message", [
    (None, "no dataset or file named"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
    ("café\n".encode("latin-1"), "not valid UTF-8"),
    ("anna\nzoé\n".encode("utf-16"), r"is UTF-16 text \(as Windows saves \"Unicode\"\): convert it to UTF-8, e\.g\. "
                                     "`iconv -f utf-16 -t utf-8`"),  # (it said binary: NUL bytes)
])
def test_bad_files_give_clear_errors(tmp_path: Path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FournilError, match=message):
        read_text(str(path))


def test_too_few_documents_for_the_split(tmp_path: Path):
    (tmp_path / "few.txt").write_text("anna\nbob\ncarl\n")
    with pytest.raises(FournilError, match="3 documents .* too few for a 90/5/5 split"):
        load_splits(DataConfig(str(tmp_path / "few.txt")))
    (tmp_path / "one.tsv").write_text("un\tone\n")  # (source, target) pairs for seq2seq: the same words
    with pytest.raises(FournilError, match="one.tsv has 1 pair, too few for a 90/5/5 split: give at least 21, or"):
        load_splits(DataConfig(str(tmp_path / "one.tsv")))


def test_a_jsonl_corpus_of_documents_reads_as_their_text(tmp_path: Path):
    """A .jsonl of {"text": ...} records (as Hugging Face datasets write a corpus) is text to learn from; it was read
    as (source, target) pairs, and refused."""
    names = ["anna", "bob", "zoé", "éloïse"] * 10
    write_jsonl(tmp_path / "names.jsonl", [{"id": i, "text": name} for i, name in enumerate(names)])
    (tmp_path / "names.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    assert read_text(str(tmp_path / "names.jsonl")) == read_text(str(tmp_path / "names.txt"))
    from_jsonl, from_text = (load_splits(DataConfig(str(tmp_path / f"names.{kind}")))[0] for kind in ("jsonl", "txt"))
    assert from_jsonl == from_text and from_jsonl.mode == "lines"

    speeches = ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "All:\r\nSpeak, speak.", "  "] * 30
    write_jsonl(tmp_path / "speeches.jsonl", [{"text": speech} for speech in speeches])
    text = read_text(str(tmp_path / "speeches.jsonl"))
    assert text == "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 30
    assert load_splits(DataConfig(str(tmp_path / "speeches.jsonl")))[0].mode == "text"

    (tmp_path / "names.json").write_text(json.dumps([{"text": name} for name in names]), encoding="utf-8")  # an array
    assert read_text(str(tmp_path / "names.json")) == read_text(str(tmp_path / "names.txt"))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}] * 3))  # (read as
    with pytest.raises(FournilError, match=r"alpaca.json holds JSON, not text: a .json corpus is an array of "  # text,
                                           r"\{\"text\": ...\} documents; this file holds instructions: learn from "
                                           r"them with fournil finetune"):  # it trained on JSON's syntax)
        load_splits(DataConfig(str(tmp_path / "alpaca.json")))
    write_jsonl(tmp_path / "pairs.jsonl", [{"source": str(n), "target": "x" * n} for n in range(1, 31)])
    assert load_splits(DataConfig(str(tmp_path / "pairs.jsonl")))[0].mode == "pairs"
    (tmp_path / "bad.jsonl").write_text('{"text": "anna"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(FournilError, match=r"bad.jsonl, line 2: its text is int, not text$"):
        read_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "anna"}\n{"title": "bob"}\n', encoding="utf-8")
    with pytest.raises(FournilError, match=r"bad.jsonl, line 2: no text field; a .jsonl corpus holds one "
                                           r"\{\"text\": ...\} object per line"):
        read_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "anna"}\n\n{"text": "bob\n', encoding="utf-8")
    with pytest.raises(FournilError, match=r"bad.jsonl, line 3: not valid JSON \(Unterminated string"):
        read_text(str(tmp_path / "bad.jsonl"))


def test_a_parquet_corpus_reads_as_the_same_text_as_its_jsonl(tmp_path: Path, monkeypatch):
    """Parquet, as the Hugging Face Hub stores datasets: a text column, one document a row (an empty one skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    speeches = ["First Citizen:\nBefore we proceed any further, hear me speak.", None, "All:\nSpeak, speak."] * 20
    pq.write_table(pa.table({"id": list(range(60)), "text": speeches}), tmp_path / "speeches.parquet")
    write_jsonl(tmp_path / "speeches.jsonl", [{"text": s} for s in speeches if s])
    assert read_text(str(tmp_path / "speeches.parquet")) == read_text(str(tmp_path / "speeches.jsonl"))
    assert load_splits(DataConfig(str(tmp_path / "speeches.parquet")))[0].mode == "text"
    pq.write_table(pa.table({"source": ["1", "2"] * 20, "target": ["un", "deux"] * 20}), tmp_path / "pairs.parquet")
    assert load_splits(DataConfig(str(tmp_path / "pairs.parquet")))[0].mode == "pairs"
    (tmp_path / "bad.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(FournilError, match=r"bad.parquet is not a Parquet file pyarrow can read \("):
        read_text(str(tmp_path / "bad.parquet"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # a machine without pyarrow (an optional dependency)
    with pytest.raises(FournilError, match=r"speeches.parquet is a Parquet file: reading one needs pyarrow \(pip "
                                           r"install pyarrow\), or convert it to JSONL$"):
        read_text(str(tmp_path / "speeches.parquet"))
