"""A per-slide overview figure for reports: slide thumbnail, mask overlay, class areas and object sizes.

Why: a reviewer wants to see at a glance that the mask sits on the tissue and what the numbers are
before reading a table. The figure is drawn from the low-resolution pyramid of the mask and the slide's
own thumbnail (never the full resolution), with the same colours as the store's label metadata. A store with
instances (``labels/nuclei``) shows each instance in its own colour with its outline, since touching nuclei are
one blob in the class colours, and its size histogram is of the instances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis.instance_stats import instance_level
from pipeline.analysis.summary import SlideSummary, format_number
from pipeline.store.results import overlay, preview_labels, thumbnail_like
from pipeline.store.output_store import PALETTE

logger = logging.getLogger(__name__)
TISSUE_GREY = (0.62, 0.62, 0.62)


@dataclass(frozen=True)
class FigureOptions:
    """``max_side``: pixels of the mask level shown (the smallest pyramid level at least this big).
    ``dpi``: resolution of the PNG (the figure is 15 x 6.4 inches)."""

    max_side: int = 1024
    dpi: int = 150


def colour(cls: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in PALETTE[cls % len(PALETTE)][:3])


def slide_thumbnail(summary: SlideSummary, shape: tuple[int, int]) -> np.ndarray | None:
    """The slide under the mask, or None when its file is gone or unreadable (the figure shows the mask alone)."""
    from pipeline.slides.pyramid import open_pyramid

    source = summary.store.provenance.get("source")
    if not source or not Path(source).exists():
        return None
    try:
        return thumbnail_like(open_pyramid(source), shape)
    except Exception as error:
        logger.warning(
            "%s: no thumbnail from %s (%s); the figure shows the mask only", summary.store.name, source, error
        )
        return None


def title_lines(summary: SlideSummary) -> tuple[str, str]:
    """The slide's name, and one line of key numbers."""
    info, (height, width) = summary.store.provenance, summary.store.shape
    parts = [f"{width:,} × {height:,} px", f"level {info.get('level', 0)}"]
    parts.append(f"{summary.mpp:.3f} µm/px" if summary.mpp else "no µm/px")
    tissue = summary.tissue_mm2
    parts.append(f"tissue {tissue:.2f} mm²" if tissue is not None else f"tissue {summary.tissue_pixels:,.0f} px")
    for k in summary.object_classes:
        name, areas = summary.store.class_names[k], summary.object_areas(k)
        density = summary.density(k)
        text = f"{name}: {len(areas):,}" + (f" ({format_number(density)}/mm²)" if density is not None else "")
        if len(areas):
            median = summary.um2(float(np.median(areas)))
            text += f", median {median:.1f} µm²" if median is not None else f", median {np.median(areas):.0f} px"
        parts.append(text)
    return summary.store.name, "   ·   ".join(parts)


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """A random-looking but fixed RGB (0..255) per id, so neighbouring instances differ and reruns match."""
    from matplotlib.colors import hsv_to_rgb

    hue = (ids.astype(np.uint64) * np.uint64(2654435761) % np.uint64(2**32)) / 2**32  # Knuth's multiplicative hash
    return hsv_to_rgb(np.stack([hue, np.full_like(hue, 0.7), np.full_like(hue, 0.95)], axis=-1)) * 255


def instance_overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Each instance of ``ids`` (0: none) in its own colour over ``rgb``, its outline (pixels next to another id,
    4-neighbours) in a dark shade of it."""
    out = rgb.astype(np.float32)
    inside = ids > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * instance_colours(ids[inside])
    edge = np.zeros_like(inside)
    for axis in (0, 1):
        step = np.diff(ids, axis=axis) != 0
        lead, trail = [slice(None)] * 2, [slice(None)] * 2
        lead[axis], trail[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lead)] |= step
        edge[tuple(trail)] |= step
    edge &= inside
    out[edge] = 0.45 * instance_colours(ids[edge])
    return out.round().astype(np.uint8)


def draw_images(axes: list, summary: SlideSummary, labels: np.ndarray, thumb: np.ndarray | None,
                ids: np.ndarray | None = None) -> None:  # fmt: skip
    """The slide and the mask over it; without the slide (``thumb`` None), the mask alone on white. ``ids``:
    instance ids at the mask's shape, drawn over the classes."""
    from matplotlib.patches import Patch

    if thumb is not None:
        axes[0].imshow(thumb, interpolation="lanczos")
        axes[0].set_title("slide", loc="left", fontsize=10)
    background = thumb if thumb is not None else np.full((*labels.shape, 3), 255, dtype=np.uint8)
    alpha = 0.75 if thumb is not None else 1.0
    if ids is None:
        picture = overlay(background, labels, alpha=alpha)
    else:
        picture = instance_overlay(overlay(background, np.where(ids > 0, 0, labels), alpha=alpha), ids, alpha)
    axes[-1].imshow(picture, interpolation="nearest")
    title = "segmentation" if ids is None else f"segmentation, {summary.instances.path} in random colours"
    axes[-1].set_title(title + ("" if thumb is not None else " (slide file not available)"), loc="left",
                       fontsize=10)  # fmt: skip
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("0.85")
    present = [k for k in range(1, len(summary.store.class_names)) if summary.class_pixels[k]]
    if present:
        handles = [Patch(color=colour(k), label=summary.store.class_names[k]) for k in present]
        axes[-1].legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.85)


