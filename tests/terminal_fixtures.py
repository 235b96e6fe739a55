"""Run a command with one of its output streams on a pseudo-terminal, as a user's shell gives it."""

from __future__ import annotations

import os
import subprocess


def read_terminal(master: int) -> bytes:
    """Everything written to the terminal whose master end is `master` until the child closes it; closes `master`."""
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks)


def popen_on_terminal(args: list, stream: str, env: dict, raw: bool = False) -> tuple[subprocess.Popen, int]:
    """Start `args` with `stream` ("stdout" or "stderr") on a new pseudo-terminal (raw: no newline translation) and
    the other one piped; returns the process and the terminal's master end, for `read_terminal`."""
    import pty
    import tty

    master, slave = pty.openpty()
    if raw:
        tty.setraw(slave)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: slave}
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env, **streams)
    os.close(slave)
    return proc, master
