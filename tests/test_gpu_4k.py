"""The GPU timing script's CPU mode (tests/bench/gpu_4k.py --cpu): the same chains, samplers and
bookkeeping on tiny models, so the script stays working between the times a GPU is lent."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent / "bench"))

import chains  # noqa: E402
import gpu_4k  # noqa: E402


def test_stratified_steps_cover_the_schedule():
    assert gpu_4k.stratified(50, 3) == [8, 8, 25, 41]  # warm-up, then one step per third
    assert gpu_4k.stratified(2, 5) == [0, 0, 1]


def test_cpu_mode_runs_every_sdxl_and_flux_workflow(tmp_path):
    out = tmp_path / "gpu_4k.json"
    report = gpu_4k.main(["--cpu", "--steps", "1", "--sizes", "2048x4096", "--json", str(out)])
    expected = {w for w, s in chains.workflows().items() if s[-1].arch in gpu_4k.FAMILIES}
    assert {r["workflow"] for r in report["results"]} == expected and out.is_file()
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["s_per_image"] > 0 and all(s["finite"] and s["timed_steps"] == 1 for s in r["samplers"])
    lr = next(r for r in report["results"] if r["workflow"] == "sdxl_4096_lr_guided")
    # the LR passes keep the target's aspect ratio (the injector refuses a guide of another one)
    assert [s["sampler"].split()[-1] for s in lr["samplers"]] == ["512x1024", "1024x2048", "2048x4096"]
