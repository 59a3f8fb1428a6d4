"""Slides and tiling: from a file to exact pixels and the tiles that cover them.

Owns: opening a slide (:mod:`formats`: which format, what is refused), its pyramid and native readers
(:mod:`pyramid`, :mod:`tiff_reader`), views of one level (:mod:`sources`: windows, resampling, limits), the
tiling geometry as pure functions (:mod:`geometry`), the level for a µm/px (:mod:`resolution`), tissue
detection (:mod:`tissue`, :mod:`tissue_tiles`), level-0 coordinates (:mod:`coordinates`) and which
command-line inputs name slides or stores (:mod:`inputs`: files, folders, globs).

May import: numpy, tifffile, openslide, zarr (reading), PIL. Never the store, inference, torch or Ray.
"""
