"""The project's local Ray listens on loopback only, and every way of asking for a local Ray gets that one.

A local start (``init_ray()`` with no address, ``address="local"`` or ``RAY_ADDRESS=local``) must keep every
listening TCP socket of every Ray process (GCS, raylet, dashboard and its agents, workers, the driver's core
worker) on 127.0.0.1 / ::1: without ``loopback_only()`` Ray binds them to 0.0.0.0 / :: and advertises the
machine's LAN address. The sockets are read from /proc (no psutil): the listening entries of /proc/net/tcp{,6}
matched, by inode, to the socket descriptors of this process and its descendants (Ray's processes are all
children of the driver that started them, or of its raylet), so another Ray on the machine is never looked at.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

from pipeline.inference import ray_setup

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc/<pid>/stat's parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening_sockets() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN:
                address, port = fields[1].split(":")
                found[fields[9]] = (str(_address(address)), int(port, 16))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, how Ray's gRPC servers show up
    return ip.is_loopback


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:90]
    except OSError:
        return "?"


def listening_sockets_of(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process, address, port) for each listening TCP socket the processes hold."""
    tables, found = listening_sockets(), []
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in tables:
                found.append((pid, process_name(pid), *tables[target[8:-1]]))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_listening_socket_of_the_local_ray_is_on_loopback(ray_local):
    ray = ray_local

    @ray.remote
    def worker_pid() -> int:
        return os.getpid()

    @ray.remote
    class Probe:  # an actor: a worker process of its own, with its own gRPC server
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    workers = {ray.get(worker_pid.remote(), timeout=60), ray.get(probe.pid.remote(), timeout=60)}
    try:
        pids = descendants(os.getpid())
        names = " ".join(process_name(pid) for pid in pids)
        assert "gcs_server" in names and "raylet" in names, f"Ray's processes not found below the driver: {names}"
        assert workers <= set(pids), f"worker processes {workers} not found below the driver"
        sockets = listening_sockets_of(pids)
        owners = {pid for pid, *_ in sockets}
        assert os.getpid() in owners and workers <= owners, f"no driver's or workers' gRPC servers in {sockets}"
        assert len(sockets) >= 5, f"too few listening sockets found to mean anything: {sockets}"
        exposed = [s for s in sockets if not is_loopback(s[2])]
        assert not exposed, "Ray sockets reachable from the network:\n" + "\n".join(
            f"  pid {pid} {name!r}: {address} port {port}" for pid, name, address, port in exposed
        )
    finally:
        ray.kill(probe)


def test_proc_addresses_and_loopback_are_read_right():
    ip = ipaddress.ip_address
    assert _address("0100007F") == ip("127.0.0.1") and _address("00000000") == ip("0.0.0.0")
    assert _address("0000000000000000FFFF00000100007F") == ip("::ffff:127.0.0.1")
    assert _address("00000000000000000000000001000000") == ip("::1")
    assert _address("020200C0") == ip("192.0.2.2")
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "::ffff:0.0.0.0", "192.0.2.2", "fd00::2"]))


# --------------------------------------------------------------------------- which addresses start a local Ray
class FakeRay:
    """Stands in for the ``ray`` module inside ``init_ray``: records ``ray.init`` and never starts anything."""

    def __init__(self):
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture
def fake_ray(monkeypatch):
    """``init_ray`` with ``ray.init`` recorded, in a process where loopback mode is off (as in a fresh one);
    the environment and Ray's flag are restored afterwards (the session's real Ray keeps its settings)."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    fake = FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ray_setup.LOOPBACK_ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    fake.constants = ray_constants
    return fake


def assert_loopback_start(fake: FakeRay) -> None:
    (call,) = fake.calls
    assert call["address"] == "local" and call["_node_ip_address"] == "127.0.0.1", call
    assert all(os.environ[name] == value for name, value in ray_setup.LOOPBACK_ENV.items())
    assert fake.constants.ENABLE_RAY_CLUSTER is False


@pytest.mark.parametrize("address", [None, "", "local", "LOCAL", " local "])
def test_no_address_or_local_starts_the_loopback_instance(fake_ray, address):
    ray_setup.init_ray(address=address, num_cpus=1)
    assert_loopback_start(fake_ray)


def test_ray_address_local_starts_the_loopback_instance(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray_setup.init_ray(num_cpus=1)
    assert_loopback_start(fake_ray)


def test_include_dashboard_binds_it_to_loopback(fake_ray):
    ray_setup.init_ray(address="local", include_dashboard=True)
    assert_loopback_start(fake_ray)
    assert fake_ray.calls[0]["dashboard_host"] == "127.0.0.1" and fake_ray.calls[0]["include_dashboard"] is True


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "ray://head:10001"])
def test_other_addresses_join_that_cluster(fake_ray, monkeypatch, address):
    ray_setup.init_ray(address=address)
    monkeypatch.setenv("RAY_ADDRESS", address)
    ray_setup.init_ray()
    assert [call["address"] for call in fake_ray.calls] == [address, address]
    assert all("_node_ip_address" not in call for call in fake_ray.calls)
    assert fake_ray.constants.ENABLE_RAY_CLUSTER is True  # joining changes nothing in this process
