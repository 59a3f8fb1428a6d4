#!/usr/bin/env python
"""Check a Ray cluster-launcher config before `ray up`: placeholders filled, Ray's schema, a Python the project runs on.

    python jobs/check_cluster_config.py cluster.yaml

Prints one line per problem (file:line: what is wrong and what to do) and exits 1, or "ok" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"REPLACE_WITH_[A-Z0-9_]+")
PLACEHOLDER_ADVICE = {
    "REPLACE_WITH_NFS_EXPORT": "your NFS export for /data, e.g. fs-0123456789abcdef0.efs.us-east-1.amazonaws.com:/",
}
MIN_PYTHON = (3, 11)


def problems(path: Path) -> list[str]:
    """Every problem of the config at ``path``, one line each (empty: ready for `ray up`)."""
    import yaml

    text = path.read_text()
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for name in PLACEHOLDER.findall(line):
            advice = PLACEHOLDER_ADVICE.get(name, "the value it names")
            found.append(f"{path}:{number}: unfilled placeholder {name}: put {advice} there")
    config = yaml.safe_load(text)
    try:
        import jsonschema
        import ray

        schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
        jsonschema.validate(config, schema)
    except ImportError as error:
        found.append(f"{path}: cannot check it against Ray's schema ({error.name} is not installed): pip install ray jsonschema")
    except Exception as error:  # jsonschema.ValidationError: name the failing key
        where = "/".join(str(p) for p in getattr(error, "absolute_path", [])) or "(top level)"
        found.append(f"{path}: {where}: {getattr(error, 'message', error)}; see Ray's cluster YAML reference")
    image = (config.get("docker") or {}).get("image", "")
    match = re.search(r"-py3(\d+)", image)
    if image and match and (3, int(match.group(1))) < MIN_PYTHON:
        found.append(f"{path}: docker image {image} has Python 3.{match.group(1)}; the project needs >= "
                     f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}: use a -py312 image")  # fmt: skip
    setup = " ".join(config.get("setup_commands") or [])
    if "torch" in setup and not re.search(r"torch==[\d.]+.*--index-url https://download\.pytorch\.org/whl/cu\d+", setup):
        found.append(f"{path}: setup_commands install torch without pinning a CUDA build: pip install "
                     "'torch==X.Y.Z' --index-url https://download.pytorch.org/whl/cuNNN")  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?", default=Path(__file__).resolve().parents[1] / "cluster.yaml")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        print(f"{args.config}: no such file; give the cluster YAML to check", file=sys.stderr)
        return 1
    found = problems(args.config)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"ok: {args.config} is ready for `ray up {args.config}`")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
