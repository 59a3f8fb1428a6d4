"""The Ray executor (pipeline.inference.ray_runner) and the batch CLI (jobs/segment_slides.py).

The Ray path must write stores bit-identical to the in-process reference ``segment_slide`` on CPU in
float32. Both sides run torch with one intra-op thread (the actors get ``cpus_per_actor=1`` thread): with
other thread counts a handful of uint8 probabilities can round the other way (labels stay the same).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import SEGMENT_SLIDES, assert_same_results, run_job, shared_file, torch_threads, varied_unet
from pipeline.inference.report import read_run_report
from pipeline.inference.engine import plan_slide, run_tiles, segment_slide
from pipeline.inference.ray_runner import RayOptions
from pipeline.inference.tile_batches import ShardActor
from pipeline.inference.scheduler import check_plans, pick_slide, segment_slides_ray
from pipeline.store.output_store import read_provenance
from pipeline.text import one_line
from pipeline.inference.report import expand_slide_inputs, failed_result, format_table, output_path_for

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "jobs" / "segment_slides.py"
SEED = 3


@pytest.fixture(scope="module")
def model():
    return varied_unet(SEED)


@pytest.fixture(scope="module")
def references(model, tmp_path_factory):
    """segment_slide outputs, one thread: {name: store path} for the slides the Ray tests run."""
    root = tmp_path_factory.mktemp("reference")
    slides = {
        "cmu": (shared_file("slides/cmu-1-small-region.svs"), 0, True),
        "small": (shared_file("slides/small-16px.svs"), 0, False),
        "boxes": (shared_file("slides/boxes-generic.tiff"), 1, False),
    }
    out = {}
    with torch_threads(1):
        for name, (path, level, probabilities) in slides.items():
            out[name] = root / f"{name}.zarr"
            segment_slide(path, out[name], model, tile_size=256, level=level, probabilities=probabilities)
    return out


# --------------------------------------------------------------------------- Ray path == reference
@pytest.mark.slow
def test_ray_matches_segment_slide_on_real_slide(ray_local, model, references, tmp_path):
    labels = zarr.open_array(f"{references['cmu']}/labels/segmentation/0", mode="r")[...]
    assert (np.bincount(labels.ravel(), minlength=3) > 0.01 * labels.size).sum() >= 2, "near-constant output"
    plan = plan_slide(shared_file("slides/cmu-1-small-region.svs"), tmp_path / "cmu.zarr", model, tile_size=256,
                      probabilities=True)  # fmt: skip
    [result] = segment_slides_ray([plan], model, actors=1, batch_size=4, progress=False)
    assert result.status == "complete", result.status
    assert result.tiles_run == result.tiles_total == len(plan.grid) == 108
    assert 0 < result.model_seconds < result.seconds  # summed from the actor's timed forward passes
    assert_same_results(tmp_path / "cmu.zarr", references["cmu"], probabilities=True)


@pytest.mark.slow
def test_reads_in_their_own_cpu_tasks_give_the_same_store(ray_local, model, references, tmp_path):
    """The GPU actors' layout (reads as CPU tasks beside the actor pool), run here with a CPU actor."""
    plan = plan_slide(shared_file("slides/cmu-1-small-region.svs"), tmp_path / "cmu.zarr", model, tile_size=256,
                      probabilities=True)  # fmt: skip
    options = RayOptions(actors=1, batch_size=4, progress=False, read_tasks=True)
    assert not options.reads_in_actor and RayOptions().reads_in_actor
    assert not RayOptions(gpus_per_actor=1).reads_in_actor  # auto: GPU actors get read tasks
    [result] = segment_slides_ray([plan], model, options)
    assert result.status == "complete", result.status
    assert result.tiles_run == 108 and 0 < result.model_seconds < result.seconds
    assert_same_results(tmp_path / "cmu.zarr", references["cmu"], probabilities=True)


