"""The headless host the workflow tests (and tests/build_workflows.py) run against: a private base
directory with a stand-in under every model file name the bundled workflows use, so the host
validates their file widgets as it would on a user's machine, plus the test-only node folder."""

import contextlib
import pathlib

import numpy as np
import safetensors.torch
from PIL import Image
import torch

import build_workflows
import host
import tiny_models
from comfy_server import ComfyServer

TESTKIT = {"ultrares_testkit": pathlib.Path(__file__).with_name("testkit")}


def prepare_base(base: pathlib.Path) -> pathlib.Path:
    """Files the graphs load for real get tiny weights (the FLUX VAE as a 16-channel TAESD, the URAE
    adapters at tiny_flux's shapes, the PASD files at the toy world's shapes, the picture PASD upscales,
    UltraPixel's modules as a torch file at the tiny StageC's width); the rest are empty placeholders the tests swap
    out before running."""
    host.make_base_directory(base)
    for folder, names in build_workflows.MODEL_FILES.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).touch()
    tiny_models.write_tiny_taesd_vae(base / "models" / "vae" / build_workflows.FLUX_VAE, latent_channels=16)
    torch.save(tiny_models.ultrapixel_state_dict(), base / "models" / "diffusion_models" / build_workflows.ULTRAPIXEL)  # as released
    from ultrares.nodes import toy_world

    toy = toy_world.build_model()  # the tests swap the SD1.5 checkpoint for the toy world: PASD files of its shapes
    for folder, name, sd in (("loras", build_workflows.URAE_2K, tiny_models.urae_2k_adapter()),
                             ("loras", build_workflows.URAE_4K, tiny_models.urae_4k_adapter()),
                             ("diffusion_models", build_workflows.PASD_UNET, tiny_models.pasd_unet_file(toy)),
                             ("controlnet", build_workflows.PASD_CONTROLNET, tiny_models.pasd_controlnet_file(toy))):
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(base / "models" / folder / name))
    y, x = np.mgrid[0:64, 0:64]
    picture = np.stack([x * 4, y * 4, np.where((x - 32) ** 2 + (y - 32) ** 2 < 300, 230, 40)], -1).astype(np.uint8)
    Image.fromarray(picture).save(base / "input" / build_workflows.PASD_INPUT)  # a disk on a gradient
    return base


@contextlib.contextmanager
def server(base: pathlib.Path):
    srv = ComfyServer(prepare_base(base), extra_packs=TESTKIT)
    srv.start(timeout=300)  # the 2-core CI machine may be busy with other tests
    try:
        yield srv
    finally:
        srv.stop()
