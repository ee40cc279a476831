"""The full-size cost count (tests/bench/full_size_cost.py): PyTorch's FLOP counter on the meta
models agrees with an independent count, and the table builds from the bundled workflows (at a
tiny model size, the same code path)."""

import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent / "bench"))

import chains  # noqa: E402
import full_size_cost as fsc  # noqa: E402
from ultrares.patches import cutdiffusion as cd  # noqa: E402


class Independent:
    """2 x parameters x positions for every Linear / Conv2d (from forward hooks' output shapes), plus
    the attention matmuls QK^T and AV (2 x 2 x b h Nq Nk d, from the queries and keys ComfyUI's
    attention receives)."""

    def __init__(self, model: torch.nn.Module):
        self.flops = 0
        self.handles = [m.register_forward_hook(self.layer) for m in model.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def layer(self, module, inputs, output):
        channels = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        positions = output.numel() // channels
        self.flops += 2 * module.weight.numel() * positions

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        b, h, nq, nk, d = fsc.attention_dims(q, k, heads, kwargs)
        self.flops += 2 * 2 * b * h * nq * nk * d
        return func(q, k, v, heads, *args, **kwargs)


@pytest.mark.parametrize("name", list(chains.ARCHS))
def test_flop_counter_matches_an_independent_count(name):
    arch = chains.ARCHS[name]
    patcher = chains.build(arch)
    independent = Independent(patcher.model.diffusion_model)
    patcher.model_options.setdefault("transformer_options", {})[fsc.OVERRIDE] = independent.attention
    counter = fsc.Counter()
    side = arch.native * arch.px_per_latent
    fsc.sample_cost(patcher, arch, side, side, 1, 1.0, "simple", counter)
    (kind,) = counter.kinds.values()
    assert kind.items == 1 and independent.flops > 1e11
    assert kind.flops == pytest.approx(independent.flops, rel=0.02), (name, kind.flops / independent.flops)


def test_table_builds_from_the_bundled_workflows():
    steps = 2
    result = fsc.run(archs=[], configs=chains.tiny_configs(), steps=steps, log=lambda line: None)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(chains.workflows()) <= set(rows)
    # every bundled workflow on a real model is either counted or named as not counted, with its files
    bundled = {p.stem for p in chains.WORKFLOWS.glob("*.json")} - {"toy_world_4x_compare"}
    assert bundled == set(chains.workflows()) | set(chains.uncounted())
    assert "not counted yet" in fsc.table(result)
    assert {"direct full size", "DemoFusion (paper)", "MultiDiffusion", "CutDiffusion (paper)", "ScaleCrafter (paper)"} <= set(rows)
    for r in rows.values():
        assert r["flops"] > 0 and math.isfinite(r["limit_ratio"]) and r["activation_gib"] > 0 and r["attention_gib"] > 0
    # direct sampling at 16x the area costs 16 base evaluations per step and more (attention grows faster)
    assert rows["direct full size"]["limit_ratio"] > 1.0
    # CutDiffusion at the reference settings: every call is one base-size item; count them from the pack's layout
    patches = cd.lattice(512, 128)[0] ** 2
    windows = len(cd.windows(512, 512, 128, 0.5, True, torch.Generator()).corners)
    stage1 = steps // 2  # switch at half the steps
    assert rows["CutDiffusion (paper)"]["base_evals"] == pytest.approx(2 * (patches * stage1 + windows * (steps - stage1)))
    table = fsc.table(result)
    assert table.count("\n") == len(rows) + len(chains.uncounted()) + 1 and "| sdxl_4096_cutdiffusion | SDXL | 4096x4096 |" in table
