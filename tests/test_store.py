"""The OME-Zarr output: layout, metadata, readers, one writer per chunk, overwrite and resume rules."""

import json

import dask.array as da
import numpy as np
import pytest
import zarr

from conftest import random_image, varied_unet
from pipeline import OutputExistsError, open_labels, segment_slide, tile_grid_for_model
from pipeline.inference.engine import plan_slide
from pipeline.store.label_pyramid import build_pyramid, pyramid_shapes
from pipeline.store.output_store import TILE_DONE


@pytest.fixture
def result_path(tmp_path):
    path = tmp_path / "slide.zarr"
    segment_slide(random_image(700, 520), path, varied_unet(), tile_size=128, probabilities=True, mpp=0.5)
    return path


def test_store_opens_with_ome_zarr_reader_and_dask(result_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    node = next(iter(Reader(parse_url(result_path / "labels" / "segmentation"))()))
    assert any(isinstance(spec, Label) for spec in node.specs)
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    assert [tuple(d.shape) for d in node.data] == [(700, 520), (350, 260), (175, 130), (88, 65)]
    labels = da.from_zarr(str(result_path / "labels" / "segmentation" / "0"))
    assert labels.shape == (700, 520) and labels.dtype == np.uint8
    assert (labels[::2, ::2].compute() == open_labels(result_path, 1)[...]).all()


@pytest.mark.parametrize("threads", [1, 4])
def test_every_pyramid_level_is_every_other_pixel_of_the_level_below(result_path, threads):
    """Odd sides (175 -> 88) and shards that end inside the level: the pyramid is exactly level[::2, ::2]."""
    levels = zarr.open_group(str(result_path / "labels" / "segmentation"), mode="r+")
    for level in range(1, 4):
        levels[str(level)][...] = 7  # anything build_pyramid fails to overwrite shows
    build_pyramid(result_path, threads=threads)
    expected = open_labels(result_path, 0)[...]
    for level in range(1, 4):
        expected = expected[::2, ::2]
        assert np.array_equal(open_labels(result_path, level)[...], expected), f"level {level}"


def test_result_says_how_much_of_the_run_the_model_was_busy(tmp_path):
    result = segment_slide(random_image(300, 260), tmp_path / "s.zarr", varied_unet(), tile_size=64)
    assert 0 < result.model_seconds < result.seconds
    assert result.to_dict()["model_busy"] == round(result.model_seconds / result.seconds, 4)


@pytest.mark.parametrize("compressors", ["auto", None])
def test_done_shards_read_from_the_chunk_files_equal_zarrs_reading(tmp_path, compressors):
    from pipeline.store.shard_state import DONE_PATH, read_done_shards

    expected = np.random.default_rng(0).integers(0, 2, (13, 17)).astype(np.uint8)  # 0 = not done: no chunk file
    array = zarr.create_array(str(tmp_path / "s.zarr" / DONE_PATH), shape=expected.shape, chunks=(1, 1),
                              dtype="uint8", fill_value=0, compressors=compressors)  # fmt: skip
    array[...] = expected
    (tmp_path / "s.zarr" / DONE_PATH / "c" / "3" / "4.partial").write_bytes(b"junk")  # a temp file is skipped
    done = read_done_shards(tmp_path / "s.zarr")
    assert np.array_equal(done, expected == 1)
    stored = [p for p in (tmp_path / "s.zarr" / DONE_PATH / "c").rglob("*") if p.is_file() and p.name.isdigit()]
    assert len(stored) == int(expected.sum())  # shards not done have no file


def test_a_tile_is_done_with_its_shard_and_skipped_without_tissue():
    from pipeline.store.shard_state import TILE_PENDING, TILE_SKIPPED, tile_states

    tissue = np.ones((5, 7), bool)
    tissue[4, :] = False
    done = np.array([[True, False, False, True], [False, False, False, False], [False, True, False, False]])
    states = tile_states(tissue, done, shard_tiles=2)
    assert (states[:2, :2] == TILE_DONE).all() and (states[:2, 6] == TILE_DONE).all()
    assert (states[4] == TILE_SKIPPED).all() and states[2, 2] == TILE_PENDING and states[4, 2] == TILE_SKIPPED
    assert int((states == TILE_DONE).sum()) == 4 + 2  # shard (2, 1) is done but its one tile row has no tissue


def test_a_store_has_one_file_per_shard_not_per_tile(tmp_path):
    """A 1024 x 768 slide of 64-px tiles (192 tiles) in shards of 4 x 4 tiles: 12 label shards, 12 done marks."""
    segment_slide(random_image(1024, 768), tmp_path / "s.zarr", varied_unet(), tile_size=64, shard_tiles=4, mpp=0.5)
    level0 = [p for p in (tmp_path / "s.zarr" / "labels" / "segmentation" / "0" / "c").rglob("*") if p.is_file()]
    done = [p for p in (tmp_path / "s.zarr" / "shards" / "done" / "c").rglob("*") if p.is_file()]
    assert len(level0) == len(done) == 12
    labels = zarr.open_array(str(tmp_path / "s.zarr" / "labels" / "segmentation" / "0"), mode="r")
    assert labels.chunks == (64, 64) and labels.shards == (256, 256)  # small inner chunks for viewers


def test_metadata_has_physical_scale_classes_and_provenance(result_path):
    root = zarr.open_group(str(result_path), mode="r")
    ome = dict(root["labels/segmentation"].attrs["ome"])
    datasets = ome["multiscales"][0]["datasets"]
    assert datasets[0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]
    assert ome["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    assert [p["label-value"] for p in ome["image-label"]["properties"]] == [0, 1, 2]
    assert dict(root["labels"].attrs["ome"])["labels"] == ["segmentation"]
    info = dict(root.attrs["wsi_unet"])
    assert info["status"] == "complete" and info["halo"] == 44 and info["tile_size"] == 128
    assert info["model_config"]["depth"] == 3 and "torch" in info["software"]
    json.dumps(info)


def test_probabilities_are_stored_per_class_and_agree_with_labels(result_path):
    probs = zarr.open_array(str(result_path / "probabilities" / "0"), mode="r")[...]
    labels = open_labels(result_path)[...]
    assert probs.shape == (3, 700, 520) and probs.dtype == np.uint8
    assert (np.abs(probs.astype(int).sum(0) - 255) <= 2).all()
    agree = probs.argmax(0) == labels
    assert agree.mean() > 0.99  # only 8-bit rounding ties may differ


def test_every_chunk_is_covered_by_exactly_one_tile():
    model = varied_unet()
    plan_grid = tile_grid_for_model(model, (1000, 700), 256, chunk=128)
    writers = np.zeros((8, 6), dtype=int)
    for tile in plan_grid:
        y0, x0, y1, x1 = tile.box
        assert y0 % 128 == 0 and x0 % 128 == 0
        assert (y1 - y0) % 128 == 0 or y1 == 1000
        writers[y0 // 128 : -(-y1 // 128), x0 // 128 : -(-x1 // 128)] += 1
    assert (writers == 1).all()


def test_existing_output_is_never_silently_overwritten(result_path):
    before = open_labels(result_path)[...].copy()
    with pytest.raises(OutputExistsError, match="slide.zarr: output exists.*overwrite"):
        segment_slide(random_image(700, 520, seed=9), result_path, varied_unet(), tile_size=128)
    assert (open_labels(result_path)[...] == before).all()
    segment_slide(random_image(700, 520, seed=9), result_path, varied_unet(), tile_size=128, overwrite=True)
    assert not (open_labels(result_path)[...] == before).all()


def test_interrupted_store_is_not_complete_and_resume_finishes_it_identically(tmp_path):
    model, image = varied_unet(), random_image(300, 400, seed=4)
    reference = tmp_path / "ref.zarr"
    segment_slide(image, reference, model, tile_size=64, shard_tiles=2)
    partial = tmp_path / "partial.zarr"
    plan = plan_slide(image, partial, model, tile_size=64, shard_tiles=2)
    from pipeline.inference.predict import TilePredictor
    from pipeline.inference.tile_batches import run_shard

    predictor = TilePredictor.for_grid(model, plan.grid, device="cpu")
    first = plan.shards[:3]  # a "crash" after 3 shards (12 tiles)
    for shard in first:
        run_shard(plan, shard, predictor, batch_size=4)
    assert dict(zarr.open_group(str(partial), mode="r").attrs["wsi_unet"])["status"] == "running"
    with pytest.raises(OutputExistsError, match="resume"):
        segment_slide(image, partial, model, tile_size=64, shard_tiles=2)
    result = segment_slide(image, partial, model, tile_size=64, resume=True, shard_tiles=2)
    assert result.tiles_run == result.tiles_total - 12 and result.tiles_done_earlier == 12
    assert (plan.store.tile_states() == TILE_DONE).all()
    assert (open_labels(partial)[...] == open_labels(reference)[...]).all()
    with pytest.raises(OutputExistsError, match="other settings.*tile_size"):
        segment_slide(image, partial, model, tile_size=128, resume=True)


def test_pyramid_stops_when_a_level_fits_one_chunk():
    assert pyramid_shapes((700, 520), 128) == [(700, 520), (350, 260), (175, 130), (88, 65)]
    assert pyramid_shapes((16, 16), 64) == [(16, 16)]


def test_pyramid_levels_written_with_the_shards_and_after_them_are_every_other_pixel(tmp_path):
    """Levels 1-2 come with each level-0 shard (their shards halve its side), level 3 on after the last shard."""
    segment_slide(random_image(1000, 760, seed=5), tmp_path / "s.zarr", varied_unet(), tile_size=64, shard_tiles=4,
                  mpp=0.5)  # fmt: skip
    level0 = open_labels(tmp_path / "s.zarr", 0)[...]
    assert [open_labels(tmp_path / "s.zarr", level).shards for level in range(5)] == [(256, 256), (128, 128), (64, 64),
                                                                                      (256, 256), (256, 256)]
    for level in range(1, 5):
        assert np.array_equal(open_labels(tmp_path / "s.zarr", level)[...], level0[:: 2**level, :: 2**level]), level


def test_provenance_records_the_slides_absolute_path_and_a_relative_rerun_still_resumes(tmp_path, monkeypatch):
    import tifffile

    from pipeline.store.output_store import read_provenance

    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("slide.tif", random_image(200, 150, seed=3), photometric="rgb")
    segment_slide("slide.tif", "out.zarr", varied_unet(), tile_size=64)
    assert read_provenance(tmp_path / "out.zarr")["source"] == str(tmp_path / "slide.tif")
    again = segment_slide("./slide.tif", "out.zarr", varied_unet(), tile_size=64, resume=True)
    assert again.error is None and again.tiles_run == 0  # the same slide: nothing to redo


def test_many_readers_and_writers_as_on_a_gpu_write_the_same_store(tmp_path, monkeypatch):
    """The in-process engine's GPU layout (shards read ahead by several threads, written behind by several),
    run on the CPU: the store equals the one-reader, one-writer run's, file for file."""
    from conftest import assert_identical_stores
    from pipeline.inference import engine

    image, model = random_image(520, 700, seed=9), varied_unet()
    segment_slide(image, tmp_path / "one.zarr", model, tile_size=64, shard_tiles=2)
    monkeypatch.setattr(engine, "engine_threads", lambda device: (3, 2))
    segment_slide(image, tmp_path / "many.zarr", model, tile_size=64, shard_tiles=2)
    assert_identical_stores(tmp_path / "many.zarr", tmp_path / "one.zarr")
