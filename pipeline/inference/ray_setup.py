"""Starting or joining Ray the same way everywhere (CLI jobs, tests, notebooks).

Joining: ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job) connects to that cluster
(``"auto"`` joins a Ray already running on this machine). Otherwise, and for the address ``"local"`` (which
is Ray's own word for "start a new instance"), a new local instance is started on loopback only. Two Ray
behaviours matter here:
``ray.init()`` with no address silently attaches to any Ray already running on the machine (so we pass
``address="local"``), and Ray replaces 127.0.0.1 by the machine's "remotely reachable" IP unless
single-machine mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which keeps every port on loopback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCAL = "local"  # the address that makes ray.init start a new instance instead of joining one


def loopback_only() -> None:
    """Keep a local Ray instance (and its workers, which inherit the environment) on 127.0.0.1."""
    os.environ.update(LOOPBACK_ENV)
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray._private.services
    except ImportError:  # pragma: no cover - layout of a future Ray
        logger.debug("ray_constants not found; relying on the environment variable")


def starts_local(address: str | None) -> bool:
    """Whether ``address`` means "start a new local instance" (none, or ``"local"``) rather than "join one"."""
    return not address or address.strip().lower() in ("", LOCAL)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_ray(
    address: str | None = None, num_cpus: int | None = None, repo_root: str | Path | None = None, **kwargs: Any
):
    """Join ``address`` / ``$RAY_ADDRESS`` if given, else start a private local instance on 127.0.0.1.

    ``"local"`` (as ``--address local`` or ``RAY_ADDRESS=local``) also starts the private loopback instance:
    passed to ``ray.init`` as it is, Ray would start one on the machine's network address instead.

    ``include_dashboard=True`` starts the dashboard on loopback (Ray Train's cleanup polls its state API).

    ``repo_root`` goes on the workers' PYTHONPATH unless the job already ships a working_dir
    (``ray job submit --working-dir .``), so workers import the same ``pipeline`` and ``unet``.
    """
    import ray

    if ray.is_initialized():
        return ray
    kwargs.setdefault("log_to_driver", False)
    # Ray's own start-up lines (the token-auth notice, "Started a local Ray instance") only with WSI_VERBOSE=1
    # (the job's --verbose); its errors always
    kwargs.setdefault("logging_level", logging.INFO if os.environ.get("WSI_VERBOSE") == "1" else logging.ERROR)
    if repo_root is not None and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ and "runtime_env" not in kwargs:
        paths = [str(repo_root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
    address = address or os.environ.get("RAY_ADDRESS") or None
    dashboard = kwargs.pop("include_dashboard", False)  # only for a local start; bound to loopback
    if not starts_local(address):
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        return ray
    loopback_only()
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
        kwargs["dashboard_port"] = kwargs.get("dashboard_port") or free_port()
        # Ray's state API finds "the" local Ray by its processes and fails when another instance runs on the
        # machine (Ray Train's placement-group cleaner then dies with a traceback); this names ours, to this
        # process and to the workers, which inherit its environment
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=dashboard, **kwargs)
    return ray
