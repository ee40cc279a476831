// The numbers the UltraRes info panel shows, as pure functions (no app, no DOM), so the browser test
// can check each one against the Python that really runs (patches/*.py). Sizes are in latent pixels
// unless a name says px; one latent pixel is 8 image pixels for every model family the pack supports.

export const LATENT_PX = 8;
// Joint sequence FLUX was trained at (patches/urae.py TRAIN_TOKENS): 512 text + 64x64 image tokens.
export const FLUX_TRAIN_TOKENS = 512 + 64 * 64;
export const FLUX_TEXT_TOKENS = 512;

// Python's round(): halves go to the even neighbour (JS Math.round sends them up).
export function pyRound(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// ---- CutDiffusion (patches/cutdiffusion.py) ----

// lattice(): ceil(size / patch) strided sub-lattices per side, each ceil(size / stride) long.
export function lattice(size, patch) {
  const stride = Math.max(1, Math.ceil(size / patch));
  return { stride, padded: stride * Math.ceil(size / stride) };
}

// window_starts(): a start every `stride`, the last one moved back to end at the border.
export function windowStarts(size, window, stride) {
  if (size <= window) return [0];
  const count = Math.ceil((size - window) / stride) + 1;
  return Array.from({ length: count }, (_, i) => Math.min(i * stride, size - window));
}

// Both stages of Patch Split for a latent of height x width (maxBatch 0 = batched by free memory).
export function patchSplitPlan(height, width, patch, overlap, maxBatch = 0) {
  const [lh, lw] = [lattice(height, patch), lattice(width, patch)];
  const [wh, ww] = [Math.min(patch, height), Math.min(patch, width)];
  const [sh, sw] = [Math.max(1, pyRound(wh * (1 - overlap))), Math.max(1, pyRound(ww * (1 - overlap)))];
  const rows = windowStarts(height, wh, sh).length, cols = windowStarts(width, ww, sw).length;
  const stage1 = lh.stride * lw.stride, stage2 = rows * cols;
  const calls = (n) => (maxBatch > 0 ? Math.ceil(n / maxBatch) : null);
  return {
    passthrough: height <= patch && width <= patch, // the wrapper calls the model unchanged
    grid1: [lh.stride, lw.stride], piece1: [lh.padded / lh.stride, lw.padded / lw.stride], stage1,
    grid2: [rows, cols], window: [wh, ww], stride2: [sh, sw], stage2,
    calls1: calls(stage1), calls2: calls(stage2),
  };
}

// ---- ScaleCrafter (patches/scalecrafter.py) ----

// auto_table() per level: [level 0 (never dilated), ..., deepest level, middle block].
// The deepest level and the middle block get the ratio r, each shallower level one less, at least min(r, 2).
export function autoLevels(levels, ratio) {
  if (ratio <= 1) return Array(levels + 1).fill(1);
  const out = [1];
  for (let level = 1; level < levels; level++) out.push(Math.max(ratio - (levels - 1 - level), Math.min(ratio, 2)));
  out.push(ratio);
  return out;
}

// milder_table(): the noise-damped pass drops the shallowest dilated level (the middle block stays).
export function milderLevels(perLevel) {
  const inner = perLevel.slice(0, -1);
  const drop = inner.findIndex((d) => d > 1);
  return drop < 0 ? perLevel.slice() : perLevel.map((d, i) => (i === drop ? 1 : d));
}

// What Re-dilate Model (auto preset) does for a latent of `side` (its larger side) at `native`:
// ratio = side / native unless a fixed `dilation` is set; progressive decay from a factor of 3;
// passthrough when no convolution is dilated (auto_table() is empty: at or below native size).
export function redilatePlan(side, native, levels, dilation = 0) {
  const ratio = dilation > 0 ? dilation : side / native;
  const perLevel = autoLevels(levels, ratio);
  return { ratio, perLevel, damped: milderLevels(perLevel), progressive: Math.max(...perLevel) >= 3,
           passthrough: perLevel.every((d) => d <= 1) };
}

// progressive_dilation(): d_i = max(ceil(d (1 - done)), min(d, 2)).
export function progressiveDilation(d, done) {
  return Math.max(Math.ceil(d * (1 - done) - 1e-9), Math.min(d, 2));
}

// UNet levels (len(channel_mult)) by native latent size: SDXL and the toy world have 3, SD1.x/2.x 4.
export function unetLevels(native) {
  return native === 64 || native === 96 ? 4 : 3;
}

// ---- LR Condition Injector (patches/lr_guidance.py global_stride) ----

export function lrGlobalStride(high, low, globalStride = 0) {
  if (globalStride > 0) return globalStride;
  return Math.max(1, pyRound(Math.max(high[0] / low[0], high[1] / low[1])));
}

// ---- URAE (patches/urae.py) ----

// FLUX packs 2x2 latent pixels into one token: image tokens of a heightPx x widthPx image.
export function fluxImageTokens(heightPx, widthPx) {
  return Math.ceil(heightPx / 16) * Math.ceil(widthPx / 16);
}

// proportional_attention_scale(): logits x sqrt(log_4608 N), N = text + image tokens.
export function proportionalAttentionScale(tokens, trainTokens = FLUX_TRAIN_TOKENS) {
  return Math.sqrt(Math.log(tokens) / Math.log(trainTokens));
}

// ---- sizes ----

// Tiles of an edge-`tile` grid over an image (Exact Tiled VAE Decode's output-resolution tiles).
export function tileGrid(heightPx, widthPx, tile) {
  return [Math.ceil(heightPx / tile), Math.ceil(widthPx / tile)];
}

// PASD Tiled Sampling's tile starts along one side (patches/pasd.py tile_origins): every tile - overlap
// latent px, the last one flush with the end.
export function pasdTileOrigins(length, tile, overlap) {
  if (length <= tile) return [0];
  const starts = [];
  for (let s = 0; s < length - tile; s += tile - overlap) starts.push(s);
  return [...starts, length - tile];
}

// Exact Tiled VAE Decode's plan (patches/exact_decode.py plan()) for the SD/SDXL/FLUX decoder (128-256-512-512
// channels, output at 1, 1/2, 1/4, 1/8 of the image side) in bf16: `stateBytes`, the whole-image layer tensors
// (RAM when they wait on the CPU; grows with the image), `tileBytes`, one tile's working set on the GPU (the tile
// size alone sets it). Each chain's tile edge is tile * sqrt(128 / widest channels), at most the side there.
export function exactDecodeMemory(heightPx, widthPx, tile) {
  const side = Math.max(heightPx, widthPx);
  const stateBytes = Math.max(384 * heightPx * widthPx, 256 * heightPx * widthPx + 512 * Math.min(tile, side) * widthPx);
  const chains = [[512, 8], [512, 4], [512, 2], [256, 1], [128, 1]];  // [widest channels, downscale]
  const tileBytes = Math.max(...chains.map(([channels, down]) => {
    const edge = Math.min(Math.max(8, Math.floor(tile * Math.sqrt(128 / channels))), side / down);
    return 8 * channels * (edge + 8) ** 2 * 4;
  }));
  return { stateBytes, tileBytes };
}

// The nearest multiple of `multiple` (at least one): SD UNets need 64 px (three 2x downsamplings of
// an 8x latent), FLUX/SD3 16 px (8x latent, 2x2 patches).
export function snap(px, multiple) {
  return Math.max(multiple, Math.round(px / multiple) * multiple);
}

// High-resolution targets [width, height] in px, before snapping.
export const SIZE_PRESETS = [
  [2048, 2048], [3072, 3072], [4096, 4096], [2048, 4096], [4096, 2048], [3840, 2160], [2160, 3840],
];

export function presetsFor(multiple) {
  return SIZE_PRESETS.map(([w, h]) => [snap(w, multiple), snap(h, multiple)]);
}

// Native latent side guessed from a model file name (the browser cannot see the weights);
// null when nothing in the name tells.
export function nativeFromName(name) {
  const n = String(name || "").toLowerCase();
  if (/flux|sd3|sdxl|xl[_\-. ]|_xl|pony|illustrious|noob|playground/.test(n)) return 128;
  if (/768|v-?pred/.test(n) && /sd2|v2-|2\.[01]/.test(n)) return 96;
  if (/sd1|v1-5|1\.5|sd15|sd-1|v1-4/.test(n)) return 64;
  return null;
}

// ---- UltraPixel (patches/ultrapixel.py) ----

// The reference's pixel-to-StageC-latent factor and LR picture (get_target_lr_size, std 32: ~1024^2 px).
export const CASCADE_COMPRESSION = 42.67;
export const ULTRAPIXEL_TIERS = [[96 * 96, 0.7], [72 * 72, 0.5], [0, 0.3]];

// hr_latent_size(): [h, w] = ceil(side / 42.67).
export function cascadeLatent(heightPx, widthPx) {
  return [Math.ceil(heightPx / CASCADE_COMPRESSION), Math.ceil(widthPx / CASCADE_COMPRESSION)];
}

// lr_pixel_size(): h = int(32 sqrt(H/W)) * 32, w = int(32 / sqrt(H/W)) * 32.
export function ultrapixelLrPixels(heightPx, widthPx) {
  const root = Math.sqrt(heightPx / widthPx);
  return [Math.trunc(32 * root) * 32, Math.trunc(32 / root) * 32];
}

// tier_weight(): the up-path guide weight for an HR latent of `area` tokens.
export function ultrapixelTier(area) {
  return ULTRAPIXEL_TIERS.find(([min]) => area >= min)[1];
}
