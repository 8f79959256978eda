"""Tests run the real command line in a temporary directory, on real files."""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import locale
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from forkserver import ask

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: each takes its part, and so do its subprocesses
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
START_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}  # (the commands' environment, unless a test changes it)

# Seconds each file took on 2 cores (pytest --durations=0, summed; test_compiled with Inductor's cache empty, as in CI).
# The files run longest first (--no-loadscope-reorder keeps this order), so that the two workers end together: by the
# number of tests, as xdist orders them, the course's two long tests ran last, on one worker, while the other waited.
SECONDS = {"test_course.py": 210, "test_compiled.py": 160, "test_recipes.py": 180, "test_smollm2.py": 100,
           "test_bench.py": 75, "test_remote.py": 70, "test_arena.py": 70, "test_sizing.py": 65, "test_resume.py": 60,
           "test_finetune.py": 60, "test_engine.py": 60, "test_shards.py": 60, "test_speculative.py": 60,
           "test_training_guards.py": 50, "test_distill.py": 50, "test_cli.py": 45, "test_align.py": 45,
           "test_formats.py": 45, "test_bpe.py": 35, "test_server_abuse.py": 35, "test_distributed.py": 35,
           "test_pictures.py": 35, "test_precision.py": 35, "test_seq2seq.py": 35, "test_serve.py": 30,
           "test_models.py": 25, "test_cores.py": 25, "test_ngram.py": 5, "test_optimizers.py": 2, "test_docs.py": 1,
           "test_data.py": 1, "test_sampling.py": 1, "test_tokenizer.py": 1}


WIDTH = 64  # the tests' models are at most this wide (SmolLM2 apart)


def pytest_addoption(parser):
    parser.addoption("--other-precision", action="store_true",
                     help="compute in the other precision: in bf16 where this CPU trains the tests' models in fp32, "
                          "in fp32 where it trains them in bf16 (CI runs the precision tests again so: both ways on "
                          "every machine)")


def pytest_configure(config):
    if config.getoption("other_precision") and not os.environ.get("PYTEST_XDIST_WORKER"):  # (workers inherit it)
        from fournil.device import CPU_BF16, cpu_bf16_pays

        os.environ[CPU_BF16] = "0" if cpu_bf16_pays(WIDTH) else "1"
        cpu_bf16_pays.cache_clear()


