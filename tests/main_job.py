"""The main job: a bundled 4x workflow queued headless through a real ComfyUI server.

  bash tests/main_job.sh [--out out/main_job] [--batch 4] [--sdxl /path/to/sdxl_checkpoint.safetensors]

Toy world (default): the bundled toy-world workflow at 4x (1024x1024 px from a 256 px model) has
one branch per method, each ending in its own SaveImage. Each branch is queued with the pack's
headless client (client.py) as its own prompt (the graph pruned to that output), so its wall time
is its own. The pictures are saved side by
side (columns = methods, rows = pictures of the batch) and each is read by the toy-world object
counter: repetition rate, clean-picture rate, seconds per picture.

With --sdxl the real SDXL 4096x4096 workflow is queued instead, on that checkpoint (linked into the
server's private model folder); its output and wall time are reported (no counter: it is a real
picture).
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from comfy_server import ComfyServer  # noqa: E402
from host import REPO  # noqa: E402
from toy_world import measure  # noqa: E402
from ultrares import client  # noqa: E402

TOY_WORKFLOW = REPO / "workflows" / "api" / "toy_world_4x_compare.json"
SDXL_WORKFLOW = REPO / "workflows" / "api" / "sdxl_4096_redilate_ndcfg.json"  # the method that measured best here
NATIVE_PX = 256  # the toy world's native picture side (32 latent px)


def upstream(graph: dict, output_id: str) -> dict:
    """The sub-graph that output node needs: itself and every node it reads from."""
    keep, todo = set(), [output_id]
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        todo.extend(v[0] for v in graph[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and str(v[0]) in graph)
    return {nid: graph[nid] for nid in graph if nid in keep}


def label(graph: dict, nid: str) -> str:
    spec = graph[nid]
    return spec["inputs"].get("filename_prefix") or spec.get("_meta", {}).get("title") or nid


def side_by_side(columns: dict[str, list[pathlib.Path]], path: pathlib.Path, cell: int = 256) -> None:
    rows = max(len(v) for v in columns.values())
    sheet = Image.new("RGB", (cell * len(columns), 20 + cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, files) in enumerate(columns.items()):
        draw.text((c * cell + 4, 4), name, fill="black")
        for r, f in enumerate(files):
            with Image.open(f) as im:
                sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, 20 + r * cell))
    sheet.save(path)


def toy_job(server: ComfyServer, out: pathlib.Path, batch: int) -> dict:
    graph = json.loads(TOY_WORKFLOW.read_text())
    results, columns = {}, {}
    for nid in [n for n, s in graph.items() if s["class_type"] == "SaveImage"]:
        name = label(graph, nid)
        start = time.perf_counter()
        files = client.run_workflow(upstream(graph, nid), server.url, overrides=[f"*.batch_size={batch}"],
                                    out_dir=out, on_event=None)["files"]
        seconds = time.perf_counter() - start
        pictures = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
        scale = max(1, pictures[0].shape[1] // NATIVE_PX)  # the reader's edge band grows with the picture
        figures = measure.summary(measure.read_images(np.stack(pictures), scale=scale))
        figures.update(sec_per_image=seconds / len(files), pictures=len(files), size=list(Image.open(files[0]).size))
        results[name], columns[name] = figures, files
        print(f"{name}: {len(files)} pictures {figures['size'][0]}x{figures['size'][1]}, repetition "
              f"{figures['repetition_rate']:.2f}, clean {figures['clean_rate']:.2f}, {figures['sec_per_image']:.1f} s/picture", flush=True)
    side_by_side(columns, out / "side_by_side.png")
    return results


def sdxl_job(server: ComfyServer, out: pathlib.Path, checkpoint: pathlib.Path) -> dict:
    link = server.base / "models" / "checkpoints" / checkpoint.name
    if not link.exists():
        link.symlink_to(checkpoint.resolve())
    start = time.perf_counter()
    files = client.run_workflow(SDXL_WORKFLOW, server.url, overrides=[f"*.ckpt_name={checkpoint.name}"], out_dir=out)["files"]
    seconds = time.perf_counter() - start
    print(f"{SDXL_WORKFLOW.name}: {len(files)} picture(s) in {seconds:.0f} s -> {out}")
    return {SDXL_WORKFLOW.stem: {"seconds": seconds, "files": [f.name for f in files]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=REPO / "out" / "main_job")
    p.add_argument("--batch", type=int, default=4, help="toy world: pictures per method")
    p.add_argument("--sdxl", type=pathlib.Path, help="an SDXL checkpoint: queue the real 4K workflow on it instead")
    args = p.parse_args(argv)
    if args.sdxl and not args.sdxl.is_file():
        p.error(f"--sdxl {args.sdxl}: no such checkpoint file")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "server"
    shutil.rmtree(base, ignore_errors=True)
    with ComfyServer(base, cpu=not args.sdxl) as server:
        try:
            results = sdxl_job(server, args.out, args.sdxl) if args.sdxl else toy_job(server, args.out, args.batch)
        except client.ClientError as e:  # unreachable, invalid graph, failed or interrupted run: say which
            raise SystemExit(f"main job: {e}") from None
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.sdxl:
        print(f"\nside by side: {args.out / 'side_by_side.png'}\n\n| branch | repetition | clean | objects | size ratio | s/picture |\n|---|---|---|---|---|---|")
        for name, f in results.items():
            print(f"| {name} | {f['repetition_rate']:.2f} | {f['clean_rate']:.2f} | {f['mean_objects']:.2f} | "
                  f"{f['size_ratio']:.2f} | {f['sec_per_image']:.1f} |")
    return results


if __name__ == "__main__":
    main()
