"""UltraRes: high-resolution (2K-8K) generation for ComfyUI.

Every method is a set of native nodes that patch a clone of the loaded MODEL. Node classes live in
`nodes/`, the pure-torch mechanics in `patches/`, custom samplers and guiders in `samplers/`.
Nodes are imported only when ComfyUI asks for them, so `patches/` stays importable without a host.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import UltraResExtension

    return UltraResExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
