"""Installed into the project venv (via a .pth) only when torchvision's compiled ops cannot load.

The torchvision wheel that matches torch 2.13.0 here is a CUDA build whose `_C` fails on CPU torch,
and its Python side then dies registering fake kernels for operators that were never defined.
ComfyUI imports torchvision unconditionally, so before torchvision's first import we define the
operator schemas it registers against; its Python transforms work, its C++ ops stay unusable.
"""
import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _SCHEMAS:
                try:
                    lib.define(schema)
                except RuntimeError:  # already defined (the real _C loaded after all)
                    pass
            _keep.append(lib)
        return None


_keep = []
sys.meta_path.insert(0, _DefineTorchvisionOps())
