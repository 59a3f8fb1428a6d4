"""From a path to a :class:`~pipeline.slides.pyramid.SlidePyramid`: which format it is, who reads it, what is refused.

Formats are told apart by content, not by name: OpenSlide's own detection, the TIFF magic number, a
Zarr folder. What cannot be segmented is refused at open with one line that names the file, says what it
is and what to do: multi-channel (e.g. multiplexed fluorescence) images, more than 8 bits per sample,
DICOM encodings OpenSlide cannot decode, files that are not slides.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.slides.pyramid import (
    TIFF_VENDORS, OpenSlideReader, PyramidLevel, SlidePyramid, TiffReader, ZarrReader, openslide_handle,
)  # fmt: skip
from pipeline.slides.sources import SlideError, to_uint8_advice
from pipeline.slides.tiff_reader import MAX_SEGMENT_BYTES, open_tiff

logger = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF, both byte orders
CONVERT = "convert it to an 8-bit RGB tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) or OME-Zarr"


def mean_downsample(level0: tuple[int, int], level: tuple[int, int]) -> float:
    """Level-0 pixels per level pixel, averaged over the two axes, as OpenSlide computes it."""
    return (level0[0] / level[0] + level0[1] / level[1]) / 2


# --------------------------------------------------------------------------- TIFF
@dataclass(frozen=True)
class TiffLayout:
    """What tifffile sees: the pyramid's series, its level shapes, channels, µm/px and the other images."""

    series: int
    shapes: tuple[tuple[int, int], ...]
    channels: int
    mpp: float | None
    vendor: str
    associated: tuple[tuple[str, int], ...]


def inspect_tiff(path: Path) -> TiffLayout:
    """The layout of a TIFF's first image series; SlideError for what the pipeline cannot segment."""
    tif = open_tiff(str(path))
    series = tif.series[0]
    axes, shape = series.get_axes(True), series.get_shape(True)
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    if np.dtype(series.dtype) != np.uint8:
        bits = 8 * np.dtype(series.dtype).itemsize
        raise SlideError(f"{path}: {bits}-bit pixels ({series.dtype}); the model reads 8-bit images: "
                         f"{to_uint8_advice(series.dtype)}, and save it as a tiled pyramidal TIFF")  # fmt: skip
    layout = axes.replace("S", "")
    samples = shape[axes.index("S")] if "S" in axes else 1
    if layout != "YX" or samples not in (1, 3, 4):
        extra = [(axis, size) for axis, size in zip(axes, shape) if axis not in "YX"]
        count = int(np.prod([size for _, size in extra]))
        what = "channels" if any(axis in "CS" for axis, _ in extra) else "image planes (pages)"
        raise SlideError(
            f"{path}: {count} {what} (axes {axes}, {width}x{height} px), e.g. multiplexed fluorescence; the model reads "
            "RGB brightfield images (3 channels, or 1 for a grey model): merge or pick 3 channels into an 8-bit RGB "
            "image first and save it as a tiled pyramidal TIFF"
        )
    shapes = tuple((lv.get_shape(True)[axes.index("Y")], lv.get_shape(True)[axes.index("X")]) for lv in series.levels)
    for index, level in enumerate(series.levels):
        page = level.keyframe
        strip = (min(page.rowsperstrip, page.imagelength), page.imagewidth)
        segment = (page.tilelength, page.tilewidth) if page.is_tiled else strip
        _check_segment(path, index, segment, samples, "tiles" if page.is_tiled else "strips")
    end = max(int(np.max(np.add(page.dataoffsets, page.databytecounts))) for lv in series.levels for page in lv.pages if page is not None)
    if end > path.stat().st_size:
        raise ValueError(f"its tiles end at byte {end}, the file has {path.stat().st_size}: truncated")
    others = tuple((s.name.lower(), i) for i, s in enumerate(tif.series) if i and s.name)
    return TiffLayout(0, shapes, 3 if samples == 4 else samples, _tiff_mpp(tif), "ome-tiff" if tif.is_ome else "tiff", others)


def _check_segment(path: Path, level: int, segment: tuple[int, int], samples: int, kind: str) -> None:
    """Refuse a level stored in pieces so large that every tile window would decode one whole (bounded memory)."""
    size = segment[0] * segment[1] * samples
    if size > MAX_SEGMENT_BYTES:
        raise SlideError(
            f"{path}: level {level} is stored in {kind} of {segment[1]}x{segment[0]} px ({size / 2**20:,.0f} MiB "
            f"each once decoded, more than the {MAX_SEGMENT_BYTES >> 20} MiB allowed, WSI_MAX_SEGMENT_MB): every "
            f"tile would decode a whole one; {CONVERT}"
        )


