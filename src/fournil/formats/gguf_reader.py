"""Reading a GGUF file's metadata and tensor table directly from its bytes.

The ``gguf`` package's reader builds a numpy view per metadata item and takes about 11 s on SmolLM2's
100,000-string vocabulary; this reads the same layout (header, key/value pairs, tensor infos, aligned data)
with ``struct`` in a fraction of a second and leaves the tensors as raw bytes mapped from the file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fournil.errors import FournilError

# GGUF value types: number -> (struct format, numpy dtype); 7 is bool, 8 a string, 9 an array.
SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
           5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
           12: ("d", np.float64)}
STRING, ARRAY = 8, 9
LENGTH = struct.Struct("<Q")  # a string's length in bytes, before it
# tensor types: number -> (name, values per block, bytes per block), for those fournil unpacks itself
# (fournil.formats.gguf.UNPACK); the others' from the gguf package, whose import (0.09 s) only their files pay
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
         12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}


@dataclass
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # as GGUF lists them: innermost (row length) first
    kind: str  # how it is stored, GGUF's name for it (F32, Q4_1, Q4_K...)
    data: np.ndarray  # raw bytes, one row of blocks per line

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch's order: outermost first."""
        return tuple(reversed(self.dims))


class Cursor:
    """Little-endian values read one after another from a buffer."""

    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buffer, self.at)
        self.at += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, n: int) -> list[str]:
        """``n`` strings, each after its length: a vocabulary's 100,000 in one loop with no call per string (half
        the time of one call each)."""
        buffer, at, end, length = self.buffer, self.at, len(self.buffer), LENGTH.unpack_from
        texts = []
        for _ in range(n):
            (size,), at = length(buffer, at), at + 8
            if at + size > end:
                raise ValueError("a string runs past the end of the file")
            texts.append(str(buffer[at:at + size], "utf-8", "replace"))
            at += size
        self.at = at
        return texts

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item == STRING:
                return self.strings(n)
            if item not in SCALARS:
                return [self.value(item) for _ in range(n)]
            dtype = np.dtype(SCALARS[item][1]).newbyteorder("<")
            values = np.frombuffer(self.buffer, dtype, n, self.at)
            self.at += n * dtype.itemsize
            return values.tolist()
        if kind not in SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(SCALARS[kind][0])


def read_gguf_file(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file; a truncated or foreign file raises FournilError."""
    try:
        return parse(Path(path))
    except FournilError:
        raise
    except Exception as e:  # a damaged file fails in many ways; all mean the same to a user
        raise FournilError(f"{path} is not a valid GGUF file (truncated or corrupted?): {type(e).__name__}: {e}") from None


def tensor_type(number: int) -> tuple[str, int, int]:
    """A tensor type's name, values per block and bytes per block."""
    if number in TYPES:
        return TYPES[number]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(number)
    except ValueError:
        raise FournilError(f"a tensor is stored in type {number}, which neither fournil nor the installed gguf package "
                           f"knows (a newer llama.cpp's?); `pip install -U gguf` may read it") from None
    return (kind.name, *GGML_QUANT_SIZES[kind])


def parse(path: Path) -> tuple[dict, list[GGUFTensor]]:
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    c = Cursor(memoryview(buffer))  # (slicing the memmap itself costs more than reading 100,000 strings)
    if bytes(buffer[:4]) != b"GGUF":
        raise ValueError("it does not start with the bytes 'GGUF'")
    c.at = 4
    version, n_tensors, n_fields = c.take("I"), c.take("Q"), c.take("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (fournil reads versions 2 and 3, little-endian)")
    meta = {}
    for _ in range(n_fields):
        key = c.string()
        meta[key] = c.value(c.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.take("Q") for _ in range(c.take("I")))
        infos.append((name, dims, tensor_type(c.take("I")), c.take("Q")))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-c.at // alignment) * alignment
    tensors = []
    for name, dims, (kind, block, size), offset in infos:
        row_bytes = dims[0] // block * size
        rows = int(np.prod(dims[1:], dtype=np.int64))
        begin = start + offset
        if begin + rows * row_bytes > len(buffer):
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors.append(GGUFTensor(name, dims, kind, buffer[begin:begin + rows * row_bytes].reshape(rows, row_bytes)))
    return meta, tensors
