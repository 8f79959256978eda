"""A CPU's cores shared between the fournil processes that compute on it at the same time.

PyTorch gives every process a thread per core, and an OpenMP thread that waits for the next parallel loop spins on
its core. Two processes that compute at once, say `fournil train` in one terminal and `fournil chat` in another,
then ask for twice the cores there are, and each one's threads spin on the cores that the other's threads wait for:
on 2 cores (machine A), `fournil train` went from 16,308 tokens/s alone to 223 beside SmolLM2 decoding, and the
decoding from 43.7 tokens/s to 3.2 (`benchmarks/shared_cpu.py`). So a process that computes on the CPU says so, with
a file named by its pid that it touches every second, and takes its share of the cores: all of them alone, half
beside another (the two above: 12,826 and 37.7). A process idle for 3 s (a chat waiting for a question) no longer
counts, and the others take its cores back. Nothing changes where ``OMP_NUM_THREADS`` is set: the user chose (a
thread count that changes can change the last bits of a sum split between threads; set it where two runs must match
bit for bit).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import tempfile
import time
from pathlib import Path

import torch

EVERY = 1.0  # seconds between two looks at who computes
FRESH = 3.0  # a process counts while its file is at most this old


class Cores:
    """This process's share of the cores, looked at again every EVERY seconds while it computes."""

    def __init__(self):
        self.all = self.share = torch.get_num_threads()  # (PyTorch's default: a thread per core)
        self.folder = Path(tempfile.gettempdir()) / f"fournil-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        self.file = self.folder / f"computing-{os.getpid()}"
        self.next_look = 0.0
        atexit.register(self.file.unlink, missing_ok=True)

    def computing(self) -> None:
        """The share, in the calling thread (OpenMP counts threads per calling thread: a server computes in its own)."""
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + EVERY
            self.share = self.look()
        if torch.get_num_threads() != self.share:
            torch.set_num_threads(self.share)

    def look(self) -> int:
        """Say that this process computes, and count the others that do."""
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            self.file.touch()
        except OSError:  # (a folder it cannot write: this process keeps the share it has)
            return self.share
        recent, others = time.time() - FRESH, 0
        for f in self.folder.glob("computing-*"):
            with contextlib.suppress(OSError):  # (removed meanwhile by another process)
                if f.stat().st_mtime < recent:
                    f.unlink()  # (its process ended, or waits: it writes it again when it computes)
                elif f != self.file:
                    others += 1
        return max(1, self.all // (1 + others))


@functools.cache
def cores() -> Cores:
    """This process's :class:`Cores`, made at its first step of work."""
    return Cores()


def computing(device: torch.device) -> None:
    """Call it at each step of work on ``device`` (a training step, a decoding step): on a CPU, this process then uses
    its share of the cores (:class:`Cores`)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores().computing()
