"""``fournil ARGS`` for the course's scripts in the tests: the command runs in a process forked by tests/forkserver.py
(fournil imported once), on this program's own stdin, stdout and stderr, in its folder and environment. A script's 70
commands started afresh spent most of the course's time importing torch (2.5 to 5 s each).

The test puts a ``fournil`` on the scripts' PATH that runs this with ``python -S`` (the standard library only: it
starts in milliseconds), and gives the fork server's socket as the inherited file descriptor FOURNIL_FORK_SERVER. A
signal sent to this process (``kill $SERVER`` in a script) goes on to the command; its exit code is this one's.
"""
import os
import signal
import socket
import sys

from forkserver import ask

if __name__ == "__main__":
    control = socket.socket(fileno=int(os.environ["FOURNIL_FORK_SERVER"]))
    with ask(control, sys.argv[1:], os.getcwd(), dict(os.environ), [0, 1, 2]) as answer, answer.makefile() as replies:
        pid = int(replies.readline())
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, lambda received, _: os.kill(pid, received))
        code = int(replies.readline())
    sys.exit(code if code >= 0 else 128 - code)  # (killed by a signal: as a shell reports it)
