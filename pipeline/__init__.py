"""Overlap-tile whole-slide segmentation: exact tiling, slide access, the engine and the output store.

Public names are imported on first use, so light modules (``pipeline.synthetic``, ``pipeline.tissue``,
``pipeline.geometry``) load without torch.
"""

from importlib import import_module

_PUBLIC = {
    "segment_slide": "pipeline.engine", "tiled_logits": "pipeline.engine", "SegmentResult": "pipeline.engine",
    "whole_image_logits": "pipeline.predict", "TilePredictor": "pipeline.predict",
    "open_slide": "pipeline.pyramid", "open_pyramid": "pipeline.pyramid", "SlidePyramid": "pipeline.pyramid",
    "SlideError": "pipeline.slide",
    "open_labels": "pipeline.store", "OutputExistsError": "pipeline.store",
    "open_result": "pipeline.results",
    "Tile": "pipeline.geometry", "TileGrid": "pipeline.geometry", "make_tile_grid": "pipeline.geometry",
    "tile_grid_for_model": "pipeline.geometry", "check_tile_size": "pipeline.geometry",
    "symmetric_index": "pipeline.geometry",
}  # fmt: skip
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
