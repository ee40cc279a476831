"""What a picture really costs: the model FLOPs per image of every bundled workflow's node chain at
its target size, counted without weights or a GPU, beside the limit and the papers' schedules.

    .venv/bin/python tests/bench/full_size_cost.py --json out/full_size_cost.json

How. The real architectures are built through ComfyUI's model configs on the meta device (no memory);
each workflow's model nodes (the pack's patches, FreeU, ...) run on that model as ComfyUI runs them;
then every sampling step goes through the patched model as a sampler drives it (PREDICT_NOISE
wrappers -> CFG -> pre-CFG functions -> APPLY_MODEL wrappers -> object patches -> diffusion model).
Diffusion-model calls are counted with torch.utils.flop_counter.FlopCounterMode once per distinct
kind (per-item input shapes + the pack's per-call state, e.g. the dilation plan) at batch 1 and
multiplied by the items of every call; repeats return an empty tensor of the right shape.

Limit: a base-size model needs at least (target area / native area) base evaluations per step
(x2 with CFG) - 16 for 4096 from 1024. Anchors: the papers' schedules run with the same patches
(DemoFusion 1024 -> 2048 -> 3072 -> 4096 with windows + dilated sampling, MultiDiffusion, CutDiffusion's
reference settings, ScaleCrafter's full-size re-dilated passes, direct full-size sampling).

Peaks are per batch item (ComfyUI batches cond + uncond, x2, when memory allows): the largest tensor
any op creates outside attention, and the largest attention matrix (batch x heads x queries x keys in
the model dtype) - materialised only by attention_basic; PyTorch SDPA (ComfyUI's default on NVIDIA,
flash / memory-efficient kernels) never builds it, split and sub-quadratic attention build it in
chunks sized to free memory.
"""

import argparse
import contextvars
import dataclasses
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import host  # noqa: E402, F401  (the real ComfyUI host, CPU)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves, tree_map  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import chains  # noqa: E402
import comfy.patcher_extension as pe  # noqa: E402
import comfy.samplers  # noqa: E402

OVERRIDE = "optimized_attention_override"
GIB = 2**30


# ---------------------------------------------------------------- counting one diffusion-model call

