"""UltraPixel for Stable Cascade on ComfyUI's own StageC: the loader for the released
`ultrapixel_t2i.safetensors` (four LR-guidance modules), and the LR pass that samples the low-res
picture, records its features and returns the StageC MODEL that injects them into the HR pass
(any stock sampler), plus the HR latent at the reference's size. Decode with the stock StageB
conditioning / sampler and StageA (VAE Decode)."""

import functools
import pathlib

import safetensors.torch
import torch
from comfy_api.v0_0_2 import io

import comfy.ldm.cascade.common
import comfy.ldm.cascade.stage_c
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview

from ..patches import ultrapixel as up
from .common import category, input_error

KEY = "ultrares.ultrapixel"
LOADER = "UltraPixel Loader"
LR_PASS = "UltraPixel LR Pass"
FOLDER = "diffusion_models"  # beside stage_c_bf16.safetensors (models/diffusion_models or models/unet)
SAFETENSORS_MAGIC_MAX_HEADER = 100_000_000  # a safetensors file starts with its header length (u64 LE), then '{'


def stage_c(model, node: str):
    """The StageC inside `model`, or a clear error for any other family (SD1.5, FLUX, StageB...)."""
    base = model.model
    dit = getattr(base, "diffusion_model", None)
    if not isinstance(base, comfy.model_base.StableCascade_C) or not isinstance(dit, comfy.ldm.cascade.stage_c.StageC):
        raise input_error(node, "model", f"this is a {type(base).__name__} model, not a Stable Cascade StageC",
                          "connect the Stable Cascade stage C model (e.g. stable_cascade_stage_c.safetensors through "
                          "Load Checkpoint, or stage_c_bf16.safetensors through Load Diffusion Model)")
    for blocks, level in up.HOOKS:
        block = model.get_model_object(f"diffusion_model.{blocks}.{level}.{up.HOOK_BLOCK}")
        if not isinstance(block, comfy.ldm.cascade.common.AttnBlock):
            raise input_error(node, "model", f"its {blocks}[{level}][{up.HOOK_BLOCK}] is a {type(block).__name__}, not the "
                              "AttnBlock UltraPixel guides", "use a StageC with the standard 'CTA' levels (Stable Cascade 3.6B)")
    return dit


# ---- the weight file --------------------------------------------------------------------------

def file_format(path: pathlib.Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle, as the released file is) or 'unknown', by magic bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < SAFETENSORS_MAGIC_MAX_HEADER and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle protocol 2+
        return "torch"
    return "unknown"


