"""Error types and the exit codes they map to: one place, so every entry point answers alike.

User mistakes (bad config values, missing data, impossible launch settings) exit with code 2 and one
line naming the input and the fix; a non-finite loss under ``on_nonfinite: stop`` exits with 3.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3


class ConfigError(ValueError):
    """A user-facing configuration problem; entry points print it on one line and exit with code 2."""


class DataError(ConfigError):
    """A data set that cannot be loaded (missing files, wrong format); a configuration problem."""


class NonFiniteError(RuntimeError):
    """The synchronised gradient is not finite; under ``on_nonfinite: stop`` the run ends here (exit 3).

    ``step`` is the 0-based step that produced it, when it was found after later steps had run.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # keeps ``step`` across processes (Ray sends worker errors pickled)
        return type(self), (str(self), self.step)
