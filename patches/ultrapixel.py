"""UltraPixel (arXiv 2407.02158) on a Stable Cascade StageC: the four trained LR-guidance modules
(TransInr with scale-aware normalisation), the released weight layout, the reference's sizes and
tier weights, and the hook that records / injects the guidance at one AttnBlock.

Pure torch: the layer classes come in as `ops` (torch.nn, or ComfyUI's casting ops), the StageC
helpers as plain callables, so everything here is testable without ComfyUI.

Hook points (reference `model_4stage_lite.StageC`): the output of the AttnBlock at list index 2 of
each down level and each up level. During the LR pass the four outputs are recorded at the last
step (t ~ 0.05); in every HR step each output x becomes x + w * TransInr(x, its LR feature, t_emb),
w = 1 on the down path and the HR-size tier weight (0.7 / 0.5 / 0.3) on the up path.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Where the guidance goes, as (StageC module list, level): agg_net[j] = down level j, agg_net_up[j] = up level j
# (up level 0 is the deepest). The released file stores them as module.64.j / module.65.j.
HOOKS = (("down_blocks", 0), ("down_blocks", 1), ("up_blocks", 0), ("up_blocks", 1))
HOOK_BLOCK = 2  # the first AttnBlock of a level ('C', 'T', 'A', ...)
RELEASED_GROUPS = {"64": "down_blocks", "65": "up_blocks"}
# Stored in the released file but never called by the reference's forward (see the research notes).
UNUSED_PARAMS = ("hr_norm.alpha.weight", "hr_norm.alpha.bias", "hr_norm.gamma.weight", "hr_norm.gamma.bias")
HEADS = 32  # TransformerEncoder(n_head=32, head_dim=f_dim // 32) in the reference; not visible in the shapes
MAX_GROUPS = 64  # weight tokens per hyper-network layer: min(64, output width)
PE_SIGMA = 1024.0
STD_TOKENS = 24 * 24  # the LR latent area the scale embedding is relative to (s = sqrt(log_576(H W)))
# Up-path weight by HR latent area (eval mode of the reference): >= 96^2 -> 0.7, >= 72^2 -> 0.5, else 0.3.
TIERS = ((96 * 96, 0.7), (72 * 72, 0.5), (0, 0.3))
# Stable Cascade's pixel-to-StageC-latent factor in the reference's size helpers (ComfyUI's node uses 42).
COMPRESSION = 42.67
LR_STD_SIDE = 32  # get_target_lr_size(std_size=32): an LR picture of ~1024x1024 px, in 32 px units


# ---- sizes and weights ------------------------------------------------------------------------

def hr_latent_size(height: int, width: int) -> tuple[int, int]:
    """StageC latent (h, w) of a picture, as the reference sizes it: ceil(side / 42.67)."""
    return math.ceil(height / COMPRESSION), math.ceil(width / COMPRESSION)


def lr_pixel_size(height: int, width: int) -> tuple[int, int]:
    """The reference's LR picture for a target's aspect (get_target_lr_size, std 32): ~1024^2 px."""
    ratio = height / width
    return int(LR_STD_SIDE * math.sqrt(ratio)) * 32, int(LR_STD_SIDE / math.sqrt(ratio)) * 32


def lr_latent_size(height: int, width: int) -> tuple[int, int]:
    return hr_latent_size(*lr_pixel_size(height, width))


def tier_weight(hr_area: int, tiers=TIERS) -> float:
    """Up-path guide weight for an HR latent of `hr_area` tokens."""
    return next(w for area, w in tiers if hr_area >= area)


def scaled_tiers(native_side: int) -> tuple:
    """The reference tiers for a model whose LR latent side is `native_side` instead of 24 (the same
    HR/LR ratios 4 and 3); identical to TIERS at 24."""
    return tuple((round(area * native_side ** 2 / STD_TOKENS), w) for area, w in TIERS)


def sinusoid(r: torch.Tensor, dim: int = 64, max_positions: float = 10000.0) -> torch.Tensor:
    """StageC's gen_r_embedding: r * 10000 against dim/2 log-spaced frequencies, [sin, cos]."""
    r = r.float() * max_positions
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=r.device, dtype=torch.float32) * -(math.log(max_positions) / (half - 1)))
    arg = r[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


def rescale_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rho: float) -> torch.Tensor:
    """GDF's CFG with rescale, on predictions in eps space: lerp(uncond, cond, scale), then
    rho * pred * std(cond) / std(pred) + (1 - rho) * pred, std over the whole tensor. The std ratio
    is invariant to a common factor, so sigma * eps (what ComfyUI hands a cfg function) works too."""
    pred = uncond + (cond - uncond) * scale
    if rho <= 0:
        return pred
    return rho * pred * (cond.std() / pred.std().clamp_min(1e-12)) + (1 - rho) * pred


