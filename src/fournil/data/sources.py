"""Where text comes from: a bundled corpus by name, or any UTF-8 text file by path, or a corpus of documents as
Hugging Face datasets hold one: JSONL (``{"text": ...}`` on each line), a JSON array of such records, or Parquet (a
``text`` column)."""
from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path

from fournil.errors import FournilError, typed

BUNDLED = {
    "names": "names.txt",
    "prenoms": "prenoms.txt",
    "villes": "villes.txt",
    "shakespeare": "shakespeare.txt",
    "miserables": "miserables.txt",
}


def resolve(spec: str) -> Path:
    """The file behind a dataset name or path."""
    if spec in BUNDLED:
        return Path(str(resources.files("fournil.data") / "files" / BUNDLED[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        raise FournilError(f"{spec} is a folder: give a UTF-8 text file (or a bundled dataset: {', '.join(BUNDLED)}), "
                           f"or tokenize the folder first with `fournil prepare --data {typed(spec)}`")
    if not path.exists():
        from fournil.data.instructions import bundled_elsewhere

        raise FournilError(
            bundled_elsewhere(spec, "text") or
            f"no dataset or file named {spec!r}{nearest(spec, [*BUNDLED, 'nombres'])}: use a bundled dataset "
            f"({', '.join(BUNDLED)}), nombres (pairs for a seq2seq model), or the path to a UTF-8 text file (or a "
            f".jsonl or .parquet corpus)"
        )
    return path


def nearest(spec, names) -> str:
    """`` (did you mean NAME?)`` where ``spec`` is near a bundled name (a typo; ``tinyshakespeare`` or
    ``fr_hugo_miserables``, as the corpora's sources call them), else nothing."""
    near = difflib.get_close_matches(str(spec).lower(), names, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def decoded(raw: bytes, path: Path, where: str = "") -> str:
    """``raw`` (the bytes of ``path``, or those ``where`` says) as UTF-8 text; else an error that says what they are
    and how to convert them: UTF-16 (how Windows saves "Unicode" text: it begins with a byte order mark), binary (NUL
    bytes) or another encoding."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # (bytes that UTF-8 never holds)
        raise FournilError(f"{path} is UTF-16 text (as Windows saves \"Unicode\"): convert it to UTF-8, e.g. "
                           f"`iconv -f utf-16 -t utf-8`")
    if b"\x00" in raw:
        raise FournilError(f"{path} looks like a binary file (it contains NUL bytes): give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FournilError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}{where}): convert it, e.g. "
                           f"`iconv -f latin1 -t utf-8`") from None


def read_text(spec: str) -> str:
    """The whole text of a dataset, checked: not binary, valid UTF-8, not empty; newlines normalised to \\n."""
    path = resolve(spec)
    if path.suffix == ".parquet":
        text = joined(parquet_documents(path), path, "row")
    elif path.suffix == ".json":
        text = joined(json_documents(path), path, "item")
    else:
        text = decoded(path.read_bytes(), path)
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if path.suffix == ".jsonl":  # (records of another kind are refused: read as text, they would be JSON)
            text = joined(jsonl_documents(text, path), path, "line")
    if not text.strip():
        raise FournilError(f"{path} is empty: give a file with some text in it")
    return text


def holds_documents(path: Path) -> bool:
    """Whether ``path`` is a corpus of documents: JSONL whose first record has a ``text`` field, a JSON array of such
    records, or Parquet with a ``text`` column."""
    if path.suffix not in (".jsonl", ".json", ".parquet") or not path.is_file():
        return False
    if path.suffix == ".parquet":
        return "text" in parquet_table(path, schema=True).names
    if path.suffix == ".json":
        try:
            return bool(next(json_documents(path), None))
        except FournilError:
            return False
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        record = json.loads(first.decode("utf-8-sig"))
    except ValueError:  # (not JSON, nor UTF-8: the reader of pairs says what is wrong)
        return False
    return isinstance(record, dict) and "text" in record


def jsonl_documents(text: str, path: Path, first_line: int = 1):
    """(line number, the text field) of each record of JSONL ``text``, lines of ``path`` from ``first_line`` on."""
    for n, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FournilError(f"{path}, line {n}: not valid JSON ({e.msg}); a .jsonl corpus holds one "
                               f"{{\"text\": ...}} object per line") from None
        if not isinstance(record, dict) or "text" not in record:
            from fournil.data.instructions import other_kind

            raise FournilError(f"{path}, line {n}: no text field; a .jsonl corpus holds one {{\"text\": ...}} "
                               f"object per line{other_kind(record, 'documents')}")
        yield n, record["text"]


def json_documents(path: Path):
    """(item number, the text field) of each record of a JSON array of documents; any other JSON is refused, with
    what it holds (instructions, say) and the command that learns from it: read as text, it would be its syntax."""
    from fournil.data.instructions import other_kind

    try:
        records = json.loads(decoded(path.read_bytes(), path).removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise FournilError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not (isinstance(records, list) and records and all(isinstance(r, dict) and "text" in r for r in records)):
        first = records[0] if isinstance(records, list) and records else records
        raise FournilError(f"{path} holds JSON, not text: a .json corpus is an array of {{\"text\": ...}} "
                           f"documents{other_kind(first, 'documents')}")
    return enumerate((r["text"] for r in records), 1)


def parquet_documents(path: Path):
    """(row number, its text) of each row of a Parquet corpus."""
    column = parquet_table(path, columns=["text"]).column("text").to_pylist()
    return enumerate(column, 1)


def joined(documents, path: Path, unit: str) -> str:
    """The text of each numbered document (``unit``: line or row) followed by a line end (a list of names reads as
    one), or by a blank line where it holds several lines (running text); a null or empty document is left out."""
    texts = []
    for n, document in documents:
        if document is not None and not isinstance(document, str):
            raise FournilError(f"{path}, {unit} {n}: its text is {type(document).__name__}, not text")
        if document and document.strip():
            texts.append(document.replace("\r\n", "\n").strip("\n"))
    return "".join(d + ("\n\n" if "\n" in d else "\n") for d in texts)


def parquet_table(path: Path, columns: list[str] | None = None, schema: bool = False):
    """A Parquet file's table (those ``columns``), or its schema only, through pyarrow (which reads it)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FournilError(f"{path} is a Parquet file: reading one needs pyarrow (pip install pyarrow), or convert it "
                           f"to JSONL") from None
    try:
        return pq.read_schema(path) if schema else pq.read_table(path, columns=columns)
    except Exception as e:  # (pyarrow's errors: not Parquet, damaged, a column it lacks)
        raise FournilError(f"{path} is not a Parquet file pyarrow can read ({str(e).splitlines()[0]})") from None


def fingerprint(text: str) -> str:
    """A short hash that tells, at evaluation time, whether the data changed since training."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def too_few_to_split(source: str, count: int, what: str, fractions, aside: str = "") -> FournilError:
    """The error for data with too few documents or pairs to put at least one in each split."""
    need = int(1 / min(fractions)) + 1
    return FournilError(f"{source} has {count} {what}{'s' * (count != 1)}{aside}, too few for a "
                        f"{'/'.join(f'{100 * f:g}' for f in fractions)} split: give at least {need}, or pass "
                        f"--train/--val/--test files")