def read_state_dict(path: pathlib.Path, error) -> dict:
    """The file's tensors: safetensors directly; the released torch pickle only through
    torch.load(weights_only=True), which refuses anything but tensors and plain containers."""
    kind = file_format(path)
    if kind == "safetensors":  # by content, whatever the extension
        return safetensors.torch.load_file(str(path))
    if kind == "torch":
        try:  # from a file object: a path ending in .safetensors would be handed to the safetensors reader
            with open(path, "rb") as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses code objects: report, never fall back to a full unpickle
            raise error(f"{path.name} is a torch file that torch.load(weights_only=True) cannot read ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return dict(sd)
        raise error(f"{path.name} holds a {type(sd).__name__}, not a state dict of tensors")
    raise error(f"{path.name} is neither a safetensors file nor a torch file (first bytes do not match either)")


def load_modules(path: pathlib.Path, dit, dtype, std_tokens, error) -> up.UltraPixelModules:
    sd = read_state_dict(path, error)
    parts, problems = up.split_released(sd)
    if problems:
        raise error(f"{path.name} is not the UltraPixel guidance file: expected the keys module.64.0/1.* and module.65.0/1.* "
                    f"of ultrapixel_t2i (four TransInr modules); " + "; ".join(problems))
    widths = {k: p["input_layer.weight"].shape[1] for k, p in parts.items()}
    for (blocks, level), width in widths.items():
        have = getattr(dit, blocks)[level][up.HOOK_BLOCK].attention.attn.to_q.weight.shape[0]
        if width != have:
            raise error(f"{path.name} is made for a StageC {width} channels wide at {blocks}[{level}], this StageC has {have}")
    try:
        return up.build_modules(parts, ops=comfy.ops.manual_cast, dtype=dtype, std_tokens=std_tokens)
    except ValueError as e:
        raise error(f"{path.name}: {e}") from None


def module_dtype(model):
    """The StageC's storage dtype for the modules (casting ops compute in the sampling dtype);
    fp8 and other storage-only types get bf16, as the file is."""
    dtype = model.model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


class UltraPixelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResUltraPixelLoader",
            display_name=LOADER,
            category=category("UltraPixel"),
            description=(
                "Loads UltraPixel's four LR-guidance modules (ultrapixel_t2i.safetensors, as released: a bf16 torch file "
                "under a .safetensors name, read with torch.load(weights_only=True); a real safetensors conversion works too) "
                "and attaches them to a clone of the Stable Cascade StageC model, so they load, offload and cast with it. "
                "Then use UltraPixel LR Pass."),
            inputs=[
                io.Model.Input("model", tooltip="The Stable Cascade stage C model (the 3.6B 'stage_c' / 'stage_c_bf16')."),
                io.Combo.Input("ultrapixel_name", options=folder_paths.get_filename_list(FOLDER), tooltip=(
                    "ultrapixel_t2i.safetensors (211 MB, Hugging Face roubaofeipi/UltraPixel) in models/diffusion_models "
                    "(or models/unet).")),
            ],
            outputs=[io.Model.Output(tooltip="The StageC with the UltraPixel modules attached (no guidance yet).")],
        )

    @classmethod
    def execute(cls, model, ultrapixel_name) -> io.NodeOutput:
        dit = stage_c(model, LOADER)
        error = lambda problem: input_error(LOADER, "ultrapixel_name", problem,
                                            "pick ultrapixel_t2i.safetensors (Hugging Face roubaofeipi/UltraPixel) or its "
                                            "safetensors conversion; StageC/StageB files go into Load Checkpoint / Load Diffusion Model")
        path = folder_paths.get_full_path(FOLDER, ultrapixel_name)
        if path is None:
            raise error(f"{ultrapixel_name!r} is not in models/{FOLDER}")
        modules = load_modules(pathlib.Path(path), dit, module_dtype(model), native_profile(model).std_tokens, error)
        patcher = comfy.model_patcher.ModelPatcher(modules, load_device=model.load_device, offload_device=model.offload_device)
        m = model.clone()
        m.set_additional_models(KEY, [patcher])  # loaded / offloaded with the StageC by ComfyUI's memory management
        m.set_attachments(KEY, modules)
        return io.NodeOutput(m)


# ---- sizes --------------------------------------------------------------------------------------

