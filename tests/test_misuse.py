"""Misuse a user can make through the live server's /prompt: each ends in a clear error (naming the
node, the input and the fix) or, where the graph is harmless but does nothing, a notice in the log.
Graphs run on the pack's toy world (an SD1.x-family model, native 32 latent px = 256 px)."""

import json

import numpy as np
from PIL import Image

TOY_STEPS = 2


def node(server, class_type, **inputs):
    """An API-format node with every widget at the default the server lists, then `inputs`."""
    info = server.get(f"/object_info/{class_type}")[class_type]["input"]
    values = {}
    for group in ("required", "optional"):
        for name, spec in info.get(group, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                values[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                values[name] = spec[0][0]
    return {"class_type": class_type, "inputs": values | inputs}


def toy_graph(server, model=("1", 0), sampler=None, width=256, height=256, prefix="misuse"):
    """Toy loader "1", latent "2", a sampler on `model` (KSampler, or SamplerCustom with `sampler`),
    decode and save "9"."""
    graph = {
        "1": node(server, "UltraResToyWorldLoader", shape="square"),
        "2": node(server, "EmptyLatentImage", width=width, height=height, batch_size=1),
        "8": node(server, "VAEDecode", samples=["5", 0], vae=["1", 3]),
        "9": node(server, "SaveImage", images=["8", 0], filename_prefix=prefix),
    }
    if sampler is None:
        graph["5"] = node(server, "KSampler", model=list(model), positive=["1", 1], negative=["1", 2], latent_image=["2", 0],
                          seed=3, steps=TOY_STEPS, cfg=2.0, sampler_name="euler", scheduler="karras")
    else:
        graph["6"] = node(server, "BasicScheduler", model=list(model), scheduler="karras", steps=TOY_STEPS, denoise=1.0)
        graph["5"] = node(server, "SamplerCustom", model=list(model), add_noise=True, noise_seed=3, cfg=2.0, positive=["1", 1],
                          negative=["1", 2], sampler=list(sampler), sigmas=["6", 0], latent_image=["2", 0])
    return graph


def saved_pixels(server, entry):
    (image,) = entry["outputs"]["9"]["images"]
    with Image.open(server.base / "output" / image.get("subfolder", "") / image["filename"]) as im:
        return np.asarray(im.convert("RGB"))


# -- LR Condition Injector / LR-Guided Sampler ------------------------------------------------------
def injector_graph(server, guide_px, target=(512, 512), **inputs):
    graph = toy_graph(server, model=("4", 0), width=target[0], height=target[1])
    graph["3"] = node(server, "EmptyLatentImage", width=guide_px[0], height=guide_px[1], batch_size=1)
    graph["4"] = node(server, "UltraResLRConditionInjector", model=["1", 0], low_res_latent=["3", 0], **inputs)
    return graph


def test_injector_refuses_a_guide_of_another_aspect_ratio(comfy_server):
    error = comfy_server.prompt_error(injector_graph(comfy_server, (256, 256), target=(512, 256)))
    assert ("LR Condition Injector: input 'low_res_latent': it is 32x32 (latent width x height), another aspect ratio than "
            "the 64x32 latent being sampled, so it would be stretched. Fix: sample the guide at the target's aspect ratio (2:1), "
            "or set aspect_mismatch to 'center crop' or 'stretch'") in error
    comfy_server.run_prompt(injector_graph(comfy_server, (256, 256), target=(512, 256), aspect_mismatch="center crop"))


def test_injector_refuses_a_guide_too_small_to_hold_a_composition(comfy_server):
    error = comfy_server.prompt_error(injector_graph(comfy_server, (16, 16)))
    assert error.startswith("UltraResLRConditionInjector: LR Condition Injector: input 'low_res_latent': it is 2x2 latent px, "
                            "below 8 on a side (a quarter of the model's native 32 latent px)")
    assert "Fix: sample the guide near the model's native size, at least 64 px (8 latent px) a side" in error


def test_guided_sampler_wrapped_twice_equals_once(comfy_server):
    results = []
    for wraps in (1, 2):
        graph = toy_graph(comfy_server, model=("4", 0), sampler=("10", 0), width=512, height=512, prefix=f"wrapped{wraps}")
        graph["3"] = node(comfy_server, "EmptyLatentImage", width=256, height=256, batch_size=1)
        graph["4"] = node(comfy_server, "UltraResLRConditionInjector", model=["1", 0], low_res_latent=["3", 0], alpha1=1.0)
        graph["11"] = node(comfy_server, "KSamplerSelect", sampler_name="euler")
        graph["10"] = node(comfy_server, "UltraResLRGuidedSampler", sampler=["11", 0])
        if wraps == 2:
            graph["12"], graph["10"] = graph["10"], node(comfy_server, "UltraResLRGuidedSampler", sampler=["12", 0])
        results.append(saved_pixels(comfy_server, comfy_server.run_prompt(graph)))
    assert np.array_equal(results[0], results[1])


# -- Re-dilate Model / Noise-Damped CFG -------------------------------------------------------------
def redilate_graph(server, ndcfg=None, **inputs):
    graph = toy_graph(server, model=("4" if ndcfg is None else "7", 0), width=512, height=512)
    graph["4"] = node(server, "UltraResRedilateModel", model=["1", 0], **inputs)
    if ndcfg is not None:
        graph["7"] = node(server, "UltraResNoiseDampedCFG", model=["4", 0], **ndcfg)
    return graph


def test_redilate_refuses_a_preset_of_another_model_family(comfy_server):
    error = comfy_server.prompt_error(redilate_graph(comfy_server, preset="SDXL 2048x2048"))
    assert ("Re-dilate Model: input 'preset': 'SDXL 2048x2048' is the reference's table for SDXL models, but this model is "
            "SD1.x. Fix: choose a SD1.x preset, or auto (from latent size)") in error


def test_redilate_refuses_an_inverted_dispersion_window(comfy_server):
    error = comfy_server.prompt_error(redilate_graph(comfy_server, dispersion_start_percent=0.5, dispersion_end_percent=0.2))
    assert ("Re-dilate Model: input 'dispersion_start_percent': 0.5 is after dispersion_end_percent 0.2. "
            "Fix: set dispersion_start_percent <= dispersion_end_percent") in error


def test_noise_damped_cfg_reference_schedule_runs_and_an_inverted_custom_window_is_refused(comfy_server):
    # (the refusal of presets whose reference never damps needs a 4-level SD UNet: tests/test_scalecrafter.py)
    comfy_server.run_prompt(redilate_graph(comfy_server, ndcfg={}))
    error = comfy_server.prompt_error(redilate_graph(comfy_server, ndcfg=dict(schedule="custom", start_percent=0.6, end_percent=0.1)))
    assert ("Noise-Damped CFG: input 'start_percent': 0.6 is after end_percent 0.1. Fix: set start_percent <= end_percent") in error


def test_prompts_written_before_the_fidelity_defaults_still_run(comfy_server):
    """An API prompt from before: sdxl_layers at its old default 'intended', no window_unit, no schedule on
    Noise-Damped CFG (the optional inputs take their defaults)."""
    graph = redilate_graph(comfy_server, ndcfg={}, sdxl_layers="intended")
    for key in ("4", "7"):
        for name in ("window_unit", "schedule") if key == "7" else ("window_unit",):
            del graph[key]["inputs"][name]
    comfy_server.run_prompt(graph)


def test_redilate_at_native_size_says_it_changes_nothing(comfy_server):
    comfy_server.run_prompt(dict(redilate_graph(comfy_server), **{
        "2": node(comfy_server, "EmptyLatentImage", width=256, height=256, batch_size=1)}))
    assert ("Re-dilate Model: a factor of 1 (the 32x32 latent over the model's native 32 latent px) leaves every convolution "
            "as it is, so re-dilation changes nothing here.") in comfy_server.log()


# -- Patch Split/Reassemble -------------------------------------------------------------------------
def test_patch_split_with_a_patch_as_large_as_the_latent_says_so(comfy_server):
    graph = toy_graph(comfy_server, model=("4", 0))
    graph["4"] = node(comfy_server, "UltraResPatchSplit", model=["1", 0], patch_size=32)
    comfy_server.run_prompt(graph)
    assert ("Patch Split/Reassemble: the 32x32 latent fits one 32 latent px patch, so the model runs unchanged") in comfy_server.log()


# -- URAE 4K Adapter Loader -------------------------------------------------------------------------
def test_urae_loader_lists_the_lora_folder_and_refuses_unknown_files(comfy_server):
    (comfy_server.base / "models" / "loras" / "urae_4k_adapter.safetensors").write_bytes(b"")
    listed = comfy_server.get("/object_info/UltraResURAE4KAdapterLoader")["UltraResURAE4KAdapterLoader"]["input"]["required"]
    stock = comfy_server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    assert listed["adapter_name"][1]["options"] == stock and "urae_4k_adapter.safetensors" in stock
    graph = toy_graph(comfy_server, model=("4", 0))
    graph["4"] = node(comfy_server, "UltraResURAE4KAdapterLoader", model=["1", 0], adapter_name="no_such_adapter.safetensors")
    error = json.loads(comfy_server.prompt_error(graph))
    details = json.dumps(error["node_errors"]["4"])
    assert "URAE 4K Adapter Loader: input 'adapter_name': 'no_such_adapter.safetensors' is not in models/loras" in details
    assert "Fix: put urae_4k_adapter.safetensors into models/loras" in details
