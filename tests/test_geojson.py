"""The GeoJSON export is a valid FeatureCollection QuPath reads, and its polygons rasterise back to the mask.

Rasterising uses skimage.draw.polygon over the pixel-edge coordinates (pixel centres are inside or
outside, never on an edge), even-odd over all rings, so holes and multipolygons need no code under test.
"""

import json
import uuid

import numpy as np
import pytest
from analysis_stores import CHUNK, CLASSES, make_store, planted_mask, reference_objects
from instance_stores import AREAS, BOUNDARY_CLASSES, make_instance_store, touching_nuclei
from skimage.draw import polygon as fill_polygon

from pipeline.analysis.components import ComponentOptions
from pipeline.analysis.geojson import GeoJSONOptions, export_geojson

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # pixel coordinates
SMALL = (17 * CHUNK - 3, 23 * CHUNK - 9)  # 17 x 23 chunks keeps the block-by-block export fast


@pytest.fixture(scope="module")
def mask():
    return planted_mask(SMALL)


@pytest.fixture(scope="module", params=[8, 4], ids=["8-connected", "4-connected"])
def exported(request, mask, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"geojson{request.param}")
    store = make_store(folder / "s.zarr", mask)
    options = GeoJSONOptions(detections=("nucleus",), components=ComponentOptions(request.param, block=CHUNK))
    count = export_geojson(store, folder / "s.geojson", options)
    collection = json.loads((folder / "s.geojson").read_text())
    assert len(collection["features"]) == count
    return request.param, collection


