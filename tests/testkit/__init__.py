"""A test-only custom-node folder (linked into the test server as `ultrares_testkit`): stand-ins
for models no loader can build small. ComfyUI's FLUX detection fixes the width at 3072 (~500M
parameters even with one block each) and T5-XXL cannot be faked, so the workflow tests replace
UNETLoader + DualCLIPLoader/CLIPTextEncode of the FLUX workflow by this node: tests/tiny_models'
FLUX DiT (real comfy Flux classes) and conditioning of its shape (tokens + pooled vector)."""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

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


NODE_CLASS_MAPPINGS = {"UltraResTestTinyFluxLoader": TinyFluxLoader}
