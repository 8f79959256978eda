"""Checkpoints in safe formats only (safetensors and JSON), each written atomically, by one process at a time.

A file is written beside its final name and renamed over it, so a run killed at any moment leaves either the
old checkpoint or the new one, never half of one. The training state (model, optimizer, random generators,
step) is one safetensors file whose metadata holds the non-tensor parts as JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fournil.errors import FournilError


LOCK = ".lock"  # held by the process that writes the folder: a run it trains, shards it prepares


@contextlib.contextmanager
def held(folder: Path, doing: str, instead: str = ""):
    """``folder``, held by this process while it writes there: a second process that would write there too (the same
    command in another terminal, a --resume of a run still training) is refused, where both wrote over each other's
    files. The lock goes with the process, however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as f:
        if not locked(f):
            raise FournilError(f"{folder} is being {doing} by another process now: wait for it to end, or stop it "
                               f"first{instead}")
        yield


def locked(f) -> bool:
    """Whether this process got the lock of the open file ``f``, which no other holds."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it to ``path``.

    The file gets the permissions of any other new file here (the umask's), or those of the file it replaces:
    safetensors 0.8 writes its files readable by their owner only, which a server running as another user (a vLLM
    container, say) cannot read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
    else:
        tmp.unlink(missing_ok=True)  # (what a killed run left)
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o666))  # (created as the umask says)
        mode = stat.S_IMODE(tmp.stat().st_mode)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))


def save_weights(model, path: Path) -> None:
    """Weights as safetensors, tied tensors stored once under their first name (as Hugging Face does)."""
    save_tensors(unique_state(model), path)


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """The tensors (or none) and metadata of a safetensors file, or a clear error if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if tensors}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise FournilError(f"{path} is damaged or not a safetensors file ({e}); restore it, or train again") from None


def load_tensors(model, tensors: Mapping, source: str, loaded: Callable | None = None) -> None:
    """Make ``tensors`` the weights of ``model`` (built on the meta device, or not), each in the model's dtype:
    every weight must be there with its shape, a tied one under either of its names. Each is read once, in the
    model's order; ``loaded`` is given each block (an item of a list of layers) as soon as its weights are in."""
    tensors = model.upgrade(tensors)
    names: dict = {}  # each weight's names: several for a tied one
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    weights = {n for group in names.values() for n in group}
    buffers = [k for k in model.state_dict(keep_vars=True) if k not in weights]
    missing = [group[0] for group in names.values() if not any(n in tensors for n in group)]
    missing += [k for k in buffers if k not in tensors]
    unexpected = sorted(set(tensors) - weights - set(buffers))
    if missing or unexpected:
        raise FournilError(f"{source} does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name in buffers:
        put(model, name, tensors[name])
    blocks = {f"{prefix}.{i}.": block for prefix, layers in model.named_modules() if isinstance(layers, nn.ModuleList)
              for i, block in enumerate(layers)}  # the outermost first: a block's own lists come after it

    def block(name: str) -> str | None:
        return next((prefix for prefix in blocks if name.startswith(prefix)), None)

    left = Counter(block(n) for n in weights)  # weights still to come in each block
    for p, group in names.items():
        given = next(n for n in group if n in tensors)
        value = tensors[given]
        if value.shape != p.shape:
            raise FournilError(f"{source} does not match its config: {given} is {list(value.shape)}, the config makes "
                               f"it {list(p.shape)}")
        weight = nn.Parameter(value.to(p.dtype).contiguous(), p.requires_grad)
        for name in group:
            put(model, name, weight)
            left[prefix := block(name)] -= 1
            if prefix and not left[prefix] and loaded:
                loaded(blocks[prefix])
    if any(t.is_meta for t in model.buffers()):  # a buffer computed in __init__ must name its device
        raise RuntimeError(f"{type(model).__name__} built on the meta device keeps a buffer there")


def put(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the model's weight or buffer ``name`` (``layers.0.mlp.up_proj.weight``)."""
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, value)


def save_state(path: Path, model_state: dict, optimizer_state: dict, data_rng: torch.Generator, info: dict) -> None:
    """Everything needed to continue training exactly where it stopped: the weights and the optimizer's state (as
    their state dicts; optimizer state keyed by parameter number or name), random generators, ``info``."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model_state.items()}
    opt = optimizer_state
    for pid, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_rng.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {
        "info": info,
        "param_groups": opt["param_groups"],
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"fournil": json.dumps(meta)}))


def read_state_info(path: Path) -> dict:
    """The ``info`` of a training state, without loading its tensors."""
    return _state_meta(path, read_safetensors(path, tensors=False)[1])["info"]


def _state_meta(path: Path, metadata: dict) -> dict:
    try:
        return json.loads(metadata["fournil"])
    except (KeyError, json.JSONDecodeError):
        raise FournilError(f"{path} is not a fournil training state; start a new run instead of --resume") from None


def load_state(path: Path, data_rng: torch.Generator) -> tuple[dict, dict, dict]:
    """Read what ``save_state`` wrote and restore the random generators; returns the model's and the optimizer's
    state dicts (on the CPU) and ``info``."""
    tensors, metadata = read_safetensors(path)
    meta = _state_meta(path, metadata)
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            pid, name = key[6:].rsplit(".", 1)  # a parameter's number, or its name (which has dots)
            state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = value
    torch.set_rng_state(tensors["rng.torch"])
    data_rng.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return model_state, {"state": state, "param_groups": meta["param_groups"]}, meta["info"]


def unique_state(model) -> dict:
    """The state dict without the second name of tied weights."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out
