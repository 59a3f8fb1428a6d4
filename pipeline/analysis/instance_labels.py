"""The store's instance label image ``labels/<name>`` (e.g. ``labels/nuclei``), made when the store is finalized.

Why here and not in :mod:`pipeline.store`: it is an analysis of the finished mask and reuses the block
machinery of :mod:`pipeline.analysis.components`, which the store room may not import. The store calls it
through :meth:`pipeline.store.output_store.OutputStore.finalize`'s ``derived`` step (passed by the inference
plan, so the in-process engine and the Ray finalize task both run it), before the store is marked complete:
a crash leaves the store ``running`` and the rerun rebuilds ``labels/<name>`` from scratch (idempotent).

Layout: uint32 ids (0 = none), the same levels, shapes, chunks and shards as ``labels/segmentation``; lower
levels sample every other id (``[::2, ::2]``, never averaged); NGFF 0.5 ``multiscales`` as the segmentation's
and ``image-label`` with ``source`` pointing at the slide image; the name is added to ``labels``' list.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import zarr

from pipeline.analysis.components import ComponentOptions
from pipeline.analysis.instance_zarr import label_instances_zarr
from pipeline.analysis.instances import InstanceRule
from pipeline.store.durability import sync_files, sync_tree
from pipeline.store.label_pyramid import LABELS_PATH, build_pyramid

logger = logging.getLogger(__name__)
SCRATCH = ".instances-scratch"  # hidden folder of the store for the blocks' edge strips while ids are grown; removed after
FINALIZE_WORKERS = 4  # threads of the finalize step (a Ray finalize task holds one CPU; the pyramid uses 4 too)


def write_instance_labels(store: str | Path, rule: InstanceRule, options: ComponentOptions | None = None) -> int:
    """(Re)write ``labels/<rule.name>`` of ``store`` from ``labels/segmentation`` level 0: ids, pyramid, metadata,
    synced. Returns the number of instances."""
    path = Path(store)
    segmentation = zarr.open_group(str(path / LABELS_PATH), mode="r")
    multiscales = dict(segmentation.attrs["ome"]["multiscales"][0])
    labels = zarr.open_group(str(path / "labels"), mode="r+")
    _remove_label(labels, path, rule.name)  # a half-written one from a crashed finalize
    group = labels.create_group(rule.name)
    for dataset in multiscales["datasets"]:
        level = segmentation[dataset["path"]]
        group.create_array(dataset["path"], shape=level.shape, chunks=level.chunks, shards=level.shards,
                           dtype="uint32", fill_value=0, dimension_names=["y", "x"])  # fmt: skip
    scratch = path / SCRATCH
    try:
        count = label_instances_zarr(segmentation["0"], group["0"], rule, scratch / rule.name,
                                     options or ComponentOptions(workers=min(FINALIZE_WORKERS, os.cpu_count() or 1)))  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    build_pyramid(path, first=1, labels=f"labels/{rule.name}")
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{**multiscales, "name": rule.name, "type": "nearest",
                         "metadata": {"description": "instance ids; each level takes every other pixel of the one above"}}],
        "image-label": {"version": "0.5", "source": {"image": "../../"},
                        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]},  # ids: viewers pick their colours
    }
    sync_tree(path / "labels" / rule.name)
    ome = dict(labels.attrs["ome"])
    ome["labels"] = [*[name for name in ome.get("labels", []) if name != rule.name], rule.name]
    labels.attrs["ome"] = ome
    sync_files([path / "labels" / "zarr.json"], path / "labels")
    return count


def _remove_label(labels: zarr.Group, path: Path, name: str) -> None:
    """Drop ``labels/<name>`` from the list and from disk (the list first: never a listed label without files)."""
    ome = dict(labels.attrs.get("ome", {}))
    if name in ome.get("labels", []):
        ome["labels"] = [other for other in ome["labels"] if other != name]
        labels.attrs["ome"] = ome
    shutil.rmtree(path / "labels" / name, ignore_errors=True)


def finalize_instances(store: str | Path) -> dict[str, Any]:
    """The ``derived`` step of :meth:`OutputStore.finalize`: write the instance labels when the store's provenance
    holds a rule (``instances: {"rule": ...}``, from the model's card) and return the provenance to record with
    ``complete``: ``instances: {"rule", "count"}`` (not the seconds, which are logged: a resumed store's metadata
    equals an uninterrupted one's); {} without a rule."""
    recorded = dict(zarr.open_group(str(store), mode="r").attrs["wsi_unet"]).get("instances")
    if not recorded:
        return {}
    rule = InstanceRule.from_dict(recorded["rule"])
    started = time.perf_counter()
    count = write_instance_labels(store, rule)
    logger.info("%s: %d instances -> labels/%s in %.1f s", store, count, rule.name, time.perf_counter() - started)
    return {"instances": {"rule": rule.to_dict(), "count": count}}
