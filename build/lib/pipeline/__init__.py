"""Overlap-tile whole-slide segmentation on Ray, in rooms by role (see docs/design.md):

- :mod:`pipeline.slides`     slides and tiling: formats, pyramids, exact reads, geometry, resolution, tissue
- :mod:`pipeline.store`      the result on disk: the OME-Zarr contract, tile states, durability, locks, reading
- :mod:`pipeline.inference`  the plan, the predictor, the in-process and Ray executors, the batch and its report
- :mod:`pipeline.analysis`   objects, summaries, GeoJSON, figures from finished stores
- :mod:`pipeline.training`   training the U-Net with Ray Train on image folders and slides
- :mod:`pipeline.demo`       synthetic slides and the end-to-end demo

Dependencies point one way: slides <- store <- inference <- (training, demo); analysis reads store and
slides; inference, training and the demo use :mod:`unet` (the model alone), which imports nothing from here.
Public names are imported on first use, so light modules (``pipeline.demo.synthetic``,
``pipeline.slides.tissue``, ``pipeline.slides.geometry``) load without torch.
"""

from importlib import import_module

_PUBLIC = {
    "segment_slide": "pipeline.inference.engine", "tiled_logits": "pipeline.inference.engine", "SegmentResult": "pipeline.inference.engine",
    "whole_image_logits": "pipeline.inference.predict", "TilePredictor": "pipeline.inference.predict",
    "open_slide": "pipeline.slides.pyramid", "open_pyramid": "pipeline.slides.pyramid", "SlidePyramid": "pipeline.slides.pyramid",
    "SlideError": "pipeline.slides.sources",
    "open_labels": "pipeline.store.output_store", "OutputExistsError": "pipeline.store.output_store",
    "open_result": "pipeline.store.results",
    "Tile": "pipeline.slides.geometry", "TileGrid": "pipeline.slides.geometry", "make_tile_grid": "pipeline.slides.geometry",
    "tile_grid_for_model": "pipeline.slides.geometry", "check_tile_size": "pipeline.slides.geometry",
    "symmetric_index": "pipeline.slides.geometry",
}  # fmt: skip
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