class Profile:
    """How pixels map to this StageC's latents and which LR size it was trained with. Stable Cascade:
    the reference's 42.67 compression and ~1024^2 px LR picture; a model config may declare its own
    native latent side and pixel ratio (the toy StageC does)."""

    def __init__(self, compression: float, native_side: int | None, patch: int):
        self.compression, self.native_side, self.patch = compression, native_side, patch

    def _latent(self, h: float, w: float) -> tuple[int, int]:
        """Rounded to whole StageC patches."""
        return tuple(max(1, round(v / self.patch)) * self.patch for v in (h, w))

    def hr_latent(self, height: int, width: int) -> tuple[int, int]:
        if self.native_side is None:
            return up.hr_latent_size(height, width)
        return self._latent(height / self.compression, width / self.compression)

    def lr_latent(self, height: int, width: int) -> tuple[int, int]:
        if self.native_side is None:
            return up.lr_latent_size(height, width)
        root = (height / width) ** 0.5
        return self._latent(self.native_side * root, self.native_side / root)

    def tokens(self, latent: tuple[int, int]) -> int:
        """StageC tokens of a latent: one per patch."""
        return (latent[0] // self.patch) * (latent[1] // self.patch)

    @property
    def std_tokens(self) -> int:
        side = 24 if self.native_side is None else self.native_side // self.patch
        return side * side

    def tiers(self):
        return up.TIERS if self.native_side is None else up.scaled_tiers(self.native_side // self.patch)


def native_profile(model) -> Profile:
    """Stable Cascade's, unless the model config declares `ultrapixel_profile` = (px per latent, native
    latent side, StageC patch size), as the toy StageC does."""
    declared = getattr(model.model.model_config, "ultrapixel_profile", None)
    return Profile(*declared) if declared else Profile(up.COMPRESSION, None, 1)


# ---- the guided clones --------------------------------------------------------------------------

def hook_target(key) -> str:
    blocks, level = key
    return f"diffusion_model.{blocks}.{level}.{up.HOOK_BLOCK}.forward"


def original_forward(model, key):
    """The hook block's forward as the clone has it, minus any earlier UltraPixel hook (re-applying replaces)."""
    forward = model.get_model_object(hook_target(key))
    return forward.original if isinstance(forward, up.GuidedBlock) else forward


def timestep_of(model):
    """transformer_options -> r (B,): the cosine t of the call's sigma (StageC's own timestep input)."""
    sampling = model.get_model_object("model_sampling")

    def r_of(transformer_options, batch):
        sigma = transformer_options["sigmas"].reshape(-1)[:1].float()
        return sampling.timestep(sigma.cpu()).expand(batch)

    return r_of


class CascadeSampling(comfy.model_sampling.StableCascadeSampling, comfy.model_sampling.EPS):
    """StageC's schedule at a chosen shift (what ComfyUI's ModelSamplingStableCascade node builds)."""


def reference_sampling(model, shift: float, cfg_rescale: float):
    """Clone with UltraPixel's sampling: StageC schedule at `shift` (reference 1; ComfyUI's default 2)
    and GDF's CFG rescale in eps space (reference 0.7; 0 = plain CFG)."""
    m = model.clone()
    sampling = CascadeSampling()
    sampling.set_parameters(shift=shift)
    m.add_object_patch("model_sampling", sampling)
    if cfg_rescale > 0:
        def cfg_function(args):  # cond / uncond are x - denoised = sigma * eps
            return up.rescale_cfg(args["cond"], args["uncond"], args["cond_scale"], cfg_rescale)
        m.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=False)
    return m


def without_control(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """HR pass: the reference adds ControlNet residuals only when no LR guide is given (LR pass only)."""
    return executor(x, t, c_concat, c_crossattn, None, transformer_options, **kwargs)


def guided_model(model, features: up.LRFeatures, modules: up.UltraPixelModules, profile: Profile):
    """A clone that adds the four guides in every model call: down path at weight 1, up path at the tier weight."""
    m = model.clone()
    r_of = timestep_of(m)
    tiers = profile.tiers()
    for key in up.HOOKS:
        weight = (lambda h, w: 1.0) if key[0] == "down_blocks" else (lambda h, w: up.tier_weight(h * w, tiers))
        m.add_object_patch(hook_target(key), up.GuidedBlock(original_forward(model, key), key, features, r_of,
                                                            modules.at(*key), weight))
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, without_control)
    return m


def recording_model(model, features: up.LRFeatures, record_sigma: float):
    m = model.clone()
    r_of = timestep_of(m)
    for key in up.HOOKS:
        m.add_object_patch(hook_target(key), up.GuidedBlock(original_forward(model, key), key, features, r_of,
                                                            record_sigma=record_sigma))
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY)  # ControlNet acts in the LR pass
    return m


def pass_sigmas(model, sampler_name, scheduler, steps, denoise):
    """The sigmas comfy.sample.sample runs: its own KSampler's (a denoise below 1 takes the tail of a longer
    schedule; some samplers drop the penultimate sigma)."""
    return comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise).sigmas


