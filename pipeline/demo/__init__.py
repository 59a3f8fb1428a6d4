"""The demo: synthetic H&E-like slides with known nuclei (:mod:`synthetic`), and the end-to-end run that
``python jobs/segment_slides.py`` does without arguments (:mod:`run`).

May import: everything else in :mod:`pipeline` (the demo runs the real job); nothing imports the demo but
``jobs/`` and tests (and :mod:`synthetic` itself imports only numpy and tifffile).
"""
