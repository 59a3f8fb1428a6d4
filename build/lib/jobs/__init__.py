"""The command-line entry points, thin: ``wsi-segment``, ``wsi-summarize``, ``wsi-train`` once installed, or
``python jobs/<name>.py`` from a checkout. The logic lives in ``pipeline``.

The bundled model and its files sit in the repository's ``models/``; ``pip install`` (not editable) also copies
them to ``<prefix>/share/wsi-unet/models`` (pyproject's data-files), so an installed tool finds them without the
repository: :func:`bundled_file`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_MODELS = REPO_ROOT / "models"
INSTALLED_MODELS = Path(sys.prefix) / "share" / "wsi-unet" / "models"


def bundled_file(name: str, places: tuple[Path, ...] = (REPO_MODELS, INSTALLED_MODELS)) -> Path:
    """``models/<name>`` of the checkout, else of the installed copy; the first place if neither has it
    (so a message names where it was expected)."""
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    return places[0] / name


def in_checkout() -> bool:
    """Run from the repository (not from an installed wheel): its folders (demo/, runs/) are the defaults."""
    return (REPO_ROOT / "pyproject.toml").is_file()
