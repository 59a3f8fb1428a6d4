"""The house rules that docs/design.md states: rooms import only what they may, no cycles, `unet/` stays alone,
no module past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {  # room -> rooms it may import (besides itself and pipeline.text)
    "pipeline.slides": set(),
    "pipeline.store": {"pipeline.slides"},
    "pipeline.inference": {"pipeline.slides", "pipeline.store", "pipeline.analysis", "unet"},  # instances at finalize
    "pipeline.analysis": {"pipeline.slides", "pipeline.store"},
    "pipeline.training": {"pipeline.slides", "pipeline.store", "pipeline.analysis", "pipeline.inference", "unet"},
    "pipeline.demo": {"pipeline.slides", "pipeline.store", "pipeline.analysis", "pipeline.inference", "unet"},
    "pipeline.text": set(),
    "unet": set(),  # the model alone
}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "unet":
        return "unet"
    if parts[0] == "pipeline" and len(parts) > 1:
        return ".".join(parts[:2])
    return None


def imports_by_module() -> dict[str, set[str]]:
    """Every module of pipeline/ and unet/ -> the modules it imports (at the top or inside functions)."""
    found = {}
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("unet/**/*.py")]:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[module] = names
    return found


def test_rooms_import_only_what_the_design_allows():
    wrong = []
    for module, names in imports_by_module().items():
        room = room_of(module)
        for name in names:
            target = room_of(name)
            if room is None or target is None or target in (room, "pipeline.text") or name == "pipeline":
                continue
            if target not in ALLOWED.get(room, set()):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))


def test_unet_is_the_model_alone():
    modules = {m for m in imports_by_module() if m.startswith("unet")}
    assert modules == {"unet", "unet.artifact", "unet.model", "unet.receptive_field"}


def test_no_module_is_past_400_lines():
    long = {str(p.relative_to(REPO)): n for p in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("unet/**/*.py"),
            *REPO.glob("jobs/*.py")] if (n := len(p.read_text().splitlines())) > 420}  # fmt: skip
    assert not long, long


def test_slides_store_and_analysis_need_neither_torch_nor_ray():
    """They run where the model does not (summaries on a laptop, previews, readers in Ray tasks)."""
    heavy = [f"{module} imports {name}" for module, names in imports_by_module().items()
             if room_of(module) in ("pipeline.slides", "pipeline.store", "pipeline.analysis")
             for name in names if name.split(".")[0] in ("torch", "ray")]  # fmt: skip
    assert not heavy, heavy
