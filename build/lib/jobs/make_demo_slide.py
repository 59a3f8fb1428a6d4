"""Write a synthetic H&E-like demo slide (pyramidal JPEG TIFF) and its ground-truth nuclei mask.

Example: python jobs/make_demo_slide.py data/demo.tiff --size 8192 --seed 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.demo.synthetic import make_demo_slide  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Memory stays at a few tile rows whatever the size, so e.g. --size 50000 works for benchmarks.",
    )
    p.add_argument("out", type=Path, help="output slide path, e.g. demo.tiff (the mask goes next to it)")
    p.add_argument("--size", type=_positive_int, default=4096, help="square slide side in pixels (default 4096)")
    p.add_argument("--height", type=_positive_int, help="level-0 height in pixels (overrides --size)")
    p.add_argument("--width", type=_positive_int, help="level-0 width in pixels (overrides --size)")
    p.add_argument("--mpp", type=_positive_float, default=0.5, help="microns per pixel at level 0 (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--tile", type=_positive_int, default=256, help="TIFF tile side, multiple of 16 (default 256)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--tissue", type=float, default=0.5,
                   help="fraction of the slide covered by tissue sections before lumens (default 0.5: ~48%% tissue)")
    p.add_argument("--mask", type=Path, help="mask output path (default: OUT with '-mask.tiff' replacing the suffix)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    height, width = args.height or args.size, args.width or args.size
    start = time.perf_counter()
    try:
        demo = make_demo_slide(args.out, height=height, width=width, mpp=args.mpp, seed=args.seed, tile=args.tile,
                               jpeg_quality=args.quality, mask_path=args.mask, tissue=args.tissue)  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"slide: {demo.slide_path}")
    print(f"mask:  {demo.mask_path}")
    levels = ", ".join(f"{w}x{h}" for h, w in demo.level_shapes)
    print(f"size:  {width}x{height} px (WxH) at {demo.mpp} um/px; levels {levels}; {demo.nuclei_count} nuclei; "
          f"{time.perf_counter() - start:.1f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
