// UltraRes frontend extension: on the pack's nodes, what the node will do for the size it is wired
// to (patch grids, dilation per UNet level, model passes per step), found by following the graph to
// the latent that feeds the sampler; and a size-preset menu on latent nodes with the right multiples.
// Display only: it adds no widgets, so saved workflows and API prompts are unchanged.
import { app } from "../../../scripts/app.js";
import * as M from "./ultrares_math.js";

const INFO_NODES = new Set([
  "UltraResPatchSplit", "UltraResPixelInteraction", "UltraResRedilateModel", "UltraResNoiseDampedCFG",
  "UltraResLRConditionInjector", "UltraResURAEFlux", "UltraResExactVAEDecode", "UltraResPASDTiledSampling",
  "UltraResUltraPixelLRPass",
]);
const LINE_HEIGHT = 15;
const MAX_HOPS = 64; // graph walks stop here (cycles cannot occur, but subgraph oddities might)

// ---- graph walking ----

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function value(node, name) {
  return widget(node, name)?.value;
}

function inputIndex(node, name) {
  return node?.inputs?.findIndex((i) => i.name === name) ?? -1;
}

// The node and output slot feeding input `nameOrIndex` of `node`, skipping reroutes.
function source(node, nameOrIndex) {
  for (let hops = 0; node && hops < MAX_HOPS; hops++) {
    const index = typeof nameOrIndex === "number" ? nameOrIndex : inputIndex(node, nameOrIndex);
    const id = node.inputs?.[index]?.link;
    if (id == null) return null;
    const link = node.graph?.getLink(id);
    const from = link && node.graph.getNodeById(link.origin_id);
    if (!from) return null;
    if (from.type !== "Reroute") return { node: from, slot: link.origin_slot };
    node = from, nameOrIndex = 0;
  }
  return null;
}

// Nodes fed by any output of `node`, breadth first.
function* downstream(node) {
  const seen = new Set([node.id]), queue = [node];
  while (queue.length && seen.size < MAX_HOPS) {
    const current = queue.shift();
    for (const output of current.outputs ?? []) {
      for (const id of output.links ?? []) {
        const link = current.graph.getLink(id);
        const next = link && current.graph.getNodeById(link.target_id);
        if (next && !seen.has(next.id)) {
          seen.add(next.id);
          queue.push(next);
          yield next;
        }
      }
    }
  }
}

// An INT that is a widget, or an input wired to a primitive or to URAE's width/height outputs.
function intValue(node, name) {
  const src = source(node, name);
  if (!src) return value(node, name);
  if (src.node.type === "UltraResURAEFlux") return presetSide(src.node);
  const v = src.node.widgets?.[0]?.value;
  return typeof v === "number" ? v : undefined;
}

function presetSide(uraeNode) {
  const m = /(\d+)x(\d+)/.exec(String(value(uraeNode, "preset")));
  return m ? Number(m[1]) : undefined;
}

// [height, width] in latent px of the LATENT an output slot produces, or null when unknown.
function latentSize(node, depth = 0) {
  if (!node || depth > MAX_HOPS) return null;
  if (widget(node, "width") || inputIndex(node, "width") >= 0) {
    const w = intValue(node, "width"), h = intValue(node, "height");
    if (w > 0 && h > 0) return [Math.floor(h / M.LATENT_PX), Math.floor(w / M.LATENT_PX)];
    const up = upstreamLatent(node, depth); // LatentUpscale with 0 = keep the aspect ratio
    if (!up || !(w > 0 || h > 0)) return null;
    return w > 0 ? [Math.round((up[0] * w) / M.LATENT_PX / up[1]), Math.floor(w / M.LATENT_PX)]
      : [Math.floor(h / M.LATENT_PX), Math.round((up[1] * h) / M.LATENT_PX / up[0])];
  }
  const up = upstreamLatent(node, depth);
  const scale = value(node, "scale_by");
  if (up && typeof scale === "number") return up.map((s) => Math.round(s * scale));
  return up;
}

function upstreamLatent(node, depth) {
  const names = ["latent_image", "samples", "latent"];
  const index = node.inputs?.findIndex((i) => names.includes(i.name) || i.type === "LATENT") ?? -1;
  const src = index >= 0 ? source(node, index) : null;
  return src ? latentSize(src.node, depth + 1) : null;
}

