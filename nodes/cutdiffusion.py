"""CutDiffusion nodes: Patch Split/Reassemble (the two-stage patch wrapper) and Pixel Interaction
(the cross-patch shuffle of stage 1). Mechanics in patches/cutdiffusion.py."""

import comfy.model_base
import comfy.model_management
import comfy.patcher_extension
import comfy.utils
from comfy_api.v0_0_2 import io

from ..patches import cutdiffusion as cd
from .common import category, input_error, native_latent_size

SPLIT_NAME = "Patch Split/Reassemble"
INTERACTION_NAME = "Pixel Interaction"
SWITCH_UNITS = ("fraction of steps", "timestep percent", "sigma")

def host_runtime() -> cd.Runtime:
    """ComfyUI's free-memory query, cancel check and node progress bar."""

    def progress(total):
        bar = comfy.utils.ProgressBar(total)
        return lambda done: bar.update_absolute(done, total)

    return cd.Runtime(comfy.model_management.get_free_memory,
                      comfy.model_management.throw_exception_if_processing_interrupted, progress)


class UltraResPatchSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPatchSplit",
            display_name=SPLIT_NAME,
            category=category("CutDiffusion"),
            description=(
                "CutDiffusion for any sampler: sample the full high-resolution latent, but let the model only ever see "
                "base-size pieces. Stage 1 denoises the strided sub-lattices of the latent (each a whole, "
                "downsampled view of the image) as one batch, which lays out a coherent global structure; stage 2 "
                "refines with overlapping, jittered base-size windows that are averaged (MultiDiffusion). "
                "Add Pixel Interaction after this node for the full method."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is patched; the input stays untouched)."),
                io.Int.Input("patch_size", default=0, min=0, max=4096, step=1,
                             tooltip="Base patch/window size in LATENT pixels (image pixels / 8 for SD-family VAEs). "
                                     "0 = the model family's native size: 64 for SD1.x, 96 for SD2.x 768-v, "
                                     "128 for SDXL, SD3 and Flux."),
                io.Float.Input("switch_at", default=0.5, min=0.0, max=1000.0, step=0.001,
                               tooltip="Where stage 1 (sub-lattice patches) hands over to stage 2 (windows), in "
                                       "switch_unit. 0.5 fraction of steps = the reference (first half). 0 = stage 2 "
                                       "only (plain MultiDiffusion); 1 = stage 1 only."),
                io.Combo.Input("switch_unit", options=list(SWITCH_UNITS), default=SWITCH_UNITS[0],
                               tooltip="'fraction of steps': of this sampling's steps (the reference's rule). "
                                       "'timestep percent': ComfyUI's start/end-percent convention (0 = first step). "
                                       "'sigma': stage 1 runs while sigma is above this value."),
                io.Float.Input("window_overlap", default=0.5, min=0.0, max=0.875, step=0.125,
                               tooltip="Stage 2: overlap of neighbouring windows as a fraction of the window "
                                       "(0.5 = stride of half a window, the reference)."),
                io.Boolean.Input("jitter", default=True,
                                 tooltip="Stage 2: move every window randomly by up to a quarter of the overlap each "
                                         "step, on a padded canvas (the reference: +-16 latent px for SDXL), so "
                                         "window seams never stay in one place (see jitter_padding)."),
                io.Combo.Input("blend", options=["uniform", "smooth"], default="uniform",
                               tooltip="Stage 2: how overlapping windows are averaged. 'uniform' = plain mean (the "
                                       "reference); 'smooth' = a cosine taper that weights window centres more."),
                io.Int.Input("max_batch", default=0, min=0, max=1024, step=1,
                             tooltip="Patches or windows per model call (each carries the cond/uncond batch of "
                                     "that call). 0 = as many as the free memory allows. Lower it if you run out "
                                     "of VRAM."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the stage-2 window jitter (drawn per step, identical for the cond "
                                     "and uncond passes)."),
                io.Combo.Input("sdxl_size_conditioning", options=list(cd.SDXL_SIZE_MODES), default=cd.SDXL_SIZE_MODES[0],
                               tooltip="SDXL only (ignored for other models). 'image size + window crop' (the "
                                       "reference): original and target size = the full image, crop = the window's "
                                       "start on the jitter canvas (in image px, padding included, as the reference). 'window size': every patch/window is conditioned as a whole "
                                       "image of its own size. 'unchanged': keep the conditioning as encoded."),
                io.Combo.Input("jitter_padding", options=list(cd.JITTER_PADDINGS), default="reflect", optional=True,
                               tooltip="Stage 2: how the canvas the jittered windows move into is padded. 'reflect' "
                                       "mirrors the latent; 'zeros (reference)' pads with a noise-free zero strip, "
                                       "which the model can read as an edge and draw extra objects at."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, patch_size, switch_at, switch_unit, window_overlap, jitter, blend, max_batch, seed,
                sdxl_size_conditioning, jitter_padding="reflect") -> io.NodeOutput:
        if model.model.latent_format.latent_dimensions != 2:
            raise input_error(SPLIT_NAME, "model", "the model does not work on 2-D image latents (video/audio/3-D)",
                              "use an image model")
        if patch_size == 0:
            patch_size = native_latent_size(model)
            if patch_size is None:
                raise input_error(SPLIT_NAME, "patch_size", f"no native size is known for {type(model.model.model_config).__name__}",
                                  "set patch_size to the model's training resolution in latent pixels")
        if patch_size < 8:
            raise input_error(SPLIT_NAME, "patch_size", f"{patch_size} latent px is too small for a model pass",
                              "use at least 8 (0 = native size)")
        if switch_unit != "sigma" and switch_at > 1.0:
            raise input_error(SPLIT_NAME, "switch_at", f"{switch_at} is not a fraction", "use 0..1 or switch_unit 'sigma'")
        if switch_unit == "timestep percent":
            switch = cd.StageSwitch("sigma", float(model.get_model_object("model_sampling").percent_to_sigma(switch_at)))
        else:
            switch = cd.StageSwitch("steps" if switch_unit == SWITCH_UNITS[0] else "sigma", switch_at)
        embedder = model.model.embedder if isinstance(model.model, comfy.model_base.SDXL) else None
        wrapper = cd.PatchSplit(patch_size, switch, window_overlap, jitter, blend, max_batch, seed,
                                sdxl_size_conditioning, jitter_padding, embedder, host_runtime(), SPLIT_NAME)
        m = model.clone()
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, cd.KEY)  # applied twice: last wins
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, cd.KEY, wrapper)
        return io.NodeOutput(m)


class UltraResPixelInteraction(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResPixelInteraction",
            display_name=INTERACTION_NAME,
            category=category("CutDiffusion"),
            description=(
                "CutDiffusion's pixel interaction, on top of Patch Split/Reassemble: in stage 1, before every model "
                "call, each latent element is swapped with the same element of a randomly chosen other patch (a "
                "fresh permutation per element and step), and the prediction is swapped back afterwards. The "
                "patches thereby exchange information and agree on one global structure."),
            inputs=[
                io.Model.Input("model", tooltip="A model already patched by Patch Split/Reassemble."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the permutations (one per step, shared by the cond and uncond passes)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone.")],
        )

    @classmethod
    def execute(cls, model, seed) -> io.NodeOutput:
        if not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, cd.KEY):
            raise input_error(INTERACTION_NAME, "model", "this model has no Patch Split/Reassemble applied",
                              "connect the MODEL output of Patch Split/Reassemble to this node")
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[cd.INTERACTION_KEY] = cd.PixelInteraction(seed)
        return io.NodeOutput(m)


NODES = [UltraResPatchSplit, UltraResPixelInteraction]
