"""Overlap-tile whole-slide segmentation: exact tiling, slide access, the engine and the output store."""

from pipeline.engine import SegmentResult, segment_slide, tiled_logits
from pipeline.geometry import Tile, TileGrid, check_tile_size, make_tile_grid, symmetric_index, tile_grid_for_model
from pipeline.predict import TilePredictor, whole_image_logits
from pipeline.slide import SlideError, open_slide
from pipeline.store import OutputExistsError, open_labels

__all__ = [
    "segment_slide", "tiled_logits", "whole_image_logits", "SegmentResult", "TilePredictor",
    "open_slide", "SlideError", "open_labels", "OutputExistsError",
    "Tile", "TileGrid", "make_tile_grid", "tile_grid_for_model", "check_tile_size", "symmetric_index",
]  # fmt: skip