// The sampler a MODEL (or GUIDER...) output ends in, and its latent size.
function samplerLatent(node) {
  for (const next of downstream(node)) {
    if (inputIndex(next, "latent_image") >= 0) return { sampler: next, size: upstreamLatent(next, 0) };
  }
  return { sampler: null, size: null };
}

// Nodes up the MODEL chain from `node` (itself excluded), nearest first, down to the loader.
function modelChain(node) {
  const chain = [];
  for (let src = source(node, "model"); src && chain.length < MAX_HOPS; src = source(src.node, "model")) {
    chain.push(src.node);
  }
  return chain;
}

// { side, how } of the model's native latent size, from the loader at the top of the MODEL chain.
function nativeSize(chain, fluxHint) {
  const loader = chain[chain.length - 1];
  if (loader?.type === "UltraResToyWorldLoader") return { side: 32, how: "toy world" };
  const name = ["ckpt_name", "unet_name", "model_name"].map((n) => value(loader, n)).find(Boolean);
  const guess = M.nativeFromName(name);
  if (guess) return { side: guess, how: "guessed from the model name" };
  if (fluxHint) return { side: 128, how: "FLUX latent" };
  return { side: 64, how: "assumed SD1.5; set it on the node if wrong" };
}

const px = ([h, w]) => `${w * M.LATENT_PX}x${h * M.LATENT_PX} px`;
const grid = ([rows, cols]) => `${cols}x${rows}`;
const fmt = (x) => String(Math.round(x * 100) / 100);

function isFluxLatent(sampler) {
  const src = sampler && source(sampler, "latent_image");
  return !!src && /SD3|Flux|Chroma/i.test(src.node.type);
}

// ---- per node type: { lines, data } (data for tests and other tools) ----

function patchSplitInfo(node, size, chain, sampler) {
  const native = nativeSize(chain, isFluxLatent(sampler));
  const patch = value(node, "patch_size") || native.side;
  const plan = M.patchSplitPlan(size[0], size[1], patch, value(node, "window_overlap"), value(node, "max_batch"));
  const calls = (n) => (n == null ? "" : ` in ${n} model calls`); // max_batch 0: as free memory allows
  const lines = [`${px(size)}, patch ${patch} latent px${value(node, "patch_size") ? "" : ` (${native.how})`}`];
  if (plan.passthrough) lines.push("latent fits one patch: the model runs unchanged");
  else {
    lines.push(`stage 1: ${grid(plan.grid1)} sub-lattices = ${plan.stage1} patches/step${calls(plan.calls1)}`);
    lines.push(`stage 2: ${grid(plan.grid2)} windows = ${plan.stage2} patches/step${calls(plan.calls2)}`);
  }
  return { lines, data: { size, patch, ...plan } };
}

function redilateInfo(node, size, chain, sampler) {
  const native = { side: value(node, "native_latent_size"), how: "set on the node" };
  const { side, how } = native.side ? native : nativeSize(chain, isFluxLatent(sampler));
  if (value(node, "preset") !== "auto (from latent size)") {
    return { lines: [`${px(size)}: fixed table of preset '${value(node, "preset")}'`], data: { size } };
  }
  // A Patch Split applied before this node is the outer wrapper: this one then sees patches.
  const split = chain.find((n) => n.type === "UltraResPatchSplit");
  const seen = split ? Math.min(Math.max(...size), value(split, "patch_size") || side) : Math.max(...size);
  const plan = M.redilatePlan(seen, side, M.unetLevels(side), value(node, "dilation"));
  const custom = value(node, "schedule") === "custom";
  const end = custom ? value(node, "end_percent") : 0.7;
  const progressive = custom ? value(node, "progressive") : plan.progressive;
  const lines = [`${px(size)} / native ${side} latent px (${how}): ratio ${fmt(plan.ratio)}`];
  if (split) lines.push(`sees ${seen} latent px patches (Patch Split is applied before it)`);
  if (plan.passthrough) lines.push("at or below native size: re-dilation changes nothing");
  else {
    lines.push(`dilation per level 0..deepest, mid: ${plan.perLevel.map(fmt).join(", ")}`);
    const decay = value(node, "decay") || "reference";
    lines.push(`until ${Math.round(end * 100)}% of steps${progressive ? `, decaying (progressive, ${decay})` : ""}`);
  }
  return { lines, data: { size, native: side, seen, end, progressive, ...plan } };
}

