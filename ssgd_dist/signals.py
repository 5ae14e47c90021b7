"""SIGINT and SIGTERM end a run promptly: exit 128 + the signal, one line, no traceback.

The handler writes nothing (the ranks could not agree on a checkpoint there): it raises ``Stopped``
in the main thread, so the run unwinds through its ``finally`` blocks (the run directory's files are
only ever replaced atomically) and the same command resumes from the last checkpoint. A main thread
stuck in a call that does not return to Python (a collective waiting for a peer that is gone) cannot
run the handler; a watchdog thread, woken by the signal itself, ends the process after ``GRACE_S``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from .errors import Stopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 10.0


class StopOnSignals:
    """``with StopOnSignals() as stop:`` SIGINT/SIGTERM raise ``Stopped`` in the main thread.

    ``stop.signum`` is the signal received (None: none). Outside the main thread it does nothing
    (Python handlers can only be set there; whoever runs the loop in a thread stops it). The previous
    handlers are restored on exit.
    """

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._active = False
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._active = True
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if self._previous_wakeup != -1:  # someone else (an event loop) listens there: no watchdog
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._pipe = (read_fd, write_fd)
        self._thread = threading.Thread(target=self._watch, name="ssgd-stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._active:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)
            self._done.set()
            try:
                os.write(self._pipe[1], b"\0")  # wake the watchdog so that it ends
            except OSError:
                pass
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # never close a descriptor the watchdog might still read
                for fd in self._pipe:
                    os.close(fd)
            self._pipe = None
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping; the watchdog bounds how long that takes
        self.signum = signum
        raise Stopped(signum)

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while not self._done.is_set():
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            signums = [b for b in data if b in SIGNALS]
            if signums and not self._done.wait(self.grace_s):
                name = signal.Signals(signums[0]).name
                sys.stderr.write(
                    f"ssgd-dist: stopped by {name} (the run did not unwind within {self.grace_s:.0f} s); "
                    "run the same command again to resume from the last checkpoint\n"
                )
                sys.stderr.flush()
                os._exit(128 + signums[0])
