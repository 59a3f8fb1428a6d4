"""Analysis of finished stores: objects, per-slide summaries, GeoJSON for QuPath, figures.

Owns: connected components across chunks (:mod:`components`), nuclei instances from a class map (:mod:`instances`,
the whole-image reference; :mod:`instance_zarr`, out of core and exact; :mod:`instance_labels`, the store's
``labels/<name>``), summaries and CSV (:mod:`summary`), GeoJSON export in level-0 pixels (:mod:`geojson`) and
figures (:mod:`figures`).

May import: :mod:`pipeline.store` (reading results), :mod:`pipeline.slides` (coordinates, thumbnails),
zarr, dask, numpy, matplotlib. Never inference, torch or Ray.
"""