# ---- the module -------------------------------------------------------------------------------

def _cast(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A raw parameter on the compute device and dtype (ops layers cast their own weights)."""
    return p.to(device=like.device, dtype=like.dtype)


class Tokenizer(torch.nn.Module):
    """Patch-1 tokens of the LR feature map plus a learned position embedding (rows = max LR tokens)."""

    def __init__(self, ch: int, tokens: int, ops=torch.nn):
        super().__init__()
        self.prefc = ops.Linear(ch, ch)
        self.posemb = torch.nn.Parameter(torch.zeros(tokens, ch))

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # (B, h w, C), row-major like F.unfold with patch 1
        return self.prefc(x) + _cast(self.posemb[:x.shape[1]], x)[None]


class PreNorm(torch.nn.Module):
    def __init__(self, dim: int, fn: torch.nn.Module, ops=torch.nn):
        super().__init__()
        self.norm = ops.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Attention(torch.nn.Module):
    """q = W_q SiLU(x), (k, v) = W_kv SiLU(x), softmax(q k^T / sqrt(d)) v; no output projection."""

    def __init__(self, dim: int, heads: int, ops=torch.nn):
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Sequential(torch.nn.SiLU(), ops.Linear(dim, dim))
        self.to_kv = torch.nn.Sequential(torch.nn.SiLU(), ops.Linear(dim, 2 * dim))

    def forward(self, x):
        b, n, d = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class FeedForward(torch.nn.Module):
    def __init__(self, dim: int, ff_dim: int, ops=torch.nn):
        super().__init__()
        self.net = torch.nn.Sequential(ops.Linear(dim, ff_dim), torch.nn.GELU(), torch.nn.Dropout(0.0), ops.Linear(ff_dim, dim))

    def forward(self, x):
        return self.net(x)


class Encoder(torch.nn.Module):
    """One pre-LN transformer layer (TransformerEncoder(depth=1) of the reference)."""

    def __init__(self, dim: int, ff_dim: int, heads: int, ops=torch.nn):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleList([
            PreNorm(dim, Attention(dim, heads, ops), ops), PreNorm(dim, FeedForward(dim, ff_dim, ops), ops)])])

    def forward(self, x):
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class Modulation(torch.nn.Module):
    """x (1 + a) + b with (a, b) = mapper(embedding) (TimestepBlock_res with no extra conditions)."""

    def __init__(self, c: int, emb_dim: int, ops=torch.nn):
        super().__init__()
        self.mapper = ops.Linear(emb_dim, 2 * c)

    def forward(self, x, emb):
        a, b = self.mapper(emb.to(x.dtype))[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class ScaleNorm(torch.nn.Module):
    """Scale-aware conditioning: f = Modulation(x, sinusoid(s)), s = sqrt(log_576(H W)); returns f + x."""

    def __init__(self, c: int, emb_dim: int, std_tokens: int = STD_TOKENS, ops=torch.nn):
        super().__init__()
        self.mapping = Modulation(c, emb_dim, ops)
        self.emb_dim, self.std_tokens = emb_dim, std_tokens

    def scale(self, h: int, w: int) -> float:
        return math.sqrt(math.log(h * w) / math.log(self.std_tokens))

    def forward(self, x):
        s = torch.full((x.shape[0],), self.scale(*x.shape[-2:]), device=x.device)
        return self.mapping(x, sinusoid(s, self.emb_dim)) + x


def coordinate_grid(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w, 2) pixel centres in [-1, 1], y first."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def positional_encoding(coords: torch.Tensor, features: int) -> torch.Tensor:
    """(..., 2) -> (..., features): each coordinate times features/4 frequencies exp(linspace(0, ln 1024)),
    coordinate-major, then [cos(pi .), sin(pi .)]."""
    freqs = torch.exp(torch.linspace(0, math.log(PE_SIGMA), features // 4, device=coords.device))
    x = (coords.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([torch.cos(math.pi * x), torch.sin(math.pi * x)], dim=-1)


def modulated_weights(base: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """Hyper-network layer: base (in + 1, out) = [weights; bias], modulation (B, g, in) from g weight
    tokens. Output column j of the weights is scaled by group j mod g, then L2-normalised over the
    input axis; the bias row is kept. Returns (B, in + 1, out)."""
    w, b = base[:-1], base[-1:]
    m = modulation.transpose(1, 2).repeat(1, 1, w.shape[1] // modulation.shape[1])  # (B, in, out)
    w = F.normalize(w[None] * m, dim=1)
    return torch.cat([w, b[None].expand(w.shape[0], -1, -1)], dim=1)


def linear_rows(x: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """[x, 1] @ wb for x (B, N, in), wb (B, in + 1, out)."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) @ wb


@dataclass(frozen=True)
class TransInrShape:
    """Every width of a TransInr, read off its state dict (so a tiny test file builds a tiny module)."""

    ind: int  # StageC width at the hook
    ch: int  # token / INR width (= f_dim, the reference concatenates tokens and weight tokens)
    tokens: int  # position-embedding rows: the most LR tokens the module takes (1024 released)
    ff_dim: int
    pe_features: int  # 256: 2 coordinates x 64 frequencies x (cos, sin)
    hidden: int  # coordinate-MLP hidden width
    groups: tuple[int, int]  # weight tokens of wb0, wb1
    time_dim: int
    scale_dim: int
    fuse_dim: int  # toout hidden width (ind // 4)

    @classmethod
    def of(cls, sd: dict) -> "TransInrShape":
        ch, ind = sd["input_layer.weight"].shape[:2]
        hidden, out = sd["base_params.wb0"].shape[1], sd["base_params.wb1"].shape[1]
        return cls(ind=ind, ch=ch, tokens=sd["tokenizer.posemb"].shape[0],
                   ff_dim=sd["transformer_encoder.layers.0.1.fn.net.0.weight"].shape[0],
                   pe_features=sd["base_params.wb0"].shape[0] - 1, hidden=hidden,
                   groups=(min(MAX_GROUPS, hidden), min(MAX_GROUPS, out)),
                   time_dim=sd["mapp_t.mapper.weight"].shape[1], scale_dim=sd["hr_norm.mapping.mapper.weight"].shape[1],
                   fuse_dim=sd["toout.0.weight"].shape[0])

    def problems(self, sd: dict) -> list[str]:
        """Shape inconsistencies a module of this shape cannot load (empty when it can)."""
        found = []
        if self.ch % HEADS:
            found.append(f"token width {self.ch} is not a multiple of the {HEADS} attention heads")
        if sd["wtokens"].shape != (sum(self.groups), self.ch):
            found.append(f"wtokens is {tuple(sd['wtokens'].shape)}, expected {(sum(self.groups), self.ch)}")
        if self.pe_features % 4:
            found.append(f"base_params.wb0 has {self.pe_features} positional features, not a multiple of 4")
        return found


class TransInr(torch.nn.Module):
    """TransInr_withnorm: INR upsampling of the LR feature to the HR grid, fused with the HR feature,
    conditioned on the HR timestep and the HR size. forward(target, lr, t_emb) -> guide."""

    def __init__(self, shape: TransInrShape, ops=torch.nn, std_tokens: int = STD_TOKENS):
        super().__init__()
        s = self.shape = shape
        self.input_layer = ops.Conv2d(s.ind, s.ch, 1)
        self.tokenizer = Tokenizer(s.ch, s.tokens, ops)
        self.transformer_encoder = Encoder(s.ch, s.ff_dim, HEADS, ops)
        self.base_params = torch.nn.ParameterDict({
            "wb0": torch.nn.Parameter(torch.zeros(s.pe_features + 1, s.hidden)),
            "wb1": torch.nn.Parameter(torch.zeros(s.hidden + 1, s.ch))})
        self.wtoken_postfc = torch.nn.ModuleDict({
            "wb0": torch.nn.Sequential(ops.LayerNorm(s.ch), ops.Linear(s.ch, s.pe_features)),
            "wb1": torch.nn.Sequential(ops.LayerNorm(s.ch), ops.Linear(s.ch, s.hidden))})
        self.wtokens = torch.nn.Parameter(torch.zeros(sum(s.groups), s.ch))
        self.output_layer = ops.Conv2d(s.ch, s.ind, 1)
        self.mapp_t = Modulation(s.ind, s.time_dim, ops)
        self.hr_norm = ScaleNorm(s.ind, s.scale_dim, std_tokens, ops)
        self.toout = torch.nn.Sequential(ops.Linear(2 * s.ind, s.fuse_dim), torch.nn.GELU(), ops.Linear(s.fuse_dim, s.ind))

    def hyper_weights(self, lr: torch.Tensor) -> list[torch.Tensor]:
        """The two coordinate-MLP layers modulated by the weight tokens the LR feature produces."""
        tokens = self.tokenizer(self.input_layer(lr))
        wtokens = _cast(self.wtokens, tokens)[None].expand(tokens.shape[0], -1, -1)
        out = self.transformer_encoder(torch.cat([tokens, wtokens], dim=1))[:, -wtokens.shape[1]:]
        g0 = self.shape.groups[0]
        return [modulated_weights(_cast(self.base_params[name], out), self.wtoken_postfc[name](part))
                for name, part in (("wb0", out[:, :g0]), ("wb1", out[:, g0:]))]

    def upsample(self, lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """hr_rec: the coordinate MLP over the HR grid, projected back, plus the nearest-upsampled LR feature."""
        wb0, wb1 = self.hyper_weights(lr)
        h, w = size
        pe = positional_encoding(coordinate_grid(h, w, lr.device), self.shape.pe_features).to(lr.dtype)
        x = linear_rows(torch.relu(linear_rows(pe.reshape(1, h * w, -1).expand(lr.shape[0], -1, -1), wb0)), wb1)
        x = x.transpose(1, 2).reshape(lr.shape[0], -1, h, w)
        return self.output_layer(x) + F.interpolate(lr, size=size, mode="nearest")

    def forward(self, target: torch.Tensor, lr: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        hr_rec = self.upsample(lr.to(target.dtype), tuple(target.shape[-2:]))
        out = self.toout(torch.cat([hr_rec, target], dim=1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = self.mapp_t(out, t_emb)
        out = F.layer_norm(out.permute(0, 2, 3, 1), (out.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
        return self.hr_norm(out)


class UltraPixelModules(torch.nn.Module):
    """The four modules under the reference's names: agg_net[j] (down level j), agg_net_up[j] (up level j)."""

    def __init__(self, shapes: dict, ops=torch.nn, std_tokens: int = STD_TOKENS):
        super().__init__()
        self.agg_net = torch.nn.ModuleList([TransInr(shapes["down_blocks", j], ops, std_tokens) for j in (0, 1)])
        self.agg_net_up = torch.nn.ModuleList([TransInr(shapes["up_blocks", j], ops, std_tokens) for j in (0, 1)])

    def at(self, blocks: str, level: int) -> TransInr:
        return (self.agg_net if blocks == "down_blocks" else self.agg_net_up)[level]

    @property
    def max_tokens(self) -> int:
        return min(m.shape.tokens for m in self.modules() if isinstance(m, TransInr))


# ---- the released layout ----------------------------------------------------------------------

def released_param_names(sd: dict | None = None) -> set[str]:
    """Every parameter name of one released TransInr (hr_norm.alpha/gamma included)."""
    shape = TransInrShape(ind=8, ch=HEADS, tokens=1, ff_dim=1, pe_features=4, hidden=1, groups=(1, 1), time_dim=1,
                          scale_dim=2, fuse_dim=1)
    with torch.device("meta"):
        names = set(TransInr(shape).state_dict())
    return names | set(UNUSED_PARAMS)


def split_released(sd: dict) -> tuple[dict, list[str]]:
    """Map the released `module.64.j.* / module.65.j.*` state dict (the 'module.' prefix optional) to
    {(blocks, level): module state dict}; the second value lists what is wrong (empty if nothing)."""
    expected = released_param_names()
    parts, problems = {}, []
    for key, value in sd.items():
        name = key[len("module."):] if key.startswith("module.") else key
        group, _, rest = name.partition(".")
        level, _, param = rest.partition(".")
        if group not in RELEASED_GROUPS or level not in ("0", "1") or param not in expected:
            problems.append(f"unexpected key {key!r}")
            continue
        if param not in UNUSED_PARAMS:
            parts.setdefault((RELEASED_GROUPS[group], int(level)), {})[param] = value
    needed = expected - set(UNUSED_PARAMS)
    for blocks, level in HOOKS:
        group = next(g for g, b in RELEASED_GROUPS.items() if b == blocks)
        missing = sorted(needed - set(parts.get((blocks, level), {})))
        if missing:
            problems.append(f"module.{group}.{level} lacks {len(missing)} of its {len(needed)} tensors (e.g. {missing[0]})")
    return parts, problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def build_modules(parts: dict, ops=torch.nn, dtype=None, device=None, std_tokens: int = STD_TOKENS) -> UltraPixelModules:
    """The four modules built from the shapes in `parts` (split_released's first value), weights loaded."""
    shapes = {k: TransInrShape.of(sd) for k, sd in parts.items()}
    for k, shape in shapes.items():
        bad = shape.problems(parts[k])
        if bad:
            raise ValueError(f"{k[0]}[{k[1]}]: " + "; ".join(bad))
    with torch.device("meta"):
        modules = UltraPixelModules(shapes, ops, std_tokens)
    sd = {f"{'agg_net' if b == 'down_blocks' else 'agg_net_up'}.{j}.{p}": v for (b, j), part in parts.items() for p, v in part.items()}
    modules.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None or device is not None:
        modules.to(device=device, dtype=dtype)
    return modules.eval().requires_grad_(False)


# ---- the hook ---------------------------------------------------------------------------------

@dataclass
class LRFeatures:
    """The four recorded LR features of the conditional half, (B, C, h, w) each, keyed like HOOKS."""

    features: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(k in self.features for k in HOOKS)

    def batch_for(self, key, cond_or_uncond: list, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The feature for a model batch of `batch` rows made of len(cond_or_uncond) equal chunks:
        every chunk (cond or uncond) gets the conditional feature, as the reference repeats it."""
        f = self.features[key].to(device=like.device, dtype=like.dtype)
        chunks = max(1, len(cond_or_uncond))
        per = batch // chunks
        if f.shape[0] != per:
            if f.shape[0] != 1:
                raise ValueError(f"the LR pass recorded {f.shape[0]} pictures but the HR pass samples {per}: use the same batch size")
            f = f.expand(per, -1, -1, -1)
        return f.repeat(chunks, 1, 1, 1)


def conditional_rows(x: torch.Tensor, cond_or_uncond: list) -> torch.Tensor:
    """The rows of the conditional chunk (ComfyUI batches equal chunks tagged 0 = cond, 1 = uncond)."""
    chunks = max(1, len(cond_or_uncond))
    per = x.shape[0] // chunks
    index = cond_or_uncond.index(0)
    return x[index * per:(index + 1) * per]


class GuidedBlock:
    """Replacement `forward` of one hook AttnBlock: runs the original, then records (LR pass) or adds
    the guide (HR pass). `r_of` turns the call's transformer_options into the timestep r (B,);
    `weight(h, w)` is the guide weight at that HR latent size."""

    def __init__(self, original, key, features: LRFeatures, r_of, module: TransInr | None = None, weight=None,
                 record_sigma: float | None = None):
        self.original, self.key, self.features, self.r_of = original, key, features, r_of
        self.module, self.weight, self.record_sigma = module, weight, record_sigma

    def __call__(self, x, clip, transformer_options={}, **kwargs):
        x = self.original(x, clip, transformer_options=transformer_options, **kwargs)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        if self.record_sigma is not None:
            sigma = transformer_options.get("sigmas")
            # ComfyUI may run cond and uncond as separate calls: record only a call holding the cond chunk.
            if sigma is not None and 0 in cond_or_uncond and math.isclose(float(sigma.reshape(-1)[0]), self.record_sigma, rel_tol=1e-4, abs_tol=1e-6):
                self.features.features[self.key] = conditional_rows(x, cond_or_uncond).detach().clone()
            return x
        if self.module is None:
            return x
        lr = self.features.batch_for(self.key, cond_or_uncond, x.shape[0], x)
        r = self.r_of(transformer_options, x.shape[0]).to(x.device)
        guide = self.module(x, lr, sinusoid(r, self.module.shape.time_dim))
        return x + self.weight(*x.shape[-2:]) * guide.to(x.dtype)
