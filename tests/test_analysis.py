"""Slide numbers from result stores equal a whole-array scipy computation exactly, across chunk borders."""

import logging

import numpy as np
import pytest
from analysis_stores import CHUNK, CLASSES, make_store, planted_mask, reference_objects
from instance_stores import AREAS, BOUNDARY_CLASSES, make_instance_store, touching_nuclei
from scipy import ndimage

from pipeline.analysis.summary import (
    AnalysisOptions,
    ResultStoreError,
    find_stores,
    format_table,
    open_store,
    resolve_classes,
    summarize_store,
)  # fmt: skip
from pipeline.analysis.components import ComponentOptions

MPP = 0.5


@pytest.fixture(scope="module")
def mask():
    return planted_mask()


@pytest.fixture(scope="module")
def store(mask, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("analysis") / "slide-a.zarr", mask, mpp=MPP)


def options(connectivity=8, block=CHUNK, **kwargs):
    return AnalysisOptions(components=ComponentOptions(connectivity=connectivity, block=block), **kwargs)


@pytest.fixture(scope="module")
def summary_of(store):
    """Summaries of the many-chunk store, computed once per (connectivity, block): each is a full pass."""
    cache = {}

    def get(connectivity=8, block=CHUNK):
        if (connectivity, block) not in cache:
            cache[connectivity, block] = summarize_store(store, options(connectivity, block))
        return cache[connectivity, block]

    return get


