"""Two fournil processes that compute at the same time share the CPU's cores, and a process that waits gives its
share back: real processes, their files in a real folder."""
from __future__ import annotations

import os
import subprocess
import sys

# computes for argv[1] seconds or until the file argv[3] exists, then waits for argv[2] seconds, and ends; says each
# thread count it uses, one per line
WORKER = """
import os, sys, time, torch
from fournil.cores import computing
cpu, start = torch.device("cpu"), time.monotonic()
said = torch.get_num_threads()
print(said, flush=True)
while time.monotonic() < start + float(sys.argv[1]) and not os.path.exists(sys.argv[3]):
    computing(cpu)
    torch.randn(64, 64) @ torch.randn(64, 64)
    if torch.get_num_threads() != said:
        said = torch.get_num_threads()
        print(said, flush=True)
    time.sleep(0.02)
time.sleep(float(sys.argv[2]))
"""


def worker(tmp_path, computing: float, waiting: float, **env) -> subprocess.Popen:
    """The worker, with a temporary folder of its own: other fournil processes on this machine are not counted."""
    environment = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "TMPDIR": str(tmp_path), **env}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(computing), str(waiting), str(tmp_path / "stop")],
                            env=environment, stdout=subprocess.PIPE, text=True)


def test_two_computing_processes_share_the_cores_and_one_that_waits_gives_them_back(tmp_path):
    first = worker(tmp_path, 120, 0)
    try:
        alone = int(first.stdout.readline())  # PyTorch's default: a thread per core
        half = max(1, alone // 2)
        second = worker(tmp_path, 4, 8)  # computes for 4 s, then waits for 8 before it ends
        assert int(second.stdout.readline()) == alone
        if half < alone:
            assert int(second.stdout.readline()) == half  # it finds the first one computing: its share at once
            assert int(first.stdout.readline()) == half  # the first one finds it within a second
            assert int(first.stdout.readline()) == alone  # and takes the cores back 3 s after the second one waits
            assert second.poll() is None, "the cores came back when the second process ended, not when it waited"
        assert second.wait(60) == 0 and second.stdout.read() == ""
        (tmp_path / "stop").touch()
        assert first.wait(60) == 0 and first.stdout.read() == ""
    finally:
        first.kill()
    assert not list(tmp_path.glob("fournil-*/computing-*"))  # (each removed its file as it ended)


def test_a_thread_count_the_user_chose_is_kept(tmp_path):
    chosen = str(os.cpu_count() or 1)  # (a thread per core each: what sharing would halve)
    processes = [worker(tmp_path, seconds, 0, OMP_NUM_THREADS=chosen) for seconds in (6, 3)]
    for process in processes:
        assert process.wait(60) == 0
        assert len(process.stdout.read().split()) == 1  # (the count it started with, never changed)
    assert not list(tmp_path.glob("fournil-*"))
