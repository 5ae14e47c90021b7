"""Single process: the passes accumulate into ``.grad`` and the optimizer steps once."""

from .base import Backend


class LocalBackend(Backend):
    """Nothing to synchronise; kept as its own name so configs can ask for it explicitly."""