def test_the_test_mask_has_objects_across_chunk_corners_and_borders(mask):
    """The cases below are really in the data (else the exactness tests could pass vacuously)."""
    rows, cols = -(-mask.shape[0] // CHUNK), -(-mask.shape[1] // CHUNK)
    assert (rows, cols) == (37, 53)
    labels, _ = ndimage.label(mask == 1, structure=np.ones((3, 3)))
    chunks_per_object = [
        len({(y // CHUNK, x // CHUNK) for y, x in zip(*np.nonzero(labels == i))})
        for i in (labels[15, 15], labels[31, 31])
    ]
    assert chunks_per_object == [4, 2]  # 2x2 square on a four-chunk corner; diagonal pair across a corner
    assert mask[0, 0] and mask[-1, -1] and mask[79, 0]
    cut = {labels[y, x] for y in range(CHUNK, mask.shape[0], CHUNK)
           for x in np.nonzero((labels[y - 1] == labels[y]) & (labels[y] > 0))[0]}  # fmt: skip
    assert len(cut) > 100  # plenty of objects cut by horizontal chunk borders


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("block", [CHUNK, 3 * CHUNK])
def test_counts_and_object_areas_equal_scipy_on_the_whole_array(summary_of, mask, connectivity, block):
    summary = summary_of(connectivity, block)
    for cls in (1, 2):
        expected = reference_objects(mask, cls, connectivity)
        assert np.array_equal(np.sort(summary.object_areas(cls)), expected), (cls, connectivity)
    assert summary.row()["nucleus_count"] == len(reference_objects(mask, 1, connectivity))


def test_diagonal_contacts_join_objects_only_with_8_connectivity(summary_of, mask):
    eight, four = summary_of(8).row(), summary_of(4).row()
    assert eight["stroma_count"] == len(reference_objects(mask, 2, 8))
    assert four["stroma_count"] > eight["stroma_count"]  # the anti-diagonal pair (and random contacts) split


def test_class_areas_in_pixels_square_micrometres_and_square_millimetres(summary_of, mask):
    row = summary_of().row()
    counts = np.bincount(mask.ravel(), minlength=3)
    for k, name in enumerate(CLASSES):
        assert row[f"{name}_area_px"] == counts[k]
        assert row[f"{name}_area_um2"] == pytest.approx(counts[k] * MPP**2, rel=1e-12)
        assert row[f"{name}_area_mm2"] == pytest.approx(counts[k] * MPP**2 / 1e6, rel=1e-12)


def test_size_statistics_match_numpy_on_scipy_objects(summary_of, mask):
    row = summary_of().row()
    areas = reference_objects(mask, 1, 8)
    p10, median, p90 = np.percentile(areas, [10, 50, 90])
    assert row["nucleus_area_mean_px"] == pytest.approx(areas.mean(), rel=1e-12)
    assert row["nucleus_area_median_um2"] == pytest.approx(median * MPP**2, rel=1e-12)
    assert (row["nucleus_area_p10_px"], row["nucleus_area_p90_px"]) == pytest.approx((p10, p90), rel=1e-12)


def test_tissue_area_comes_from_the_stored_low_resolution_mask(tmp_path, mask):
    tissue = np.zeros((mask.shape[0] // 8, mask.shape[1] // 8), dtype=bool)  # 73 x 105: not an exact 1/8
    tissue[10:50, 20:90] = True
    path = make_store(tmp_path / "t.zarr", mask, mpp=MPP, tissue_mask=tissue, chunk=64)
    summary = summarize_store(path, options(block=None))
    expected_px = tissue.sum() * (mask.shape[0] / tissue.shape[0]) * (mask.shape[1] / tissue.shape[1])
    assert summary.tissue_source == "stored mask"
    assert summary.tissue_pixels == pytest.approx(expected_px, rel=1e-12)
    row = summary.row()
    tissue_mm2 = expected_px * MPP**2 / 1e6
    assert row["tissue_area_mm2"] == pytest.approx(tissue_mm2, rel=1e-12)
    assert row["nucleus_per_mm2_tissue"] == pytest.approx(len(reference_objects(mask, 1, 8)) / tissue_mm2, rel=1e-12)


def test_without_tissue_mask_or_slide_the_whole_image_counts_as_tissue(store, mask, caplog):
    with caplog.at_level(logging.WARNING):
        summary = summarize_store(store, options(block=None))
    assert summary.tissue_source == "whole image" and summary.tissue_pixels == mask.size
    assert "whole image" in caplog.text


def test_tissue_is_detected_on_the_slide_when_the_store_has_no_mask(tmp_path, mask):
    import tifffile

    slide = np.full((*mask.shape, 3), 245, dtype=np.uint8)
    slide[100:400, 200:600] = (200, 110, 160)  # an H&E-pink block on white glass
    tifffile.imwrite(tmp_path / "slide.tif", slide)
    path = make_store(tmp_path / "d.zarr", mask, mpp=MPP, source=str(tmp_path / "slide.tif"), chunk=64)
    summary = summarize_store(path, options(block=None))
    assert summary.tissue_source == "detected"
    assert summary.tissue_pixels == pytest.approx(300 * 400, rel=0.05)
    assert summarize_store(path, options(block=None, detect_tissue=False)).tissue_source == "whole image"


def test_store_without_mpp_has_pixel_numbers_and_empty_micrometre_columns(tmp_path, mask, caplog):
    path = make_store(tmp_path / "nompp.zarr", mask, mpp=None, chunk=64)
    with caplog.at_level(logging.WARNING):
        row = summarize_store(path, options(block=None)).row()
    assert "no µm/px" in caplog.text
    assert row["nucleus_count"] == len(reference_objects(mask, 1, 8))
    assert row["nucleus_area_px"] == (mask == 1).sum() and row["nucleus_area_median_px"] is not None
    empty = [k for k in row if "um2" in k or "mm2" in k]
    assert empty and all(row[k] is None for k in empty)


def test_object_classes_are_chosen_by_name_or_index(store):
    summary = summarize_store(store, options(block=None, object_classes=("nucleus",)))
    row = summary.row()
    assert "nucleus_count" in row and "stroma_count" not in row and "stroma_area_px" in row
    assert resolve_classes(CLASSES, ["2", "nucleus"]) == [1, 2]
    with pytest.raises(ValueError, match="background, nucleus, stroma"):
        resolve_classes(CLASSES, ["nuclei"])
    assert "nucleus n" in format_table([summary]) and "stroma n" not in format_table([summary])


def test_unfinished_missing_and_foreign_stores_are_refused_with_a_reason(mask, tmp_path):
    import zarr

    running = make_store(tmp_path / "running.zarr", mask, chunk=64)
    root = zarr.open_group(str(running), mode="r+")
    root.attrs["wsi_unet"] = {**dict(root.attrs["wsi_unet"]), "status": "running"}
    with pytest.raises(ResultStoreError, match=r"running\.zarr: result is not complete.*rerun the segment_slides.py command"):
        open_store(running)
    with pytest.raises(ResultStoreError, match="no such result store"):
        open_store(tmp_path / "absent.zarr")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    with pytest.raises(ResultStoreError, match="not a wsi-unet result store"):
        open_store(tmp_path / "foreign.zarr")


def test_find_stores_takes_stores_directories_and_globs(store, tmp_path):
    found, problems = find_stores([str(store.parent), str(store), str(store.parent / "*.zarr"), str(tmp_path / "x")])
    assert found == [store]
    assert [item for item, _ in problems] == [str(tmp_path / "x")]


def test_minimum_object_area_drops_speckles_from_counts_but_not_from_class_areas(store, mask, tmp_path):
    row = summarize_store(store, options(block=None, min_area_um2=2.0)).row()  # 2 µm² at 0.5 µm/px = 8 px
    areas = reference_objects(mask, 1, 8)
    assert row["min_object_px"] == 8
    assert row["nucleus_count"] == (areas >= 8).sum() < len(areas)
    assert row["nucleus_area_median_px"] == pytest.approx(np.median(areas[areas >= 8]))
    assert row["nucleus_area_px"] == (mask == 1).sum()
    no_mpp = make_store(tmp_path / "nompp.zarr", mask, mpp=None, chunk=64)
    with pytest.raises(ValueError, match="--min-area-px"):
        summarize_store(no_mpp, options(block=None, min_area_um2=2.0))
    assert summarize_store(no_mpp, options(block=None, min_area_px=8)).row()["nucleus_count"] == (areas >= 8).sum()


# --------------------------------------------------------------------------- instances (labels/nuclei)
@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """Two touching nuclei (one class-1 component, two instances) with and without labels/nuclei."""
    folder = tmp_path_factory.mktemp("nuclei")
    mask, ids = touching_nuclei()
    plain = make_store(folder / "plain.zarr", mask, class_names=BOUNDARY_CLASSES)
    return make_instance_store(folder / "nuclei.zarr", mask, ids), plain, mask


@pytest.mark.parametrize("block", [CHUNK, None], ids=["16-px blocks", "one block"])
def test_instances_are_the_counted_objects_of_their_class(nuclei, block):
    with_instances, plain, mask = nuclei
    summary = summarize_store(with_instances, options(block=block))
    assert summary.object_classes == [1]  # the boundary class is absorbed into the instances, no object of its own
    assert sorted(summary.object_areas(1)) == list(AREAS)
    row, tissue = summary.row(), mask.size  # no tissue mask, no slide: the whole image
    assert row["nucleus_objects_from"] == "instances (labels/nuclei)" and row["nucleus_count"] == 2
    assert row["nucleus_area_median_px"] == np.median(AREAS) and row["nucleus_area_p90_um2"] == pytest.approx(
        np.percentile(AREAS, 90) * MPP**2)  # fmt: skip
    assert row["nucleus_per_mm2_tissue"] == pytest.approx(2 / (tissue * MPP**2 / 1e6))
    assert row["nucleus_objects_fraction_of_tissue"] == pytest.approx(sum(AREAS) / tissue)
    assert row["nucleus_area_px"] == (mask == 1).sum() and row["nucleus_boundary_area_px"] == (mask == 2).sum()
    assert "nucleus_boundary_count" not in row
    assert "instances (labels/nuclei)" in format_table([summary])
    old = summarize_store(plain, options(block=block)).row()  # the same mask without instances
    assert old["nucleus_objects_from"] == "connected components" and old["nucleus_count"] == 1
    assert old["nucleus_boundary_count"] == 2


def test_minimum_area_and_named_classes_with_instances(nuclei):
    with_instances, _, _ = nuclei
    assert list(summarize_store(with_instances, options(min_area_px=50)).object_areas(1)) == [max(AREAS)]
    summary = summarize_store(with_instances, options(object_classes=("nucleus", "nucleus boundary")))
    assert summary.objects_source(2) == "connected components" and len(summary.object_areas(2)) == 2
    assert sorted(summary.object_areas(1)) == list(AREAS)


def test_provenance_naming_missing_instances_falls_back_to_components(tmp_path, caplog):
    mask, _ = touching_nuclei()
    store = make_store(tmp_path / "s.zarr", mask, class_names=BOUNDARY_CLASSES, instances={"rule": {"name": "nuclei"}})
    with caplog.at_level(logging.WARNING):
        row = summarize_store(store, options()).row()
    assert row["nucleus_count"] == 1 and "has none" in caplog.text