def draw_area_bars(ax, summary: SlideSummary) -> None:
    """Horizontal bars: tissue, then each non-background class, in mm² (px without µm/px), with % of tissue."""
    names = ["tissue"] + summary.store.class_names[1:]
    pixels = [summary.tissue_pixels] + [float(p) for p in summary.class_pixels[1:]]
    unit = "mm²" if summary.mpp else "px"
    values = [summary.mm2(p) if summary.mpp else p for p in pixels]
    colours = [TISSUE_GREY] + [colour(k) for k in range(1, len(names))]
    positions = np.arange(len(names))[::-1]
    ax.barh(positions, values, color=colours, height=0.6)
    ax.set_yticks(positions, names, fontsize=9)
    ax.set_xlabel(f"area ({unit})", fontsize=9)
    ax.set_title("class areas", loc="left", fontsize=10)
    top = max(values) if max(values) > 0 else 1.0
    ax.set_xlim(0, top * 1.45)
    for index, (y, value, pix) in enumerate(zip(positions, values, pixels)):
        share = f"  ({100 * pix / summary.tissue_pixels:.1f} % of tissue)" if index and summary.tissue_pixels else ""
        ax.text(value, y, f" {format_number(value)}{share}", va="center", fontsize=8)
    _tidy(ax)


def draw_size_histogram(ax, summary: SlideSummary) -> None:
    """Object size distributions (µm², px without µm/px), one outline per object class, up to the 99th percentile."""
    unit = "µm²" if summary.mpp else "px"
    scale = summary.mpp**2 if summary.mpp else 1.0
    drawn = False
    for k in summary.object_classes:
        areas = summary.object_areas(k) * scale
        if len(areas) == 0:
            continue
        top = float(np.percentile(areas, 99)) or float(areas.max())
        ax.hist(areas, bins=np.linspace(0, top, 41), histtype="stepfilled", alpha=0.35, color=colour(k))
        name = summary.store.class_names[k] + (" instances" if summary.from_instances(k) else "")
        ax.hist(areas, bins=np.linspace(0, top, 41), histtype="step", color=colour(k), linewidth=1.2,
                label=f"{name} (n = {len(areas):,})")  # fmt: skip
        ax.axvline(float(np.median(areas)), color=colour(k), linestyle="--", linewidth=1)
        drawn = True
    floor = ""
    if summary.min_object_px > 1:
        floor = f", objects ≥ {summary.min_object_px} px" + (
            f" = {summary.min_object_px * scale:.3g} µm²" if summary.mpp else ""
        )
    ax.set_title(f"object sizes (dashed: median{floor})", loc="left", fontsize=10)
    ax.set_xlabel(f"area ({unit})", fontsize=9)
    ax.set_ylabel("objects", fontsize=9)
    if drawn:
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no objects", ha="center", va="center", color="0.4", transform=ax.transAxes)
    _tidy(ax)


def _tidy(ax) -> None:
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def write_overview(summary: SlideSummary, png_path: str | Path, options: FigureOptions = FigureOptions()) -> Path:
    """Draw the overview figure of one slide to ``png_path`` (PNG)."""
    from matplotlib.figure import Figure  # not pyplot: no global state, no display, no backend switch

    labels = preview_labels(summary.store.path, options.max_side)
    ids = instance_level(summary.instances, labels.shape) if summary.instances else None
    thumb = slide_thumbnail(summary, labels.shape)
    figure = Figure(figsize=(15, 6.4), layout="constrained")
    grid = figure.add_gridspec(2, 3, width_ratios=(1, 1, 0.85))
    image_axes = [figure.add_subplot(grid[:, 0]), figure.add_subplot(grid[:, 1])] if thumb is not None else [
        figure.add_subplot(grid[:, :2])]  # fmt: skip
    draw_images(image_axes, summary, labels, thumb, ids)
    draw_area_bars(figure.add_subplot(grid[0, 2]), summary)
    draw_size_histogram(figure.add_subplot(grid[1, 2]), summary)
    name, numbers = title_lines(summary)
    figure.suptitle(f"{name}\n{numbers}", fontsize=11, x=0.01, ha="left", linespacing=1.6)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=options.dpi, facecolor="white")
    return png_path