@pytest.mark.slow
def test_ray_job_at_non_integer_levels_stores_the_whole_level_answer(ray_local, non_integer_slide, tmp_path):
    """Levels 1 and 2 of the built slide (downsamples 2.0019 and 4.0047) in one Ray run: each store holds
    the argmax of one forward pass over the whole level (read by OpenSlide from its origin)."""
    from test_exactness import assert_labels_are_the_argmax
    from test_pyramid import whole_level_by_openslide

    from pipeline.inference.predict import whole_image_logits

    wholes = {level: whole_level_by_openslide(non_integer_slide, level) for level in (1, 2)}
    model = varied_unet(SEED, calibrate=wholes[1])
    plans = [plan_slide(non_integer_slide, tmp_path / f"l{level}.zarr", model, tile_size=128, level=level)
             for level in wholes]  # fmt: skip
    results = segment_slides_ray(plans, model, RayOptions(actors=1, batch_size=4, progress=False))
    assert [r.status for r in results] == ["complete"] * 2 and [r.level for r in results] == [1, 2]
    for level, whole in wholes.items():
        labels = zarr.open_array(f"{tmp_path}/l{level}.zarr/labels/segmentation/0", mode="r")[...]
        assert_labels_are_the_argmax(labels, whole_image_logits(model, whole))


@pytest.mark.slow
def test_several_slides_share_one_pool(ray_local, model, references, tmp_path):
    plans = [
        plan_slide(shared_file("slides/cmu-1-small-region.svs"), tmp_path / "cmu.zarr", model, tile_size=256),
        plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "small.zarr", model, tile_size=256),
        plan_slide(shared_file("slides/boxes-generic.tiff"), tmp_path / "boxes.zarr", model, tile_size=256, level=1),
    ]
    results = segment_slides_ray(plans, model, RayOptions(actors=1, batch_size=3, progress=True))
    assert [r.status for r in results] == ["complete"] * 3
    assert [r.output for r in results] == [str(tmp_path / f"{n}.zarr") for n in ("cmu", "small", "boxes")]
    assert results[2].level == 1 and results[2].shape == (125, 150)
    for name in ("cmu", "small", "boxes"):
        assert_same_results(tmp_path / f"{name}.zarr", references[name])


@pytest.mark.slow
def test_bad_slide_fails_alone(ray_local, model, references, tmp_path):
    plans = [
        plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "small.zarr", model, tile_size=256),
        plan_slide(shared_file("slides/bad/unreadable.svs"), tmp_path / "bad.zarr", model, tile_size=256),
        plan_slide(shared_file("slides/boxes-generic.tiff"), tmp_path / "boxes.zarr", model, tile_size=256, level=1),
        plan_slide(shared_file("slides/boxes-generic.tiff"), tmp_path / "gone.zarr", model, tile_size=256),
    ]
    shutil.rmtree(tmp_path / "gone.zarr")  # its writes fail
    good, bad, boxes, gone = segment_slides_ray(plans, model, progress=False)
    assert gone.status.startswith(f"failed: writing {tmp_path / 'gone.zarr'}: ") and "\n" not in gone.status, gone.status
    assert bad.status.startswith("failed: ") and "\n" not in bad.status, bad.status
    assert bad.tiles_run == 0
    assert read_provenance(tmp_path / "bad.zarr")["status"] == "running"  # never finalized
    assert good.status == boxes.status == "complete"
    assert_same_results(tmp_path / "small.zarr", references["small"])
    assert_same_results(tmp_path / "boxes.zarr", references["boxes"])


def _explode(module, inputs):
    raise RuntimeError("simulated device failure\nsecond line")


