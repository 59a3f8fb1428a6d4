"""cluster.yaml is a valid Ray cluster-launcher config (checked offline against the schema in the ray wheel) whose
nodes all run with token authentication, the token made on the head and synced to the workers."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
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


# --------------------------------------------------------------------------- token authentication
TOKEN = "~/.ray/auth_token"  # Ray's default token path, where the head makes it and workers receive it
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
RAY_START = re.compile(r"(?:^|[\s;&|(/])ray start\b")


def all_commands(config) -> list[str]:
    """Every shell command of the config, the node types' own lists included."""
    sections = [config, *(t for t in config["available_node_types"].values())]
    return [command for section in sections for key in COMMAND_LISTS for command in section.get(key) or []]


def auth_before_ray_start(command: str) -> bool:
    """``RAY_AUTH_MODE=token`` set (exported or as a prefix) before every ``ray start`` of one command line."""
    return all("RAY_AUTH_MODE=token" in command[: m.start()] for m in RAY_START.finditer(command))


def test_head_and_workers_start_ray_with_token_auth():
    config, _ = load()
    head = [c for c in config["head_start_ray_commands"] if RAY_START.search(c)]
    workers = [c for c in config["worker_start_ray_commands"] if RAY_START.search(c)]
    assert len(head) == 1 and "--head" in head[0] and auth_before_ray_start(head[0])
    assert "--dashboard-host=127.0.0.1" in head[0]  # reached through `ray dashboard`'s SSH tunnel only
    assert len(workers) == 1 and "--address=" in workers[0] and auth_before_ray_start(workers[0])


def test_no_ray_start_without_token_auth_and_no_token_in_the_config():
    config, _ = load()
    starts = [c for c in all_commands(config) if RAY_START.search(c)]
    assert len(starts) >= 2
    assert [c for c in starts if not auth_before_ray_start(c)] == []
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert "RAY_AUTH_TOKEN=" not in text  # the token itself is never in a file of the repo
    assert not any("auth_token" in str(path) for pair in config["file_mounts"].items() for path in pair)


def test_token_is_made_on_the_head_and_synced_to_every_worker():
    config, _ = load()
    (make,) = [c for c in config["head_setup_commands"] if "get-auth-token --generate" in c]
    assert "umask 077" in make and "> /dev/null" in make and f"chmod 600 {TOKEN}" in make  # private, never logged
    assert config["cluster_synced_files"] == [TOKEN]
    assert any(f"test -s {TOKEN}" in c for c in config["worker_setup_commands"])
    overrides = [t for t in config["available_node_types"].values() if "worker_setup_commands" in t]
    assert not overrides  # a node type's own list would replace the check


def test_documented_commands_fetch_the_token_from_where_the_head_makes_it():
    config, _ = load()
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray rsync-down cluster.yaml /home/ray/.ray/auth_token" in text  # the container's user and home
    submit = r"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\S+ \\\n#\s+ray job submit --address http://127\.0\.0\.1:8265"
    assert re.search(submit, text)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("bash") is None, reason="runs bash")
@pytest.mark.skipif(not Path(sys.executable).with_name("ray").exists(), reason="no `ray` command beside this Python")
def test_setup_commands_make_a_private_token_once_and_workers_refuse_to_start_without_it(tmp_path):
    """The head's and workers' setup commands as written, run with bash in throwaway homes (this venv's `ray`)."""
    config, _ = load()
    (make,) = [c for c in config["head_setup_commands"] if "get-auth-token" in c]
    (check,) = config["worker_setup_commands"]

    def run(command: str, home: Path) -> subprocess.CompletedProcess:
        home.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
        env = {"HOME": str(home), "PATH": path}  # `ray` on the PATH, as in the nodes' container
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)

    head, worker = tmp_path / "head", tmp_path / "worker"
    made = run(make, head)
    token = head / ".ray" / "auth_token"
    assert made.returncode == 0, made.stderr
    assert made.stdout == "" and token.read_text() not in made.stderr  # not in `ray up`'s log
    assert len(token.read_text().strip()) >= 32
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    first = token.read_text()
    assert run(make, head).returncode == 0 and token.read_text() == first  # a rerun of `ray up` keeps it

    missing = run(check, worker)
    assert missing.returncode != 0 and "no Ray auth token" in missing.stderr
    (worker / ".ray").mkdir()
    shutil.copy2(token, worker / ".ray" / "auth_token")  # what cluster_synced_files' rsync -a does
    assert run(check, worker).returncode == 0


# --------------------------------------------------------------------------- a config that would boot
CHECK = ROOT / "jobs" / "check_cluster_config.py"


def test_nodes_run_a_python_the_project_supports_and_a_pinned_cuda_torch():
    config, _ = load()
    image = config["docker"]["image"]
    assert re.search(r"rayproject/ray:[\d.]+-py31[1-9]-gpu$", image), image
    assert "-v /data:/data" in config["docker"]["run_options"]  # the shared storage reaches the container
    amis = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert amis == {"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"}
    assert any(re.search(r"torch==[\d.]+\S* --index-url https://download\.pytorch\.org/whl/cu\d+", c)
               for c in config["setup_commands"])  # fmt: skip


def test_check_script_refuses_the_unfilled_template_and_accepts_a_filled_copy(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), str(ROOT / "cluster.yaml")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "unfilled placeholder REPLACE_WITH_NFS_EXPORT" in line and "cluster.yaml:" in line and "efs" in line
    filled = tmp_path / "cluster.yaml"
    filled.write_text((ROOT / "cluster.yaml").read_text().replace(
        "REPLACE_WITH_NFS_EXPORT", "fs-0123456789abcdef0.efs.us-east-1.amazonaws.com:/"))
    done = subprocess.run([sys.executable, str(CHECK), str(filled)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok:"), done.stderr
    old = tmp_path / "old.yaml"
    old.write_text(filled.read_text().replace("-py312-gpu", "-py310-gpu").replace("--index-url", "--extra-index-url"))
    done = subprocess.run([sys.executable, str(CHECK), str(old)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Python 3.10" in done.stderr and "without pinning a CUDA build" in done.stderr
