"""The demo: synthetic H&E-like slides with known nuclei (:mod:`synthetic`), and the end-to-end run that
``python jobs/segment_slides.py`` does without arguments (:mod:`run`).

May import: everything else in :mod:`pipeline` (the demo runs the real job); only ``jobs/``, ``benchmarks/``
and tests import the demo (:mod:`synthetic` itself needs numpy, scipy, tifffile and atomic files from the store).
"""
