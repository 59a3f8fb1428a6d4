"""Shared fixtures and helpers: the ../shared data (skip when absent), small varied-output U-Nets, one local
Ray, the job run as a user runs it, and the two ways of comparing stores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet import UNet

SHARED = Path(os.environ.get("WSI_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"test data {path} not found (needs ../shared beside the checkout, or WSI_TEST_DATA)")
    return path


def varied_unet(seed: int = 0, num_classes: int = 3, calibrate: np.ndarray | None = None, **config) -> UNet:
    """A Kaiming-initialised U-Net whose argmax really varies over an image.

    Random nets put almost every pixel in one class because the logits share a large offset; setting
    the output bias to minus the mean logit per class (measured on a random image, or on the top-left
    of ``calibrate``, an (H, W, C) uint8 image like the ones the model will see) removes it.
    """
    torch.manual_seed(seed)
    config = {"base_channels": 4, "depth": 3, **config}
    model = UNet(num_classes=num_classes, **config).eval()
    size = model.input_size_for(model.valid_output_size(64)) if model.is_valid_padding else 64
    image = torch.rand(1, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    if calibrate is not None:
        height, width = calibrate.shape[:2]
        crop = np.pad(calibrate[:size, :size], ((0, max(0, size - height)), (0, max(0, size - width)), (0, 0)), "symmetric")
        image = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None].float() / 255
    with torch.no_grad():
        mean = model(image).mean(dim=(0, 2, 3))
        model.outc.bias -= mean
    return model


@pytest.fixture
def model() -> UNet:
    return varied_unet()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance on loopback for the whole session, shut down at the end."""
    pytest.importorskip("ray")
    from pipeline.inference.ray_setup import init_ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach a test to someone's cluster
    ray = init_ray(
        num_cpus=2, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )  # fmt: skip
    yield ray
    ray.shutdown()


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth-ish random uint8 image (noise plus gradients) so outputs vary at several scales."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(yy / 7.0)[..., None] * np.cos(xx / 11.0)[..., None]
    return np.clip(base + rng.normal(0, 40, (height, width, channels)), 0, 255).astype(np.uint8)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def assert_same_results(actual: Path, expected: Path, probabilities: bool = False) -> None:
    """Complete, with equal arrays (labels at every pyramid level, tile states, optionally probabilities):
    what two executors of the same plan must give, whatever their files' timestamps or metadata order."""
    assert zarr.open_group(str(actual), mode="r").attrs["wsi_unet"]["status"] == "complete"
    arrays = [f"labels/segmentation/{level.name}" for level in sorted(Path(expected, "labels", "segmentation").iterdir())
              if level.is_dir()] + ["tiles/tissue", "shards/done"] + (["probabilities/0"] if probabilities else [])  # fmt: skip
    assert len(arrays) > 1
    for array in arrays:
        a, e = (zarr.open_array(f"{store}/{array}", mode="r")[...] for store in (actual, expected))
        assert a.dtype == e.dtype and np.array_equal(a, e), f"{array} differs"


def assert_identical_stores(actual: Path, expected: Path) -> None:
    """Same files with the same bytes: what "a resumed or retried run equals an uninterrupted one" means."""
    got, want = store_files(actual), store_files(expected)
    assert sorted(got) == sorted(want), f"different files: {sorted(set(got) ^ set(want))[:10]}"
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files with other bytes: {differ[:10]}"


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch with ``count`` intra-op threads (an actor with ``cpus_per_actor=count`` does the same)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def tile_states_written(store: Path) -> int:
    """Tiles recorded done (their shard is) or skipped (no tissue) so far, read while a run writes."""
    from pipeline.store.shard_state import TILE_PENDING, read_tile_states

    try:
        return int((read_tile_states(store) != TILE_PENDING).sum())
    except Exception:  # not created yet, or being renamed into place
        return 0


# --------------------------------------------------------------------------- a slide with non-integer downsamples
NON_INTEGER_LEVELS = ((601, 4443), (300, 2221), (150, 1110), (75, 555))  # floor halving: downsamples 2.0019, 4.0047, ...
DARK_DISKS = ((120, 200, 24), (300, 2100, 30), (480, 4300, 26), (250, 3400, 40))  # (y, x, radius) at level 0


def write_pyramid_tiff(path: Path, level0: np.ndarray, shapes: tuple[tuple[int, int], ...], mpp: float = 0.25) -> Path:
    """A JPEG-tiled pyramidal TIFF (OpenSlide "generic-tiff"): each level the area average of level 0 at
    ``shapes[k]``, so levels whose sizes are not level 0's halved exactly have non-integer downsamples."""
    import tifffile
    from PIL import Image

    from pipeline.demo.synthetic import jpeg_options

    options = jpeg_options(mpp, tile=128)
    with tifffile.TiffWriter(path) as tif:
        for k, (height, width) in enumerate(shapes):
            image = level0 if k == 0 else np.asarray(Image.fromarray(level0).resize((width, height), Image.Resampling.BOX))
            scale = shapes[0][1] / width
            tif.write(image, resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)), subfiletype=int(k > 0), **options)
    return path