def polygons_of(geometry: dict) -> list:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def rasterise(features: list[dict], shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Even-odd fill of every ring at pixel centres: pixel (r, c) covers [c, c+1] x [r, r+1]."""
    out = np.zeros(shape, dtype=bool)
    for feature in features:
        for rings in polygons_of(feature["geometry"]):
            for ring in rings:
                xy = np.asarray(ring, dtype=float) / scale
                rows, cols = fill_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
                out[rows, cols] ^= True
    return out


def signed_area(ring: list) -> float:
    xy = np.asarray(ring, dtype=float)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def of_class(collection: dict, name: str) -> list[dict]:
    return [f for f in collection["features"] if f["properties"]["classification"]["name"] == name]


def test_feature_collection_has_the_structure_qupath_and_rfc7946_expect(exported):
    _, collection = exported
    assert collection["type"] == "FeatureCollection" and collection["features"]
    ids = set()
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        ids.add(str(uuid.UUID(feature["id"])))
        geometry, properties = feature["geometry"], feature["properties"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        for rings in polygons_of(geometry):
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1]  # closed linear rings
                assert all(len(position) == 2 for position in ring)
                assert (signed_area(ring) > 0) == (k == 0)  # exterior counter-clockwise, holes clockwise
        classification = properties["classification"]
        assert classification["name"] in CLASSES[1:]
        assert len(classification["color"]) == 3 and all(0 <= c <= 255 for c in classification["color"])
        expected_type = "detection" if classification["name"] == "nucleus" else "annotation"
        assert properties["objectType"] == expected_type
        assert properties["measurements"]["Area px"] > 0
    assert len(ids) == len(collection["features"])


def test_geometries_are_valid_simple_features(exported):
    from shapely.geometry import shape

    _, collection = exported
    invalid = [f["id"] for f in collection["features"] if not shape(f["geometry"]).is_valid]
    assert not invalid


@pytest.mark.parametrize("cls", [1, 2])
def test_polygons_rasterise_back_to_the_mask(exported, mask, cls):
    _, collection = exported
    drawn = rasterise(of_class(collection, CLASSES[cls]), mask.shape)
    truth = mask == cls
    iou = (drawn & truth).sum() / (drawn | truth).sum()
    assert iou >= 0.99, iou
    assert iou == 1.0  # pixel-edge polygons are exact


@pytest.mark.parametrize("cls", [1, 2])
def test_objects_cut_by_chunk_borders_are_one_feature_each(exported, mask, cls):
    connectivity, collection = exported
    features = of_class(collection, CLASSES[cls])
    expected = reference_objects(mask, cls, connectivity)
    assert len(features) == len(expected)
    assert np.array_equal(np.sort([f["properties"]["measurements"]["Area px"] for f in features]), expected)


def test_holes_are_kept_and_corner_contacts_follow_the_connectivity(exported):
    connectivity, collection = exported
    c = CHUNK
    ring = [f for f in of_class(collection, "nucleus") if f["properties"]["measurements"]["Area px"] == 32]
    assert any(len(polygons_of(f["geometry"])[0]) == 2 for f in ring)  # 6x6 square less its 2x2 hole
    corner = [2 * c, 2 * c]  # the only point the diagonal pair of pixels (2c-1, 2c-1), (2c, 2c) shares
    touching = [f for f in of_class(collection, "nucleus")
                if any(corner in ring for rings in polygons_of(f["geometry"]) for ring in rings)]  # fmt: skip
    types = [f["geometry"]["type"] for f in touching]
    assert types == (["MultiPolygon"] if connectivity == 8 else ["Polygon", "Polygon"])


def test_coordinates_are_level0_pixels(tmp_path, mask):
    store = make_store(tmp_path / "l2.zarr", mask, level=2, level0_downsample=4.0, chunk=64)
    export_geojson(store, tmp_path / "l2.geojson", GeoJSONOptions(components=ComponentOptions(block=None)))
    collection = json.loads((tmp_path / "l2.geojson").read_text())
    xs = [p[0] for f in collection["features"] for rings in polygons_of(f["geometry"]) for r in rings for p in r]
    assert max(xs) == 4 * mask.shape[1]  # objects reach the right border of the level
    drawn = rasterise(of_class(collection, "nucleus"), mask.shape, scale=4.0)
    assert (drawn == (mask == 1)).all()


def test_minimum_area_drops_small_objects(tmp_path, mask):
    store = make_store(tmp_path / "m.zarr", mask, chunk=64)
    options = GeoJSONOptions(min_area_px=10, components=ComponentOptions(block=None))
    export_geojson(store, tmp_path / "m.geojson", options)
    areas = [
        f["properties"]["measurements"]["Area px"] for f in json.loads((tmp_path / "m.geojson").read_text())["features"]
    ]
    expected = np.concatenate([reference_objects(mask, k, 8) for k in (1, 2)])
    assert min(areas) >= 10 and len(areas) == (expected >= 10).sum()


def test_level0_downsample_of_slide_views(tmp_path):
    """What the engine records: 1 for level 0, the pyramid's downsample for a level, times the resampling factor."""
    from conftest import shared_file

    from pipeline.slides.coordinates import store_level0_downsample
    from pipeline.slides.pyramid import open_pyramid, open_slide
    from pipeline.slides.sources import ResampledSource

    assert open_slide(np.zeros((8, 8, 3), np.uint8)).level0_downsample == 1.0
    assert store_level0_downsample({"level": 0, "mpp": None, "source": "gone.svs"}) == 1.0
    path = shared_file("slides/boxes-generic.tiff")
    level2 = open_slide(path, 2)
    assert level2.level0_downsample == open_pyramid(path).levels[2].downsample == pytest.approx(4.016129)
    assert ResampledSource(level2, 1.5).level0_downsample == pytest.approx(1.5 * level2.level0_downsample)
    recovered = store_level0_downsample(
        {"source": str(path), "level": 2, "shape": list(level2.size), "mpp": level2.mpp}
    )
    assert recovered == pytest.approx(level2.level0_downsample, rel=0.01)  # old stores: from the slide


def test_a_resampled_store_from_the_engine_exports_in_level0_pixels(tmp_path):
    """End to end: segment_slide records the downsample of a resampled view; the export scales by it."""
    from conftest import random_image, varied_unet

    from pipeline import open_labels, open_slide, segment_slide

    slide = open_slide(random_image(200, 168), mpp=0.25)
    segment_slide(slide, tmp_path / "r.zarr", varied_unet(num_classes=2), tile_size=32, target_mpp=0.5)
    mask = open_labels(tmp_path / "r.zarr")[...]
    assert mask.shape == (100, 84)
    export_geojson(tmp_path / "r.zarr", tmp_path / "r.geojson", GeoJSONOptions(components=ComponentOptions(block=None)))
    collection = json.loads((tmp_path / "r.geojson").read_text())
    assert 0 < (mask == 1).mean() < 1
    assert (rasterise(of_class(collection, "class_1"), mask.shape, scale=2.0) == (mask == 1)).all()


def test_objects_from_a_non_integer_level_land_on_the_level0_objects(non_integer_slide, tmp_path):
    """Segmented at level 2 (downsample 4.0047) by a model with a known answer (dark pixels), exported
    polygons in level-0 pixels cover the dark disks of level 0: every centroid within one pixel of the
    segmented level (4 level-0 px; OpenSlide's one downsample per level averages the two axes, 4.0027 and
    4.0067 here), the far right of the slide included."""
    from conftest import DARK_DISKS, NON_INTEGER_LEVELS, dark_detector, dark_disks_mask
    from shapely.geometry import shape

    from pipeline import segment_slide

    segment_slide(non_integer_slide, tmp_path / "l2.zarr", dark_detector(), tile_size=64, level=2)
    export_geojson(tmp_path / "l2.zarr", tmp_path / "l2.geojson", GeoJSONOptions(components=ComponentOptions(block=None)))
    features = of_class(json.loads((tmp_path / "l2.geojson").read_text()), "nucleus")
    assert len(features) == len(DARK_DISKS)
    centroids = [shape(f["geometry"]).centroid for f in features]
    for y, x, radius in DARK_DISKS:
        nearest = min(centroids, key=lambda c: (c.x - x) ** 2 + (c.y - y) ** 2)
        assert abs(nearest.x - x) <= 4 and abs(nearest.y - y) <= 4, (x, y, nearest)
    drawn, disks = rasterise(features, NON_INTEGER_LEVELS[0]), dark_disks_mask(NON_INTEGER_LEVELS[0])
    assert (drawn & disks).sum() / (drawn | disks).sum() > 0.85


def test_one_feature_per_instance_merged_across_blocks(tmp_path):
    mask, ids = touching_nuclei()
    store = make_instance_store(tmp_path / "n.zarr", mask, ids)
    count = export_geojson(store, tmp_path / "n.geojson", GeoJSONOptions(components=ComponentOptions(block=CHUNK)))
    features = sorted(json.loads((tmp_path / "n.geojson").read_text())["features"],
                      key=lambda f: f["properties"]["instance_id"])  # fmt: skip
    assert count == len(features) == 2
    for number, feature in enumerate(features, start=1):
        properties = feature["properties"]
        assert properties["instance_id"] == number and uuid.UUID(feature["id"])
        assert properties["classification"]["name"] == "nucleus" and properties["objectType"] == "detection"
        assert properties["measurements"]["Area px"] == AREAS[number - 1]
        assert feature["geometry"]["type"] == "Polygon"  # the second, cut by four blocks, merged into one
        assert np.array_equal(rasterise([feature], mask.shape), ids == number)
    options = GeoJSONOptions(min_area_px=50, components=ComponentOptions(block=CHUNK))
    assert export_geojson(store, tmp_path / "big.geojson", options) == 1


def test_the_same_mask_without_instances_exports_connected_components(tmp_path):
    mask, _ = touching_nuclei()
    store = make_store(tmp_path / "plain.zarr", mask, class_names=BOUNDARY_CLASSES)
    export_geojson(store, tmp_path / "plain.geojson", GeoJSONOptions(components=ComponentOptions(block=CHUNK)))
    collection = json.loads((tmp_path / "plain.geojson").read_text())
    assert len(of_class(collection, "nucleus")) == 1 and len(of_class(collection, "nucleus boundary")) == 2
    assert all("instance_id" not in f["properties"] for f in collection["features"])
