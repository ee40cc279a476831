"""Registers every UltraRes node with ComfyUI through the V3 API (pinned to comfy_api v0.0.2,
the newest numbered API of ComfyUI 0.3.75)."""

import importlib

from comfy_api.v0_0_2 import ComfyExtension, io

# One module per method; each exposes NODES, a list of its io.ComfyNode classes.
_NODE_MODULES = (
    "scalecrafter",
    "cutdiffusion",
    "lr_injector",
    "urae",
    "exact_decode",
    "pasd",
    "toy_world",
    "ultrapixel",
)


def node_classes() -> list[type[io.ComfyNode]]:
    classes = []
    for name in _NODE_MODULES:
        classes.extend(importlib.import_module(f"{__name__}.{name}").NODES)
    return classes


class UltraResExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
