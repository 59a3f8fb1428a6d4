"""What a command line's positional inputs name: items given directly, folders of items, glob patterns.

Shared by ``segment_slides.py`` (slides) and ``summarize_results.py`` (result stores); light (no torch).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


@dataclass(frozen=True)
class InputKind:
    """How to recognise one kind of input. ``is_item``: a path that is one (a folder may be one, e.g. a Zarr);
    ``in_folder``: which entries of a named folder count (default ``is_item``); the words for messages."""

    is_item: Callable[[Path], bool]
    plural: str  # "slides"
    missing: str  # "no such slide file or directory"
    folder_hint: str = ""  # " (.svs .tif ...)"
    in_folder: Callable[[Path], bool] | None = None


def expand_inputs(
    inputs: Iterable[str], kind: InputKind, exclude: str | Path | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """(items in order without duplicates, [(input, one-line reason)] for inputs that name none).

    A folder that is not itself an item is searched, not recursively, skipping hidden entries; a file that
    exists is taken as named (whoever opens it rejects it with its own reason). Anything under ``exclude``
    (an output folder) is left out, so outputs are never taken for inputs."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    excluded = Path(exclude).resolve() if exclude is not None else None
    seen: set[Path] = set()
    in_folder = kind.in_folder or kind.is_item
    for item in inputs:
        named = [(path, path.resolve()) for path in _expand_one(item, kind, in_folder, problems)]
        kept = [(path, real) for path, real in named if excluded is None or not _inside(real, excluded)]
        if named and not kept:  # all it names is output: the output folder was given as input
            problems.append((item, f"{item}: inside the output folder {exclude} (outputs are never inputs); "
                                   f"put the {kind.plural} and the outputs in different folders"))  # fmt: skip
        for path, real in kept:
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found, problems


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _expand_one(item: str, kind: InputKind, in_folder: Callable[[Path], bool],
                problems: list[tuple[str, str]]) -> list[Path]:  # fmt: skip
    """What one input names (a file, a folder's entries, a glob's matches); records why if it names none."""
    path = Path(item)
    if path.exists() and (not path.is_dir() or kind.is_item(path)):
        return [path]
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if in_folder(p) and not p.name.startswith("."))
        if not entries:
            problems.append((item, f"{item}: directory holds no {kind.plural}{kind.folder_hint}"))
        return entries
    if glob.has_magic(item):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if kind.is_item(Path(m)))
        if not matches:
            problems.append((item, f"{item}: no {kind.plural} match this pattern"))
        return matches
    problems.append((item, f"{item}: {kind.missing}; check the path"))
    return []
