"""Screenshots of a store in napari, opened as a user opens it: napari-ome-zarr's reader on the store's root.

What a user does by hand: File > Open the ``.zarr`` folder (plugin napari-ome-zarr), tick the eye of
``labels/labels/nuclei`` (the plugin adds label layers hidden), and set its "color mode" to "auto":
napari-ome-zarr colours only the label values a label image lists, and ``labels/nuclei`` lists only 0
(NGFF 0.5's strict schema asks for ``colors``; ids are too many to list).

Headless (no screen): in a venv with ``pip install "napari[pyqt6]" napari-ome-zarr`` and Debian's ``xvfb``,
``xvfb-run -a -s "-screen 0 1600x1100x24" python docs/napari_screenshot.py STORE OUT.jpg CY CX ZOOM``
(CY, CX: centre of the zoomed view in µm; ZOOM: screen px per µm). Writes OUT.jpg: the whole window on the
whole slide beside the canvas zoomed in.
"""

import sys

import napari
import numpy as np
from PIL import Image


def main(store: str, out: str, centre_y: float, centre_x: float, zoom: float) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    viewer.open(store, plugin="napari-ome-zarr")
    nuclei = next(layer for layer in viewer.layers if layer.name.endswith("nuclei"))
    nuclei.visible, nuclei.opacity = True, 0.6
    nuclei.colormap = napari.utils.colormaps.label_colormap(49, seed=0.5)  # what "color mode: auto" picks
    viewer.layers.selection.active = nuclei
    viewer.reset_view()
    whole = viewer.screenshot(canvas_only=False, flash=False)
    viewer.camera.center, viewer.camera.zoom = (centre_y, centre_x), zoom
    zoomed = viewer.screenshot(canvas_only=True, flash=False)
    viewer.close()
    height = whole.shape[0]
    zoomed = np.asarray(Image.fromarray(zoomed).resize((round(zoomed.shape[1] * height / zoomed.shape[0]), height)))
    gap = np.full((height, 12, 4), 255, np.uint8)
    Image.fromarray(np.concatenate([whole, gap, zoomed], axis=1)[..., :3]).save(out, quality=85)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6]))
