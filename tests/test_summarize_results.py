"""jobs/summarize_results.py: one CSV row per slide, a table, GeoJSON and figures; bad stores fail alone."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from analysis_stores import make_store, planted_mask, reference_objects
from instance_stores import AREAS, make_instance_store, touching_nuclei
from PIL import Image

from pipeline.analysis.components import ComponentOptions
from pipeline.analysis.figures import draw_size_histogram, instance_overlay
from pipeline.analysis.instance_stats import instance_level
from pipeline.analysis.summary import AnalysisOptions, summarize_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import summarize_results  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
SHAPE = (150, 230)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder with two finished stores (one with its slide file and a tissue mask, one without µm/px)."""
    import tifffile

    folder = tmp_path_factory.mktemp("results")
    first, second = planted_mask(SHAPE, seed=1), planted_mask(SHAPE, seed=2)
    slide = np.full((*SHAPE, 3), 240, dtype=np.uint8)
    slide[20:130, 30:200] = (205, 120, 170)
    tifffile.imwrite(folder / "slide-a.tif", slide)
    tissue = np.zeros((15, 23), dtype=bool)
    tissue[2:13, 3:20] = True
    make_store(folder / "slide-a.zarr", first, source=str(folder / "slide-a.tif"), tissue_mask=tissue)
    make_store(folder / "slide-b.zarr", second, mpp=None)
    return folder, {"slide-a": first, "slide-b": second}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_stores_give_one_csv_row_each_and_a_table(results, tmp_path, capsys):
    folder, masks = results
    assert summarize_results.main([str(folder), "--out", str(tmp_path), "--block", "16"]) == 0
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["slide"] for r in rows] == ["slide-a", "slide-b"]
    for row in rows:
        assert int(row["nucleus_count"]) == len(reference_objects(masks[row["slide"]], 1, 8))
    a, b = rows
    assert a["tissue_source"] == "stored mask" and float(a["nucleus_area_um2"]) > 0
    assert b["mpp"] == "" and b["nucleus_area_um2"] == "" and b["nucleus_per_mm2_tissue"] == ""
    table = capsys.readouterr().out
    assert "slide-a" in table and "slide-b" in table and "nucleus n" in table


def test_incomplete_and_missing_stores_fail_alone_with_one_line_each(results, tmp_path, capsys):
    folder, _ = results
    running = tmp_path / "running.zarr"
    shutil.copytree(folder / "slide-b.zarr", running)
    root = zarr.open_group(str(running), mode="r+")
    root.attrs["wsi_unet"] = {**dict(root.attrs["wsi_unet"]), "status": "running"}
    missing = tmp_path / "missing.zarr"
    code = summarize_results.main([str(folder / "slide-a.zarr"), str(running), str(missing), "--out", str(tmp_path)])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert any(str(running) in line and "not complete" in line for line in errors)
    assert any(str(missing) in line and "no such result store" in line for line in errors)
    assert [r["slide"] for r in read_csv(tmp_path / "summary.csv")] == ["slide-a"]


def test_geojson_and_figures_for_every_slide(results, tmp_path):
    folder, _ = results
    code = summarize_results.main([str(folder / "*.zarr"), "--out", str(tmp_path), "--geojson", "--figures",
                                   "--objects", "nucleus", "--quiet"])  # fmt: skip
    assert code == 0
    for name in ("slide-a", "slide-b"):
        collection = json.loads((tmp_path / f"{name}.geojson").read_text())
        kinds = {
            f["properties"]["classification"]["name"]: f["properties"]["objectType"] for f in collection["features"]
        }
        assert kinds == {"nucleus": "detection", "stroma": "annotation"}
        picture = Image.open(tmp_path / f"{name}-overview.png")
        assert picture.size[0] > 1000 and picture.size[1] > 500
        assert np.asarray(picture.convert("L")).std() > 10  # not blank


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        summarize_results.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in summarize_results.build_parser()._actions:
        assert all(option in text for option in action.option_strings)
        assert action.help, action.dest


def test_a_store_with_nuclei_instances_reports_instances_everywhere(tmp_path, capsys):
    mask, ids = touching_nuclei()
    make_instance_store(tmp_path / "in" / "nuclei.zarr", mask, ids)
    out = tmp_path / "out"
    assert summarize_results.main([str(tmp_path / "in"), "--out", str(out), "--geojson", "--figures", "--block", "16",
                                   "--quiet"]) == 0  # fmt: skip
    (row,) = read_csv(out / "summary.csv")
    assert row["nucleus_count"] == "2" and row["nucleus_objects_from"] == "instances (labels/nuclei)"
    assert float(row["nucleus_area_median_px"]) == np.median(AREAS)
    assert "instances (labels/nuclei)" in capsys.readouterr().out
    features = json.loads((out / "nuclei.geojson").read_text())["features"]
    assert sorted(f["properties"]["instance_id"] for f in features) == [1, 2]
    assert Image.open(out / "nuclei-overview.png").size[0] > 1000


def test_the_overview_draws_instances_in_their_own_colours_and_sizes(tmp_path):
    from matplotlib.figure import Figure

    mask, ids = touching_nuclei()
    summary = summarize_store(make_instance_store(tmp_path / "n.zarr", mask, ids),
                              AnalysisOptions(components=ComponentOptions(block=16)))  # fmt: skip
    assert np.array_equal(instance_level(summary.instances, (24, 32)), ids[::2, ::2])  # the pyramid level
    assert instance_level(summary.instances, (10, 13)).shape == (10, 13)  # sampled from the next larger level
    white = np.full((*ids.shape, 3), 255, dtype=np.uint8)
    picture = instance_overlay(white, ids).astype(int)
    first, second, outline = picture[8, 6], picture[12, 16], picture[8, 9]  # inside 1, inside 2, 1's edge next to 2
    assert np.array_equal(picture[ids == 0], white[ids == 0])
    assert np.abs(first - second).sum() > 30 and outline.sum() < first.sum()
    axes = Figure().add_subplot()
    draw_size_histogram(axes, summary)
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["nucleus instances (n = 2)"]