def dark_disks_mask(shape: tuple[int, int], disks=DARK_DISKS) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.any([(yy - y) ** 2 + (xx - x) ** 2 <= r * r for y, x, r in disks], axis=0)


@pytest.fixture(scope="session")
def non_integer_slide(tmp_path_factory) -> Path:
    """4443 x 601 px at level 0, levels 2221, 1110 and 555 px wide (OpenSlide downsamples 2.0019, 4.0047,
    8.0094): light texture with dark disks (objects a threshold finds at every level)."""
    level0 = (170 + 0.3 * random_image(*NON_INTEGER_LEVELS[0], seed=7)).astype(np.uint8)
    level0[dark_disks_mask(NON_INTEGER_LEVELS[0])] = 30
    return write_pyramid_tiff(tmp_path_factory.mktemp("non-integer") / "non-integer.tiff", level0, NON_INTEGER_LEVELS)


def dark_detector(threshold: float = 100.0) -> UNet:
    """A valid U-Net (depth 1) with a known answer: class 1 ("nucleus") exactly where the mean of a pixel's
    channels is below ``threshold`` (0-255). Every convolution but the centre taps is zero, so each output
    pixel sees only its own input pixel, placed by the network's own geometry."""
    model = UNet(in_channels=3, num_classes=2, base_channels=1, depth=1).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.inc.block[0].weight[0, :, 1, 1] = -1 / 3  # -mean of the inputs normalised to [-1, 1]
        model.inc.block[2].weight[0, 0, 1, 1] = 1
        model.ups[0].conv.block[0].weight[0, 0, 1, 1] = 1  # the skip (first in the concatenation) passes through
        model.ups[0].conv.block[2].weight[0, 0, 1, 1] = 1
        model.outc.weight[1, 0] = 1
        model.outc.bias[1] = -(1 - 2 * threshold / 255)  # darkness above the threshold's
    model.card.class_names = ["background", "nucleus"]
    return model


# --------------------------------------------------------------------------- DICOM whole-slide images
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"  # uncompressed, which OpenSlide decodes
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"  # which OpenSlide does not


def write_dicom_level(path: Path, image: np.ndarray, series: str, mpp: float, tile: int = 16,
                      syntax: str = EXPLICIT_LITTLE_ENDIAN) -> Path:  # fmt: skip
    """One pyramid level as a DICOM WSI file (TILED_FULL frames); levels of one slide share ``series``."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = WSI_STORAGE, generate_uid(), syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series, generate_uid(), "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    height, width = image.shape[:2]
    rows, cols = -(-height // tile), -(-width // tile)
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, ds.NumberOfFrames = height, width, rows * cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.DimensionOrganizationType, ds.TotalPixelMatrixFocalPlanes = "TILED_FULL", 1
    spacing = Dataset()
    spacing.PixelSpacing, spacing.SliceThickness = [mpp / 1000, mpp / 1000], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [spacing]
    ds.SharedFunctionalGroupsSequence = [shared]
    padded = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    padded[:height, :width] = image
    frames = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    if syntax == EXPLICIT_LITTLE_ENDIAN:
        ds.PixelData = frames.tobytes()
    else:  # frames this test cannot encode: OpenSlide refuses the syntax before it decodes any
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64) for _ in range(rows * cols)])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def dicom_slide(tmp_path_factory) -> Path:
    """A 3-level DICOM WSI (uncompressed) in its own folder: 140 x 100 px, level 1 exactly half (downsample
    2, which OpenSlide reads without resampling), level 2 34 x 24 px (downsample 4.14, which it cannot)."""
    pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.uid import generate_uid

    folder, series = tmp_path_factory.mktemp("dicom"), generate_uid()
    image = random_image(100, 140, seed=5)
    for k, (height, width) in enumerate(((100, 140), (50, 70), (24, 34))):
        level = image if k == 0 else np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))
        write_dicom_level(folder / f"level{k}.dcm", level, series, mpp=0.25 * 140 / width)
    return folder / "level0.dcm"


# --------------------------------------------------------------------------- the job, run as a user runs it
SEGMENT_SLIDES = Path(__file__).resolve().parents[1] / "jobs" / "segment_slides.py"
QUIET = ("--num-cpus", "2", "--no-progress", "--no-preview")  # two CPUs like CI, no bars or PNGs to wait for


def start_job(*args: str, **popen) -> subprocess.Popen:
    """``python jobs/segment_slides.py ARGS`` from outside the checkout (the script must find it by itself),
    with no inherited RAY_ADDRESS or PYTHONPATH, in a session of its own (so a test can kill it and its Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ""
    return subprocess.Popen([sys.executable, str(SEGMENT_SLIDES), *args], env=env, cwd=tempfile.gettempdir(),
                            text=True, start_new_session=True, **popen)  # fmt: skip


def run_job(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the job to its end (or ``timeout``); whatever it started is killed afterwards."""
    process = start_job(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_session(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill_session(sid: int) -> None:
    """SIGKILL every process of the job's session (the driver and the local Ray it started)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def error_lines(stderr: str) -> list[str]:
    """The job's one-line ERROR log lines (one per failed slide)."""
    return [line for line in stderr.splitlines() if line.startswith("ERROR ")]
