"""Error types and the exit codes they map to: one place, so every entry point answers alike.

User mistakes (bad config values, missing data, impossible launch settings, a run directory that is
in use or holds another run) exit with code 2 and one line naming the input and the fix; a non-finite
loss or weights under ``on_nonfinite: stop`` exit with 3; a full disk with 4; SIGINT/SIGTERM with
128 + the signal number.
"""

from __future__ import annotations

import signal

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_DISK_FULL = 4


class ConfigError(ValueError):
    """A user-facing configuration problem; entry points print it on one line and exit with code 2."""


class DataError(ConfigError):
    """A data set that cannot be loaded (missing files, wrong format); a configuration problem."""


class NonFiniteError(RuntimeError):
    """The synchronised gradient, or the weights, are not finite; under ``on_nonfinite: stop`` (and for
    weights always) the run ends here (exit 3).

    ``step`` is the 0-based step that produced it, when it was found after later steps had run;
    ``hint`` is what the user can change.
    """

    DEFAULT_HINT = "set train.on_nonfinite=skip to skip such steps, or lower optim.lr"

    def __init__(self, message: str, step: int | None = None, hint: str = DEFAULT_HINT):
        super().__init__(message)
        self.step = step
        self.hint = hint

    def __reduce__(self):  # keeps ``step`` across processes (Ray sends worker errors pickled)
        return type(self), (str(self), self.step, self.hint)


class DiskFullError(RuntimeError):
    """No space left while writing the run directory (exit 4); the file being replaced is left intact."""


class Stopped(BaseException):
    """SIGINT or SIGTERM ended the run (exit 128 + signal). A ``BaseException``, like ``KeyboardInterrupt``,
    so that no ``except Exception`` on the way up (a checkpoint fallback, a sweep cell) swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):
        return type(self), (self.signum,)


EXPECTED = (ConfigError, NonFiniteError, DiskFullError, Stopped)


def explain(exc: BaseException) -> tuple[int, str]:
    """The exit code of an ``EXPECTED`` error and the one line an entry point prints for it."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, f"error: {exc}"
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE, f"stopped: {exc}; {exc.hint}"
    if isinstance(exc, DiskFullError):
        return EXIT_DISK_FULL, f"error: {exc}"
    if isinstance(exc, Stopped):
        return exc.exit_code, f"{exc}; run the same command again to resume from the last checkpoint"
    raise TypeError(f"not an expected error: {exc!r}")