def sample_lr(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise=1.0):
    """The LR pass with the reference's recipe; returns (LR latent, the four features at the last step)."""
    sigmas = pass_sigmas(model, sampler_name, scheduler, steps, denoise)
    features = up.LRFeatures()
    recorder = recording_model(model, features, float(sigmas[-2]))  # the last step's input: t ~ 0.05 at 20 steps
    noise = comfy.sample.prepare_noise(latent, seed)
    callback = latent_preview.prepare_callback(recorder, steps)
    samples = comfy.sample.sample(recorder, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=denoise, seed=seed, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
    return samples, features


class UltraPixelLRPass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UltraResUltraPixelLRPass",
            display_name=LR_PASS,
            category=category("UltraPixel"),
            description=(
                "UltraPixel's low-res pass: samples the picture at the reference's LR size for the target aspect (~1024x1024 "
                "px), records StageC's features at the four guided blocks at the last step (t ~ 0.05; the conditional half, "
                "used for both CFG halves) and returns the StageC MODEL that injects them, through the loaded modules, into "
                "every step of the high-res pass, plus the empty HR latent. Sample the HR latent with a stock KSampler "
                "(same steps, cfg, sampler), then StageB / StageA as usual. ControlNet acts in this pass only, as in the reference."),
            inputs=[
                io.Model.Input("model", tooltip="The StageC from UltraPixel Loader."),
                io.Conditioning.Input("positive", tooltip="The prompt (Stable Cascade CLIP)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the reference: empty)."),
                io.Int.Input("width", default=4096, min=256, max=16384, step=8, tooltip="Final picture width in px."),
                io.Int.Input("height", default=4096, min=256, max=16384, step=8, tooltip="Final picture height in px."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the LR pass's noise."),
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="LR steps (reference 20). Use the same in the HR KSampler."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale (reference 4)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler_ancestral",
                               tooltip="LR sampler; the reference's DDPM sampler (DDIM eta 1) is ancestral sampling."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="'simple' gives the reference's evenly spaced t = 1, 0.95, ..., 0.05."),
                io.Float.Input("shift", default=1.0, min=0.1, max=10.0, step=0.01, tooltip=(
                    "StageC schedule shift for both passes (reference 1; ComfyUI's Stable Cascade default is 2). The "
                    "returned MODEL carries it.")),
                io.Float.Input("cfg_rescale", default=0.7, min=0.0, max=1.0, step=0.01, tooltip=(
                    "GDF's CFG rescale in eps space for both passes (reference 0.7; 0 = plain CFG).")),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pictures per run (LR and HR)."),
                io.Float.Input("denoise", default=1.0, min=0.5, max=1.0, step=0.01, optional=True, tooltip=(
                    "Where the LR pass starts on the schedule, from pure noise (reference 1.0, GDF's t_start 1). Below 1 it "
                    "skips the first, highest sigmas (StageC's schedule starts at sigma 100): for models that are imprecise "
                    "there, such as the toy StageC. Use the same denoise in the HR KSampler.")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="StageC that injects the LR features: sample the HR latent with it."),
                io.Latent.Output(display_name="hr_latent", tooltip="Empty StageC latent at the target size (ceil(side / 42.67))."),
                io.Latent.Output(display_name="lr_latent", tooltip="The LR result (decode through StageB for a preview)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, width, height, seed, steps, cfg, sampler_name, scheduler, shift,
                cfg_rescale, batch_size, denoise=1.0) -> io.NodeOutput:
        error = functools.partial(input_error, LR_PASS)
        stage_c(model, LR_PASS)  # refuses any other model family
        modules = model.get_attachment(KEY)
        if modules is None:
            raise error("model", "the StageC carries no UltraPixel modules", "put UltraPixel Loader between the StageC loader and this node")
        profile = native_profile(model)
        lr, hr = profile.lr_latent(height, width), profile.hr_latent(height, width)
        if profile.tokens(lr) > modules.max_tokens:
            raise error("width", f"the LR latent {lr[1]}x{lr[0]} has {profile.tokens(lr)} tokens but the UltraPixel modules take at "
                        f"most {modules.max_tokens}", "use a less extreme aspect ratio")
        channels = model.model.latent_format.latent_channels
        sampling = reference_sampling(model, shift, cfg_rescale)
        lr_latent = torch.zeros(batch_size, channels, *lr)
        samples, features = sample_lr(sampling, positive, negative, lr_latent, seed, steps, cfg, sampler_name, scheduler, denoise)
        if not features.complete:
            raise error("sampler_name", f"{sampler_name} never evaluated the model at the last step's sigma, so no LR features "
                        "were recorded", "use a one-call-per-step sampler such as euler_ancestral, ddpm or euler")
        hr_model = guided_model(sampling, features, modules, profile)
        return io.NodeOutput(hr_model, {"samples": torch.zeros(batch_size, channels, *hr)}, {"samples": samples})


NODES = [UltraPixelLoader, UltraPixelLRPass]