function noiseDampedInfo(node, size, chain, sampler) {
  const redilate = chain.find((n) => n.type === "UltraResRedilateModel");
  const lines = [];
  const data = { size };
  if (redilate && value(redilate, "preset") === "auto (from latent size)") {
    const info = redilateInfo(redilate, size, modelChain(redilate), sampler);
    data.damped = value(node, "damped_uncond") === "undilated" ? info.data.perLevel.map(() => 1) : info.data.damped;
    lines.push(`damped uncond dilation: ${data.damped.map(fmt).join(", ")}`);
  } else if (!redilate) lines.push("needs Re-dilate Model before it");
  const window = value(node, "schedule") === "custom"
    ? `${Math.round(value(node, "start_percent") * 100)}-${Math.round(value(node, "end_percent") * 100)}% of steps`
    : "the re-dilation's range (reference)";
  lines.push(`model passes/step: 3 (cond, uncond, damped uncond) in ${window}, else 2`);
  return { lines, data };
}

function pixelInteractionInfo(node, size, chain) {
  const split = chain.find((n) => n.type === "UltraResPatchSplit");
  if (!split) return { lines: ["needs Patch Split/Reassemble before it"], data: { size } };
  const info = patchSplitInfo(split, size, modelChain(split), null);
  return { lines: [`shuffles across the ${info.data.stage1} stage-1 patches of ${px(size)}`], data: info.data };
}

function lrInjectorInfo(node, size) {
  const src = source(node, "low_res_latent");
  const low = src && latentSize(src.node);
  if (!low) return { lines: [`${px(size)}; low-res size unknown`], data: { size } };
  const stride = M.lrGlobalStride(size, low, value(node, "global_stride"));
  const lines = [`${px(low)} -> ${px(size)} (x${fmt(Math.max(size[0] / low[0], size[1] / low[1]))})`];
  if (value(node, "global_strength") > 0 && stride >= 2) {
    lines.push(`global path: ${stride}x${stride} = ${stride * stride} sub-lattices, +1 model call/step`);
  } else lines.push("global path off: no extra model call");
  return { lines, data: { size, low, stride } };
}

function uraeInfo(node, size) {
  const target = presetSide(node);
  const [h, w] = size.map((s) => s * M.LATENT_PX);
  const tokens = M.fluxImageTokens(h, w);
  const scale = M.proportionalAttentionScale(tokens + M.FLUX_TEXT_TOKENS);
  const lines = [`${w}x${h} px: ${tokens} image tokens, attention x${scale.toFixed(3)}`];
  if (target && (h !== target || w !== target)) lines.push(`preset is ${target}x${target}: sample at that size`);
  return { lines, data: { size, tokens, scale, target } };
}

function pasdTilesInfo(node, size) {
  const [h, w] = size;
  const tile = value(node, "tile_size");
  if (h * w <= tile * tile) return { lines: [`${px(size)}: fits one ${tile}x${tile} tile, sampled whole`], data: { size, grid: [1, 1] } };
  const side = Math.min(tile, h, w);
  const overlap = value(node, "tile_overlap");
  const rows = M.pasdTileOrigins(h, side, overlap).length;
  const cols = M.pasdTileOrigins(w, side, overlap).length;
  return {
    lines: [`${px(size)}: ${rows}x${cols} = ${rows * cols} tiles of ${side} latent px (${side * M.LATENT_PX} px) per step`,
      `hint cropped with each tile, overlap ${overlap} latent px`],
    data: { size, grid: [rows, cols], side },
  };
}

function exactDecodeInfo(node) {
  const src = source(node, "samples");
  const size = src && latentSize(src.node);
  if (!size) return { lines: ["latent size unknown"], data: {} };
  const [h, w] = size.map((s) => s * M.LATENT_PX);
  const tile = value(node, "tile_size");
  const tiles = M.tileGrid(h, w, tile);
  const memory = M.exactDecodeMemory(h, w, tile);
  const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  const where = value(node, "layer_memory");
  const layers = where === "vae device" ? `layers ${gib(memory.stateBytes)} on the GPU`
    : `layers ${gib(memory.stateBytes)} in RAM${where === "auto" ? " (on the GPU if free there)" : ""}`;
  return {
    lines: [`${w}x${h} px: ${grid(tiles)} = ${tiles[0] * tiles[1]} tiles of ${tile} px at full resolution`,
      `bf16: ${layers}; tiles at most ${gib(memory.tileBytes)} on the GPU + weights`],
    data: { size, tiles, memory },
  };
}

