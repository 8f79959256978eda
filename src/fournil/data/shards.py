"""Corpora larger than memory: text tokenized once into binary shards of token ids, then read through np.memmap.

``fournil prepare --data FOLDER_OR_FILE --tokenizer T --out DIR`` reads the text in chunks of up to a megabyte (cut at
line ends), sends chunk 18 of every 20 to val and chunk 19 to test (a 90/5/5 split), tokenizes batches of chunks in
parallel (the Rust tokenizer uses every core), and appends the ids to ``DIR/{split}_NNNNN.bin`` (uint16 when the
vocabulary fits, else uint32). ``DIR/meta.json`` records the shards and how far the input has been read, rewritten
atomically after each batch: an interrupted ``prepare`` continues where it stopped, and training reads the shards
without tokenizing anything again. A training run on ``--data DIR`` checks that its tokenizer is the shards' one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fournil.checkpoint import LOCK, held, write_json
from fournil.data.sources import BUNDLED, decoded, holds_documents, joined, jsonl_documents
from fournil.errors import FournilError, typed

META, TOKENIZER = "meta.json", "tokenizer.json"
CHUNK_BYTES = 1 << 20  # at most; smaller for small corpora, so that val and test get some 200 chunks' worth
BATCH_CHUNKS = 16  # chunks tokenized together, then written, then recorded
SHARD_TOKENS = 50_000_000


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / META).is_file()


def tokenizer_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def made_with(folder: Path, spec: str) -> bool:
    """Whether the shards in ``folder`` were made with the tokenizer ``spec`` names: char, bpe:N (a byte-level BPE of
    N tokens learned from the corpus), or a tokenizer.json (or its folder) that is the same file."""
    from fournil.tokenizers import CharTokenizer, load_tokenizer
    from fournil.tokenizers.bpe import bpe_size

    saved = Path(folder) / TOKENIZER
    if spec == "char":
        return isinstance(load_tokenizer(saved), CharTokenizer)
    if size := bpe_size(spec):
        tokenizer = load_tokenizer(saved)
        return not isinstance(tokenizer, CharTokenizer) and tokenizer.vocab_size == size
    given = Path(spec) / TOKENIZER if Path(spec).is_dir() else Path(spec)
    return given.is_file() and tokenizer_fingerprint(given) == tokenizer_fingerprint(saved)


def input_files(source: Path) -> list[Path]:
    if not source.exists():
        from fournil.data.instructions import bundled_elsewhere

        raise FournilError(bundled_elsewhere(str(source), "text") or f"no file or folder {source}: prepare a text "
                           f"file, a folder of .txt files or a bundled dataset ({', '.join(BUNDLED)})")
    if source.is_file():
        if source.suffix in (".parquet", ".json"):  # (read in chunks of bytes, neither is text)
            raise FournilError(f"{source} is a {'Parquet' if source.suffix == '.parquet' else 'JSON'} file: prepare "
                               f"reads text files and .jsonl corpora; train on it directly (fournil train --data "
                               f"{typed(source)}), or write its documents as JSONL first, one a line")
        if source.suffix == ".jsonl" and not holds_documents(source):
            raise FournilError(f"{source} is not a .jsonl corpus (one {{\"text\": ...}} object per line): prepare "
                               f"such a file, or a text file")
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and (p.suffix in (".txt", ".md", ".text")
                                                                   or p.suffix == ".jsonl" and holds_documents(p)))
    if not files:
        raise FournilError(f"{source} holds no .txt files (nor .jsonl corpora) to prepare")
    return files


def chunk_size(total_bytes: int) -> int:
    return max(4096, min(CHUNK_BYTES, total_bytes // 200))


def file_pieces(path: Path, size: int, whole_lines: bool = False):
    """The bytes of one file in pieces of about ``size``, each cut after a line end where there is one (always, with
    ``whole_lines``: a line longer than ``size`` makes a longer piece)."""
    with open(path, "rb") as f:
        pending = b""
        while block := f.read(size):
            data = pending + block
            cut = data.rfind(b"\n") + 1 or (0 if whole_lines else len(data))  # no line end: cut anyway, or read on
            piece, pending = data[:cut], data[cut:]
            if piece:
                yield piece
        if pending:
            yield pending


def chunks(files: list[Path], start: int, size: int):
    """(index, text, bytes, last of its file) for every chunk of the input from chunk ``start`` on."""
    index = 0
    for path in files:
        documents, line = holds_documents(path), 1
        pieces = file_pieces(path, size, whole_lines=documents)
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            if index >= start:
                text = decoded(piece, path, " of a chunk")
                if documents:
                    text = joined(jsonl_documents(text, path, line), path, "line")
                yield index, text, len(piece), following is None
            index, line = index + 1, line + piece.count(b"\n")
            piece = following


def split_of(index: int) -> str:
    return {18: "val", 19: "test"}.get(index % 20, "train")


def source_texts(source: str):
    """Every chunk of text of ``source``, for learning a vocabulary before tokenizing."""
    files = input_files(Path(source).expanduser())
    return (text for _, text, _, _ in chunks(files, 0, chunk_size(sum(p.stat().st_size for p in files))))


def prepare(source: str, tokenizer, out: Path, progress: bool = True) -> dict:
    """Tokenize ``source`` (a file, or a folder of .txt files and .jsonl corpora) into shards under ``out``; continue
    if interrupted. One process at a time: another ``prepare`` into ``out`` meanwhile is refused."""
    files = [p.resolve() for p in input_files(Path(source).expanduser())]
    made = [p for p in (out, *out.parents) if not p.exists()]  # (shards/ too, the first time)
    with held(out, "prepared", "; or prepare into another --out"):
        new = not (out / META).exists()
        try:
            return tokenize_into(out, source, files, tokenizer, progress)
        except FournilError:  # (too small, a file that is not text): nothing worth resuming
            if new:
                discard(out, made)
            raise


def discard(out: Path, made: list[Path]) -> None:
    """Take away what a new ``prepare`` wrote, and the folders it ``made`` that then hold nothing else."""
    for p in out.iterdir():
        if p.name in (META, LOCK) or p.name.startswith("tokenizer") or p.suffix == ".bin":
            p.unlink()
    for folder in made:  # (the deepest first)
        if not any(folder.iterdir()):
            folder.rmdir()


def tokenize_into(out: Path, source: str, files: list[Path], tokenizer, progress: bool) -> dict:
    if (out / META).exists():  # prepared, or interrupted: of the same files, or it would mix two corpora
        meta = json.loads((out / META).read_text())
        if [Path(p).resolve() for p in meta["sources"]] != files:
            first = meta["sources"][0] + (f" and {len(meta['sources']) - 1:,} more files" if len(meta["sources"]) > 1
                                          else "")
            raise FournilError(f"{out} holds the shards of {first}, not of {source}: choose another --out, or delete "
                               f"{out} first")
        if meta["done"]:
            return meta
    else:
        tokenizer.save(out / TOKENIZER)
        fp = tokenizer_fingerprint(out / TOKENIZER)
        meta = {"tokenizer": fp, "dtype": "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32", "chunks_done": 0,
                "chunk_bytes": chunk_size(sum(p.stat().st_size for p in files)),
                "bytes_done": 0, "done": False, "sources": [str(p) for p in files],
                "shards": {"train": [], "val": [], "test": []}}
    dtype = np.dtype(meta["dtype"])
    boundary = tokenizer.eos_id  # ends each file: documents do not run into each other
    total = sum(p.stat().st_size for p in files)
    batch = []

    def flush():
        texts = [text for _, text, _, _ in batch]
        ids = tokenizer.encode_many(texts)
        for (index, _, size, file_end), toks in zip(batch, ids):
            toks = toks + [boundary] * (file_end and boundary is not None)
            append(meta, out, split_of(index), np.asarray(toks, dtype=dtype))
            meta["chunks_done"], meta["bytes_done"] = index + 1, meta["bytes_done"] + size
            bar.update(size)
        write_json(out / META, meta)  # the shards hold everything up to here
        batch.clear()

    with tqdm(total=total, initial=meta["bytes_done"], unit="B", unit_scale=True, disable=not progress,
              desc="tokenizing") as bar:  # (closed before an error is said, which would end its line)
        for item in chunks(files, meta["chunks_done"], meta["chunk_bytes"]):
            batch.append(item)
            if len(batch) == BATCH_CHUNKS:
                flush()
        if batch:
            flush()
    if not meta["shards"]["val"] or not meta["shards"]["test"]:
        raise FournilError(f"{source} is too small to shard: val and test each take one chunk in 20; "
                           f"train on it directly with --data FILE")
    meta["done"] = True
    write_json(out / META, meta)
    return meta


def append(meta: dict, out: Path, split: str, ids: np.ndarray) -> None:
    """Add ``ids`` to the split's last shard, or start a new one when it is full. Bytes past what meta.json records
    (from a run killed mid-write) are cut off first."""
    shards = meta["shards"][split]
    if not shards or shards[-1]["tokens"] >= SHARD_TOKENS:
        shards.append({"file": f"{split}_{len(shards):05d}.bin", "tokens": 0})
    shard = shards[-1]
    path = out / shard["file"]
    with open(path, "ab") as f:
        f.truncate(shard["tokens"] * ids.itemsize)
        f.write(ids.tobytes())
    shard["tokens"] += len(ids)


@dataclass
class Shards:
    """The shards of one split, as one long stream of token ids read lazily."""

    folder: Path
    files: list[str]
    lengths: list[int]
    dtype: str

    def __post_init__(self):
        self.maps = [np.memmap(self.folder / f, dtype=self.dtype, mode="r", shape=(n,)) for f, n in zip(self.files, self.lengths)]
        self.ends = np.cumsum(self.lengths)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, length: int) -> torch.Tensor:
        """``length`` ids from position ``start`` of the stream, across shard ends if need be."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            s = int(np.searchsorted(self.ends, start, side="right"))
            offset = start - (int(self.ends[s - 1]) if s else 0)
            take = min(length - filled, self.lengths[s] - offset)
            out[filled : filled + take] = self.maps[s][offset : offset + take]
            filled, start = filled + take, start + take
        return torch.from_numpy(out)


def open_shards(folder: str | Path) -> tuple[dict, str]:
    """The three splits of a prepared folder, and its fingerprint (which changes if the shards do)."""
    folder = Path(folder).expanduser()
    meta = json.loads((folder / META).read_text())
    if not meta.get("done"):
        raise FournilError(f"{folder} is only partly prepared: run `fournil prepare` again to finish it")
    splits = {name: Shards(folder, [s["file"] for s in shards], [s["tokens"] for s in shards], meta["dtype"])
              for name, shards in meta["shards"].items()}
    for name, shards in splits.items():
        for f, n in zip(shards.files, shards.lengths):
            if (folder / f).stat().st_size < n * np.dtype(meta["dtype"]).itemsize:
                raise FournilError(f"{folder / f} is shorter than meta.json says: the shards are damaged; prepare again")
    return splits, meta["tokenizer"] + f"-{sum(len(s) for s in splits.values())}"
