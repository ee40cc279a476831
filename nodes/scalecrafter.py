"""ScaleCrafter nodes: Re-dilate Model (re-dilated and dispersed convolutions) and Noise-Damped CFG.
The mechanics live in patches/scalecrafter.py; this module checks the input and wires the patches
into a clone of the model."""

import types

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.ops
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..patches import scalecrafter as sc
from ..patches import schedule as windows
from .common import category, input_error, model_family, percent_inputs
from .common import native_latent_size as common_native_size

WRAPPER_KEY = "ultrares.scalecrafter"
AUTO = "auto (from latent size)"
REDILATE = "Re-dilate Model"
NDCFG = "Noise-Damped CFG"


def comfy_conv_weights(conv, x):
    """The conv's weight and bias the way its own ComfyUI forward gets them: cast to the input's
    dtype/device (fp16/bf16/fp8 weights, lowvram offload) with LoRA weight functions applied."""
    if getattr(conv, "comfy_cast_weights", False) or getattr(conv, "weight_function", None) or getattr(conv, "bias_function", None):
        weight, bias, stream = comfy.ops.cast_bias_weight(conv, x, offloadable=True)
        return weight, bias, lambda: comfy.ops.uncast_bias_weight(conv, weight, bias, stream)
    return conv.weight, conv.bias, lambda: None


def unet_of(model, node: str):
    """(diffusion_model, unet_config) of an SD1.x/SD2.x/SDXL-style UNet, or a clear error."""
    unet = model.get_model_object("diffusion_model")
    config = getattr(model.model.model_config, "unet_config", {})
    family = type(model.model).__name__
    if not isinstance(unet, openaimodel.UNetModel) or "channel_mult" not in config:
        raise input_error(node, "model", f"a {family} model has no SD-style UNet with 3x3 convolutions to re-dilate",
                          "use an SD1.x, SD2.x or SDXL-family checkpoint (ScaleCrafter is defined for those UNets)")
    if config.get("use_temporal_resblock") or config.get("dims", 2) != 2 or config.get("resblock_updown"):
        raise input_error(node, "model", f"the {family} UNet uses video or ResBlock up/down-sampling layers ScaleCrafter does not define",
                          "use an SD1.x, SD2.x or SDXL-family image checkpoint")
    return unet, config


def checked_sites(unet, config, node: str) -> tuple[sc.ConvSite, ...]:
    sites = sc.unet_conv_sites(config)
    for site in sites:
        try:
            conv = comfy.utils.get_attr(unet, site.path)
        except AttributeError:
            conv = None
        if not isinstance(conv, torch.nn.Conv2d) or tuple(conv.kernel_size) != (3, 3) or tuple(conv.dilation) != (1, 1):
            raise input_error(node, "model", f"the UNet has no plain 3x3 convolution at {site.path} where its config puts one",
                              "use an unmodified SD1.x, SD2.x or SDXL-family UNet")
    return sites


def percent(name: str, default: float, tooltip: str):
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.001, tooltip=tooltip)


def window_unit_input():
    return io.Combo.Input("window_unit", options=list(windows.WINDOW_UNITS), default=windows.WINDOW_UNITS[0], optional=True,
                          tooltip="How start/end percent are read. 'steps (reference)': as a share of the sampler's steps, "
                                  "as the reference counts them (end 0.74 of 50 steps = the first 37 steps on any scheduler). "
                                  "'timestep percent': ComfyUI's sigma convention, which covers a different number of steps "
                                  "on karras, exponential, beta or sgm_uniform schedules.")


def check_order(node: str, start: float, end: float, start_name: str, end_name: str) -> None:
    if start > end:
        raise input_error(node, start_name, f"{start} is after {end_name} {end}", f"set {start_name} <= {end_name}")


class RedilateModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResRedilateModel",
            display_name=REDILATE,
            category=category("ScaleCrafter"),
            description=(
                "ScaleCrafter re-dilation: the UNet's inner 3x3 convolutions see a field enlarged by the resolution ratio "
                "during the early steps, so objects keep the model's native proportions at 2x-4x instead of repeating. "
                "Optional dispersed (5x5) convolutions. Use with Noise-Damped CFG for 4x and ComfyUI's FreeU."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL-family model. A patched clone is returned."),
                io.Combo.Input("preset", options=[AUTO, *sc.PRESETS], default=AUTO,
                               tooltip="Per-layer dilation table. 'auto' derives it at sampling time from the latent size over the "
                                       "model's native size (deepest level = ratio, each shallower level one less, at least 2). "
                                       "The others are the reference's tables for that model and output size."),
                io.Combo.Input("sdxl_layers", options=["official", "intended"], default="official",
                               tooltip="SDXL presets only. 'official': the reference's tables as they run. Its configs name "
                                       "down_blocks.3, which SDXL lacks, so the deepest input level (input blocks 7-8) runs "
                                       "undilated at 2048 and 2560, at 3 (not 4) at 4096x2048 and at 4 at 4096x4096, and the "
                                       "damped tables leave it plain. 'intended': that level dilated like the middle block at "
                                       "every size, and in the damped tables too."),
                io.Combo.Input("schedule", options=["reference", "custom"], default="reference",
                               tooltip="'reference': the preset's active range (dilate_tau of 50 steps) and progressive flag; auto "
                                       "uses 0-70% and progressive from a factor of 3. 'custom': the three inputs below."),
                percent("start_percent", 0.0, "Custom schedule: where re-dilation starts (0 = first step)."),
                percent("end_percent", 0.7, "Custom schedule: where re-dilation stops (the reference uses 0.4-0.74)."),
                io.Boolean.Input("progressive", default=True,
                                 tooltip="Custom schedule: decay each layer's factor over the active range, "
                                         "d_i = max(ceil(d (1 - i/n)), 2), as the reference's 2048/4096 configs."),
                io.Int.Input("native_latent_size", default=0, min=0, max=1024, step=8,
                             tooltip="Auto preset: the side of the latent the model was trained at. 0 = from the model family "
                                     "(64 for SD1.x/2.x at 512 px, 96 for SD2.x v-prediction at 768 px, 128 for SDXL at 1024 px)."),
                io.Float.Input("dilation", default=0.0, min=0.0, max=16.0, step=0.05,
                               tooltip="Auto preset: the deepest level's factor instead of the measured resolution ratio "
                                       "(0 = measure; at least 1)."),
                io.Combo.Input("decay", options=list(sc.DECAYS), default="reference", optional=True,
                               tooltip="Shape of the progressive decay. 'reference': integer steps down to 2, "
                                       "d_i = max(ceil(d (1 - i/n)), 2). 'cosine to 2' / 'cosine to 1': fractional, "
                                       "d_i = f + (d - f)(1 + cos(pi i/n))/2, holding the full field while the layout forms "
                                       "and easing to f (2, or undilated) as detail is drawn."),
                percent("dispersion_start_percent", 0.0, "Where dispersed 5x5 convolutions start (0 = first step)."),
                percent("dispersion_end_percent", 0.0,
                        "Where dispersed convolutions stop. 0 = off (as every released reference config). Dispersion replaces "
                        "the deepest re-dilated 3x3 kernels by 5x5 kernels with half the dilation while both ranges are active."),
                window_unit_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with re-dilated convolutions.")],
        )

    @classmethod
    def execute(cls, model, preset, sdxl_layers, schedule, start_percent, end_percent, progressive,
                native_latent_size, dilation, dispersion_start_percent, dispersion_end_percent,
                window_unit=windows.WINDOW_UNITS[0], decay="reference") -> io.NodeOutput:
        unet, config = unet_of(model, REDILATE)
        sites = checked_sites(unet, config, REDILATE)
        levels = len(config["channel_mult"])
        if 0 < dilation < 1:
            raise input_error(REDILATE, "dilation", f"{dilation} is below 1 (a convolution cannot be contracted)",
                              "use 0 to measure the resolution ratio, or a factor of at least 1")
        check_order(REDILATE, start_percent, end_percent, "start_percent", "end_percent")
        check_order(REDILATE, dispersion_start_percent, dispersion_end_percent, "dispersion_start_percent", "dispersion_end_percent")
        tables = {}
        if preset == AUTO:
            native = native_latent_size or common_native_size(model)
            if not native:
                raise input_error(REDILATE, "native_latent_size", f"the native size of a {type(model.model).__name__} model is unknown",
                                  "enter the latent side the model was trained at (pixels / 8 for SD-family VAEs)")
            tables = dict(native=native, ratio=dilation)
            reference = (0.7, None)  # the pack's rule: as the reference's 2048/4096 configs
        else:
            if dilation:
                raise input_error(REDILATE, "dilation", "a fixed factor applies to the auto preset only",
                                  "set dilation to 0, or choose the auto preset")
            chosen = sc.PRESETS[preset]
            family = model_family(model)
            if chosen.family != family:
                raise input_error(REDILATE, "preset", f"'{preset}' is the reference's table for {chosen.family} models, but this "
                                  f"model is {family}", f"choose a {family} preset, or auto (from latent size)")
            if chosen.levels != levels:
                raise input_error(REDILATE, "preset", f"'{preset}' is written for a UNet with {chosen.levels} levels, this one has {levels}",
                                  "choose a preset of the model's family, or auto")
            main, damped, disperse = chosen.tables(intended=sdxl_layers == "intended")
            tables = dict(main=main, damped=damped, disperse=disperse, preset=preset, ndcfg=chosen.ndcfg)
            reference = (chosen.end_percent, chosen.progressive)
        start, end, prog = (0.0, *reference) if schedule == "reference" else (start_percent, end_percent, progressive)
        sampling = model.get_model_object("model_sampling")
        redilation = sc.Redilation(
            sites, levels, windows.window(window_unit, sampling, start, end, REDILATE),
            windows.window(window_unit, sampling, dispersion_start_percent, dispersion_end_percent, REDILATE), prog, decay=decay, **tables)

        m = model.clone()
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)  # re-applying replaces
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, redilation)
        for site in sites:
            key = f"diffusion_model.{site.path}.forward"
            conv = comfy.utils.get_attr(unet, site.path)
            previous = m.object_patches.get(key)
            if isinstance(previous, sc.RedilatedConv):
                previous = previous.previous
            if previous is None:
                previous = types.MethodType(type(conv).forward, conv)
            m.add_object_patch(key, sc.RedilatedConv(conv, site.path, previous, comfy_conv_weights))
        return io.NodeOutput(m)


class NoiseDampedCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResNoiseDampedCFG",
            display_name=NDCFG,
            category=category("ScaleCrafter"),
            description=(
                "ScaleCrafter's noise-damped guidance for a re-dilated model: the CFG direction comes from the strongly "
                "re-dilated model, its base from one extra unconditional pass with a milder dilation table, which "
                "denoises better. Costs one extra unconditional UNet pass per step in its range."),
            inputs=[
                io.Model.Input("model", tooltip="The output of Re-dilate Model (its tables give the milder one)."),
                io.Combo.Input("damped_uncond", options=["milder dilation", "undilated"], default="milder dilation",
                               tooltip="'milder dilation': the reference code's base (the preset's noise-damped table, or the main "
                                       "table without its shallowest level). 'undilated': the plain model, as the paper words it."),
                *percent_inputs(io, 0.0, 0.7, "noise-damped guidance (custom schedule only)"),
                io.Combo.Input("schedule", options=["reference", "custom"], default="reference", optional=True,
                               tooltip="'reference': the Re-dilate Model's own range, as every reference config that uses "
                                       "noise-damped guidance (ndcfg_tau = dilate_tau: 0.7 for SD1.5 2048 and SDXL 4096, 0.74 "
                                       "for SD2.1 2048x2048); refused for presets whose reference never uses it (SD2.1 2048x1024, "
                                       "every 1024/1280/2048/2560 preset). 'custom': start/end percent above."),
                window_unit_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with noise-damped CFG.")],
        )

    @classmethod
    def execute(cls, model, damped_uncond, start_percent, end_percent, schedule="reference",
                window_unit=windows.WINDOW_UNITS[0]) -> io.NodeOutput:
        redilations = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        if not redilations:
            raise input_error(NDCFG, "model", "the model is not re-dilated, so there is no damped table to guide from",
                              f"connect the output of {REDILATE}")
        redilation = redilations[-1]
        if schedule == "reference":
            if not redilation.ndcfg:
                raise input_error(NDCFG, "schedule", f"the reference never uses noise-damped guidance with preset "
                                  f"'{redilation.preset}' (its ndcfg_tau is 0)",
                                  "remove this node, or set schedule to 'custom' to apply the preset's damped table anyway")
            window = redilation.window
        else:
            check_order(NDCFG, start_percent, end_percent, "start_percent", "end_percent")
            window = windows.window(window_unit, model.get_model_object("model_sampling"), start_percent, end_percent, NDCFG)
        m = model.clone()
        others = [f for f in m.model_options.get("sampler_pre_cfg_function", []) if not isinstance(f, sc.NoiseDampedCFG)]
        m.model_options["sampler_pre_cfg_function"] = others + [
            sc.NoiseDampedCFG(window, damped_uncond == "undilated", comfy.samplers.calc_cond_batch)]
        return io.NodeOutput(m)


NODES = [RedilateModel, NoiseDampedCFG]
