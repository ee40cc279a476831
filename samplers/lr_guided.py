"""The exact skip residual: a SAMPLER that wraps any stock k-diffusion sampler and blends the
sampler state toward the noised upsampled low-res latent before each step.

The guidance itself (low-res latent, schedule, seed) comes from the LR Condition Injector on the
MODEL; this sampler finds it in the model options, marks the run so the injector's model-level
approximation of the blend stands down, and steps the wrapped sampler one schedule step at a time
while the blend weight is non-zero. The remaining steps run in one call, so a multistep sampler
keeps its history once the guidance has faded; during blended steps it restarts each step (its
first-order form), because its history belongs to the un-blended trajectory.
"""

import inspect

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.patcher_extension
import comfy.samplers

from ..patches.lr_guidance import KEY, STATE_BLENDED


def find_guidance(model_options: dict):
    """The LRGuidance the injector installed on the model being sampled, or None."""
    found = comfy.patcher_extension.get_wrappers_with_key(
        comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY, model_options, is_model_options=True)
    return found[-1] if found else None


def _flag_state_blended(extra_args: dict) -> dict:
    model_options = dict(extra_args.get("model_options", {}))
    model_options["transformer_options"] = dict(model_options.get("transformer_options", {}), **{STATE_BLENDED: True})
    return dict(extra_args, model_options=model_options)


def _shifted(callback, offset: int):
    if callback is None or offset == 0:
        return callback
    return lambda d: callback(dict(d, i=d["i"] + offset))


def lr_guided_sampler(inner: comfy.samplers.KSAMPLER, error) -> comfy.samplers.KSAMPLER:
    """Wrap a KSAMPLER; `error(input, problem, fix)` builds the node's input error. Wrapping a
    sampler this function made wraps its inner sampler instead: re-applying replaces, never stacks."""
    step_fn = getattr(inner.sampler_function, "lr_guided_inner", inner.sampler_function)
    takes_noise_sampler = "noise_sampler" in inspect.signature(step_fn).parameters

    def sample_lr_guided(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        guidance = find_guidance(extra_args.get("model_options", {}))
        if guidance is None:
            raise error("model", "the MODEL being sampled carries no LR Condition Injector, so there is no low-res "
                        "latent to guide with", "apply LR Condition Injector to the MODEL given to SamplerCustom")
        base_model = model.inner_model.inner_model  # KSamplerX0Inpaint -> guider -> BaseModel
        guidance.check_target(x.shape)
        steps = len(sigmas) - 1
        weighted = [i for i in range(steps) if guidance.skip_weight(base_model.model_sampling, sigmas[i], sigmas) > 0]
        n_single = weighted[-1] + 1 if weighted else 0

        args = _flag_state_blended(extra_args)
        if n_single and takes_noise_sampler and options.get("noise_sampler") is None:
            # One noise stream across the per-step calls (each call would otherwise re-seed its own).
            options["noise_sampler"] = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
        for i in range(n_single):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x = guidance.blend_state(x, sigmas[i], base_model, sigmas)
            x = step_fn(model, x, sigmas[i:i + 2], extra_args=args, callback=_shifted(callback, i), disable=True, **options)
        if n_single < steps:
            x = step_fn(model, x, sigmas[n_single:], extra_args=args, callback=_shifted(callback, n_single), disable=disable, **options)
        return x

    sample_lr_guided.lr_guided_inner = step_fn
    return comfy.samplers.KSAMPLER(sample_lr_guided, extra_options=dict(inner.extra_options), inpaint_options=inner.inpaint_options)
