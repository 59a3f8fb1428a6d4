#!/usr/bin/env python
"""Numbers, shapes and pictures from result stores: one CSV row per slide, GeoJSON for QuPath, figures.

    python jobs/summarize_results.py results/                         # every <slide>.zarr in results/
    python jobs/summarize_results.py results/*.zarr --geojson --figures --out reports/

Per slide: area of each class (px, µm², mm²), tissue area, object counts of the object classes (objects
cut by chunk borders counted once; a store with nuclei instances, labels/nuclei, counts the instances),
objects per mm² of tissue and object size statistics; written to
OUT/summary.csv and printed as a table. ``--geojson`` writes OUT/<slide>.geojson (level-0 pixel
coordinates, QuPath: File > Import objects); ``--figures`` writes OUT/<slide>-overview.png. A store
that is missing, unfinished or unreadable is reported on one line and the others are still summarized;
the exit status is then 1 (2 for usage errors). The logic lives in ``pipeline.analysis.summary``,
``pipeline.analysis.geojson`` and ``pipeline.analysis.figures``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import logging  # noqa: E402

logger = logging.getLogger("summarize_results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="summarize_results.py",
        description="Summarize wsi-unet result stores (<slide>.zarr): per-slide class areas, tissue area, object "
        "counts, densities and sizes as a CSV and a table; optionally QuPath GeoJSON and an overview figure per slide.",
    )
    add = parser.add_argument
    # fmt: off
    add("stores", nargs="+", metavar="STORES",
        help="result stores (<slide>.zarr folders), directories holding them (not recursive) or quoted glob "
        "patterns ('results/**/*.zarr')")
    add("--out", metavar="DIR", default=None,
        help="folder for summary.csv, GeoJSON and figures (default: the folder of the first store)")
    add("--csv", metavar="FILE", default=None, help="CSV path (default: OUT/summary.csv)")
    add("--geojson", action="store_true",
        help="also write OUT/<slide>.geojson: one feature per object in level-0 pixels, for QuPath")
    add("--figures", action="store_true",
        help="also write OUT/<slide>-overview.png: thumbnail, mask overlay, class areas, object sizes")
    add("--objects", nargs="+", metavar="CLASS", default=None,
        help="class names (or indices) counted as objects and exported as QuPath detections, e.g. --objects "
        "nucleus; the other classes but background are regions (QuPath annotations) (default: every class but "
        "background, index 0, and those a store's instances absorbed, e.g. nucleus boundary). In a store with "
        "instances (labels/nuclei) the objects of their class are the instances, one GeoJSON feature each")
    add("--min-area", type=float, default=0.0, metavar="UM2",
        help="leave objects smaller than UM2 µm² out of counts, densities, sizes and GeoJSON, e.g. 5 for speckles "
        "(class areas keep every pixel; default: %(default)s, keep all)")
    add("--min-area-px", type=int, default=0, metavar="N",
        help="the same in pixels of the segmented level, also for stores without µm/px (default: %(default)s)")
    add("--connectivity", type=int, choices=(4, 8), default=8,
        help="pixels of one object touch by an edge or a corner (8) or by an edge only (4) (default: %(default)s)")
    add("--no-tissue-detection", action="store_true",
        help="for stores without a tissue mask, take the whole image as tissue instead of detecting tissue on "
        "the slide's thumbnail")
    add("--workers", type=int, default=None, metavar="N",
        help="threads reading and labelling blocks (default: all cores)")
    add("--block", type=int, default=None, metavar="PX",
        help="side of the blocks labelled at once, rounded up to whole Zarr chunks (default: 1024); memory is "
        "about 10 bytes per pixel of a block per worker")
    add("--quiet", action="store_true", help="only warnings and errors on stderr")
    # fmt: on
    return parser


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def options_from(args: argparse.Namespace):
    from pipeline.analysis.summary import AnalysisOptions
    from pipeline.analysis.components import ComponentOptions

    components = ComponentOptions(connectivity=args.connectivity, block=args.block, workers=args.workers)
    analysis = AnalysisOptions(
        object_classes=tuple(args.objects) if args.objects else None, min_area_um2=args.min_area,
        min_area_px=args.min_area_px, detect_tissue=not args.no_tissue_detection, components=components,
    )  # fmt: skip
    return analysis, components


def geojson_options(summary, components):
    """Object classes become QuPath detections, the other non-background classes annotations (regions)."""
    from pipeline.analysis.geojson import GeoJSONOptions

    return GeoJSONOptions(detections=tuple(summary.object_classes), min_area_px=summary.min_object_px,
                          components=components)  # fmt: skip


def summarize_one(path: Path, out_dir: Path, args: argparse.Namespace, analysis, components):
    """Everything asked for one store; raises with a one-line reason on failure."""
    from pipeline.analysis.summary import summarize_store

    summary = summarize_store(path, analysis)
    if args.geojson:
        from pipeline.analysis.geojson import export_geojson

        out = out_dir / f"{summary.store.name}.geojson"
        export_geojson(path, out, geojson_options(summary, components), summary.components, summary.instances)
    if args.figures:
        from pipeline.analysis.figures import write_overview

        png = write_overview(summary, out_dir / f"{summary.store.name}-overview.png")
        logger.info("%s: figure -> %s", summary.store.name, png)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    from pipeline.analysis.summary import find_stores, format_table, write_csv
    from pipeline.text import one_line

    try:
        analysis, components = options_from(args)
    except ValueError as error:
        usage_error(one_line(error))
    stores, problems = find_stores(args.stores)
    failures = [reason for _, reason in problems]
    out_dir = Path(args.out) if args.out else (stores[0].parent if stores else Path("."))
    summaries = []
    for path in stores:
        try:
            summaries.append(summarize_one(path, out_dir, args, analysis, components))
        except Exception as error:  # one bad store never stops the others
            logger.debug("failure details", exc_info=True)
            failures.append(f"{path}: {one_line(error)}" if str(path) not in str(error) else one_line(error))
    if summaries:
        csv_path = write_csv(summaries, Path(args.csv) if args.csv else out_dir / "summary.csv")
        print(format_table(summaries))
        print(f"summary: {csv_path}")
    for reason in failures:
        print(f"error: {reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(stores) + len(problems)} inputs failed", file=sys.stderr)
    return 1 if failures else 0


def run() -> None:
    """The console entry point (``wsi-summarize``) and ``python jobs/summarize_results.py``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
