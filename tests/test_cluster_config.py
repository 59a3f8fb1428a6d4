"""cluster.yaml is a valid Ray cluster-launcher config (checked offline against the schema in the ray wheel)."""

import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]


def load():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    return yaml.safe_load((ROOT / "cluster.yaml").read_text()), schema


def test_cluster_yaml_validates_against_rays_schema():
    config, schema = load()
    jsonschema.validate(config, schema)


def test_cluster_has_a_gpu_worker_type_and_installs_the_project():
    config, _ = load()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert any("pip install -e" in command for command in config["setup_commands"])


def test_schema_check_really_rejects_unknown_keys():
    config, schema = load()
    config["not_a_ray_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