def _tiff_mpp(tif) -> float | None:
    """µm/px of level 0: OME PhysicalSizeX, else the resolution tags (inch or centimetre units)."""
    if tif.is_ome:
        import xml.etree.ElementTree as ET

        for element in ET.fromstring(tif.ome_metadata).iter():
            if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
                unit = element.get("PhysicalSizeXUnit", "µm")
                scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
                return float(element.get("PhysicalSizeX")) * scale if scale else None
    tags = tif.series[0].levels[0].keyframe.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    per_unit = numerator / denominator if denominator else 0
    microns = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value))
    return microns / per_unit if microns and per_unit > 0 else None


def tiff_pyramid(path: Path, layout: TiffLayout) -> SlidePyramid:
    """A TIFF that OpenSlide does not know (OME-TIFF, stripped, ...), read with tifffile alone."""
    shapes = layout.shapes
    levels = tuple(PyramidLevel(s, mean_downsample(shapes[0], s) if i else 1.0) for i, s in enumerate(shapes))
    reader = TiffReader(str(path), layout.series, layout.associated)
    return SlidePyramid(path.name, str(path), layout.vendor, levels, layout.channels, layout.mpp, reader,
                       "tifffile tiles", tuple(name for name, _ in layout.associated))  # fmt: skip


# --------------------------------------------------------------------------- OpenSlide
def openslide_pyramid(path: Path, vendor: str, layout: TiffLayout | None) -> SlidePyramid:
    """A file OpenSlide opens: its metadata; pixels through tifffile when it reads the same levels exactly."""
    handle = openslide_handle(str(path))
    dims = [(height, width) for width, height in handle.level_dimensions]
    downsamples = tuple(float(d) for d in handle.level_downsamples)
    mpp_x = handle.properties.get("openslide.mpp-x")
    mpp = float(mpp_x) if mpp_x else None
    associated = tuple(sorted(handle.associated_images.keys()))
    if layout is not None and vendor in TIFF_VENDORS and list(layout.shapes) == dims:
        reader = TiffReader(str(path), layout.series, tuple((name, i) for name, i in layout.associated if name in associated))
        pyramid = SlidePyramid(path.name, str(path), vendor, tuple(PyramidLevel(d, ds) for d, ds in zip(dims, downsamples)),
                               layout.channels, mpp, reader, "tifffile tiles", associated)  # fmt: skip
        if _same_top_left(pyramid):
            return pyramid
    levels = tuple(PyramidLevel(d, ds, native=ds.is_integer()) for d, ds in zip(dims, downsamples))
    return SlidePyramid(path.name, str(path), vendor, levels, 3, mpp, OpenSlideReader(str(path), downsamples),
                        "openslide", associated)  # fmt: skip


def _same_top_left(pyramid: SlidePyramid, side: int = 64) -> bool:
    """tifffile and OpenSlide agree on each level's top-left ``side`` px (origin (0, 0) is exact in both).

    A tile tifffile cannot decode sends the file to OpenSlide, which then reads or reports it as it would
    without this check; a tile only OpenSlide fails on is left to tifffile."""
    for index, level in enumerate(pyramid.levels):
        h, w = min(side, level.shape[0]), min(side, level.shape[1])
        try:
            ours = pyramid.reader.read(index, 0, h, 0, w)
        except Exception:
            return False
        try:
            theirs = OpenSlideReader(pyramid.path, (1.0,) * len(pyramid.levels)).read(index, 0, h, 0, w)
        except Exception:
            continue
        if ours.shape != theirs.shape or not (ours == theirs).all():
            logger.warning("%s: tifffile and OpenSlide differ at level %d; reading it through OpenSlide", pyramid.name, index)
            return False
    return True


# --------------------------------------------------------------------------- DICOM
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "implicit VR little endian (uncompressed)",
    "1.2.840.10008.1.2.1": "explicit VR little endian (uncompressed)",
    "1.2.840.10008.1.2.1.99": "deflated explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian (uncompressed)",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless (first-order prediction)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.110": "JPEG XL lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL (JPEG recompression)",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE lossless",
}


