"""Exact Tiled VAE Decode equals the full decode (tiny SD-layout and FLUX-layout decoders, odd sizes,
tiny tiles, attention in the up path), keeps the whole-image layer tensors on the state device and
only a tile's working set on the compute device, and refuses VAEs it cannot decode exactly."""

import pytest
import torch

import comfy.sd
import comfy.taesd.taesd
import host
import tiny_models
from tensor_memory import PeakTensorMemory, TaggedPlacement
from comfy.ldm.modules.diffusionmodules.model import Decoder
from ultrares.nodes.common import UltraResInputError
from ultrares.nodes.exact_decode import ExactVAEDecode
from ultrares.patches.exact_decode import UnsupportedDecoder, exact_decode, plan


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tiles are thousands of small ops: on a busy machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_decoder(seed=0, **overrides):
    config = dict(ch=32, out_ch=3, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=64, z_channels=4)
    decoder = tiny_models.init_parameters(Decoder(**dict(config, **overrides)), seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.2)
    return decoder.eval()


@pytest.mark.parametrize("layout, shape", [
    (dict(), (1, 13, 19)),  # SD layout: 4 latent channels; odd sizes
    (dict(z_channels=16, num_res_blocks=2, attn_resolutions=[16]), (2, 12, 12)),  # FLUX latent width, attention in the up path, batch
])
def test_exact_decode_equals_the_full_decode(layout, shape):
    decoder = tiny_decoder(**layout)
    z = torch.randn((shape[0], decoder.conv_in.in_channels) + shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = decoder(z)
    tile = 12  # many tiles, which do not divide the image at any resolution
    assert plan(decoder, z.shape, tile).tiles > 100
    out = exact_decode(decoder, z, tile=tile)
    assert out.shape == full.shape
    assert (out - full).abs().max() < 1e-5


def test_state_waits_on_the_state_device_and_the_compute_device_holds_one_tile():
    """Compute-device bytes stay under the plan's tile bound (set by the tile size alone) while the image
    grows 16x in area; the whole-image tensors are on the state device. At the larger size the whole-latent
    attention tensors the previous design moved to the device (q, k, v, output) alone exceed that bound."""
    decoder = tiny_decoder(ch_mult=[1, 2])  # 64 -> 32 channels at full resolution, as in the real VAEs
    compute = {}
    for side in (8, 32):
        z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(6))
        with torch.no_grad(), PeakTensorMemory() as full_probe:
            full = decoder(z)
        with PeakTensorMemory() as probe:
            out = exact_decode(decoder, z, tile=16, placement=TaggedPlacement(probe))
        assert (out - full).abs().max() < 1e-5
        bound = plan(decoder, z.shape, 16)
        compute[side] = probe.peaks["cpu"]
        assert compute[side] <= bound.tile_bytes, (side, probe.peaks, bound)
        assert probe.peaks["state"] >= 0.9 * bound.state_bytes  # the plan's state figure is what lives there
    attention_tensors = 4 * z[0, :1].numel() * decoder.mid.attn_1.in_channels * 4
    assert attention_tensors > bound.tile_bytes > compute[32]
    assert full_probe.peak > 5 * compute[32]


def test_node_equals_vae_decode_for_the_sd_layout(node_classes):
    vae = tiny_models.tiny_vae()
    latent = {"samples": torch.randn(2, 4, 7, 10, generator=torch.Generator().manual_seed(7))}
    full = host.run_node(node_classes["VAEDecode"], vae=vae, samples=latent)[0]
    exact = host.run_node(ExactVAEDecode, vae=vae, samples=latent, tile_size=32, layer_memory="auto")[0]
    assert exact.shape == full.shape == (2, 56, 80, 3)
    assert (exact - full).abs().max() < 1e-5


def test_node_equals_vae_decode_for_the_flux_vae_layout(node_classes):
    """ComfyUI's own detection builds the FLUX VAE (16 channels, no post-quant conv, 4 levels) from its keys."""
    vae = tiny_models.released_vae("flux")
    tiny_models.init_parameters(vae.first_stage_model.decoder, 8)
    latent = {"samples": torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(9))}
    full = host.run_node(node_classes["VAEDecode"], vae=vae, samples=latent)[0]
    exact = host.run_node(ExactVAEDecode, vae=vae, samples=latent, tile_size=16, layer_memory="cpu")[0]
    assert type(vae.first_stage_model).__name__ == "AutoencodingEngine"
    assert (exact - full).abs().max() < 1e-5


def test_unsupported_vaes_and_latents_are_refused_clearly():
    taesd = tiny_models.init_parameters(comfy.taesd.taesd.TAESD(latent_channels=4), 0)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    with pytest.raises(UltraResInputError, match="Exact Tiled VAE Decode: input 'vae'.*TAESD"):
        host.run_node(ExactVAEDecode, vae=vae, samples={"samples": torch.zeros(1, 4, 8, 8)}, tile_size=64, layer_memory="auto")
    with pytest.raises(UltraResInputError, match="input 'samples'.*16 channels, this VAE decodes 4"):
        host.run_node(ExactVAEDecode, vae=tiny_models.tiny_vae(), samples={"samples": torch.zeros(1, 16, 8, 8)}, tile_size=64, layer_memory="auto")
    with pytest.raises(UnsupportedDecoder, match="not a 2D convolution"):
        exact_decode(_with_conv3d_in(tiny_decoder()), torch.zeros(1, 4, 8, 8))


def _with_conv3d_in(decoder):
    decoder.conv_in = torch.nn.Conv3d(4, 64, 3, padding=1)
    return decoder
