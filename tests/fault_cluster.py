"""Segment one slide on a local multi-node Ray cluster (127.0.0.1) while faults hit it; prints a JSON summary.

Used by tests/test_faults.py in a subprocess, because it needs a Ray cluster of its own. Topology: a head
node with no CPUs (the driver only) and worker node A; after ``--kill-after`` tiles the model actor's
process is killed with SIGKILL, after ``--remove-after`` tiles node A (with the restarted actor, the read
and write tasks and their objects) is removed and worker node B joins.

    python tests/fault_cluster.py SLIDE OUT.zarr MODEL.pt --kill-after 10 --remove-after 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import tile_states_written  # noqa: E402


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent_pid(pid)
    return False


def model_actor_pids() -> list[int]:
    """Processes of the model actors (``ray::ShardActor``) in this cluster only.

    Only descendants of this process (the cluster's raylets started them): a Ray job of someone else on the same
    machine may have such actors too, and killing those is not this test's business.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="ignore")
                if title.startswith("ray::") and "ShardActor" in title and descends_from(int(entry), os.getpid()):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def inject(cluster, node_a, store: Path, kill_after: int, remove_after: int, log: dict) -> None:
    while tile_states_written(store) < kill_after:
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while not (pids := model_actor_pids()) and time.monotonic() < deadline:  # between two actor incarnations
        time.sleep(0.05)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    log["killed_actor_pids"], log["killed_at_tiles"] = pids, tile_states_written(store)
    while tile_states_written(store) < remove_after:
        time.sleep(0.05)
    # Remove first, then add: starting a node takes seconds, in which a fast run could finish unharmed.
    cluster.remove_node(node_a, allow_graceful=False)
    log["removed_node_at_tiles"] = tile_states_written(store)
    cluster.add_node(num_cpus=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("slide")
    parser.add_argument("out")
    parser.add_argument("model")
    parser.add_argument("--kill-after", type=int, default=10)
    parser.add_argument("--remove-after", type=int, default=30)
    args = parser.parse_args()

    from pipeline.inference.ray_setup import loopback_only

    loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.inference.engine import plan_slide
    from pipeline.inference.scheduler import segment_slides_ray
    from unet import load_model

    env = {"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    node_a = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    model = load_model(args.model)
    plan = plan_slide(args.slide, args.out, model, tile_size=256, shard_tiles=2)
    log: dict = {"tiles": plan.tiles_to_run}
    results: list = []
    run = threading.Thread(  # the run in a thread: adding and removing nodes must happen on the main thread
        target=lambda: results.extend(segment_slides_ray([plan], model, actors=1, batch_size=2, progress=False)),
        daemon=True,
    )
    run.start()
    inject(cluster, node_a, Path(args.out), args.kill_after, args.remove_after, log)
    run.join()
    (result,) = results
    log.update(status=result.status, tiles_run=result.tiles_run)
    print("RESULT " + json.dumps(log), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
