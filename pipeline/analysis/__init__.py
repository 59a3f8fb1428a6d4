"""Analysis of finished stores: objects, per-slide summaries, GeoJSON for QuPath, figures.

Owns: connected components across chunks (:mod:`components`), summaries and CSV (:mod:`summary`), GeoJSON
export in level-0 pixels (:mod:`geojson`) and figures (:mod:`figures`).

May import: :mod:`pipeline.store` (reading results), :mod:`pipeline.slides` (coordinates, thumbnails),
zarr, dask, numpy, matplotlib. Never inference, torch or Ray.
"""
