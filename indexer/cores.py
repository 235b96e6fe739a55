"""Core tokens: one token per core, shared by the decoder processes and the encoder calls of an indexing run, so
that a core never time-shares a decoder with an encoder call.

Without them, 2 decoder processes and 2 encoder calls (one thread each) are runnable at once on 2 cores and the
kernel switches between them every few milliseconds; each switch evicts the other's working set from the core's
caches. Measured on the 2-vCPU Xeon (issue 12's notes): a one-thread int8 ViT-B-32 encoder costs 19.5 CPU ms per
image alone, 26 with a decoder on the same core, and no more than alone with the decoder on the other core. With a
token held for each file a decoder decodes and for each encoder call, at most one of them runs per core.

The tokens are bytes in a pipe that every taker shares (the decoder processes inherit its two ends): taking one
reads a byte, giving it back writes one. They only order the work, they never guard correctness, so waiting for
one gives up after `TOKEN_WAIT` seconds and the work runs without (as it would with no tokens at all): a token lost
with a process the OOM killer took can slow a run, never stall it, and the reader puts back the token of a decoder
that died in the middle of a file (`ParallelReader._replace`).
"""

from __future__ import annotations

import errno
import os
import select
import time

TOKEN_WAIT = 2.0  # seconds a taker waits for a token before it runs without one


class CoreTokens:
    """`count` tokens in a pipe. Create in the process that starts the decoders; pass `fds` to them (`attach`)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("core tokens: count must be at least 1")
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)  # takers poll, then read; a byte another taker got first is no error
        os.write(self._write, b"\0" * count)
        self._owner = True

    @classmethod
    def attach(cls, read_fd: int, write_fd: int) -> "CoreTokens":
        """The tokens of the process that passed these two descriptors (a decoder process's side)."""
        tokens = cls.__new__(cls)
        tokens._read, tokens._write = read_fd, write_fd
        tokens._owner = False
        return tokens

    @property
    def fds(self) -> tuple[int, int]:
        return self._read, self._write

    def take(self, wait: float | None = None) -> bool:
        """Take a token, waiting up to `wait` seconds (default TOKEN_WAIT); False: none came (the caller runs without
        one)."""
        if self._read < 0:
            return False  # closed: the run is over
        deadline = time.monotonic() + (TOKEN_WAIT if wait is None else wait)
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        while True:
            try:
                if os.read(self._read, 1):
                    return True
                return False  # EOF: every write end is closed (the run is over)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    return False
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)

    def give(self) -> None:
        """Give back a token taken with `take` (or one a dead taker held: see the module doc)."""
        if self._write < 0:
            return  # closed (its descriptor number may belong to another file by now)
        try:
            os.write(self._write, b"\0")
        except OSError:  # the run is being torn down
            pass

    def free(self) -> int:
        """Tokens nobody holds now (the bytes in the pipe)."""
        import fcntl
        import struct
        import termios

        return struct.unpack("i", fcntl.ioctl(self._read, termios.FIONREAD, b"\0\0\0\0"))[0]

    def close(self) -> None:
        if self._owner:
            for fd in (self._read, self._write):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._owner = False
            self._read = self._write = -1

    def __enter__(self) -> "CoreTokens":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