@pytest.mark.slow
def test_pipeline_failure_fails_unfinished_slides(ray_local, tmp_path):
    """An error outside the per-tile catches (here: every forward pass raises) fails the slides left, on one
    line each, and finalizes none of them."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels to the actor by value
    broken = varied_unet(SEED)
    broken.register_forward_pre_hook(_explode)
    slide = shared_file("slides/small-16px.svs")
    plans = [plan_slide(slide, tmp_path / f"{n}.zarr", broken, tile_size=256) for n in "ab"]
    results = segment_slides_ray(plans, broken, progress=False)
    for result, name in zip(results, "ab"):
        assert result.status.startswith("failed: ") and "simulated device failure" in result.status, result.status
        assert "\n" not in result.status and "second line" not in result.status
        assert read_provenance(tmp_path / f"{name}.zarr")["status"] == "running"


def test_nothing_to_run_finalizes_without_ray(model, tmp_path):
    """A resumed store whose tiles are all done is just finalized (no Ray needed)."""
    with torch_threads(1):
        segment_slide(shared_file("slides/small-16px.svs"), tmp_path / "s.zarr", model, tile_size=256)
    plan = plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "s.zarr", model, tile_size=256, resume=True)
    assert plan.shards == [] and plan.already_done == 1
    [result] = segment_slides_ray([plan], model, progress=False)
    assert result.status == "complete" and result.tiles_run == 0


# --------------------------------------------------------------------------- pieces without Ray
def test_slots_go_to_the_oldest_slide_but_never_all_of_them_while_another_waits():
    assert pick_slide([(0, 0)], slots=4) == 0
    assert pick_slide([(3, 7)], slots=8) == 3  # alone: it may take every slot
    assert pick_slide([(0, 1), (1, 0)], slots=4) == 0  # oldest first
    assert pick_slide([(0, 2), (1, 0), (2, 0)], slots=4) == 1  # a giant slide holds half: the next one gets it
    assert pick_slide([(0, 2), (1, 2)], slots=4) == 0  # all at the cap: oldest (the run has no slot left anyway)


def test_plans_share_geometry_and_model_and_options_are_checked(model, tmp_path):
    big = plan_slide(shared_file("slides/cmu-1-small-region.svs"), tmp_path / "a.zarr", model, tile_size=128,
                     shard_tiles=4)  # fmt: skip
    small = plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "b.zarr", model, tile_size=256)
    assert big.tiles_to_run == len(big.grid) and len(big.shards) == big.grid.shard_rows * big.grid.shard_cols
    assert sorted((t.row, t.col) for s in big.shards for t in s.tiles) == sorted((t.row, t.col) for t in big.grid)
    other = plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "c.zarr", model, tile_size=128)
    with pytest.raises(ValueError, match="same tile geometry"):
        check_plans([small, other], model)
    with pytest.raises(ValueError, match="planned for another model"):
        check_plans([small], varied_unet(SEED, depth=2))
    assert small.probabilities is False and small.model_checksum.startswith("weights:")  # the plan carries both
    with pytest.raises(ValueError, match="amp must be one of"):
        RayOptions(amp="fp8")
    with pytest.raises(TypeError, match="unknown option"):
        segment_slides_ray([small], model, gpus=1)


class _Recorder:
    """Wraps a callable; records (start, end) of each call and the most calls ever running at once."""

    def __init__(self, inner):
        self.inner, self.spans, self.running, self.most = inner, [], 0, 0
        self.guard = threading.Lock()

    def __getattr__(self, name):  # everything but the call is the wrapped object's (busy_seconds, ...)
        return getattr(self.inner, name)

    def __call__(self, *args):
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        started = time.perf_counter()
        try:
            time.sleep(0.02)  # widen the window in which a second call could slip in
            return self.inner(*args)
        finally:
            with self.guard:
                self.running -= 1
            self.spans.append((started, time.perf_counter()))


def test_a_cpu_actor_runs_two_shards_at_once_but_one_forward_pass_at_a_time(model, tmp_path):
    """Two calls in flight on one actor: each reads and writes its own shard, forward passes never overlap, a
    shard is cut into forward batches of ``batch_size``, and the store equals the in-process engine's."""
    image = shared_file("slides/cmu-1-small-region.svs")
    plan = plan_slide(image, tmp_path / "a.zarr", model, tile_size=128, shard_tiles=3, tissue_mask=None)
    actor = ShardActor(model, 128, "cpu", None, False, False, batch_size=4, threads=1)
    forward = actor.predictor = _Recorder(actor.predictor)
    shards = plan.shards[:2]  # 9 tiles each: forward batches of 4, 4 and 1
    outcomes = [None, None]

    def call(k):
        outcomes[k] = actor.run(plan, shards[k])

    with torch_threads(1):
        threads = [threading.Thread(target=call, args=(k,)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reference = plan_slide(image, tmp_path / "b.zarr", model, tile_size=128, shard_tiles=3, tissue_mask=None)
        run_tiles(reference, model, 4, device="cpu")
    assert [o.error for o in outcomes] == [None, None] and [o.tiles for o in outcomes] == [9, 9]
    assert forward.most == 1, "two forward passes ran at once"
    assert len(forward.spans) == 6
    done, want = zarr.open_array(f"{tmp_path}/a.zarr/labels/segmentation/0")[...], \
        zarr.open_array(f"{tmp_path}/b.zarr/labels/segmentation/0")[...]  # fmt: skip
    assert np.array_equal(done[:384, :768], want[:384, :768])


def test_report_helpers(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.svs", "b.tiff", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"")
    (tmp_path / "in" / "c.zarr").mkdir()
    out = tmp_path / "in" / "out"
    (out / "old.zarr").mkdir(parents=True)
    slides, problems = expand_slide_inputs(
        [str(tmp_path / "in"), str(tmp_path / "in" / "*.svs"), str(tmp_path / "missing.svs"), str(out / "*.zarr"),
         str(tmp_path / "in" / "*.ndpi")],
        exclude=out,
    )  # fmt: skip
    assert [p.name for p in slides] == ["a.svs", "b.tiff", "c.zarr"]  # no duplicates, nothing from the output
    assert [reason.split(": ", 1)[1][:24] for _, reason in problems] == [
        "no such slide file or di", "inside the output folder", "no slides match this pat"]  # outputs named as input: said
    assert output_path_for("x/y/slide-1.svs", "o") == Path("o/slide-1.zarr")
    failed = failed_result("x.svs", "-", "x.svs: no such\nfile")
    assert failed.status == "failed: x.svs: no such file"
    table = format_table([failed])
    assert "x.svs" in table and "failed: x.svs: no such file" in table and len(table.splitlines()) == 3
    assert one_line(RuntimeError("first\nsecond")) == "RuntimeError: first"


def test_the_table_rates_only_this_runs_work_and_shows_kept_outputs_as_kept():
    from pipeline.inference.engine import SegmentResult

    fresh = SegmentResult("a.svs", "a.zarr", (1000, 2000), 0, 0.5, tiles_total=40, tiles_run=30, tiles_skipped=10,
                          seconds=4.0)  # fmt: skip
    resumed = SegmentResult("b.svs", "b.zarr", (1000, 2000), 0, 0.5, tiles_total=40, tiles_run=6, tiles_skipped=10,
                            seconds=1.0, tiles_done_earlier=24)  # fmt: skip
    kept = SegmentResult("c.svs", "c.zarr", (1000, 2000), 0, 0.5, tiles_total=40, tiles_run=0, tiles_skipped=10,
                         seconds=0.01, kept=True)  # fmt: skip
    assert fresh.megapixels_per_second == pytest.approx(0.5)  # the slide's 2 Mpx in 4 s
    assert resumed.megapixels_per_second == pytest.approx(0.4)  # 6 of its 30 tiles to run: 0.4 Mpx in 1 s
    assert kept.megapixels_per_second is None and kept.to_dict()["mpx_per_s"] is None
    rows = {line.split()[0]: line.split() for line in format_table([fresh, resumed, kept]).splitlines()[2:]}
    assert rows["a.svs"][3:7] == ["30/10", "-", "4.0", "0.50"]
    assert rows["b.svs"][3:8] == ["6/10", "24", "earlier", "1.0", "0.40"]
    assert rows["c.svs"][3:7] == ["-", "kept", "0.0", "kept"]


# --------------------------------------------------------------------------- the CLI
def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_job(*args, timeout=timeout)


def test_cli_help_mentions_every_option():
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--out", "--model", "--level", "--tile-size", "--batch-size", "--actors", "--gpus-per-actor",
                   "--amp", "--compile", "--read-tasks", "--probabilities", "--overwrite", "resumes", "--address",
                   "--no-tissue-mask", "--tissue-mask", "--num-cpus", "bf16", "fp16", "off"):  # fmt: skip
        assert option in done.stdout, option


def test_cli_compile_and_forward_tiles_reach_the_actors_options():
    """``--compile`` alone means on, ``auto`` stays a policy for the actors, off is the default; ``--forward-tiles``
    and bad values of both are refused before any slide is touched."""
    sys.path.insert(0, str(SEGMENT_SLIDES.parent))
    import segment_slides

    parser, model = segment_slides.build_parser(), varied_unet()
    options = {args: segment_slides.options_from(parser.parse_args(["s.svs", "--out", "o", *args]), model)[1]
               for args in [(), ("--compile",), ("--compile", "auto"), ("--forward-tiles", "1")]}  # fmt: skip
    assert options[()].compile is False and options[()].forward_tiles is None
    assert options[("--compile",)].compile is True and options[("--compile", "auto")].compile == "auto"
    assert options[("--forward-tiles", "1")].forward_tiles == 1
    with pytest.raises(ValueError, match="forward_tiles"):
        RayOptions(forward_tiles=0)
    with pytest.raises(ValueError, match="compile"):
        RayOptions(compile="sometimes")


@pytest.mark.slow
def test_cli_usage_errors_exit_2(model, tmp_path):
    from unet import save_model

    artifact = save_model(model, tmp_path / "model.pt")
    slide = str(shared_file("slides/small-16px.svs"))
    done = run_cli(slide, "--out", str(tmp_path / "o"), "--model", str(artifact), "--tile-size", "100", timeout=60)
    assert done.returncode == 2 and "not a multiple of the model's alignment" in done.stderr, done.stderr
    done = run_cli(slide, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none.pt"), timeout=60)
    assert done.returncode == 2 and "model file not found" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_end_to_end(model, tmp_path):
    from unet import save_model

    artifact = save_model(model, tmp_path / "model.pt")
    slide = shared_file("slides/small-16px.svs")
    out = tmp_path / "out"
    missing = tmp_path / "missing.svs"
    done = run_cli(str(slide), str(missing), "--out", str(out), "--model", str(artifact), "--no-tissue-mask",
                   "--num-cpus", "2", "--no-progress", "--threads-per-actor", "1")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "missing.svs" in line]
    assert len(lines) == 1 and lines[0].startswith("ERROR ")
    assert lines[0].endswith(f": {missing}: no such slide file or directory; check the path")
    store = out / "small-16px.zarr"
    assert read_provenance(store)["status"] == "complete"
    report = read_run_report(out)
    summary = report["summary"]
    assert (summary["slides"], summary["complete"], summary["failed"], summary["resumed"], summary["kept"]) == (2, 1, 1, [], [])
    assert summary["failures"] == [{"slide": str(missing), "reason": f"{missing}: no such slide file or directory; check the path"}]
    by_name = {Path(s["slide"]).name: s for s in report["slides"]}
    assert by_name["small-16px.svs"]["status"] == "complete" and by_name["small-16px.svs"]["tiles_run"] == 1
    assert by_name["missing.svs"]["status"].startswith("failed: ")
    assert report["settings"]["model_checksum"] == model_checksum(artifact)
    assert "small-16px.svs" in done.stdout and "complete" in done.stdout  # the table
    for noise in ("Token authentication", "constructor arguments in the object store", "Traceback"):
        assert noise not in done.stderr, done.stderr  # Ray's start-up notices stay hidden without --verbose
    assert (out / "small-16px.png").stat().st_size > 0  # the preview
    with torch_threads(1):  # the job's precision (--amp auto), its actor's one thread
        segment_slide(slide, tmp_path / "ref.zarr", artifact, tile_size=256, amp="auto")
    assert_same_results(store, tmp_path / "ref.zarr")

    # The same command again: the complete store is kept untouched and reported as kept.
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    again = run_cli(str(slide), "--out", str(out), "--model", str(artifact), "--no-tissue-mask", "--num-cpus", "2")
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and "complete" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    summary = read_run_report(out)["summary"]
    assert summary["kept"] == [str(slide)] and summary["resumed"] == []

    # Another model on the same output: refused with a clear reason, the store untouched.
    other = save_model(varied_unet(SEED + 1), tmp_path / "other.pt")
    refused = run_cli(str(slide), "--out", str(out), "--model", str(other), "--no-tissue-mask", "--num-cpus", "2")
    assert refused.returncode == 1
    assert "other settings (model_checksum)" in refused.stderr and "--overwrite" in refused.stderr, refused.stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    assert read_provenance(store)["status"] == "complete"


def model_checksum(path) -> str:
    from unet.artifact import file_sha256

    return file_sha256(path)


def test_a_pool_that_takes_every_cpu_is_refused_not_hung(ray_local, model, tmp_path):
    plan = plan_slide(shared_file("slides/small-16px.svs"), tmp_path / "o.zarr", model, tile_size=256)
    (result,) = segment_slides_ray([plan], model, actors=2, cpus_per_actor=1.0, progress=False)  # ray_local has 2
    assert result.status.startswith("failed: ") and "leaving none to read and write tiles" in result.status


def test_a_rerun_keeps_complete_outputs_from_their_metadata_alone_without_ray(model, tmp_path, monkeypatch):
    """Complete outputs made with the same settings cost a metadata read each: no plan, no task, no Ray."""
    import tifffile

    from pipeline.inference import batch as batch_module
    from pipeline.inference.batch import BatchConfig, segment_batch

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.full((300, 200, 3), 200, np.uint8), photometric="rgb")
    slides = [shared_file("slides/small-16px.svs"), plain]
    out = tmp_path / "out"
    for slide in slides:  # what an earlier run left: complete stores with the batch's settings
        segment_slide(slide, output_path_for(slide, out), model, tile_size=256, tissue_mask=True)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for outputs that are complete")

    monkeypatch.setattr(batch_module, "init_ray", no_ray)
    run = segment_batch([str(s) for s in slides], out, model, BatchConfig(tile_size=256, previews=False),
                        RayOptions(progress=False))  # fmt: skip
    assert not run.failed and [r.kept for r in run.results] == [True, True]
    assert read_run_report(run.report)["summary"]["kept"] == [str(s) for s in slides]
    changed = segment_batch([str(plain)], out, model, BatchConfig(tile_size=128, previews=False),
                            RayOptions(progress=False))  # other settings: planned (here: Ray refused)  # fmt: skip
    assert changed.failed and "Ray was started" in changed.results[0].error


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_exits_130_without_a_traceback(model, tmp_path):
    import signal

    from conftest import kill_session, start_job
    from unet import save_model

    artifact = save_model(model, tmp_path / "model.pt")
    out = tmp_path / "out"
    # Ctrl-C at a terminal: SIGINT at its default disposition in the job, even when this test session was started
    # in the background of a script (which leaves SIGINT ignored, and Python keeps an ignored SIGINT ignored)
    job = start_job(str(shared_file("slides/cmu-1-small-region.svs")), "--out", str(out), "--model", str(artifact),
                    "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / "cmu-1-small-region.zarr").exists() and time.time() < deadline:
            time.sleep(0.1)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=120)
    finally:
        kill_session(job.pid)
    assert job.returncode == 130, err
    assert "interrupted: rerun the same command to resume" in err and "Traceback" not in err, err
    assert read_provenance(out / "cmu-1-small-region.zarr")["status"] != "complete"