def dicom_transfer_syntax(path: Path) -> str | None:
    """The Transfer Syntax UID (0002,0010) from a DICOM Part 10 file's meta header (always explicit VR LE)."""
    with open(path, "rb") as file:
        head = file.read(16384)
    if head[128:132] != b"DICM":
        return None
    position = 132
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            return None
        if head[position + 4 : position + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,), start = struct.unpack_from("<I", head, position + 8), position + 12
        else:
            (length,), start = struct.unpack_from("<H", head, position + 6), position + 8
        if element == 0x0010:
            return head[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = start + length
    return None


def dicom_refusal(path: Path, error: Exception) -> SlideError:
    syntax = dicom_transfer_syntax(path) or "unknown"
    name = TRANSFER_SYNTAXES.get(syntax, "an encoding this tool does not know")
    return SlideError(
        f"{path}: a DICOM slide encoded as {name} (transfer syntax {syntax}), which OpenSlide cannot decode "
        f"({error}); re-encode it as JPEG baseline or JPEG 2000 (e.g. gdcmconv --jpeg), or {CONVERT}"
    )


# --------------------------------------------------------------------------- Zarr
def is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path.is_dir() and any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup")))


def open_zarr(path: Path) -> SlidePyramid:
    """A Zarr array, or a group with OME ``multiscales`` (their dataset paths, µm/px) or levels "0", "1", ..."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:
        raise SlideError(f"{path}: not a readable Zarr array or group ({type(error).__name__}: {error})") from None
    mpp = None
    if isinstance(node, zarr.Array):
        keys = ("",)
    else:
        attrs = node.attrs.asdict()
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if multiscales:
            keys, mpp = tuple(d["path"] for d in multiscales[0]["datasets"]), _multiscale_mpp(multiscales[0])
        else:
            keys = tuple(sorted((k for k in node.array_keys() if k.isdigit()), key=int))
        if not keys:
            raise SlideError(f"{path}: a Zarr group without image levels (arrays '0', '1', ... or OME multiscales)")
    arrays = [node if not key else node[key] for key in keys]
    first = arrays[0]
    if first.ndim not in (2, 3) or np.dtype(first.dtype) != np.uint8:
        raise SlideError(f"{path}: a {first.dtype} array of shape {first.shape}; the model reads (y, x[, channel]) uint8 "
                         f"images: {to_uint8_advice(first.dtype) if first.dtype != np.uint8 else CONVERT}")  # fmt: skip
    shapes = [tuple(int(n) for n in a.shape[:2]) for a in arrays]
    levels = tuple(PyramidLevel(s, mean_downsample(shapes[0], s) if i else 1.0) for i, s in enumerate(shapes))
    channels = int(first.shape[2]) if first.ndim == 3 else 1
    for index, array in enumerate(arrays):
        chunk = array.chunks  # the inner chunk of a sharded array: what one read decodes
        _check_segment(path, index, tuple(int(n) for n in chunk[:2]), int(np.prod(chunk[2:], dtype=np.int64)), "chunks")
    return SlidePyramid(path.name, str(path), "zarr", levels, channels, mpp, ZarrReader(str(path), keys), "zarr")


def _multiscale_mpp(multiscale: dict) -> float | None:
    """µm/px of the first dataset's x axis, when its unit is a length the tool knows."""
    axes = multiscale.get("axes") or []
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if "x" not in names:
        return None
    unit = axes[names.index("x")].get("unit") if isinstance(axes[0], dict) else None
    scale = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}.get(unit)
    for transform in multiscale["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale" and scale:
            return float(transform["scale"][names.index("x")]) * scale
    return None


# --------------------------------------------------------------------------- any file
def open_file(path: Path) -> SlidePyramid:
    """The pyramid of a slide file: OpenSlide's formats, any TIFF tifffile reads; refusals in one line."""
    import openslide

    if path.is_dir():
        raise SlideError(f"{path}: a folder that is not a Zarr store; name the slide file itself (for DICOM, one of its .dcm files)")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty (0 bytes); the copy or download was interrupted: copy it again")
    with open(path, "rb") as file:
        head = file.read(4)
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detect_format raises on unreadable files in some versions
        vendor = None
    layout, tiff_error = None, None
    if head in TIFF_MAGIC:
        try:
            layout = inspect_tiff(path)
        except SlideError:
            if vendor is None or vendor in TIFF_VENDORS:  # what tifffile sees is the slide: refuse it
                raise
        except Exception as error:
            tiff_error = f"{type(error).__name__}: {error}"
    openslide_error = None
    if vendor is not None:
        try:
            return openslide_pyramid(path, vendor, layout)
        except openslide.OpenSlideError as error:
            openslide_handle.drop(str(path))
            if vendor == "dicom":
                raise dicom_refusal(path, error) from None
            openslide_error = str(error)
    if layout is not None:
        pyramid = tiff_pyramid(path, layout)
        try:
            pyramid.level(0).read(0, min(16, layout.shapes[0][0]), 0, min(16, layout.shapes[0][1]))
        except Exception as error:
            tiff_error = f"{type(error).__name__}: {error}"
        else:
            if openslide_error:
                logger.info("%s: OpenSlide cannot open it (%s); reading it with tifffile", path, openslide_error)
            return pyramid
    if openslide_error or tiff_error:
        what = f"OpenSlide cannot open it ({openslide_error})" if openslide_error else "a TIFF that OpenSlide does not know"
        raise SlideError(
            f"{path}: {what} and tifffile cannot read it ({tiff_error or 'not a TIFF'}); it may be truncated or "
            f"corrupt: copy or re-export it, or {CONVERT}"
        )
    raise SlideError(
        f"{path}: not a slide ({path.stat().st_size} bytes starting {head!r}): OpenSlide does not recognise it and it "
        f"is not a TIFF or Zarr; check the file, or {CONVERT}"
    )