class MetaMix(TorchDispatchMode):
    """Lets real CPU tensors (sigmas, schedules, the pack's small CPU tensors) meet meta tensors:
    an op that sees both runs on meta. Ops on real tensors alone run for real, so the pack's
    Python decisions (float(sigma), window draws) work unchanged."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(a.is_meta for a in leaves) and not all(a.is_meta for a in leaves):
            to_meta = lambda a: a.to("meta") if isinstance(a, torch.Tensor) and not a.is_meta else a
            args, kwargs = tree_map(to_meta, args), tree_map(to_meta, kwargs)
        return func(*args, **kwargs)


class Peaks(TorchDispatchMode):
    """Largest tensor an op creates (bytes), outside attention kernels (whose inner matrices depend
    on the attention path and are recorded by `Attention`)."""

    def __init__(self):
        super().__init__()
        self.activation, self.in_attention = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_attention:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.activation = max(self.activation, t.numel() * t.element_size())
        return out


def attention_dims(q, k, heads, kwargs):
    """(batch, heads, queries, keys, head dim) of a ComfyUI optimized_attention call."""
    if kwargs.get("skip_reshape", False):
        b, h, nq, d = q.shape
        return b, h, nq, k.shape[2], d
    (b, nq, hd), nk = q.shape, k.shape[1]
    return b, heads, nq, nk, hd // heads


class Attention:
    """optimized_attention_override that records the attention matrix every call implies, then runs
    the attention ComfyUI chose (or the override it sits in front of)."""

    def __init__(self, peaks: Peaks):
        self.peaks, self.matrix, self.tokens = peaks, 0, 0

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        b, h, nq, nk, _ = attention_dims(q, k, heads, kwargs)
        self.matrix = max(self.matrix, b * h * nq * nk * q.element_size())
        self.tokens = max(self.tokens, nq)
        self.peaks.in_attention = True
        try:
            return func(q, k, v, heads, *args, **kwargs)
        finally:
            self.peaks.in_attention = False


@dataclasses.dataclass
class Kind:
    flops: int  # per item
    activation: int  # bytes per item
    attention: int  # bytes per item
    tokens: int
    out_shape: tuple
    out_dtype: torch.dtype
    items: int = 0  # items evaluated over the whole chain


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value if value is None or isinstance(value, (int, float, str, bool)) else repr(value)


def _shapes(args, kwargs):
    """Per-item shapes of the tensor inputs (the batch dimension left out) and the batch size."""
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    batch = args[0].shape[0]
    return tuple((tuple(t.shape[1:]) if t.ndim and t.shape[0] == batch else tuple(t.shape), t.dtype) for t in tensors), batch


def _first_item(value, batch):
    return value[:1] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch else value


def _own_transformer_options(args, kwargs):
    """A copy of the call's transformer_options (a keyword, or apply_model's positional dict), put
    back into the arguments."""
    if "transformer_options" in kwargs:
        options = dict(kwargs["transformer_options"])
        return args, dict(kwargs, transformer_options=options), options
    i = next(i for i, a in enumerate(args) if isinstance(a, dict))
    options = dict(args[i])
    return args[:i] + (options,) + args[i + 1:], kwargs, options


class Counter:
    """APPLY_MODEL wrapper (innermost, so it sees the calls tiling wrappers make): counts each distinct kind of call once at batch 1, then
    returns empty outputs of the right shape for every call of that kind."""

    def __init__(self):
        self.kinds: dict = {}

    def __call__(self, executor, *args, **kwargs):
        shapes, batch = _shapes(args, kwargs)
        state = tuple(sorted((var.name, _freeze(val)) for var, val in contextvars.copy_context().items()
                             if var.name.startswith("ultrares")))
        key = (shapes, state)
        kind = self.kinds.get(key)
        if kind is None:
            one = lambda a: _first_item(a, batch)
            args1, kwargs1 = tree_map(one, args), tree_map(one, kwargs)
            peaks = Peaks()
            attention = Attention(peaks)
            args1, kwargs1, options = _own_transformer_options(args1, kwargs1)
            previous = options.get(OVERRIDE)  # e.g. URAE's proportional attention: record inside it
            options[OVERRIDE] = attention if previous is None else (
                lambda func, *a, **k: previous(lambda *b, **c: attention(func, *b, **c), *a, **k))
            with FlopCounterMode(display=False) as flops, peaks:
                out = executor(*args1, **kwargs1)
            kind = self.kinds[key] = Kind(flops.get_total_flops(), peaks.activation, attention.matrix, attention.tokens,
                                          tuple(out.shape[1:]), out.dtype)
        kind.items += batch
        return torch.empty((batch, *kind.out_shape), dtype=kind.out_dtype, device="meta")

    def total(self) -> int:
        return sum(k.flops * k.items for k in self.kinds.values())


# ---------------------------------------------------------------- one sampling, step by step

class _Guider:
    """What PREDICT_NOISE wrappers read from executor.class_obj."""

    def __init__(self, model):
        self.inner_model = model


def sample_cost(patcher, arch: chains.Arch, width: int, height: int, steps: int, cfg: float, scheduler: str,
                counter: Counter) -> None:
    """Drive every step of one sampling through the patched clone (first-order samplers: one model
    evaluation per step, as the workflows' euler / euler_ancestral)."""
    base = patcher.model
    latent = (1, arch.channels, height // arch.px_per_latent, width // arch.px_per_latent)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)
    options = pe.copy_nested_dicts(patcher.model_options)
    topts = options.setdefault("transformer_options", {})
    wrappers = pe.copy_nested_dicts(patcher.wrappers)
    wrappers.setdefault(pe.WrappersMP.APPLY_MODEL, {}).setdefault("ultrares.bench.counter", []).append(counter)  # innermost
    topts["wrappers"], topts["sample_sigmas"] = wrappers, sigmas
    uncond = None if math.isclose(cfg, 1.0) else "uncond"

    def calc_cond_batch(model, conds, x, timestep, model_options):
        rows = [i for i, c in enumerate(conds) if c is not None]
        to = dict(model_options["transformer_options"], cond_or_uncond=rows, sigmas=timestep)
        out = model.apply_model(torch.cat([x] * len(rows)), torch.cat([timestep] * len(rows)), transformer_options=to,
                                **chains.conds(arch, len(rows) * x.shape[0]))
        chunks = iter(out.chunk(len(rows)))
        return [next(chunks) if c is not None else None for c in conds]

    def denoise(x, timestep, model_options, seed):
        out = calc_cond_batch(base, ["cond", uncond], x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            if dataclasses.is_dataclass(fn) and "calc_cond_batch" in {f.name for f in dataclasses.fields(fn)}:
                fn = dataclasses.replace(fn, calc_cond_batch=calc_cond_batch)
            out = fn({"conds": ["cond", uncond], "conds_out": out, "cond_scale": cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": base, "model_options": model_options})
        return out[0] if out[1] is None else out[1] + (out[0] - out[1]) * cfg

    predict = pe.WrapperExecutor.new_class_executor(denoise, _Guider(base), pe.get_all_wrappers(pe.WrappersMP.PREDICT_NOISE, topts))
    patcher.patch_model(load_weights=False)
    try:
        with torch.no_grad(), MetaMix():
            for sigma in sigmas[:-1]:
                predict.execute(torch.empty(latent, device="meta"), sigma.reshape(1), options, 0)
    finally:
        patcher.unpatch_model(unpatch_weights=False)


@dataclasses.dataclass
class Cost:
    name: str
    arch: str
    width: int
    height: int
    flops: float
    base_evals: float  # flops / one base-size evaluation
    limit_ratio: float
    activation_gib: float
    attention_gib: float
    attention_tokens: int
    calls: dict
    note: str = ""


def base_eval(arch: chains.Arch, config=None) -> Kind:
    """One native-size evaluation of the bare model, batch 1."""
    patcher = chains.build(arch, config=config)
    counter = Counter()
    sample_cost(patcher, arch, arch.native * arch.px_per_latent, arch.native * arch.px_per_latent, 1, 1.0, "simple", counter)
    return next(iter(counter.kinds.values()))


def chain_cost(name: str, samplings: list, arch: chains.Arch, base: Kind, config=None, overrides=None, note="") -> Cost:
    """The whole node chain of a workflow (every sampler in it), per image."""
    outputs, counter, calls = [], Counter(), {}
    # Patch Split asks the device for free memory to group windows; meta has none to ask, and the
    # grouping changes no FLOPs (calls are counted per item), so every group is one call.
    overrides = {"UltraResPatchSplit": {"max_batch": 1024}} | (overrides or {})
    for s in samplings:
        patcher = chains.apply_chain(chains.build(arch, config=config), s, outputs, overrides)
        before = counter.total()
        sample_cost(patcher, arch, s.width, s.height, s.steps, s.cfg, s.scheduler, counter)
        calls[f"{s.name} {s.width}x{s.height}"] = round((counter.total() - before) / base.flops, 1)
        lat = (1, arch.channels, s.height // arch.px_per_latent, s.width // arch.px_per_latent)
        outputs.append({"samples": torch.empty(lat, device="meta")})
    final = samplings[-1]
    area = final.width * final.height / (arch.native * arch.px_per_latent) ** 2
    limit = area * final.steps * (1 if math.isclose(final.cfg, 1.0) else 2) * base.flops
    total = counter.total()
    kinds = counter.kinds.values()
    return Cost(name, arch.name, final.width, final.height, total, total / base.flops, total / limit,
                max(k.activation for k in kinds) / GIB, max(k.attention for k in kinds) / GIB, max(k.tokens for k in kinds),
                calls, note)


# ---------------------------------------------------------------- anchors: the papers' schedules

def _sampling(name, arch, nodes, size, steps, cfg, sampler="euler", scheduler="ddim_uniform"):
    return chains.Sampling(name, arch, nodes, size[0], size[1], steps, cfg, sampler, scheduler)


def _split(switch, overlap=0.5):
    return ("UltraResPatchSplit", dict(patch_size=0, switch_at=switch, switch_unit="fraction of steps", window_overlap=overlap,
                                       jitter=True, blend="uniform", max_batch=0, seed=0,
                                       sdxl_size_conditioning="image size + window crop"), {})


def _inject(stride, low_res):
    return ("UltraResLRConditionInjector", dict(seed=0, skip_strength=1.0, alpha1=3.0, global_strength=1.0, alpha2=1.0, blur_sigma=0.8,
                                                alpha3=1.0, global_stride=stride, upscale_method="bicubic", start_percent=0.0,
                                                end_percent=1.0), {"low_res_latent": low_res})


def anchors(side: int = 4096, native: int = 1024, steps: int = 50, cfg: float = 7.5) -> dict[str, tuple[str, list, str]]:
    """name -> (arch, samplings, what the paper runs) for SDXL at side x side."""
    euler = dict(steps=steps, cfg=cfg)
    scales = list(range(2, side // native + 1))
    demofusion = [_sampling("base", "SDXL", [], (native, native), **euler)]
    for i, s in enumerate(scales):
        demofusion.append(_sampling(f"phase {s}x", "SDXL", [_split(0.0), _inject(s, i)], (native * s, native * s), **euler))
    redilate = [("UltraResRedilateModel", dict(preset=f"SDXL {side}x{side}", sdxl_layers="official", schedule="reference",
                                                start_percent=0.0, end_percent=0.7, progressive=True, native_latent_size=0, dilation=0.0,
                                                dispersion_start_percent=0.0, dispersion_end_percent=0.0), {}),
                ("UltraResNoiseDampedCFG", dict(damped_uncond="milder dilation", start_percent=0.0, end_percent=0.7), {})]
    size = (side, side)
    return {
        "limit": ("SDXL", None, f"{(side // native) ** 2} base-size evaluations per step, x2 for CFG"),
        "direct full size": ("SDXL", [_sampling("direct", "SDXL", [], size, **euler)], "the plain model at the target size"),
        "ScaleCrafter (paper)": ("SDXL", [_sampling("ScaleCrafter", "SDXL", redilate, size, steps, 5.0, "euler_ancestral")],
                                 "full-size re-dilated passes + noise-damped CFG over 70% (official SDXL 4096 config)"),
        "DemoFusion (paper)": ("SDXL", demofusion, f"{' -> '.join(str(native * s) for s in [1] + scales)}, windows (stride 64) + "
                                                   "dilated sampling every step"),
        "MultiDiffusion": ("SDXL", [_sampling("MultiDiffusion", "SDXL", [_split(0.0)], size, **euler)], "1024 windows, stride 64"),
        "CutDiffusion (paper)": ("SDXL", [_sampling("CutDiffusion", "SDXL", [_split(0.5), ("UltraResPixelInteraction", dict(seed=0), {})], size, **euler)],
                                 "sub-lattices for 25 steps, windows (stride 64) for 25"),
    }


# ---------------------------------------------------------------- the table

def run(workflow_names=None, anchor_names=None, archs=None, configs=None, overrides=None, steps=None, side=4096, log=print,
        save=None) -> dict:
    """Costs of the bundled workflows and anchors. configs/overrides/steps: smaller architectures,
    node inputs and step counts for a smoke run (the same code path at a tiny size). save(result)
    is called after every row (a long run keeps what it has)."""
    configs = configs or {}
    start = time.perf_counter()
    bases, rows = {}, []
    result = {"base": {}, "rows": rows}

    def base(name):
        if name not in bases:
            bases[name] = base_eval(chains.ARCHS[name], configs.get(name))
            result["base"][name] = dataclasses.asdict(bases[name]) | {"out_dtype": str(bases[name].out_dtype)}
            log(f"base {name}: {bases[name].flops / 1e12:.3f} TFLOP per evaluation ({time.perf_counter() - start:.0f} s)")
        return bases[name]

    def add(cost):
        rows.append(dataclasses.asdict(cost))
        result["seconds"] = time.perf_counter() - start
        log(f"{table({'rows': [rows[-1]]}).splitlines()[-1]}  ({result['seconds']:.0f} s)")
        if save:
            save(result)

    for name, samplings in chains.workflows(workflow_names).items():
        samplings = [dataclasses.replace(s, steps=steps or s.steps) for s in samplings]
        arch = chains.ARCHS[samplings[-1].arch]
        add(chain_cost(name, samplings, arch, base(arch.name), configs.get(arch.name), overrides))
    native = chains.ARCHS["SDXL"].native * 8
    for name, (arch_name, samplings, note) in anchors(side, native, steps or 50).items():
        if anchor_names is not None and name not in anchor_names or samplings is None:
            continue
        add(chain_cost(name, samplings, chains.ARCHS[arch_name], base(arch_name), configs.get(arch_name), overrides, note))
    for name in chains.ARCHS if archs is None else archs:
        base(name)
    return result


def table(result: dict) -> str:
    demofusion = next((r for r in result["rows"] if r["name"].startswith("DemoFusion")), None)
    lines = ["| chain | model | size | PFLOP / image | base evals | x limit | x DemoFusion | largest activation GiB | "
             "largest attention matrix GiB (tokens) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = demofusion and (r["arch"], r["width"], r["height"]) == (demofusion["arch"], demofusion["width"], demofusion["height"])
        vs_demo = f"{r['flops'] / demofusion['flops']:.2f}" if same else "-"
        lines.append(f"| {r['name']} | {r['arch']} | {r['width']}x{r['height']} | {r['flops'] / 1e15:.1f} | {r['base_evals']:.0f} | "
                     f"{r['limit_ratio']:.2f} | {vs_demo} | {r['activation_gib']:.2f} | {r['attention_gib']:.1f} ({r['attention_tokens']}) |")
    lines += [f"| {name} | not counted yet: {', '.join(files)} not built here | | | | | | | |" for name, files in chains.uncounted().items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path, help="write the figures here")
    p.add_argument("--workflows", help="comma-separated workflow names (default: all bundled ones)")
    p.add_argument("--table", type=pathlib.Path, help="only print the table of a JSON written before")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return None
    save = None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save = lambda result: args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result = run(args.workflows.split(",") if args.workflows else None, save=save)
    print()
    for name, kind in result["base"].items():
        print(f"one base-size evaluation, {name}: {kind['flops'] / 1e12:.2f} TFLOP")
    print(table(result))
    if save:
        save(result)
    return result


if __name__ == "__main__":
    main()
