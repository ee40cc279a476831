"""Deterministic peak tensor memory of a block of torch code (no allocator involved), per place, for
tests and benchmarks on a CPU host where the compute device cannot be measured separately."""

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ultrares.patches.exact_decode import Placement


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still referenced: each storage counts
    once, from its first tensor until its last one dies. Storages are filed by place: their device's
    name, or the name given by `place(...)` to those created inside it. `peak` is the peak of all
    places together, `peaks[place]` each place's own peak. `meta=True` also counts meta tensors (shapes
    only: a full-size run without the compute)."""

    def __init__(self, meta: bool = False):
        super().__init__()
        self.meta = meta
        self.refs, self.current, self.peaks, self.total, self.peak = {}, {}, {}, 0, 0
        self.placing = None

    @contextlib.contextmanager
    def place(self, name: str):
        outer, self.placing = self.placing, name
        try:
            yield
        finally:
            self.placing = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (self.meta or t.device.type != "meta"):
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if size == 0:
            return
        if key not in self.refs:
            place = self.placing or t.device.type
            self.refs[key] = [0, size, place]
            self.current[place] = self.current.get(place, 0) + size
            self.peaks[place] = max(self.peaks.get(place, 0), self.current[place])
            self.total += size
            self.peak = max(self.peak, self.total)
        self.refs[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current[entry[2]] -= entry[1]
            self.total -= entry[1]
            del self.refs[key]


class TaggedPlacement(Placement):
    """A test double of the device choice: compute and state share one real device (cpu, or meta for
    shapes only), and every tensor the decode sends to the state side is copied there inside
    `probe.place("state")`; all other tensors count as the compute device's."""

    def __init__(self, probe: PeakTensorMemory, device="cpu"):
        super().__init__(torch.device(device), torch.device(device))
        object.__setattr__(self, "probe", probe)

    def state_empty(self, shape, dtype):
        with self.probe.place("state"):
            return super().state_empty(shape, dtype)

    def to_state(self, t):
        with self.probe.place("state"):
            return t.to(self.state, copy=True)

    def to_compute(self, t):
        return t.to(self.compute, copy=True)  # a tile is a copy on the compute device, never a view of a state