def pytest_terminal_summary(terminalreporter):
    from fournil.device import CPU_BF16

    if value := os.environ.get(CPU_BF16):
        precision = "bf16" if value == "1" else "fp32"
        terminalreporter.write_line(f"{CPU_BF16}={value}: these tests computed in {precision}, whatever the CPU and "
                                    f"the models' width")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -SECONDS.get(item.path.name, 30))  # (a stable sort: each file's tests in order)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fournil serve MODEL`` (or another ``command``: ``arena``) in a process of its own on 127.0.0.1 (``env``:
    variables to add to its environment)."""

    def __init__(self, model, *extra, env: dict | None = None, command: str = "serve"):
        self.process = subprocess.Popen([sys.executable, "-m", "fournil", command, str(model), *map(str, extra),
                                         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **(env or {})})
        lines = []  # the server names the free port it took (--port 0) once its model is loaded
        port_line = re.compile(r" on http://[^:]+:(\d+)")

        def until_the_port():
            while (line := self.process.stdout.readline()) and not port_line.search(line):
                lines.append(line)
            lines.append(line)

        reader = threading.Thread(target=until_the_port, daemon=True)
        reader.start()
        reader.join(timeout=180)
        if reader.is_alive():
            self.process.kill()
            reader.join()
        self.printed = "".join(lines)
        if not (port := port_line.search(self.printed)):
            raise AssertionError(f"the server exited, or did not say its port in 180 s:\n{self.printed}")
        self.port = int(port.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the server did not start")

    def get(self, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body: dict, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def output(self) -> str:
        """All the server printed, once it has stopped."""
        return self.printed + self.process.stdout.read()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


class ForkServer:
    """tests/forkserver.py, started once per worker: it runs each command in a process forked from one that has
    imported fournil already."""

    def __init__(self, env: dict):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")),
                                             str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env,
                                            stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.process.poll() is None

    def program(self, folder: Path) -> dict:
        """Variables for a shell in which ``fournil`` runs each command with this server (tests/forkclient.py): a
        program of that name in ``folder``, first on the PATH. The shell must inherit ``self.control`` (pass_fds)."""
        folder.mkdir()
        client = Path(__file__).with_name("forkclient.py")
        (folder / "fournil").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{client}" "$@"\n')
        (folder / "fournil").chmod(0o755)
        return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "FOURNIL_FORK_SERVER": str(self.control.fileno())}

    def close(self):
        """Ends the server (what it started runs on, each command in a process of its own)."""
        self.control.close()
        self.process.terminate()
        self.process.wait()

    def run(self, args: list, cwd: Path, env: dict, input: str | None, timeout: float) -> subprocess.CompletedProcess:
        """What ``subprocess.run([python, "-m", "fournil", *args], capture_output=True, text=True)`` gives."""
        stdin, to_stdin = os.pipe() if input is not None else (os.open(os.devnull, os.O_RDONLY), None)
        from_stdout, stdout = os.pipe()
        from_stderr, stderr = os.pipe()
        answer = ask(self.control, args, str(cwd), env, [stdin, stdout, stderr])
        for fd in (stdin, stdout, stderr):
            os.close(fd)
        read = {}

        def reader(name, fd):
            with open(fd, encoding=locale.getpreferredencoding(False)) as pipe:  # (newlines as text=True reads them)
                read[name] = pipe.read()

        def writer():
            with contextlib.suppress(BrokenPipeError), open(to_stdin, "w", encoding=locale.getpreferredencoding(False)) \
                    as pipe:
                pipe.write(input)

        threads = [threading.Thread(target=reader, args=("out", from_stdout), daemon=True),
                   threading.Thread(target=reader, args=("err", from_stderr), daemon=True)]
        threads += [threading.Thread(target=writer, daemon=True)] if to_stdin is not None else []
        for thread in threads:
            thread.start()
        with answer, answer.makefile() as replies:
            pid = int(replies.readline())
            answer.settimeout(timeout)
            try:
                code = int(replies.readline())
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(args, timeout) from None
        for thread in threads:
            thread.join()
        return subprocess.CompletedProcess(args, code, read["out"], read["err"])


def can_fork() -> bool:
    """On Linux (macOS forks badly once system frameworks are loaded, and Windows does not fork), unless
    FOURNIL_TEST_FORK=0 starts every command afresh (to tell whether a failure is the fork server's)."""
    return sys.platform == "linux" and os.environ.get("FOURNIL_TEST_FORK") != "0"


@functools.cache
def fork_server() -> ForkServer | None:
    """The worker's fork server, started at its first command (where it can fork)."""
    return ForkServer(START_ENV) if can_fork() else None


class CLI:
    def __init__(self, cwd: Path):
        self.cwd = cwd

    def __call__(self, *args, check: bool = True, timeout: float = 300, input: str | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        args, env = list(map(str, args)), {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if (server := fork_server()) and server.running():
            result = server.run(args, self.cwd, env, input, timeout)
        else:
            result = subprocess.run([sys.executable, "-m", "fournil", *args], cwd=self.cwd, env=env,
                                    capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"fournil {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def popen(self, *args) -> subprocess.Popen:
        # Ctrl-C reaches the child even when the tests themselves run in the background (where the shell ignores it)
        return subprocess.Popen([sys.executable, "-m", "fournil", *map(str, args)], cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


class InProcess:
    """``fournil.cli.main`` called directly: the same code path as the console script, without the start-up."""

    def __init__(self, capsys, monkeypatch, cwd):
        self.capsys = capsys
        monkeypatch.chdir(cwd)

    def __call__(self, *args, check=False):
        from fournil.cli import main

        try:
            code = main(list(map(str, args)))
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        assert gc.get_freeze_count() == 0  # (main leaves the garbage collector's objects out for the command only)
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


@contextlib.contextmanager
def held_elsewhere(folder: Path):
    """``folder``'s lock, held by another process (as a fournil process that writes there holds it) meanwhile."""
    from fournil.checkpoint import LOCK

    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(300)", folder / LOCK],
                              stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # (once it holds it)
        yield
    finally:
        holder.kill()
        holder.wait()


def losses(run: Path) -> list:
    """Each logged step's training loss and each validation's NLL, as the run's metrics.jsonl has them."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cli(tmp_path) -> CLI:
    return CLI(tmp_path)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, made by ``build(folder)`` once for the whole session: the first of xdist's workers to ask
    builds it (under a lock), the other reads it (their base folders share a parent, unique to the session)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():  # (what a failed build left is built again)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Small runs of every model on the bundled English names, trained once for the whole session."""
    settings = {"ngram": [], "mlp": ["--steps", "60"], "rnn": ["--steps", "30", "--n-hidden", "64"],
                "gpt": ["--steps", "30", "--n-embd", "32", "--n-layer", "2"],
                "llama": ["--steps", "30", "--n-embd", "32", "--n-layer", "2"]}

    def build(root):
        for model, extra in settings.items():
            CLI(root)("train", "--data", "names", "--model", model, "--out", f"names-{model}", "--quiet",
                      "--eval-every", "20", *extra)

    root = built_once(tmp_path_factory, "trained", build)
    return {model: root / f"names-{model}" for model in settings}


@pytest.fixture(scope="session")
def running_text(tmp_path_factory) -> Path:
    """A tiny gpt of Shakespeare with a context of 16 characters: text without an end, longer than its context."""
    root = built_once(tmp_path_factory, "running-text", lambda root: CLI(root)(
        "train", "--data", "shakespeare", "--model", "gpt", "--n-embd", "32", "--n-layer", "1", "--block-size", "16",
        "--steps", "10", "--eval-every", "10", "--quiet", "--out", "tiny"))
    return root / "tiny"


@pytest.fixture(scope="session")
def bpe_llama(tmp_path_factory) -> Path:
    """A tiny llama of Shakespeare with a byte-level BPE (ChatML template, <|im_end|> ends a turn) and a context of
    1,024 tokens: a base to fine-tune, and a chat model to serve."""
    root = built_once(tmp_path_factory, "bpe-llama", lambda root: CLI(root)(
        "train", "--data", "shakespeare", "--model", "llama", "--tokenizer", "bpe:400", "--n-embd", "48", "--n-layer",
        "2", "--block-size", "1024", "--batch-size", "4", "--steps", "20", "--eval-every", "20", "--quiet", "--out",
        "chat"))
    return root / "chat"
