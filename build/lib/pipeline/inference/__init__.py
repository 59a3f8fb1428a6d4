"""Inference: a slide plan, the predictor, and the executors that run it.

Owns: the per-slide plan and the in-process executor (:mod:`engine`), the fused forward pass
(:mod:`predict`), the one tile-batch path every executor takes (:mod:`tile_batches`), the Ray Data executor (:mod:`ray_runner`) and Ray set-up (:mod:`ray_setup`), the batch
of slides behind ``jobs/segment_slides.py`` (:mod:`batch`) and its run report
(:mod:`report`).

May import: :mod:`pipeline.slides`, :mod:`pipeline.store`, :mod:`pipeline.analysis` (the instance labels a
store's finalize writes), :mod:`unet`, torch, Ray. Never training or the demo.
"""
