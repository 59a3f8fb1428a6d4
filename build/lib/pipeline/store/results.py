"""Reading results downstream: labelled arrays with physical coordinates, and preview pictures."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from pipeline.store.output_store import LABELS_PATH, PALETTE


def open_result(path: str | Path, level: int = 0):
    """The class-index mask of a result store as a lazy ``xarray.DataArray`` (dims y, x).

    Coordinates are pixel centres in µm when the slide had a pixel size, else in pixels of the segmented
    level; ``attrs`` carry the class names, the µm/px and the run's provenance. ``.data`` is a dask array.
    """
    import xarray as xr

    root = zarr.open_group(str(path), mode="r")
    info = dict(root.attrs["wsi_unet"])
    if info.get("status") != "complete":
        raise ValueError(f"{path}: result is not complete (status {info.get('status')!r}); rerun the segment_slides.py command that made it to finish it")
    group = root[LABELS_PATH]
    ome = dict(group.attrs["ome"])
    dataset = ome["multiscales"][0]["datasets"][level]
    scale = dataset["coordinateTransformations"][0]["scale"]
    labels = da.from_zarr(group[str(level)])
    unit = "micrometer" if info.get("mpp") else "pixel"
    coords = {dim: (np.arange(n) + 0.5) * s for dim, n, s in zip(("y", "x"), labels.shape, scale)}
    names = [p["class"] for p in ome["image-label"]["properties"]]
    return xr.DataArray(
        labels, dims=("y", "x"), coords=coords, name="segmentation",
        attrs={"class_names": names, "units": unit, "mpp": info.get("mpp"), "level": level, "provenance": info},
    )  # fmt: skip


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Colour the non-background classes of ``labels`` over ``rgb`` (same height and width)."""
    out = rgb.astype(np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(PALETTE[int(value) % len(PALETTE)][:3], dtype=np.float32)
        where = labels == value
        out[where] = (1 - alpha) * out[where] + alpha * colour
    return out.round().astype(np.uint8)


def preview_labels(store_path: str | Path, max_side: int = 1024) -> np.ndarray:
    """The smallest pyramid level of the mask whose longer side is still >= ``max_side`` (else level 0)."""
    group = zarr.open_group(f"{store_path}/{LABELS_PATH}", mode="r")
    levels = sorted(int(k) for k in group.array_keys())
    level = next((k for k in reversed(levels) if max(group[str(k)].shape) >= max_side), levels[0])
    return group[str(level)][...]


def thumbnail_like(slide, shape: tuple[int, int]) -> np.ndarray:
    """The slide's RGB thumbnail resized to ``shape`` (h, w), e.g. to lie under a pyramid level of the mask."""
    from PIL import Image

    thumb = slide.thumbnail(max(shape))
    thumb = np.repeat(thumb, 3, axis=2) if thumb.shape[2] == 1 else thumb[..., :3]
    return np.asarray(Image.fromarray(thumb).resize(shape[::-1]))


def write_preview(store_path: str | Path, slide, png_path: str | Path, max_side: int = 1024) -> Path:
    """A PNG of the slide thumbnail with the mask overlaid, from the smallest pyramid level >= max_side."""
    from PIL import Image

    labels = preview_labels(store_path, max_side)
    picture = Image.fromarray(overlay(thumbnail_like(slide, labels.shape), labels))
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.NEAREST)
    png_path = Path(png_path)
    picture.save(png_path)
    return png_path