// Sizes from the node's own width/height widgets (Stable Cascade's 42.67 px per StageC latent px).
function ultrapixelInfo(node) {
  const [h, w] = [value(node, "height"), value(node, "width")];
  if (!h || !w) return { lines: [], data: {} };
  const lrPx = M.ultrapixelLrPixels(h, w);
  const lr = M.cascadeLatent(...lrPx), hr = M.cascadeLatent(h, w);
  const tier = M.ultrapixelTier(hr[0] * hr[1]);
  return {
    lines: [`LR latent ${lr[1]}x${lr[0]} (${lrPx[1]}x${lrPx[0]} px, ${lr[0] * lr[1]} tokens of 1024)`,
      `HR latent ${hr[1]}x${hr[0]}, up-path guide weight ${tier}`],
    data: { lr, hr, tier },
  };
}

export function nodeInfo(node) {
  if (node.type === "UltraResExactVAEDecode") return exactDecodeInfo(node);
  if (node.type === "UltraResUltraPixelLRPass") return ultrapixelInfo(node);
  const { sampler, size } = samplerLatent(node);
  if (!size) return { lines: [sampler ? "latent size unknown" : "connect it to a sampler to see the plan"], data: {} };
  const chain = modelChain(node);
  switch (node.type) {
    case "UltraResPatchSplit": return patchSplitInfo(node, size, chain, sampler);
    case "UltraResPixelInteraction": return pixelInteractionInfo(node, size, chain);
    case "UltraResRedilateModel": return redilateInfo(node, size, chain, sampler);
    case "UltraResNoiseDampedCFG": return noiseDampedInfo(node, size, chain, sampler);
    case "UltraResLRConditionInjector": return lrInjectorInfo(node, size);
    case "UltraResURAEFlux": return uraeInfo(node, size);
    case "UltraResPASDTiledSampling": return pasdTilesInfo(node, size);
  }
  return { lines: [], data: {} };
}

// ---- drawing ----

function refresh(node) {
  try {
    node.ultraresInfo = nodeInfo(node);
  } catch (error) { // a graph shape we did not foresee must never break the canvas
    node.ultraresInfo = { lines: [], data: {}, error: String(error) };
  }
  return node.ultraresInfo;
}

function addInfoPanel(nodeType) {
  const computeSize = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function (...args) {
    const size = computeSize.apply(this, args);
    const lines = this.ultraresInfo?.lines.length ?? 1;
    return [size[0], size[1] + lines * LINE_HEIGHT + 6];
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
    onDrawForeground?.call(this, ctx, ...rest);
    if (this.flags?.collapsed) return;
    const { lines } = refresh(this);
    ctx.save();
    ctx.font = "11px sans-serif";
    // Grow the node to fit the text (never shrink it: the user may have sized it).
    const width = Math.max(0, ...lines.map((line) => ctx.measureText(line).width)) + 16;
    const height = this.computeSize()[1];
    if (this.size[0] < width || this.size[1] < height) {
      this.setSize([Math.max(this.size[0], width), Math.max(this.size[1], height)]);
    }
    ctx.fillStyle = "#9fd3ff";
    lines.forEach((line, i) => ctx.fillText(line, 8, this.size[1] - (lines.length - i) * LINE_HEIGHT + 4));
    ctx.restore();
  };
}

// ---- size presets ----

// 16 px for FLUX/SD3-style latents (2x2 patches), 64 px for SD UNets.
export function sizeMultiple(node) {
  return /SD3|Flux|Chroma|Hunyuan|Mochi|LTXV|Cosmos/i.test(node.type) ? 16 : 64;
}

function setSize(node, width, height) {
  for (const [name, v] of [["width", width], ["height", height]]) {
    const w = widget(node, name);
    w.value = v;
    w.callback?.(v, app.canvas, node);
  }
  node.setDirtyCanvas?.(true, true);
}

function presetMenu(node) {
  if (!widget(node, "width") || !widget(node, "height") || !/Latent/.test(node.type)) return [];
  const multiple = sizeMultiple(node);
  const options = M.presetsFor(multiple).map(([w, h]) => ({
    content: `${w} x ${h}`,
    callback: () => setSize(node, w, h),
  }));
  return [{ content: `UltraRes size (multiples of ${multiple} px)`, has_submenu: true, submenu: { options } }];
}

app.registerExtension({
  name: "UltraRes.SizeInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (INFO_NODES.has(nodeData.name)) addInfoPanel(nodeType);
  },
  getNodeMenuItems(node) {
    return presetMenu(node);
  },
});
