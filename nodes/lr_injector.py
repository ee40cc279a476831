"""LR Condition Injector (model patch) and LR-Guided Sampler (exact state blend): a low-resolution
result guides a high-resolution pass, training-free (DemoFusion's skip residual and dilated global
path), for any SD1.5 / SDXL / FLUX model."""

import functools
import logging

import comfy.patcher_extension
import comfy.samplers
from comfy_api.v0_0_2 import io

from ..patches.lr_guidance import ASPECT_MODES, FADES, KEY, UPSCALE_METHODS, GuidanceSchedule, LRGuidance
from ..patches.schedule import SigmaWindow
from ..samplers.lr_guided import lr_guided_sampler
from .common import category, input_error, native_latent_size, percent_inputs

INJECTOR = "LR Condition Injector"
SAMPLER = "LR-Guided Sampler"


def min_guide_side(native: int | None) -> int:
    """The smallest guide side in latent px: a quarter of the native side (16 = 128 px for SD1.5,
    32 = 256 px for SDXL, 8 for the toy world), 8 when the family is unknown. The guide is meant to
    be the model's own composition at or near its native size; a quarter of it is already a 1/16
    thumbnail, below which the upsampled guide carries little more than colour (1x1: one colour)."""
    return max(2, native // 4) if native else 8


class LRConditionInjector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResLRConditionInjector",
            display_name=INJECTOR,
            category=category("guidance"),
            description=(
                "Guides a high-resolution pass with a low-resolution result (DemoFusion's training-free form): the "
                "sampling state is pulled toward the upsampled low-res latent, noised to the current step, with a "
                "weight that fades as the image forms; optionally the model also denoises blurred strided "
                "sub-lattices (each at the model's native size) for a global layout. The low-res pass fixes the "
                "composition, the high-res pass adds detail without repeating. With the stock KSampler the state "
                "blend is exact for 'euler'; for any sampler use SamplerCustom with the LR-Guided Sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The model that samples the high-resolution latent."),
                io.Latent.Input("low_res_latent", tooltip=(
                    "The low-resolution result (e.g. the base-size KSampler output) of the same model family; "
                    "upsampled to the size being sampled. Batch 1 or the high-res batch size.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
                    "Seed of the one fixed noise sample that noises the upsampled low-res latent at every step. "
                    "The sampler's own seed gives the same noise as the sampler starts from.")),
                io.Float.Input("skip_strength", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Skip residual weight: c1 = skip_strength * cf^alpha1. 1 = DemoFusion; 0 = off.")),
                io.Float.Input("alpha1", default=3.0, min=0.0, max=20.0, step=0.1, tooltip=(
                    "How fast the skip residual fades (cf^alpha1). Smaller keeps more of the low-res image "
                    "(more consistency, more upsampling blur); larger frees the detail pass earlier.")),
                io.Float.Input("global_strength", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Dilated global path weight: c2 = global_strength * cf^alpha2. 0 = off (no extra model call); "
                    "1 = DemoFusion. Costs about one more model evaluation per step while active.")),
                io.Float.Input("alpha2", default=1.0, min=0.0, max=20.0, step=0.1, tooltip=(
                    "How fast the global path fades (cf^alpha2). Smaller: less repetition but grainier.")),
                io.Float.Input("blur_sigma", default=0.8, min=0.0, max=4.0, step=0.05, tooltip=(
                    "Std of the Gaussian blur on the global path's input at the start (scaled by 0.99*cf^alpha3+0.01). "
                    "Larger: stronger global guidance, risk of over-smoothing. 0 = no blur.")),
                io.Float.Input("alpha3", default=1.0, min=0.0, max=20.0, step=0.1, tooltip=(
                    "How fast the blur fades (cf^alpha3). Smaller: less grainy, risk of over-smoothing.")),
                io.Int.Input("global_stride", default=0, min=0, max=16, tooltip=(
                    "Sub-lattice stride of the global path (each sub-lattice is 1/stride of the size). 0 = the "
                    "high-res / low-res size ratio. In a 2x-then-4x chain set 4 on the 4x pass so the "
                    "sub-lattices are the model's native size.")),
                io.Combo.Input("upscale_method", options=list(UPSCALE_METHODS), default="bicubic", tooltip=(
                    "How the low-res latent is enlarged in latent space (DemoFusion: bicubic).")),
                *percent_inputs(io, 0.0, 1.0, "the guidance"),
                io.Combo.Input("aspect_mismatch", options=list(ASPECT_MODES), default="refuse", optional=True, tooltip=(
                    "A low-res latent of another aspect ratio than the sampled one: 'refuse' stops with an error naming "
                    "both sizes; 'center crop' guides with its largest centred part of the target's aspect ratio; "
                    "'stretch' upsamples it to the target as it is (the picture is distorted).")),
                io.Combo.Input("fade", options=list(FADES), default="demofusion", optional=True, tooltip=(
                    "What the skip and global weights fade with (c = strength * f^alpha). 'demofusion': "
                    "f = cf(t) of the model timestep. 'step cosine' / 'step linear': f = (1 + cos(pi i/n))/2 or "
                    "1 - i/n of the steps done in the guidance range, which keeps more weight in the late steps "
                    "of schedules such as karras. The blur always fades with cf(t).")),
            ],
            outputs=[io.Model.Output(tooltip="The model with the low-res guidance attached.")],
        )

    @classmethod
    def execute(cls, model, low_res_latent, seed, skip_strength, alpha1, global_strength, alpha2, blur_sigma, alpha3,
                global_stride, upscale_method, start_percent, end_percent, aspect_mismatch="refuse",
                fade="demofusion") -> io.NodeOutput:
        error = functools.partial(input_error, INJECTOR)
        samples = low_res_latent.get("samples") if isinstance(low_res_latent, dict) else None
        if samples is None or samples.ndim != 4:
            shape = None if samples is None else tuple(samples.shape)
            raise error("low_res_latent", f"expected an image latent [batch, channels, height, width], got {shape}",
                        "connect an image LATENT (e.g. a KSampler output), not a video/audio latent")
        channels = model.model.latent_format.latent_channels
        if samples.shape[1] != channels:
            raise error("low_res_latent", f"it has {samples.shape[1]} channels but this model's latents have {channels}",
                        "pass a latent made by the same model family (same VAE) as this model")
        native = native_latent_size(model)
        smallest = min_guide_side(native)
        if min(samples.shape[-2:]) < smallest:
            why = f"a quarter of the model's native {native} latent px" if native else "the minimum where the native size is unknown"
            raise error("low_res_latent", f"it is {samples.shape[-1]}x{samples.shape[-2]} latent px, below {smallest} on a side "
                        f"({why}), too small to hold a composition: upsampled it "
                        "guides toward flat colour",
                        f"sample the guide near the model's native size, at least {8 * smallest} px ({smallest} latent px) a side")
        if start_percent > end_percent:
            raise error("end_percent", f"end ({end_percent}) is before start ({start_percent})", "set end_percent >= start_percent")

        schedule = GuidanceSchedule(skip_strength, alpha1, global_strength, alpha2, blur_sigma, alpha3, fade)
        window = SigmaWindow.from_percents(model.get_model_object("model_sampling"), start_percent, end_percent)
        guidance = LRGuidance(samples.detach().clone(), schedule, seed, window, upscale_method, global_stride, error, aspect_mismatch)

        m = model.clone()
        if m.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY):
            logging.warning("%s: the model already carries an LR Condition Injector; this one replaces it.", INJECTOR)
            m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY)
            m.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, KEY)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY, guidance)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, KEY, guidance.clear)
        return io.NodeOutput(m)


class LRGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResLRGuidedSampler",
            display_name=SAMPLER,
            category=category("guidance"),
            description=(
                "The exact form of the LR Condition Injector's skip residual, for SamplerCustom / "
                "SamplerCustomAdvanced: wraps any stock sampler and blends the sampler state toward the noised "
                "upsampled low-res latent before each step. The low-res latent and weights come from the LR "
                "Condition Injector on the MODEL being sampled."),
            inputs=[io.Sampler.Input("sampler", tooltip=(
                "The sampler to wrap (KSamplerSelect or a stock Sampler* node). While the blend weight is non-zero "
                "it runs one step at a time; multistep samplers then act as their first-order form."))],
            outputs=[io.Sampler.Output(tooltip="The wrapped sampler, for SamplerCustom's sampler input.")],
        )

    @classmethod
    def execute(cls, sampler) -> io.NodeOutput:
        error = functools.partial(input_error, SAMPLER)
        if not isinstance(sampler, comfy.samplers.KSAMPLER):
            raise error("sampler", f"{type(sampler).__name__} is not a k-diffusion sampler, so it cannot be stepped",
                        "use KSamplerSelect or one of ComfyUI's Sampler* nodes")
        return io.NodeOutput(lr_guided_sampler(sampler, error))


NODES = [LRConditionInjector, LRGuidedSampler]
