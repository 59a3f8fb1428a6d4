"""The store: the on-disk contract of one result, ``<slide>.zarr``, and everything that keeps it whole.

Owns: the OME-Zarr layout, one writer per chunk, create / resume / overwrite and finalize
(:mod:`output_store`), the per-tile state files (:mod:`tile_state`), durability under power loss
(:mod:`durability`), the lock that gives a store one job (:mod:`locking`) and reading results back with
previews (:mod:`results`).

May import: :mod:`pipeline.slides` (geometry, for tile boxes; slides, for previews), zarr, numpy. Never
inference, torch or Ray.
"""
