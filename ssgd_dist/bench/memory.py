"""Memory of a step: storage bytes counted by allocation, and the process's peak RSS.

Counted by allocation because neither RSS nor the CUDA allocator can tell a parameter-sized
difference between variants (see ``AllocationTracker``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active, on any device.

    On the CPU it stands in for CUDA's ``max_memory_allocated``: RSS cannot tell a parameter-sized
    difference (the allocator keeps freed memory, and activations are hundreds of times larger than
    ResNet-20's weights). On the GPU it is used too, because frees of memory allocated before the
    measurement (earlier variants') would otherwise offset the difference between variants; cuDNN's
    workspace and NCCL's buffers are not tensors, so they are not counted.

    A storage counts from the op that allocates it (an output aliasing none of the op's inputs) until
    it dies; storages alive before entering count as 0.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def live_bytes(self) -> int:
        """Bytes of the storages allocated while active that are still alive now (held, not transient)."""
        self._forget_dead()
        return self.current

    def _forget_dead(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._forget_dead()
        inputs = {storage.data_ptr() for storage in _storages((args, kwargs))}
        for storage in _storages(out):
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._live:
                self._live[key] = (StorageWeakRef(storage), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    """The storages of the tensors in ``tree``; wrapper tensors without one of their own (a DTensor's
    outer tensor: its local tensor is counted where it is allocated) are left out."""
    out = []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            try:
                storage = t.untyped_storage()
                storage.data_ptr()
            except RuntimeError:
                continue
            out.append(storage)
    return out


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (Linux ``VmHWM``); None where /proc cannot say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
