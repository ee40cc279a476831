"""A test-only custom-node folder (linked into the test server as `ultrares_testkit`): stand-ins
for models no loader can build small. ComfyUI's FLUX detection fixes the width at 3072 (~500M
parameters even with one block each) and T5-XXL cannot be faked, so the workflow tests replace
UNETLoader + DualCLIPLoader/CLIPTextEncode of the FLUX workflow by this node: tests/tiny_models'
FLUX DiT (real comfy Flux classes) and conditioning of its shape (tokens + pooled vector). Stable Cascade's model detection fixes the full
widths too, so its checkpoints are replaced by tiny StageC / StageB / StageA built from ComfyUI's classes."""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import folder_paths  # noqa: E402

sys.path.insert(0, folder_paths.get_folder_paths("custom_nodes")[0])  # the pack as `ultrares` (tiny_models uses its VAE wrapper)

import tiny_models  # noqa: E402


class TinyFluxLoader:
    CATEGORY = "UltraRes/tests"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("MODEL", "positive", "negative")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, seed):
        g = torch.Generator().manual_seed(seed)
        width = tiny_models.FLUX_DIT["context_in_dim"]

        def cond():
            return [[torch.randn(1, 8, width, generator=g), {"pooled_output": torch.randn(1, tiny_models.FLUX_DIT["vec_in_dim"], generator=g)}]]

        return tiny_models.tiny_flux(seed), cond(), cond()


class TinyCascadeLoader:
    """Stands in for a Stable Cascade checkpoint: stage 'c' gives the tiny StageC and conditioning of the
    Stable Cascade text encoder's shape; stage 'b' the tiny StageB and the tiny StageA as VAE."""

    CATEGORY = "UltraRes/tests"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "VAE")
    RETURN_NAMES = ("MODEL", "positive", "negative", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"stage": (["c", "b"],), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, stage, seed):
        model = tiny_models.tiny_stage_c(seed) if stage == "c" else tiny_models.tiny_stage_b(seed)
        cond = lambda i: tiny_models.cascade_conditioning(seed + i)
        return model, cond(1), cond(2), tiny_models.tiny_stage_a(seed)


NODE_CLASS_MAPPINGS = {"UltraResTestTinyFluxLoader": TinyFluxLoader, "UltraResTestTinyCascadeLoader": TinyCascadeLoader}
