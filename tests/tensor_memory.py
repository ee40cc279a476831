"""Deterministic peak tensor memory of a block of torch code (no allocator involved), for tests and
benchmarks on a CPU host where the compute device cannot be measured separately."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still referenced (deterministic, no
    allocator involved): each storage counts once, from its first tensor until its last one dies."""

    def __init__(self):
        super().__init__()
        self.refs, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key not in self.refs:
            self.refs[key] = [0, size]
            self.current += size
            self.peak = max(self.peak, self.current)
        self.refs[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]
