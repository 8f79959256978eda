"""``python -m fournil ARGS`` for the tests, without Python's and torch's start-up and exit each time (2.6 s of CPU
for ``fournil --version`` started afresh, 0.1-0.2 s forked): this process imports fournil once, then forks once per
command.

Each command still runs in a process of its own, on its own pipes, in its own folder, with its own environment; what
it shares with the others is only what the import did. conftest.py's ``ForkServer`` is the other end: it sends a
command (JSON, and its stdin, stdout and stderr with a socket for the answer) on the socket this process is given. A
waiter, forked for each command, forks the command, then answers with its pid and, when it ends, its exit code.
Python starts, and torch reads its variables (threads, instruction sets), before any of this: a command whose
environment changes those starts Python afresh (``READ_AT_START``).

Two clients: conftest.py's ``CLI`` (through ``ForkServer``), and tests/forkclient.py, the ``fournil`` program that the
course's scripts call in the tests.
"""
import atexit
import json
import os
import random
import runpy
import signal
import socket
import sys

# what Python and torch read as they start (this process started before): a command that changes one of these gets a
# Python of its own. Inductor (TORCHINDUCTOR_*, which fournil sets in the tests' own process too) and Intel's OpenMP
# (KMP_*, which scikit-learn sets there) read theirs when they load: this process loaded neither.
READ_AT_START = ("PYTHON", "OMP_", "GOMP_", "MKL_", "ATEN_", "ONEDNN_", "DNNL_", "TORCH_", "CUDA", "LD_", "MALLOC",
                 "LC_", "LANG")


def ask(control: socket.socket, args: list, cwd: str, env: dict, stdio: list[int]) -> socket.socket:
    """Has the fork server at the other end of ``control`` run ``fournil ARGS`` on the file descriptors ``stdio`` (its
    stdin, stdout and stderr); returns the socket on which the server answers, a line each: the command's pid, then,
    when it ends, its exit code (minus the signal that killed it)."""
    answer, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        command = json.dumps({"args": args, "cwd": cwd, "env": env}).encode()
        socket.send_fds(control, [command], [*stdio, theirs.fileno()])
    return answer


def serve(control: socket.socket) -> dict:
    """Forks for each command until the tests close their end; returns (in the command's process) the command."""
    import fournil.cli  # noqa: F401  (the start-up every command shares)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # (the waiters end unwaited for)
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 4)
        if not message:  # the tests ended
            os._exit(0)
        if os.fork():
            for fd in fds:
                os.close(fd)
            continue
        control.close()  # the waiter
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        *stdio, answer = fds
        if not (pid := os.fork()):
            os.close(answer)
            for number, fd in enumerate(stdio):
                os.dup2(fd, number)
                os.close(fd)
            return json.loads(message)
        for fd in stdio:
            os.close(fd)
        with socket.socket(fileno=answer) as reply:
            reply.sendall(f"{pid}\n".encode())
            _, status = os.waitpid(pid, 0)
            reply.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        os._exit(0)


exit_code = 1  # (an uncaught exception's)


def exit_at_once():
    """Python's exit, less its last part: after the threads are joined and the atexit functions have run, tearing down
    torch's modules took 0.7 s of each command, to free memory that the process's end frees anyway."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    atexit.register(exit_at_once)  # (first registered, so last run)
    command = serve(socket.socket(fileno=int(sys.argv[1])))
    os.chdir(command["cwd"])
    env = command["env"]
    changed = {key for key in env.keys() | os.environ.keys() if env.get(key) != os.environ.get(key)}
    if any(key.startswith(READ_AT_START) for key in changed):
        os.execve(sys.executable, [sys.executable, "-m", "fournil", *command["args"]], env)
    os.environ.clear()
    os.environ.update(env)
    sys.argv[1:] = command["args"]
    sys.path[0] = command["cwd"]  # (as ``python -m`` puts it)
    random.seed()  # (a fresh process seeds Python's generator anew)
    try:
        runpy.run_module("fournil", run_name="__main__", alter_sys=True)
        exit_code = 0
    except SystemExit as end:
        exit_code = 0 if end.code is None else end.code if isinstance(end.code, int) else 1
        raise
